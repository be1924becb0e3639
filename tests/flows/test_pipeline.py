"""End to end through Prefect: one named task run per shard per stage, artifacts, skip on rerun, failures isolated."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import layout_for
from tests.flows.helpers import child_flow_run_ids, latest_artifact, task_run_logs, task_runs_of

STAGES = ("download", "chunk", "embed", "summarize")


@pytest.fixture
def pipeline_flow(prefect_api):
    from flows.pipeline import pipeline

    return pipeline


def run_pipeline(pipeline_flow, source, data_dir, **extra):
    state = pipeline_flow(source=str(source), data_dir=str(data_dir), max_tokens=64, return_state=True, **extra)
    from flows.outcome import outcome

    return state, outcome(state)


def test_pipeline_end_to_end_then_skip_on_rerun(pipeline_flow, demo_source, tmp_path, run_config_for):
    data_dir = tmp_path / "data"
    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir)
    assert state.is_completed(), state.message
    shards = [p.stem for p in sorted(demo_source.glob("*.parquet"))]
    assert all(reports[s].succeeded == shards for s in STAGES)

    run = run_config_for(demo_source)
    layout, ledger = layout_for(run), Ledger(layout_for(run))
    for shard in shards:
        chunks = pq.read_table(layout.output_path("chunk", shard))
        embeddings = pq.read_table(layout.output_path("embed", shard))
        assert embeddings.column("doc_index").equals(chunks.column("doc_index"))
        assert embeddings.column("chunk_index").equals(chunks.column("chunk_index"))
        for stage in STAGES:
            record = ledger.read(stage, shard)
            assert record.status == "done" and record.rows_out >= 1
    summary = json.loads((layout.summary_dir() / "train.json").read_text())
    assert summary["totals"]["rows"] == 36 and summary["totals"]["chunks"] == reports["chunk"].totals()["chunks"]

    # One named task run per shard per stage, each with its token count in the state message.
    stage_runs = child_flow_run_ids(state.state_details.flow_run_id)
    runs = task_runs_of(stage_runs, expected=len(STAGES) * len(shards))
    names = sorted(r.name for r in runs)
    assert names == sorted(f"{stage}-{shard}" for stage in STAGES for shard in shards)
    assert all({f"stage:{r.name.split('-')[0]}", "dataset:demo", "backend:local"} <= set(r.tags) for r in runs), "filterable, and tag concurrency limits apply"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_runs = [client.read_flow_run(i) for i in [state.state_details.flow_run_id, *stage_runs]]
    assert {r.name for r in flow_runs} == {"demo-local"} and all({"dataset:demo", "backend:local"} <= set(r.tags) for r in flow_runs[1:])
    chunk_runs = [r for r in runs if r.name.startswith("chunk-")]
    assert all(r.state.is_completed() and "tokens" in r.state.message and "$" in r.state.message for r in chunk_runs)

    table = latest_artifact("chunk-demo-shards")
    rows = json.loads(table.data)
    assert [r["shard"] for r in rows] == shards and all(r["tokens"] > 0 and r["status"] == "done" for r in rows)
    assert "modal estimate $" in rows[0]
    assert float(latest_artifact("embed-demo-progress").data) == 100.0
    markdown = latest_artifact("summarize-demo-summary").data
    assert "3 of 3 shards succeeded" in markdown and "histogram" in markdown
    assert markdown.count("](data:image/png;base64,") == 2, "both pictures inlined (they render in the UI)"

    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir)
    assert state.is_completed()
    assert all(r.status == "skipped" for s in STAGES for r in reports[s].results)
    rerun_runs = task_runs_of(child_flow_run_ids(state.state_details.flow_run_id), expected=len(STAGES) * len(shards))
    assert all(r.state.message.startswith("skipped: done earlier") for r in rerun_runs)


def test_a_corrupt_shard_fails_alone_and_a_rerun_runs_only_it(pipeline_flow, demo_source, tmp_path):
    data_dir = tmp_path / "data"
    good = demo_source / "data-00001-of-00003.parquet"
    backup = tmp_path / "backup.parquet"
    shutil.copy(good, backup)
    good.write_bytes(good.read_bytes()[:200])  # truncated

    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir)
    assert state.is_failed() and "data-00001-of-00003" in state.message
    assert list(reports["download"].failed) == ["data-00001-of-00003"]
    assert "data-00001-of-00003.parquet" in reports["download"].failed["data-00001-of-00003"]
    assert reports["embed"].succeeded == ["data-00000-of-00003", "data-00002-of-00003"]
    markdown = latest_artifact("download-demo-summary").data
    assert "data-00001-of-00003" in markdown and "fineweb-modal run" in markdown
    # The pipeline run's own summary resumes the whole run: the failed stage and every one after it.
    pipeline_summary = latest_artifact("pipeline-demo-summary").data
    assert pipeline_summary.startswith("# pipeline · demo: not finished") and "| download | 2 | 0 | 1 | 0 | 0 | $0 |" in pipeline_summary
    assert "--stages download,chunk,embed,summarize" in pipeline_summary
    dataset_now = pipeline_summary.split("## The dataset now")[1]
    assert "3 shard(s)." in dataset_now and "| download | 2 | 1 | 0 | 0 |" in dataset_now and "| embed | 2 | 0 | 1 | 0 |" in dataset_now

    from fineweb_modal.status import ledger_status

    download_status = next(s for s in ledger_status(data_dir, "demo") if s.stage == "download")
    assert list(download_status.failed) == ["data-00001-of-00003"] and len(download_status.done) == 2
    record = json.loads(next(data_dir.rglob("_ledger/download/*/data-00001-of-00003.json")).read_text())
    assert record["attempts"] == 1 and record["error_type"] == "UnreadableFileError", "bad data is not retried"
    downstream = {s.stage: s.missing for s in ledger_status(data_dir, "demo") if s.stage != "download"}
    assert downstream == {"chunk": ["data-00001-of-00003"], "embed": ["data-00001-of-00003"], "summarize": ["data-00001-of-00003"]}, "its later stages lack it too"
    from flows.cli import main

    assert main(["run", "--source", str(demo_source), "--data-dir", str(data_dir), "--max-tokens", "64", "--only", "failed"]) == 1, "still corrupt"

    shutil.copy(backup, good)
    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir, only="failed")
    assert state.is_completed(), state.message
    for stage in STAGES:
        assert {r.shard: r.status for r in reports[stage].results} == {"data-00001-of-00003": "done"}, "only the failed shard ran"
    pipeline_summary = latest_artifact("pipeline-demo-summary").data
    assert pipeline_summary.startswith("# pipeline · demo: finished"), "a later run that finishes replaces the not-finished summary"
    assert "| embed | 1 | 0 | 0 | 0 |" in pipeline_summary and "| embed | 3 | 0 | 0 | 0 |" in pipeline_summary.split("## The dataset now")[1]
    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir, only="failed")
    assert state.is_completed() and state.message == "no failed shards: nothing to rerun"
    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir)
    assert all(r.status == "skipped" for stage in STAGES for r in reports[stage].results)
    assert all(not s.failed and not s.missing for s in ledger_status(data_dir, "demo"))


def _damage_text(path) -> None:
    """Rewrite an Arrow shard with the same rows, one text no longer UTF-8 (a copy damaged on disk since its download)."""
    import pyarrow as pa

    from fineweb_modal.storage import open_arrow_batches

    schema, batches = open_arrow_batches(path)
    table = pa.Table.from_batches(list(batches), schema).combine_chunks()
    texts = table.column("text").chunk(0)
    offsets, data = texts.buffers()[1], bytearray(texts.buffers()[2].to_pybytes())
    data[0] = 0xFF
    damaged = pa.Array.from_buffers(pa.string(), len(texts), [None, offsets, pa.py_buffer(bytes(data))])
    table = table.set_column(table.schema.get_field_index("text"), "text", damaged)
    damaged_path = path.with_suffix(".damaged")  # not over the memory-mapped file being read
    with pa.OSFile(str(damaged_path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    damaged_path.replace(path)


def test_a_download_copy_damaged_since_is_made_again_by_only_failed(pipeline_flow, demo_source, tmp_path):
    """Its done record still matches its row count: chunk finds the damage, marks the download failed, and `only=failed` redoes both."""
    data_dir, shard = tmp_path / "data", "data-00001-of-00003"
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download"])
    assert state.is_completed(), state.message
    copy = next(data_dir.rglob(f"{shard}.arrow"))
    _damage_text(copy)

    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download", "chunk"])
    assert state.is_failed() and list(reports["chunk"].failed) == [shard]
    assert "its download is marked failed" in reports["chunk"].failed[shard]
    from fineweb_modal.status import ledger_status

    assert {s.stage: list(s.failed) for s in ledger_status(data_dir, "demo")} == {"download": [shard], "chunk": [shard]}

    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download", "chunk"], only="failed")
    assert state.is_completed(), state.message
    assert {r.shard: r.status for r in reports["download"].results} == {shard: "done"} == {r.shard: r.status for r in reports["chunk"].results}


def test_only_failed_finds_a_failed_shard_whose_input_was_deleted_since(pipeline_flow, demo_source, tmp_path, run_config_for):
    data_dir, shard = tmp_path / "data", "data-00002-of-00003"
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download"])
    run = run_config_for(demo_source, stages=["download", "chunk"])
    Ledger(layout_for(run)).write_failed("chunk", shard, "f" * 16, RuntimeError("a chunk failure"), 3)
    layout_for(run).output_path("download", shard).unlink()  # "fix" it by deleting the copy

    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["chunk"], only="failed")
    assert state.is_failed() and f"{shard} have no chunk input any more" in state.message and "(download)" in state.message
    from flows.cli import main

    assert main(["run", "--source", str(demo_source), "--data-dir", str(data_dir), "--max-tokens", "64", "--stages", "chunk", "--only", "failed"]) == 2, "refused: a config matter"
    state, reports = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download", "chunk"], only="failed")
    assert state.is_completed(), state.message
    assert [r.shard for r in reports["download"].results] == [shard] == [r.shard for r in reports["chunk"].results]

    gone = demo_source / "data-00003-of-00003.jsonl"
    gone.write_text('{"text": "fine"}\n{"text": broken')
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download", "chunk"])
    assert state.is_failed()
    gone.unlink()  # "fixed" by taking the file out of the source
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download", "chunk"], only="failed")
    assert state.is_failed() and "failed shard(s) data-00003-of-00003 are no longer in the source" in state.message
    assert str(layout_for(run).ledger_dir("download")) in state.message, "and where the record to delete is"


def test_bad_config_fails_before_any_stage(pipeline_flow, demo_source, tmp_path):
    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", overlap=0.9)
    assert state.is_failed() and "overlap=0.9" in state.message
    assert not (tmp_path / "data").exists()


def test_a_dead_tei_is_refused_up_front_over_shards_embedded_with_another_engine(pipeline_flow, demo_source, tmp_path, run_config_for):
    """Shards done with the in-process engine are not done for TEI: the run asks TEI first, and fails in seconds, not per shard."""
    from fineweb_modal.shards import shard_status

    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", stages=["download", "chunk", "embed"])
    assert state.is_completed(), state.message
    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", stages=["download", "chunk", "embed"], engine="tei", tei_url="http://127.0.0.1:9")
    assert state.is_failed() and "is TEI running at --tei-url?" in state.message and "failed shards" not in state.message
    run = run_config_for(demo_source)
    assert all(shard_status(run, "embed", f"data-0000{i}-of-00003") == "done" for i in range(3)), "no shard was touched"


def test_the_modal_backend_without_a_token_is_refused_once_not_per_shard(pipeline_flow, demo_source, tmp_path, monkeypatch):
    """As a deployment runs it (no CLI in front): one clear refusal, no shard task started."""
    from tasks import backends

    monkeypatch.setattr(backends, "modal_token_configured", lambda: False)
    monkeypatch.delitem(backends._backends, "modal", raising=False)
    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", backend="modal")
    assert state.is_failed() and "needs a Modal token" in state.message and "failed shards" not in state.message
    assert not list((tmp_path / "data").rglob("*.arrow")) and not list((tmp_path / "data").rglob("_ledger/*/*/*.json"))


def test_missing_kept_column_is_a_config_error_before_chunking(pipeline_flow, demo_source, tmp_path):
    state, reports = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", keep_columns=["url", "nope"])
    assert state.is_failed() and "['nope'] not found" in state.message
    assert not (tmp_path / "data" / "demo-chunked-64").exists()


def test_tei_engine_through_the_flows_matches_the_in_process_engine(pipeline_flow, demo_source, tmp_path):
    import numpy as np

    from tests.tei_double import TEITestDouble

    double = TEITestDouble(max_client_batch_size=8, served_model_id="/repository").start()  # as on Inference Endpoints
    try:
        tei_dir, local_dir = tmp_path / "tei", tmp_path / "local"
        stages = ["download", "chunk", "embed"]
        state, reports = run_pipeline(pipeline_flow, demo_source, tei_dir, stages=stages, engine="tei", tei_url=double.url, tei_served_model="/repository")
        assert state.is_completed(), state.message
        state, _ = run_pipeline(pipeline_flow, demo_source, local_dir, stages=stages)
        assert state.is_completed()
        for shard in reports["embed"].succeeded:
            path = f"demo-chunked-64-all-MiniLM-L6-v2/train/{shard}.parquet"
            via_tei, in_process = pq.read_table(tei_dir / path), pq.read_table(local_dir / path)
            assert via_tei.column("chunk_index").equals(in_process.column("chunk_index"))
            a = np.stack(via_tei.column("embedding").to_numpy(zero_copy_only=False))
            b = np.stack(in_process.column("embedding").to_numpy(zero_copy_only=False))
            assert (a * b).sum(axis=1).min() >= 0.999
        assert double.metrics.max_request_inputs <= 8
    finally:
        double.stop()


@pytest.mark.parametrize("flow_name", ["pipeline", "download", "chunk", "embed", "summarize", "verify", "plan", "publish"])
def test_list_parameters_take_the_clis_comma_form_in_a_deployment_run(flow_name):
    """`prefect deployment run 'pipeline/local' -p shards=0,3` validates against the flow's schema, as the CLI's `--shards 0,3` does."""
    import importlib

    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    values = {"shards": "0,3", **({"stages": "download,chunk"} if flow_name == "pipeline" else {})}
    assert validate(values, schema, ignore_required=True) == []
    for shards in (["0", "3"], 3, [0, 3]):  # `-p shards=3` and `-p shards=[0,3]` arrive as JSON numbers
        assert validate({"shards": shards}, schema, ignore_required=True) == []


def test_a_deployment_run_is_told_the_prefect_command_that_retries_it(monkeypatch):
    from flows.reporting import _prefect_rerun

    assert _prefect_rerun() is None, "a run started from Python or the CLI is not offered it (it would need --entrypoint)"
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "0f3c0a57-0000-4000-8000-000000000001")
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", "5d1e2f00-0000-4000-8000-000000000002")
    assert _prefect_rerun() == "prefect flow-run retry 5d1e2f00-0000-4000-8000-000000000002"


def test_a_refusal_names_flags_on_the_cli_and_parameters_in_a_deployment_run(pipeline_flow, demo_source, tmp_path, monkeypatch):
    """Whoever filled in the run form sees `tei_url`, the field they know; the CLI's user sees --tei-url."""
    from flows.outcome import in_parameter_terms

    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", engine="tei")
    assert state.is_failed() and "--engine tei with the local backend needs --tei-url" in state.message
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "0f3c0a57-0000-4000-8000-000000000001")
    state, _ = run_pipeline(pipeline_flow, demo_source, tmp_path / "data", engine="tei")
    assert state.is_failed() and "`engine` tei with the local backend needs `tei_url`" in state.message and "--" not in state.message
    assert not (tmp_path / "data").exists()
    assert in_parameter_terms("see fineweb-modal --help; --source and --nope", {"source"}) == "see fineweb-modal --help; `source` and --nope"

    from fineweb_modal.errors import ConfigError
    from flows.embed import embed
    from flows.outcome import outcome

    state = embed(name="demo", data_dir=str(tmp_path / "data"), engine="tei", return_state=True)  # a stage's own deployment
    assert state.is_failed() and state.message.startswith("embed: `engine` tei with the local backend needs `tei_url`")
    assert isinstance(outcome(state), ConfigError), "refused (a message), not an exception raised through Prefect (a traceback)"


def test_warnings_from_the_worker_process_reach_the_task_runs_log(pipeline_flow, demo_source, tmp_path):
    """Shard work runs in a worker process (or a Modal container), where no Prefect logger is: its warnings come back with the result."""
    (demo_source / "data-00002-of-00003.parquet").unlink()
    (demo_source / "data-00002-of-00003.jsonl").write_text('{"text": "one fine line"}\n{"text": 5}\n{"text": "another"}\n')
    data_dir = tmp_path / "data"
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download"])
    assert state.is_completed(), state.message
    (run,) = [r for r in task_runs_of(child_flow_run_ids(state.state_details.flow_run_id), expected=3) if r.name == "download-data-00002-of-00003"]
    wanted = "left out 1 line(s) that are no document: line 2 ('text' is a number"
    assert any(wanted in m for m in task_run_logs(run.id, wanted))

    next(data_dir.rglob("data-00000-of-00003.arrow")).unlink()  # the done record now points at nothing
    state, _ = run_pipeline(pipeline_flow, demo_source, data_dir, stages=["download"])
    (run,) = [r for r in task_runs_of(child_flow_run_ids(state.state_details.flow_run_id), expected=3) if r.name == "download-data-00000-of-00003"]
    wanted = "ledger says done with 12 rows but"
    assert any(wanted in m and "redoing it" in m for m in task_run_logs(run.id, wanted)), "why a done shard ran again is in the UI"
