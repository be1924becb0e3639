"""Words: state messages, artifact keys, the shard table and summary markdown, resume commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fineweb_modal.costs import format_usd
from fineweb_modal.report import StageReport, artifact_key, shard_table, stage_markdown, state_message, text_histogram
from fineweb_modal.shards import ShardResult


def test_overhead_is_shown_and_summed_beside_the_work():
    results = [
        ShardResult(stage="embed", shard=s, status="done", where="modal", tokens=100, seconds=10.0, overhead_seconds=o, cost_usd=0.01)
        for s, o in (("a", 60.0), ("b", 1.5))
    ]
    report = StageReport(stage="embed", name="d", backend="modal", results=results)
    assert report.totals()["overhead_seconds"] == 61.5 and report.totals()["tokens_per_second"] == 10.0  # work seconds only
    assert [row["overhead s"] for row in shard_table(report)] == [60.0, 1.5]
    assert "61.5 s of the containers' time outside shard work" in stage_markdown(report, "cmd")
    assert "outside shard work" not in stage_markdown(StageReport(stage="embed", name="d", backend="local", results=[results[0].model_copy(update={"overhead_seconds": 0.0})]), "cmd")


def test_state_message_shows_tokens_and_dollars():
    local = ShardResult(stage="chunk", shard="s", status="done", tokens=1234567, modal_estimate_usd=0.0123)
    assert state_message(local) == "1 234 567 tokens, $0 local (≈$0.0123 on Modal)"
    remote = local.model_copy(update={"where": "modal", "cost_usd": 0.012})
    assert state_message(remote) == "1 234 567 tokens, $0.012"
    assert state_message(local.model_copy(update={"status": "skipped"})).startswith("skipped: done earlier")
    assert format_usd(2.5) == "$2.50" and format_usd(0) == "$0"


def test_artifact_keys_are_valid_slugs():
    key = artifact_key("chunk", "FineWeb_Edu.sample 10BT", "shards")
    assert re.fullmatch(r"[a-z0-9-]*", key) and key == "chunk-fineweb-edu-sample-10bt-shards"


def test_table_and_markdown_list_failures_and_resume():
    report = StageReport(
        stage="chunk",
        name="d",
        backend="local",
        results=[ShardResult(stage="chunk", shard="a", status="done", tokens=100, seconds=2.0, chunks=3)],
        failed={"b": "BadDataError: b.arrow is truncated"},
    )
    rows = shard_table(report)
    assert [(r["shard"], r["status"]) for r in rows] == [("a", "done"), ("b", "failed")]
    assert rows[0]["tokens/s"] == 50 and "truncated" in rows[1]["error"]
    markdown = stage_markdown(report, "fineweb-modal run --stages chunk")
    assert "1 of 2 shards succeeded" in markdown and "`b`: BadDataError" in markdown and "fineweb-modal run --stages chunk" in markdown


def test_what_failed_attempts_were_billed_rides_on_the_error_and_counts_in_the_stages_cost():
    import pickle

    from fineweb_modal.costs import billed_on, mark_billed
    from fineweb_modal.errors import BadDataError

    error = BadDataError("b.arrow is truncated")
    mark_billed(error, 0.25, "900 s of an H100 container")
    crossed = pickle.loads(pickle.dumps(error))  # as it comes back from a Modal container or a worker process
    assert billed_on(crossed) == 0.25 and crossed.__notes__ == ["this attempt was billed $0.25 (900 s of an H100 container)"]
    assert billed_on(ValueError("not marked")) is None

    done = ShardResult(stage="embed", shard="a", status="done", where="modal", tokens=100, seconds=2.0, cost_usd=0.5, extra={"failed_attempts_usd": 0.25})
    assert state_message(done) == "100 tokens, $0.5 (+$0.25 billed for failed attempts)"
    report = StageReport(stage="embed", name="d", backend="modal", results=[done], failed={"b": "BadDataError: truncated"}, failed_attempts_usd={"a": 0.25, "b": 1.0})
    assert report.totals()["cost_usd"] == pytest.approx(1.75) and report.totals()["failed_attempts_usd"] == pytest.approx(1.25)
    assert [row["failed attempts $"] for row in shard_table(report)] == [0.25, 1.0]
    assert "includes $1.25 billed for the failed attempts of 2 shard(s)" in stage_markdown(report, "cmd")


def test_text_histogram_scales_bars():
    lines = text_histogram([0, 10, 50], [5, 10], width=10).splitlines()
    assert lines[1].count("█") == 10 and lines[0].count("█") == 5


def test_printed_commands_name_this_install_s_cli_where_path_would_miss_it(tmp_path, monkeypatch):
    """With the venv not activated, `fineweb-modal` would be not found, or another install's: its full path is printed."""
    import sys

    from fineweb_modal.config import build_run_config
    from fineweb_modal.report import cli_program, resume_command

    installed = Path(sys.prefix) / "bin" / "fineweb-modal"
    other = tmp_path / "other-bin"
    other.mkdir()
    (other / "fineweb-modal").write_text("#!/bin/sh\n")
    (other / "fineweb-modal").chmod(0o755)
    run = build_run_config(name="demo", data_dir=str(tmp_path), stages="chunk")
    for path, expected in ((str(installed.parent), "fineweb-modal"), (str(other), str(installed)), ("/nonexistent", str(installed))):
        monkeypatch.setenv("PATH", path)
        assert cli_program() == expected, path
        assert resume_command(run, "chunk").startswith(f"{expected} run --name demo ")


def test_the_resume_command_rebuilds_the_same_run(tmp_path):
    """Parsed back by the CLI, the printed command gives the run's own config: every non-default embed option carried."""
    import shlex

    from fineweb_modal.config import build_run_config
    from fineweb_modal.report import resume_command
    from flows.cli import _parser, _run_kwargs

    run = build_run_config(
        name="demo", data_dir=str(tmp_path), stages="chunk,embed", prefix="search_document: ", dimensions=128, embedding_dtype="float16", compile="on",
        shards="data-00001-of-00099,7", max_cost=2.5,
    )  # fmt: skip
    tei_run = build_run_config(name="demo", data_dir=str(tmp_path), stages="embed", engine="tei", tei_url="http://127.0.0.1:8080", tei_served_model="/my repo")
    odd_run = build_run_config(name="demo", data_dir=str(tmp_path / "my data"), stages="chunk,embed", prefix="it's: ", keep_columns="url,my col")
    for one in (run, tei_run, odd_run):
        command = resume_command(one, "chunk" if one is odd_run else "embed")
        args = _parser().parse_args(shlex.split(command)[1:])
        again = build_run_config(**_run_kwargs(args))
        assert again.embed == one.embed and again.chunk == one.chunk and again.dataset == one.dataset
        assert again.shards == one.shards and again.max_cost == one.max_cost, "a budget and a selection are kept, not widened"


def test_a_resume_names_the_shards_an_index_chose_at_the_first_stage(tmp_path):
    """`--shards 2,3` meant the source's third and fourth files; embed's listing is shorter: the command names them."""
    from fineweb_modal.config import build_run_config
    from fineweb_modal.report import pipeline_resume

    run = build_run_config(name="demo", data_dir=str(tmp_path), stages="chunk,embed,summarize", shards="2,3", max_cost=1.0)
    done = ShardResult(stage="embed", shard="c", status="done")
    reports = {"embed": StageReport(stage="embed", name="demo", backend="modal", results=[done], not_started=["d"])}
    _, command = pipeline_resume(run, reports)
    assert "--stages embed,summarize" in command and "--shards c,d" in command and "--max-cost 1" in command
    everything = build_run_config(name="demo", data_dir=str(tmp_path), stages="chunk,embed,summarize")
    assert "--shards" not in pipeline_resume(everything, reports)[1], "a run over every shard resumes over every shard"

