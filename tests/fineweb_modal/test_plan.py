"""The forecast: a sample's counts scale to the shard; dollars follow tokens, rate and price."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from fineweb_modal import plan as planning
from fineweb_modal.costs import RATES_USD_PER_SECOND, stage_resources
from fineweb_modal.shards import ShardJob, layout_for, plan_sample, run_shard


def test_a_full_sample_forecasts_exactly_what_chunking_produces(demo_source, run_config_for):
    run = run_config_for(demo_source)
    path = sorted(demo_source.glob("*.parquet"))[0]
    for stage in ("download", "chunk"):
        run_shard(ShardJob(stage=stage, shard=path.stem, run=run, source_file=str(path) if stage == "download" else None))
    sample = planning.ShardSample(**plan_sample(run, path.stem))
    chunks = pq.read_table(layout_for(run).output_path("chunk", path.stem))
    assert sample.rows == sample.sampled == 12
    assert sample.est_chunks == chunks.num_rows
    assert sample.est_embed_tokens == sum(chunks.column("chunk_token_count").to_pylist())


def test_forecast_prices_tokens_at_each_gpu_rate(monkeypatch, tmp_path):
    monkeypatch.setattr(planning, "BENCHMARK_RESULTS", tmp_path / "none.json")
    samples = [planning.ShardSample("a", 100, 10, 250.0, 90_000.0, 1.0e9), planning.ShardSample("b", 100, 10, 250.0, 90_000.0, 1.0e9)]
    rows = {(r["engine"], r["gpu"]): r for r in planning.forecast(samples)}
    h100 = rows[("transformers", "H100")]
    seconds = 2.0e9 / planning.DEFAULT_TOKENS_PER_S["transformers"]["H100"]
    embed = stage_resources("embed")
    per_second = embed.cpu * RATES_USD_PER_SECOND["cpu_core"] + embed.memory_gib * RATES_USD_PER_SECOND["memory_gib"] + RATES_USD_PER_SECOND["H100"]
    assert h100["chunks"] == 500 and h100["embed tokens"] == 2_000_000_000
    assert h100["GPU hours"] == pytest.approx(seconds / 3600, rel=0.01) and h100["cost $"] == pytest.approx(seconds * per_second, abs=0.01)
    assert rows[("tei", "A10G")]["cost $"] > h100["cost $"], "the seed's A10G TEI costs more per token than an H100"
    assert {r["rate from"] for r in rows.values()} == {"default estimate"}
    tiny = {(r["engine"], r["gpu"]): r for r in planning.forecast([planning.ShardSample("a", 10, 1, 250.0, 900.0, 1.0e5)])}
    assert 0 < tiny[("transformers", "H100")]["GPU hours"] < 0.01 and tiny[("transformers", "H100")]["cost $"] > 0, "a demo's forecast does not read 0.0"


def test_a_gpu_benchmark_replaces_the_default_rate(monkeypatch, tmp_path):
    results = tmp_path / "embed.json"
    results.write_text(json.dumps({"entries": {"embed-gpu": {"device": "NVIDIA H100 80GB HBM3", "tokens_per_s": {"engine": 2_500_000}}}}))
    monkeypatch.setattr(planning, "BENCHMARK_RESULTS", results)
    rows = {(r["engine"], r["gpu"]): r for r in planning.forecast([planning.ShardSample("a", 1, 1, 1.0, 1.0, 2.5e9)])}
    assert rows[("transformers", "H100")]["tokens/s"] == 2_500_000 and rows[("transformers", "H100")]["rate from"] == "benchmark"
    assert rows[("transformers", "A10G")]["rate from"] == "default estimate"
    # A GPU outside the default list that the benchmark ran on gets its own row.
    results.write_text(json.dumps({"entries": {"embed-gpu": {"device": "NVIDIA H200", "tokens_per_s": {"engine": 1_287_951}}}}))
    rows = {(r["engine"], r["gpu"]): r for r in planning.forecast([planning.ShardSample("a", 1, 1, 1.0, 1.0, 2.5e9)])}
    assert rows[("transformers", "H200")]["tokens/s"] == 1_287_951 and rows[("transformers", "H200")]["rate from"] == "benchmark"
    assert rows[("transformers", "H100")]["rate from"] == "default estimate" and ("tei", "H200") in rows


def test_a_hub_dataset_is_planned_before_its_download_from_its_row_count_and_first_docs(demo_source, run_config_for, folder_as_hub_repo, tmp_path):
    """A local folder stands in for the Hub repo (no Hub here): rows from its parquet footers, documents streamed."""
    import json as jsonlib

    from fineweb_modal.chunking import chunk_texts
    from fineweb_modal.errors import ConfigError

    run = run_config_for(demo_source)
    texts = [t for p in sorted(demo_source.glob("*.parquet")) for t in pq.read_table(p).column("text").to_pylist()]
    assert planning.hub_rows(str(demo_source), None, "train") == (len(texts), True) == (36, True)
    whole = planning.sample_hub(str(demo_source), None, "train", run.chunk, sample_docs=100)
    chunk_rows, _ = chunk_texts(texts, run.chunk)
    assert (whole.rows, whole.sampled, whole.est_chunks) == (36, 36, len(chunk_rows)), "a sample of everything is exact"
    assert whole.est_embed_tokens == sum(r[4] for r in chunk_rows)
    part = planning.sample_hub(str(demo_source), None, "train", run.chunk, sample_docs=12)
    assert part.sampled == 12 and part.rows == 36 and part.est_chunks > 0

    with pytest.raises(ConfigError, match=r"has no split 'test': it has train"):
        planning.hub_rows(str(demo_source), None, "test")
    other_column = run.chunk.model_copy(update={"text_column": "body"})
    with pytest.raises(ConfigError, match=r"column\(s\) \['body'\] not found; the shard has \['text', .*\(set --text-column\)"):
        planning.sample_hub(str(demo_source), None, "train", other_column, sample_docs=5)
    jsonl = tmp_path / "jsonl-repo"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text("\n".join(jsonlib.dumps({"text": t}) for t in texts[:5]))
    with pytest.raises(ConfigError, match="its rows cannot be counted without a download: run the download stage, then plan"):
        planning.hub_rows(str(jsonl), None, "train")
    card = "---\ndataset_info:\n  splits:\n  - name: train\n    num_examples: 999\n---\n"
    (jsonl / "README.md").write_text(card)
    assert planning.hub_rows(str(jsonl), None, "train") == (999, False), "not parquet: the card's split size"
    (demo_source / "README.md").write_text(card)
    assert planning.hub_rows(str(demo_source), None, "train") == (36, True), "parquet: its footers, whatever a stale card says"


def test_a_hub_id_is_planned_from_the_hub_even_where_a_local_folder_has_its_name(demo_source, run_config_for, tmp_path, monkeypatch):
    """Without the stand-in: the suite is offline, so the Hub cannot be read (plan says so), and the folder named `org/name` is not read instead."""
    import shutil

    from fineweb_modal.errors import ConfigError

    shutil.copytree(demo_source, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="planning a Hub dataset before its download reads the Hub, and HF_HUB_OFFLINE is set"):
        planning.sample_hub("org/name", None, "train", run_config_for(demo_source).chunk)
    with pytest.raises(ConnectionError, match="Couldn't reach 'org/name' on the Hub"):
        planning.hub_rows("org/name", None, "train")
