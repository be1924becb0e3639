"""--max-cost: no shard starts past the budget; what runs finishes; exit code 3 and the resume command.

Local runs cost $0, so this uses a test double of the Modal backend: the local backend, pricing every shard
as a Modal container would be billed (`where="modal"`).
"""

from __future__ import annotations

import re

import pytest

from fineweb_modal.shards import ShardJob, ShardResult, run_shard
from tasks import backends


class LocalPricedAsModal(backends.LocalBackend):
    """Runs here, bills like Modal: a stand-in for the modal backend in tests."""

    name = "modal"

    def run(self, job: ShardJob) -> ShardResult:
        return run_shard(job.model_copy(update={"where": "modal"}))

    def check_deployment(self, tei_model: str | None = None) -> None:
        """Its "deployment" is this checkout, serving any model: nothing to refuse."""


@pytest.fixture
def priced_backend(monkeypatch):
    double = LocalPricedAsModal()
    monkeypatch.setitem(backends._backends, "modal", double)
    monkeypatch.setattr(backends, "modal_token_configured", lambda: True)
    yield double
    double.close()


def test_the_budget_stops_new_shards_and_exits_3(prefect_api, priced_backend, demo_source, tmp_path, monkeypatch, capsys):
    from fineweb_modal.report import cli_program
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    argv = ["run", "--source", str(demo_source), "--data-dir", str(tmp_path / "data"), "--max-tokens", "64", "--backend", "modal"]
    assert main([*argv, "--stages", "download", "--max-cost", "0.000000001"]) == 3
    captured = capsys.readouterr()
    assert "max cost $0.00 reached" in captured.err and "fineweb-modal run" in captured.err
    assert f"Resume with a higher --max-cost (raise the one below; done shards are skipped):\n  {cli_program()} run --source {demo_source}" in captured.err
    assert "--max-cost 1e-09" in captured.err.split("Resume with")[1], "the printed command keeps the budget: pasted, it is not unlimited"
    assert "download   2 ok (0 skipped), 0 failed" in captured.out, "two shards probe the cost, the third never starts"
    assert re.search(r"download   2 ok .* s · \$\S+ · ", captured.out), "and what they cost"

    assert main([*argv, "--stages", "download"]) == 0, "without the limit the rest resumes"
    out = capsys.readouterr().out
    assert "download   3 ok (2 skipped), 0 failed" in out


class FixedPrice(LocalPricedAsModal):
    """Every shard that works costs exactly PRICE: a budget can fall between whole shards."""

    PRICE = 1.0

    def run(self, job: ShardJob) -> ShardResult:
        result = super().run(job)
        return result.model_copy(update={"cost_usd": self.PRICE}) if result.status == "done" else result


@pytest.mark.parametrize(("budget", "done"), [(0.0, 0), (2.5, 2), (3.5, 3)])
def test_a_shard_starts_only_while_spent_plus_in_flight_plus_its_own_fits(prefect_api, demo_source, run_config_for, monkeypatch, budget, done):
    """Two probe shards cost 2; a third would make 3: it starts under a budget of 3.5, not under 2.5; none under a budget spent already."""
    from flows.download import download
    from flows.outcome import outcome

    double = FixedPrice()
    monkeypatch.setitem(backends._backends, "modal", double)
    monkeypatch.setattr(backends, "modal_token_configured", lambda: True)
    try:
        run = run_config_for(demo_source)
        state = download(source=str(demo_source), data_dir=str(run.dataset.data_dir), backend="modal", max_cost=budget, return_state=True)
        report = outcome(state)
    finally:
        double.close()
    assert len([r for r in report.results if r.status == "done"]) == done
    assert len(report.not_started) == 3 - done


def test_a_spent_budget_still_lets_done_shards_through_as_skipped(prefect_api, priced_backend, demo_source, run_config_for):
    """A resumed run whose earlier stage used the budget up: what is done already costs nothing and is not 'not started'."""
    from flows.download import download
    from flows.outcome import outcome

    data_dir = str(run_config_for(demo_source).dataset.data_dir)
    assert download(source=str(demo_source), data_dir=data_dir, backend="modal", shards="0,1", return_state=True).is_completed()
    report = outcome(download(source=str(demo_source), data_dir=data_dir, backend="modal", max_cost=0.0, return_state=True))
    assert sorted((r.shard, r.status) for r in report.results) == [("data-00000-of-00003", "skipped"), ("data-00001-of-00003", "skipped")]
    assert report.not_started == ["data-00002-of-00003"]


class FailsBilled(LocalPricedAsModal):
    """Every shard fails for its data after its container was billed PRICE (as the Modal container reports it)."""

    PRICE = 1.0

    def run(self, job: ShardJob) -> ShardResult:
        from fineweb_modal.costs import mark_billed
        from fineweb_modal.errors import BadDataError

        error = BadDataError(f"{job.shard}: unreadable")
        mark_billed(error, self.PRICE, "test")
        raise error


def test_failed_attempts_count_toward_the_budget(prefect_api, demo_source, run_config_for, monkeypatch):
    """Two probe shards fail after $1 each: with $1.50 allowed, the third never starts, and the report shows the $2."""
    from flows.download import download
    from flows.outcome import outcome

    double = FailsBilled()
    monkeypatch.setitem(backends._backends, "modal", double)
    monkeypatch.setattr(backends, "modal_token_configured", lambda: True)
    try:
        run = run_config_for(demo_source)
        report = outcome(download(source=str(demo_source), data_dir=str(run.dataset.data_dir), backend="modal", max_cost=1.5, return_state=True))
    finally:
        double.close()
    assert len(report.failed) == 2 and len(report.not_started) == 1
    assert report.totals()["cost_usd"] == pytest.approx(2.0) and sorted(report.failed_attempts_usd.values()) == [1.0, 1.0]


class OneCheapFailure(LocalPricedAsModal):
    """The first shard fails at once, billed a hundred-thousandth of a dollar; every other one costs $1, a little later."""

    def run(self, job: ShardJob) -> ShardResult:
        import time

        from fineweb_modal.costs import mark_billed
        from fineweb_modal.errors import BadDataError

        if job.shard.startswith("data-00000-"):
            error = BadDataError(f"{job.shard}: unreadable")
            mark_billed(error, 1e-5, "test")
            raise error
        time.sleep(0.3)
        return super().run(job).model_copy(update={"cost_usd": 1.0})


def test_a_cheap_failure_is_no_sample_of_what_a_shard_costs(prefect_api, tmp_path, monkeypatch):
    """Counted as spent, it must not make the estimate ~$0 and let every shard start at once."""
    from fineweb_modal.demo import write_demo_source
    from flows.download import download
    from flows.outcome import outcome

    source = write_demo_source(tmp_path / "source" / "many", n_docs=40, n_shards=8)
    double = OneCheapFailure()
    monkeypatch.setitem(backends._backends, "modal", double)
    monkeypatch.setattr(backends, "modal_token_configured", lambda: True)
    try:
        report = outcome(download(source=str(source), data_dir=str(tmp_path / "data"), backend="modal", max_cost=2.5, return_state=True))
    finally:
        double.close()
    assert len(report.failed) == 1 and len([r for r in report.results if r.status == "done"]) == 2 and len(report.not_started) == 5
    assert report.totals()["cost_usd"] == pytest.approx(2.00001)
