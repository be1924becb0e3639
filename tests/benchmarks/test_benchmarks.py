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
    # engine_fused cannot run on a CPU: it must be reported, and everything else still measured.
    variants = ("engine", "padded_bf16", "seed_style", "engine_fused")
    entry = gpu_entry(tmp_path, repeats=1, device="cpu", model_config=tiny, variants=variants)
    rows = pq.read_metadata(tmp_path / "chunks.parquet").num_rows
    assert entry["chunks"] == rows and entry["tokens"] > rows * 100
    assert set(entry["tokens_per_s"]) == {"engine", "padded_bf16", "seed_style", "engine_model_only"}
    assert set(entry["errors"]) == {"engine_fused"} and "needs a CUDA device" in entry["errors"]["engine_fused"]
    assert entry["best_engine"] == "engine"
    # bf16 and fp16 against fp32 on the same weights: close, and the packed engine as close as the padded one.
    assert min(entry["min_cosine_vs_fp32_padded"].values()) > 0.99
    assert entry["pass"] is False, "a tiny model on a CPU is far from 2 M tokens/s"


def test_host_entry_measures_what_overlapping_saves(tmp_path, monkeypatch):
    """With a simulated device nearly as fast as the tokenizer, one block after another leaves the device idle a third of
    the time; embed_shard overlaps the steps."""
    import fineweb_modal.embedding as embedding
    from benchmarks.embed import prepare_gpu_inputs
    from benchmarks.host import host_entry

    monkeypatch.setattr(embedding, "READ_BLOCK_ROWS", 256)  # several blocks in a small file
    prepare_gpu_inputs(tmp_path, 400_000)
    entry = host_entry(0, repeats=1, host_over_device=1.5, inputs=tmp_path)
    # Both rates are rounded to whole tokens/s in the entry: compare within a token.
    assert entry["tokens"] > entry["chunks"] * 100 and abs(entry["device_tokens_per_s"] - entry["tokenizer_tokens_per_s"] / 1.5) <= 1
    assert entry["efficiency"]["serial"] < 0.75, "serial: the device idles while each block is read, tokenized and written"
    assert entry["efficiency"]["embed_shard"] > entry["efficiency"]["serial"] + 0.1


def test_fp8_linear_rounds_each_row_to_e4m3_at_its_own_scale():
    """Per-row scales: a row 1000x larger keeps the same relative error; the error is e4m3's (a few %), not zero."""
    import torch

    from benchmarks.fp8 import FP8, RowwiseFloat8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = RowwiseFloat8Linear(linear)
    inputs = torch.randn(2, 5, 64)
    inputs[1] *= 1000
    expected = linear(inputs).detach()
    got = fp8(inputs)
    assert fp8.weight.dtype == FP8 and got.shape == expected.shape and got.dtype == inputs.dtype
    errors = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).flatten()
    assert 0.002 < errors.min() and errors.max() < 0.1
    assert errors[5:].mean() < 3 * errors[:5].mean(), "the large rows are scaled on their own"


def test_fp8_entry_reports_agreement_and_shares(tmp_path):
    from benchmarks.fp8 import SELECTIONS, fp8_entry

    tiny = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 192, "num_attention_heads": 2}
    entry = fp8_entry(4, nomic_config=tiny)
    nomic = entry["models"]["nomic-embed-text-v1.5 shape (random weights)"]
    # q, k, v, o: 4 x 64 x 64; gate, up, down: 3 x 64 x 192 -> the feed-forward holds 9/13 of the weights.
    assert nomic["fp8_share_of_matmul_flops"] == {"all": 1.0, "feed-forward": round(9 / 13, 3), "feed-forward down": round(3 / 13, 3)}
    for model in entry["models"].values():
        cosines = model["min_cosine_vs_fp32"]
        assert set(cosines) == {"bf16", *(f"fp8 {s}" for s in SELECTIONS)}
        assert all(0.9 < c <= 1.0 for c in cosines.values()) and cosines["fp8 all"] <= cosines["bf16"]
    trained = entry["models"]["all-MiniLM-L6-v2 (trained)"]["min_cosine_vs_fp32"]
    assert trained["fp8 all"] < trained["bf16"] - 1e-4, "six trained layers in fp8 move the vectors measurably"
    assert entry["pass"] == bool(entry["trained_selections_within_bar"])


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


def test_the_best_engine_is_the_fastest_that_keeps_the_vectors():
    from benchmarks.embed import MIN_COSINE, best_engine

    rates = {"engine": 1.0e6, "engine_compiled": 1.3e6, "engine_fused": 1.6e6, "engine_compiled_model_only": 1.9e6, "seed_style": 0.7e6}
    agreement = {"engine": 0.99995, "engine_compiled": 0.99998, "engine_fused": MIN_COSINE - 0.001, "seed_style": 1.0}
    assert best_engine(rates, agreement) == "engine_compiled", "the fused variant is faster but below the bar; model-only is not an engine"
    assert best_engine(rates, agreement | {"engine_fused": 0.9995}) == "engine_fused"
    assert best_engine({"engine_fused": 1.6e6, "seed_style": 0.7e6}, {"engine_fused": 0.99}) == "engine_fused", "nothing accurate: the fastest, to be failed"
    assert best_engine({"seed_style": 0.7e6}, {}) == "seed_style"


# What the GPU machine's image lacks (it has torch, transformers, tokenizers, triton and pyarrow).
ABSENT_ON_GPU_IMAGE = ("pydantic", "prefect", "datasets", "modal", "sentence_transformers")
_RUN_WITHOUT = """
import importlib.abc, json, sys
from pathlib import Path

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ImportError(f"{{name}} is not on the GPU image")

sys.meta_path.insert(0, Absent())
from benchmarks.model_profile import run
import benchmarks.attention  # the attention kernels' benchmark runs there too
tiny = {{"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}}
run(Path({inputs!r}), ["frozen", "frozen_131k"], 1, Path({output!r}), device="cpu", model_config=tiny)
import fineweb_modal
assert "fineweb_modal.ledger" not in sys.modules and "fineweb_modal.config" not in sys.modules
"""


def test_model_profile_runs_on_the_gpu_images_packages_alone(tmp_path):
    """benchmarks.model_profile (and the engine, embed_shard's module and benchmarks.embed it imports) without pydantic,
    prefect, datasets, modal or sentence-transformers, as the GPU machine runs it: a baseline, a candidate, a profile."""
    import json
    import subprocess
    import sys

    from benchmarks.embed import prepare_gpu_inputs

    prepare_gpu_inputs(tmp_path, 20_000)
    output = tmp_path / "profile.json"
    script = _RUN_WITHOUT.format(absent=set(ABSENT_ON_GPU_IMAGE), inputs=str(tmp_path), output=str(output))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    baseline, candidate = results["variants"]["frozen"], results["variants"]["frozen_131k"]
    assert baseline["tokens_per_s"] > 0 and baseline["vs_baseline"] == 1.0 and "error" not in candidate
    assert candidate["options"]["batch_tokens"] == 131_072 and candidate["min_cos_vs_baseline"] > 0.999
    shares = baseline["profile"]["share"]
    assert abs(sum(shares.values()) - 1) < 0.01 and shares["matmul"] > 0.2, shares
    assert all(k["kind"] == "matmul" for k in baseline["profile"]["top_kernels"] if k["name"] in ("aten::mm", "aten::addmm"))


def test_kernel_kinds_from_gpu_kernel_names():
    """Names as the H200's profile showed them: cuBLAS's nvjet, flash attention, inductor's Triton kernels and templates."""
    from benchmarks.model_profile import kernel_kind

    assert kernel_kind("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_NNT") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>") == "attention"
    assert kernel_kind("triton_poi_fused__unsafe_view_mul_silu_split_5") == "fused elementwise"
    assert kernel_kind("triton_tem_fused_mm_3") == "matmul"
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert kernel_kind("void at::native::indexFuncLargeIndex<float>") == "other"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0") == "attention"


def test_attention_kernels_compare_on_the_engines_packed_batches(tmp_path):
    """benchmarks.attention on a CPU: the engine's own packing, both kernels timed over the same batches, outputs
    compared (here both run the exact per-sequence fallback, so they agree to the bit)."""
    import json

    import pyarrow.parquet as pq

    from benchmarks.attention import run
    from benchmarks.embed import prepare_gpu_inputs

    prepare_gpu_inputs(tmp_path, 20_000)
    output = tmp_path / "attention.json"
    results = run(tmp_path, repeats=1, output=output, device="cpu", chunks=12, batch_tokens=2_048)
    assert json.loads(output.read_text()) == results
    lengths = pq.read_table(tmp_path / "chunks.parquet", columns=["chunk_token_count"]).column("chunk_token_count").to_pylist()[:12]
    assert results["batches"] >= 2 and results["tokens"] >= sum(lengths)  # the prefix and special tokens come on top
    assert results["padded_width"] == 2_048 and results["plan_shapes_in_both_blocks"] >= 1
    for kernel in ("flash", "cudnn"):
        entry = results["kernels"][kernel]
        assert "error" not in entry and entry["seconds_per_pass"] > 0 and entry["ns_per_token_and_layer"] > 0
        assert entry["first_pass_seconds_block_a"] > 0 and entry["first_pass_seconds_block_b"] > 0
    assert results["max_abs_difference"] == 0.0 and results["outputs_agree"]
