"""The benchmarks' own pieces: the corpus is web-like, the seed-style baseline chunks like the seed, the table reads,\nthe GPU and host entries run small here."""

from __future__ import annotations

import statistics

from benchmarks.chunk import seed_style
from benchmarks.corpus import web_like_documents
from benchmarks.report import rows
from fineweb_modal.models import DEFAULT_MODEL, load_tokenizer, model_info


def test_corpus_has_web_like_lengths():
    docs = web_like_documents(200_000, seed=1)
    tokenizer = load_tokenizer(model_info(DEFAULT_MODEL).path)
    lengths = [len(e) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    assert 150_000 < sum(lengths) < 400_000
    assert 350 < statistics.median(lengths) < 1400 and max(lengths) > 5 * statistics.median(lengths)


def test_seed_style_slices_with_the_seeds_stride():
    tokenizer = load_tokenizer(model_info(DEFAULT_MODEL).path)
    text = "word " * 1000  # 1000 tokens + [CLS]/[SEP]
    assert seed_style([text] * 3, tokenizer, max_tokens=500, overlap_tokens=50) == 3 * 3  # starts 0, 450, 900


def test_report_rows_show_ratios_and_verdicts():
    entries = {
        "chunk": {"tokens": 10, "shard_mb": 1.0, "tokens_per_s": {"stage": 9, "raw": 10, "seed_style": 5}, "stage_vs_raw": 0.9, "stage_vs_seed_style": 1.8, "verdict": "PASS x"},
        "embed-gpu": {"device": "no GPU"},
        "orchestration": {"shards": 100, "flow_seconds": 5.0, "overhead_seconds_per_shard": 0.04, "loop_seconds": 1.0, "verdict": "PASS y"},
    }
    table = "\n".join(rows(entries))
    assert "0.9× raw" in table and "| embed (GPU) | no GPU |" in table and "0.04 s per shard" in table


def test_gpu_entry_runs_end_to_end_small_on_cpu(tmp_path):
    """The GPU entry's own code (inputs folder, variants, agreement check, rates) on a tiny NomicBert, here on CPU."""
    import pyarrow.parquet as pq

    from benchmarks.embed import gpu_entry, prepare_gpu_inputs

    prepare_gpu_inputs(tmp_path, 20_000)
    tiny = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
    entry = gpu_entry(tmp_path, repeats=1, compile_variant=False, device="cpu", model_config=tiny)
    rows = pq.read_metadata(tmp_path / "chunks.parquet").num_rows
    assert entry["chunks"] == rows and entry["tokens"] > rows * 100
    assert set(entry["tokens_per_s"]) == {"engine", "padded_bf16", "seed_style", "engine_model_only"}
    assert not entry["errors"]
    # bf16 and fp16 against fp32 on the same weights: close, and the packed engine as close as the padded one.
    assert min(entry["min_cosine_vs_fp32_padded"].values()) > 0.99
    assert entry["pass"] in (True, False)


def test_host_entry_measures_what_overlapping_saves(tmp_path, monkeypatch):
    """With a simulated device nearly as fast as the tokenizer, one block after another leaves the device idle a third of
    the time; embed_shard overlaps the steps."""
    import fineweb_modal.embedding as embedding
    from benchmarks.embed import prepare_gpu_inputs
    from benchmarks.host import host_entry

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 256)  # several blocks in a small file
    prepare_gpu_inputs(tmp_path, 400_000)
    entry = host_entry(0, repeats=1, host_over_device=1.5, inputs=tmp_path)
    assert entry["tokens"] > entry["chunks"] * 100 and entry["device_tokens_per_s"] == round(entry["tokenizer_tokens_per_s"] / 1.5)
    assert entry["efficiency"]["serial"] < 0.75, "serial: the device idles while each block is read, tokenized and written"
    assert entry["efficiency"]["embed_shard"] > entry["efficiency"]["serial"] + 0.1


def _report_peak(queue) -> None:
    from benchmarks.memory import _rss_mb

    queue.put({"peak_mb": _rss_mb()})


def test_a_childs_peak_memory_is_its_own_not_its_parents():
    """ru_maxrss of a spawned child starts at its parent's RSS on Linux (the forked image's high-water mark
    survives exec); the memory benchmark reads VmHWM instead."""
    from benchmarks.memory import _in_child

    held = bytearray(300 * 1024 * 1024)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # touch every page: 300 MB resident in this process
    assert _in_child(_report_peak)["peak_mb"] < 200
    del held
