"""run_shard: work once, skip when done with the same config, redo when the config or the input changed."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from fineweb_modal.errors import BadDataError
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, finalize_stage, layout_for, run_shard, shard_status


def run_stages(run, shard, stages=("download", "chunk", "embed", "summarize"), source_file=None):
    return [run_shard(ShardJob(stage=s, shard=shard, run=run, source_file=source_file if s == "download" else None)) for s in stages]


def test_stages_chain_and_rerun_skips(demo_source, run_config_for):
    run = run_config_for(demo_source)
    source_file = str(sorted(demo_source.glob("*.parquet"))[0])
    shard = "data-00000-of-00003"
    first = run_stages(run, shard, source_file=source_file)
    assert [r.status for r in first] == ["done"] * 4
    download, chunk, embed, summary = first
    assert download.rows_out == 12 and chunk.docs == embed.docs == 12 and chunk.chunks == embed.chunks > 12
    assert embed.rows_out == chunk.rows_out and summary.extra["summary"]["chunks"] == chunk.chunks
    assert chunk.cost_usd == 0 and chunk.modal_estimate_usd > 0 and chunk.seconds > 0
    from fineweb_modal.costs import rate_per_second, stage_resources
    from fineweb_modal.plan import gpu_tokens_per_s

    # This CPU's embed seconds say nothing of an H100's: the estimate prices the tokens at the GPU's throughput.
    h100_seconds = embed.tokens / gpu_tokens_per_s("transformers", "H100")
    assert embed.modal_estimate_usd == pytest.approx(h100_seconds * rate_per_second(stage_resources("embed")))
    assert embed.modal_estimate_usd < embed.seconds * rate_per_second(stage_resources("embed")) / 10
    again = run_stages(run, shard, source_file=source_file)
    assert [r.status for r in again] == ["skipped"] * 4
    assert again[1].tokens == chunk.tokens and again[1].seconds == 0
    layout = layout_for(run)
    assert pq.read_table(layout.output_path("embed", shard)).num_rows == chunk.chunks
    assert shard_status(run, "embed", shard) == "done"


def test_a_source_touched_since_is_downloaded_again_and_its_consumers_redone(demo_source, run_config_for):
    """Sources are known by name, size and modification time: the same bytes touched count as a new input."""
    import os

    run = run_config_for(demo_source)
    source = sorted(demo_source.glob("*.parquet"))[0]
    shard = source.stem
    run_stages(run, shard, stages=("download", "chunk"), source_file=str(source))
    assert [r.status for r in run_stages(run, shard, stages=("download", "chunk"), source_file=str(source))] == ["skipped"] * 2
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [r.status for r in run_stages(run, shard, stages=("download", "chunk"), source_file=str(source))] == ["done"] * 2


def test_rechunking_with_another_config_invalidates_embeddings(demo_source, run_config_for):
    run = run_config_for(demo_source)
    source_file = str(sorted(demo_source.glob("*.parquet"))[0])
    shard = "data-00000-of-00003"
    run_stages(run, shard, source_file=source_file)
    other = run_config_for(demo_source, overlap=0.3)  # same max_tokens → same folders, new chunks
    rechunk, reembed = run_stages(other, shard, stages=("chunk", "embed"))
    assert rechunk.status == "done" and reembed.status == "done"
    assert rechunk.chunks == reembed.chunks


def test_failure_writes_a_failed_record_and_leaves_no_output(tmp_path, run_config_for):
    source = tmp_path / "src"
    source.mkdir()
    bad = source / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    run = run_config_for(source)
    with pytest.raises(BadDataError, match="broken.parquet"):
        run_shard(ShardJob(stage="download", shard="broken", run=run, source_file=str(bad), attempt=1))
    record = Ledger(layout_for(run)).read("download", "broken")
    assert record.status == "failed" and record.error_type == "UnreadableFileError" and "broken.parquet" in record.error
    assert not layout_for(run).output_path("download", "broken").exists()
    assert shard_status(run, "download", "broken") == "failed"


def test_summarize_totals_combine_shards(demo_source, run_config_for):
    run = run_config_for(demo_source)
    results = []
    for path in sorted(demo_source.glob("*.parquet")):
        results.append(run_stages(run, path.stem, stages=("download", "chunk", "summarize"), source_file=str(path))[-1])
    outcome = finalize_stage(run, "summarize", [r.extra["summary"] for r in results])
    totals = outcome["totals"]
    assert totals["shards"] == 3 and totals["rows"] == 36
    assert totals["chunks"] == sum(r.chunks for r in results) == sum(totals["histogram"]["counts"])
    assert totals["chunks_under_50"] >= totals["chunks_under_10"]
    for chart in ("histogram", "throughput"):
        assert outcome["charts"][chart].endswith(".png") and open(outcome["charts"][chart], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # A later run over one shard (--shards, --only failed) still writes the split's totals.
    again = finalize_stage(run, "summarize", [results[0].extra["summary"]])
    assert again["totals"] == totals
    # A shard whose chunks changed since its summary no longer counts until it is summarized again.
    run_stages(run_config_for(demo_source, overlap=0.2), results[1].shard, stages=("chunk",))
    assert finalize_stage(run, "summarize", [])["totals"]["shards"] == 2


def test_a_hub_download_into_a_new_data_dir_is_skipped_when_run_again(demo_source, run_config_for, tmp_path, monkeypatch, folder_as_hub_repo):
    """A local folder stands in for a Hub repo (no Hub here): the same load_dataset + save_to_disk path."""
    import datasets

    from fineweb_modal import download
    from fineweb_modal.shards import download_hub_shards

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    run = run_config_for(demo_source, data_dir=str(tmp_path / "new" / "data"), name="hubbed")
    hub_run = run.model_copy(update={"download": run.download.model_copy(update={"source_kind": "hub"})})
    first = download_hub_shards(hub_run)
    docs = sum(pq.read_metadata(p).num_rows for p in demo_source.glob("*.parquet"))
    assert first and {r.status for r in first} == {"done"} and sum(r.docs for r in first) == docs

    def no_second_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    real_download = download.download_hub
    monkeypatch.setattr(download, "download_hub", no_second_download)
    again = download_hub_shards(hub_run)
    assert [(r.shard, r.status, r.docs) for r in again] == [(r.shard, "skipped", r.docs) for r in first]

    monkeypatch.setattr(download, "download_hub", real_download)
    layout_for(hub_run).output_path("download", first[0].shard).unlink()  # its record stays: not done any more
    assert [(r.shard, r.status) for r in download_hub_shards(hub_run)] == [(r.shard, "done") for r in first]


def test_a_hub_download_saved_in_fewer_files_leaves_no_earlier_shard_behind(demo_source, run_config_for, tmp_path, monkeypatch, folder_as_hub_repo):
    """A rerun whose save writes other files (another num_proc, a dataset that shrank) must not keep the old ones: their rows would count twice."""
    import datasets

    from fineweb_modal.shards import download_hub_shards

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    run = run_config_for(demo_source, name="hubbed", num_proc=2)
    hub_run = run.model_copy(update={"download": run.download.model_copy(update={"source_kind": "hub"})})
    assert len(download_hub_shards(hub_run)) == 2
    layout = layout_for(hub_run)
    layout.ledger_path("download", "data-00001-of-00002").unlink()  # not done: the next run downloads again
    chunked = layout.output_path("chunk", "data-00000-of-00002")
    chunked.parent.mkdir(parents=True)
    chunked.write_bytes(b"")  # an earlier chunk output of a shard the new save does not have
    results = download_hub_shards(hub_run.model_copy(update={"num_proc": 1}))
    assert any("data-00000-of-00002 are no longer in the dataset but still chunked" in w for w in results[0].extra["warnings"]), "for the task's log"
    docs = sum(pq.read_metadata(p).num_rows for p in demo_source.glob("*.parquet"))
    assert [r.shard for r in results] == ["data-00000-of-00001"] and results[0].docs == docs
    assert layout.list_shards("download") == ["data-00000-of-00001"], "files and ledger records of the earlier save are gone"


def test_a_failing_shard_carries_the_warnings_logged_before_it_failed(demo_source, run_config_for, monkeypatch):
    """Its error is what the task run shows: the warnings ride on it as notes (a worker process has no Prefect logger)."""
    from fineweb_modal import download

    run = run_config_for(demo_source)
    source_file = sorted(demo_source.glob("*.parquet"))[0]
    job = ShardJob(stage="download", shard=source_file.stem, run=run, source_file=str(source_file))
    assert "warnings" not in run_shard(job).extra
    layout_for(run).output_path("download", source_file.stem).unlink()  # the done record now points at nothing

    def disk_trouble(*args):
        raise OSError("the disk went away")

    monkeypatch.setattr(download, "convert_file", disk_trouble)
    with pytest.raises(OSError, match="the disk went away") as failure:
        run_shard(job)
    assert any("ledger says done with 12 rows but" in note and "redoing it" in note for note in failure.value.__notes__)


def test_the_embedding_engines_warnings_come_back_with_the_shard(demo_source, run_config_for, monkeypatch):
    """A warning the engine logs where the shard runs (here: its fp16 disagreed, it runs fp32) reaches the task's log."""
    import torch

    from fineweb_modal import embedding

    run = run_config_for(demo_source)
    source_file = str(sorted(demo_source.glob("*.parquet"))[0])
    shard = "data-00000-of-00003"
    run_stages(run, shard, stages=("download", "chunk"), source_file=source_file)
    monkeypatch.setattr(embedding, "cpu_half_dtype", lambda: torch.float16)
    monkeypatch.setattr(embedding, "CPU_HALF_MIN_COSINE", 1.01)  # no fp16 run can agree this well
    embedding._cached_engine.cache_clear()  # a fresh engine, built in this shard's run
    try:
        [result] = run_stages(run, shard, stages=("embed",))
    finally:
        embedding._cached_engine.cache_clear()
    assert result.status == "done" and any("fp16 vectors disagree with fp32" in w for w in result.extra["warnings"])


def test_a_shard_done_with_another_config_is_not_done_for_this_one(demo_source, run_config_for):
    """What a run will redo is not `done`: else the checks made before work (is TEI up? is there room?) skip it."""
    run = run_config_for(demo_source)
    source_file = str(sorted(demo_source.glob("*.parquet"))[0])
    shard = "data-00000-of-00003"
    run_stages(run, shard, stages=("download", "chunk", "embed"), source_file=source_file)
    assert shard_status(run, "embed", shard) == "done" and shard_status(run, "chunk", shard) == "done"
    assert shard_status(run_config_for(demo_source, embedding_dtype="float16"), "embed", shard) == "stale"
    assert shard_status(run_config_for(demo_source, overlap=0.2), "chunk", shard) == "stale"
    assert shard_status(run_config_for(demo_source, keep_columns=[]), "download", shard) == "done", "a download's config is not the chunk's"
