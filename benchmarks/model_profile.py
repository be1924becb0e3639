"""The embedding model alone: where its device time goes, by kernel kind, and what compile modes and batch budgets change.

Model only (pre-tokenized blocks, no parquet I/O) on nomic-embed-text-v1.5's shape with random weights, as
the GPU entry of `benchmarks/embed.py`, whose inputs folder it reads (`--prepare-gpu`). The baseline is the
current best engine (packed, bf16, compiled with freezing). Ordered so that a run cut off at its time limit
has already written every figure it measured: the baseline's rate and profile first, then each candidate
(compile seconds, rate, min cos against the baseline). The results file is rewritten after each step.

    python -m benchmarks.model_profile --gpu-inputs .gpu --output $OUT/model-profile.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.embed import NOMIC_PREFIX, flops_per_token, log, matmul_peak_tflops, timed
from fineweb_modal.embedding import TransformersEngine

BASELINE = "frozen"
CANDIDATES: dict[str, dict] = {
    BASELINE: {"freeze": True},
    "frozen_131k": {"freeze": True, "batch_tokens": 131_072},  # half the launches per token
    "frozen_autotuned": {"freeze": True, "compile_mode": "max-autotune-no-cudagraphs"},  # Triton matmul templates, epilogues fused
    "frozen_computed_rotary": {"freeze": True, "rotary_table": False},  # cos/sin computed per call, as transformers does
    "frozen_cudnn": {"freeze": True, "attention_kernel": "cudnn"},  # cuDNN's ragged attention instead of FlashAttention-2
}
# Kernel names by kind, first match wins: flash attention; cuBLAS/CUTLASS and Triton matmul templates; the
# rest of inductor's Triton kernels (rotary, SwiGLU's gate × up, residual + layer norm); copies.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                "mkldnn::_linear")),
    ("fused elementwise", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "aten::cat")),
)


def kernel_kind(name: str) -> str:
    """The kind of work a kernel (or, on a CPU, an operator) does, from its name."""
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(key in lower for key in keys)), "other")


def profile_block(engine: TransformersEngine, block) -> dict:
    """Device time of one block by kernel kind: shares, picoseconds per token and layer, and the largest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    with profile(activities=activities) as prof:
        engine.run(block)
        if on_gpu:
            torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        if on_gpu:
            if event.device_type != DeviceType.CUDA:
                continue
            micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        else:  # CPU operators (self time: no double counting) stand in for kernels, so the code path runs in tests
            micros = event.self_cpu_time_total
        by_kind[kernel_kind(event.key)] += micros
        kernels.append((micros, event.key, event.count))
    total = sum(by_kind.values()) or 1.0
    layers = int(engine.model.config.num_hidden_layers)
    return {
        "device_seconds": round(total / 1e6, 4),
        "share": {kind: round(micros / total, 4) for kind, micros in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "ps_per_token_and_layer": {kind: round(micros * 1e6 / block.tokens / layers, 1) for kind, micros in by_kind.items()},
        "top_kernels": [
            {"name": name[:120], "kind": kernel_kind(name), "share": round(micros / total, 4), "calls": count}
            for micros, name, count in sorted(kernels, reverse=True)[:15]
        ],
    }


def run(
    inputs: Path,
    candidates: list[str],
    repeats: int,
    output: Path | None,
    device: str = "cuda",
    model_config: dict | None = None,
    profile: bool = True,
) -> dict:
    """Time the baseline and each candidate on the same blocks; write the results after each step."""
    import pyarrow.parquet as pq
    from transformers import NomicBertConfig, NomicBertModel

    device_ = torch.device(device)
    on_gpu = device_.type == "cuda"
    model_dir = str(inputs / "nomic-shape")
    texts = pq.read_table(inputs / "chunks.parquet", columns=["chunk_text"]).column("chunk_text").to_pylist()
    torch.manual_seed(0)
    base = NomicBertModel(NomicBertConfig(**(model_config or {}))).eval()
    results: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({device})",
        "chunks": len(texts),
        "variants": {},
    }
    if on_gpu:
        results["matmul_peak_tflops_bf16"] = round(matmul_peak_tflops(device_, torch.bfloat16, 8192), 1)

    def save() -> None:
        if output:
            output.write_text(json.dumps(results, indent=2))

    save()
    blocks_by_packing: dict[tuple[int, str], list] = {}
    reference = None
    for name in [BASELINE, *(c for c in candidates if c != BASELINE)]:
        options = dict(CANDIDATES[name])
        entry: dict = {"options": options}
        results["variants"][name] = entry
        engine = model = None
        try:
            start = time.perf_counter()
            model = copy.deepcopy(base).to(device_, torch.bfloat16)
            attention = "packed" if on_gpu else "padded"
            engine = TransformersEngine(
                model_dir, prefix=NOMIC_PREFIX, model=model, device=device_.type, attention=attention, compile=True, **options
            )
            packing = (engine.batch_tokens, engine.attention_kernel)  # the cuDNN kernel's batches are padded to the budget
            if packing not in blocks_by_packing:
                blocks_by_packing[packing] = [engine.prepare(texts[i : i + 8192]) for i in range(0, len(texts), 8192)]
            blocks = blocks_by_packing[packing]
            tokens = sum(b.tokens for b in blocks)
            vectors = engine.embed(texts[:512])  # compiles
            for block in blocks:  # warm-up: the remaining batch shapes
                engine.run(block)
            entry["compile_and_warm_up_seconds"] = round(time.perf_counter() - start, 1)
            if not engine.compiled:
                raise RuntimeError("torch.compile failed and the engine fell back to eager")
            if name == BASELINE:
                reference = vectors
            if reference is not None:  # none when the baseline failed: then no candidate claims agreement with it
                entry["min_cos_vs_baseline"] = round(float((vectors * reference).sum(axis=1).min()), 6)
            seconds = statistics.median(
                timed(lambda engine=engine, blocks=blocks: [engine.run(b) for b in blocks], on_gpu) for _ in range(repeats)
            )
            entry["tokens_per_s"] = round(tokens / seconds)
            flops = flops_per_token(base, tokens / len(texts))
            if on_gpu:
                entry["mfu_vs_measured_peak"] = round(tokens / seconds * flops / (results["matmul_peak_tflops_bf16"] * 1e12), 3)
            log(f"{name}: {entry}")
            save()
            if profile and name == BASELINE:
                entry["profile"] = profile_block(engine, blocks[0])
                log(f"{name} profile: {entry['profile']['share']} {entry['profile']['ps_per_token_and_layer']}")
        except Exception as exc:  # reported; the next candidate still runs
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            log(f"{name}: {entry['error']}")
        save()
        engine = model = None  # the next candidate gets the device's memory
        if on_gpu:
            torch.cuda.empty_cache()
    base_rate = results["variants"][BASELINE].get("tokens_per_s")
    for entry in results["variants"].values():
        if base_rate and "tokens_per_s" in entry:
            entry["vs_baseline"] = round(entry["tokens_per_s"] / base_rate, 3)
    save()
    return results


def main() -> None:
    """Run on the GPU (a CPU run checks the code path only) and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-inputs", type=Path, required=True, help="a folder written by `python -m benchmarks.embed --prepare-gpu`")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"of {', '.join(CANDIDATES)}; the baseline always runs first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = run(args.gpu_inputs, args.candidates.split(","), args.repeats, args.output, device=device)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
