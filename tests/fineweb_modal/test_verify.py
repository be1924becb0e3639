"""verify_shard finds what is wrong; load_embeddings returns every vector with its keys."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_modal import load_embeddings
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, layout_for, run_shard, verify_outputs


def build_shards(demo_source, run):
    files = sorted(demo_source.glob("*.parquet"))
    for path in files:
        for stage in ("download", "chunk", "embed"):
            run_shard(ShardJob(stage=stage, shard=path.stem, run=run, source_file=str(path) if stage == "download" else None))
    return [p.stem for p in files]


def test_good_outputs_pass_and_broken_ones_are_named(demo_source, run_config_for):
    run = run_config_for(demo_source)
    shards = build_shards(demo_source, run)
    assert all(verify_outputs(run, s)["problems"] == [] for s in shards)

    layout = layout_for(run)
    embed_path = layout.output_path("embed", shards[0])
    table = pq.read_table(embed_path)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    vectors[3] = np.nan
    vectors[5] *= 2
    broken = table.set_column(3, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), 384))
    pq.write_table(broken, embed_path)
    problems = verify_outputs(run, shards[0])["problems"]
    assert any("1 embedding(s) hold NaN" in p for p in problems) and any("not unit-norm" in p for p in problems)

    chunk_path = layout.output_path("chunk", shards[1])
    chunks = pq.read_table(chunk_path)
    texts = chunks.column("chunk_text").to_pylist()
    texts[2] = texts[2].lower() + " [SEP]"
    pq.write_table(chunks.set_column(3, "chunk_text", pa.array(texts, pa.large_string())), chunk_path)
    assert verify_outputs(run, shards[1])["problems"] == ["1 chunk(s) are not the source substring at their offsets (first: row 2)"]

    pq.write_table(pq.read_table(layout.output_path("embed", shards[2])).slice(1), layout.output_path("embed", shards[2]))
    assert "embeddings for" in verify_outputs(run, shards[2])["problems"][0]


def test_load_embeddings_returns_all_vectors_with_keys(demo_source, run_config_for, tmp_path):
    run = run_config_for(demo_source)
    shards = build_shards(demo_source, run)
    vectors, keys = load_embeddings(tmp_path / "data", "demo", 64, run.chunk.model)
    chunk_rows = sum(pq.read_metadata(layout_for(run).output_path("chunk", s)).num_rows for s in shards)
    assert vectors.shape == (chunk_rows, 384) and vectors.dtype == np.float32
    assert keys.column_names == ["id", "doc_index", "chunk_index", "shard"] and keys.num_rows == chunk_rows
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert sorted(set(keys.column("shard").to_pylist())) == shards


def test_embeddings_of_replaced_chunks_are_stale_until_the_embed_stage_reruns(tmp_path, run_config_for):
    """Source edited, download and chunk rerun, embed not: the old vectors must not pass as the new texts'."""
    from fineweb_modal.publish import join_shard
    from fineweb_modal.shards import shard_status
    from fineweb_modal.status import ledger_status
    from flows.cli import main

    source = tmp_path / "source" / "edited"
    source.mkdir(parents=True)
    path = source / "s0.parquet"

    def run_stages(texts: list[str], stages: tuple[str, ...]):
        pq.write_table(pa.table({"text": texts}), path)
        run = run_config_for(source, keep_columns="")
        for stage in stages:
            run_shard(ShardJob(stage=stage, shard="s0", run=run, source_file=str(path) if stage == "download" else None))
        return run

    run = run_stages(["The cat sat on the mat.", "Stock markets fell sharply today."], ("download", "chunk", "embed"))
    layout = layout_for(run)
    assert shard_status(run, "embed", "s0") == "done" and verify_outputs(run, "s0")["problems"] == []
    # A chunk attempt that failed left the chunk file as it was: the embeddings are still its own.
    Ledger(layout).write_failed("chunk", "s0", "another-config", TimeoutError("slow disk"), 1)
    assert shard_status(run, "embed", "s0") == "done" and verify_outputs(run, "s0")["problems"] == []
    assert run_shard(ShardJob(stage="embed", shard="s0", run=run)).status == "skipped", "and an embed run agrees: nothing to redo"
    # Other texts, other lengths: the source file's size changes, so download and chunk redo the shard.
    run = run_stages(["Quantum physics of black holes.", "The football final ended in a draw."], ("download", "chunk"))

    assert shard_status(run, "embed", "s0") == "stale" and shard_status(run, "chunk", "s0") == "done"
    (embed_status,) = [s for s in ledger_status(tmp_path / "data", "edited") if s.stage == "embed"]
    assert embed_status.stale == ["s0"] and embed_status.done == []
    assert main(["status", "--data-dir", str(tmp_path / "data"), "--name", "edited"]) == 1, "`status` exits 1 on it"
    assert verify_outputs(run, "s0")["problems"] == ["the embed output was made from a chunk output since replaced: rerun embed"]
    with pytest.raises(ValueError, match="since replaced; rerun the embed stage"):
        join_shard(layout, "s0", tmp_path / "published" / "s0.parquet")
    with pytest.raises(ValueError, match=r"shard\(s\) \['s0'\] were made from chunk files since replaced"):
        load_embeddings(tmp_path / "data", "edited", 64, run.chunk.model)

    assert run_shard(ShardJob(stage="embed", shard="s0", run=run)).status == "done", "a rerun of embed redoes it"
    assert shard_status(run, "embed", "s0") == "done" and verify_outputs(run, "s0")["problems"] == []
    assert main(["status", "--data-dir", str(tmp_path / "data"), "--name", "edited"]) == 0
    assert join_shard(layout, "s0", tmp_path / "published" / "s0.parquet") == 2


def test_spans_are_checked_against_the_column_the_chunks_were_cut_from(tmp_path, run_config_for):
    """A dataset chunked with text_column=content verifies with no flag saying so: the chunk file records it."""
    from tests.conftest import write_parquet

    source = tmp_path / "source" / "wiki"
    write_parquet(source / "s0.parquet", [{"content": f"Document {i}: " + "words and more words. " * (5 + i)} for i in range(6)])
    run = run_config_for(source, text_column="content", keep_columns=[])
    shard = "s0"
    for stage in ("download", "chunk", "embed"):
        run_shard(ShardJob(stage=stage, shard=shard, run=run, source_file=str(source / "s0.parquet") if stage == "download" else None))
    as_verify_is_called = run_config_for(source, keep_columns=[])  # text_column left at its default, `text`
    assert as_verify_is_called.chunk.text_column == "text"
    assert verify_outputs(as_verify_is_called, shard)["problems"] == []


def test_a_shard_embedded_again_with_another_prefix_makes_the_dataset_mixed(demo_source, run_config_for, tmp_path):
    """A partial rerun with another config leaves one dataset folder with vectors of two kinds: said, not loaded."""
    from fineweb_modal.status import ledger_status
    from fineweb_modal.verify import made_with, mixed_settings

    run = run_config_for(demo_source)
    shards = build_shards(demo_source, run)
    layout = layout_for(run)
    made = {shard: made_with(layout, shard) for shard in shards}
    assert mixed_settings(made) == "" and made[shards[0]]["embed"]["prefix"] == "" and made[shards[0]]["chunk"]["max_tokens"] == 64
    assert {s.stage: s.mixed for s in ledger_status(tmp_path / "data", "demo")} == {"download": "", "chunk": "", "embed": ""}
    queried = run.model_copy(update={"embed": run.embed.model_copy(update={"prefix": "query: "})})
    assert run_shard(ShardJob(stage="embed", shard=shards[1], run=queried)).status == "done", "another config redoes the shard"
    made = {shard: made_with(layout, shard) for shard in shards}
    assert mixed_settings(made) == (
        f"the shards' embed files differ in their prefix: '' for {shards[0]}, {shards[2]}; 'query: ' for {shards[1]}; "
        "rerun embed over all of them with one config (a run redoes the shards another config made)"
    )
    with pytest.raises(ValueError, match="differ in their prefix"):
        load_embeddings(tmp_path / "data", "demo", 64, run.chunk.model)
    statuses = {s.stage: s for s in ledger_status(tmp_path / "data", "demo")}
    assert statuses["embed"].mixed == mixed_settings(made) and sorted(statuses["embed"].done) == sorted(shards), "status says so too, the shards still done"
    assert statuses["chunk"].mixed == "", "the chunks were all cut alike"
    assert verify_outputs(run, shards[1])["made_with"] == made[shards[1]], "verify returns them, for the flow to compare"
    assert mixed_settings({shard: made[shard] for shard in (shards[0], shards[2])}) == "", "the shards chosen only"


def test_only_settings_that_shape_the_vectors_and_are_told_are_compared():
    """A shard embedded through TEI (which may not report its model's revision or pooling) beside in-process ones is not mixed."""
    from fineweb_modal.verify import mixed_settings

    chunk = {"model": "m", "tokenizer_sha256": "t", "max_tokens": 256, "overlap": 0.1, "text_column": "text", "keep_columns": ["url", "score"]}

    def made(revision: str, dims: str = "768") -> dict:
        return {"chunk": chunk, "embed": {"model": "m", "revision": revision, "pooling": "mean", "prefix": "", "dims": dims, "dtype": "float32"}}

    assert mixed_settings({"a": made("0a1b"), "b": made("unknown"), "c": made("local"), "d": {"chunk": chunk}}) == ""
    assert mixed_settings({"a": made("0a1b"), "b": made("2c3d")}) == "", "a model commit may change only its card"
    tei = made("unknown")
    tei["embed"] = {**tei["embed"], "pooling": "unknown"}
    assert mixed_settings({"a": made("r"), "b": tei}) == "", "a TEI that does not say its pooling"
    cls = made("r")
    cls["embed"] = {**cls["embed"], "pooling": "cls"}
    assert mixed_settings({"a": made("r"), "b": cls}) == (
        "the shards' embed files differ in their pooling: 'mean' for a; 'cls' for b; delete the embed files of the shards to make again, then rerun embed"
    ), "the same config made both (the model changed under it): a rerun alone would skip them"
    local_prefix = made("r")
    local_prefix["embed"] = {**local_prefix["embed"], "prefix": "local"}
    assert "differ in their prefix: '' for a; 'local' for b" in mixed_settings({"a": made("r"), "b": local_prefix}), "'local' is a value like any other there"
    assert "differ in their dims: '768' for a, b; '256' for c" in mixed_settings({"a": made("r"), "b": made("r"), "c": made("r", dims="256")})
    other_columns = {**chunk, "keep_columns": ["url"]}
    assert "chunk files differ in their keep_columns: ['url', 'score'] for a; ['url'] for b" in mixed_settings({"a": {"chunk": chunk}, "b": {"chunk": other_columns}})
