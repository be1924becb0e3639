"""--max-cost: no shard starts past the budget; what runs finishes; exit code 3 and the resume command.

Local runs cost $0, so this uses a test double of the Modal backend: the local backend, pricing every shard
as a Modal container would be billed (`where="modal"`).
"""

from __future__ import annotations

import pytest

from fineweb_modal.shards import ShardJob, ShardResult, run_shard
from tasks import backends


class LocalPricedAsModal(backends.LocalBackend):
    """Runs here, bills like Modal: a stand-in for the modal backend in tests."""

    name = "modal"

    def run(self, job: ShardJob) -> ShardResult:
        return run_shard(job.model_copy(update={"where": "modal"}))


@pytest.fixture
def priced_backend(monkeypatch):
    double = LocalPricedAsModal()
    monkeypatch.setitem(backends._backends, "modal", double)
    monkeypatch.setattr(backends, "modal_token_configured", lambda: True)
    yield double
    double.close()


def test_the_budget_stops_new_shards_and_exits_3(prefect_api, priced_backend, demo_source, tmp_path, monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    argv = ["run", "--source", str(demo_source), "--data-dir", str(tmp_path / "data"), "--max-tokens", "64", "--backend", "modal"]
    assert main([*argv, "--stages", "download", "--max-cost", "0.000000001"]) == 3
    captured = capsys.readouterr()
    assert "max cost $0.00 reached" in captured.err and "fineweb-modal run" in captured.err
    assert f"Resume with a higher --max-cost (done shards are skipped):\n  fineweb-modal run --source {demo_source}" in captured.err
    assert "download   2 ok (0 skipped), 0 failed" in captured.out, "two shards probe the cost, the third never starts"

    assert main([*argv, "--stages", "download"]) == 0, "without the limit the rest resumes"
    out = capsys.readouterr().out
    assert "download   3 ok (2 skipped), 0 failed" in out
