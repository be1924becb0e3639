"""Embedding throughput, side by side in one process, alternating, median of several repetitions.

CPU (always): the in-process engine vs sentence-transformers `encode(batch_size=32)` vs a seed-style
baseline (length-sorted, padded 512×1024-token budget, eager attention), on the same chunks of the same
model (all-MiniLM-L6-v2). GPU (when CUDA is there): the engine in bf16 vs the seed-style baseline in fp16
on nomic-embed-text-v1.5's architecture (transformers' NomicBertModel, random weights). Tokens are real
tokens ([CLS]/[SEP] included, padding not). MFU = tokens/s × model FLOPs per token / peak, against the
measured matmul peak of the device (and, on an H100, its 989 TFLOP/s bf16 spec).

    python -m benchmarks.embed [--chunks 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import merge_results
from fineweb_modal.chunking import chunk_texts
from fineweb_modal.config import build_run_config
from fineweb_modal.demo import build_documents
from fineweb_modal.embedding import TransformersEngine
from fineweb_modal.models import DEFAULT_MODEL, model_info

RESULTS = Path(__file__).parent / "results"
SEED_BATCH_TOKENS = 512 * 1024
H100_BF16_SPEC_TFLOPS = 989.0
GOALS = {"cpu_vs_sentence_transformers": 1.2, "gpu_tokens_per_s": 2.0e6, "gpu_vs_seed": 2.0}


def chunk_corpus(n_chunks: int, max_tokens: int) -> list[str]:
    """Real English chunks as the chunk stage cuts them (the demo's documents, resampled as needed)."""
    cfg = build_run_config(name="bench", stages="chunk", max_tokens=max_tokens).chunk
    docs = [d["text"] for d in build_documents(max(20, n_chunks // 2), seed=7)]
    rows, _ = chunk_texts(docs, cfg)
    texts = [docs[d][s:e] for d, _, s, e, _ in rows]
    return (texts * (n_chunks // max(len(texts), 1) + 1))[:n_chunks]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The best of a few large matmuls: what this device really does, not its data sheet."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best / 1e12


def flops_per_token(model: torch.nn.Module, mean_tokens: float) -> float:
    """2 × non-embedding parameters (the matmuls) + attention scores and mixing (4 × layers × hidden × length)."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    config = model.config
    return 2 * params + 4 * config.num_hidden_layers * config.hidden_size * mean_tokens


def timed(fn, repeats: int, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(variants: dict, repeats: int, sync: bool) -> dict[str, float]:
    """Median seconds per variant, run alternately so drift on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up: weights in cache, kernels chosen
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, repeats, sync))
    return {name: statistics.median(values) for name, values in times.items()}


def cpu_entry(n_chunks: int, repeats: int) -> dict:
    """The CPU comparison on all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    texts = chunk_corpus(n_chunks, 256)
    path = model_info(DEFAULT_MODEL).path
    ours = TransformersEngine(DEFAULT_MODEL, device="cpu")
    seed = TransformersEngine(DEFAULT_MODEL, device="cpu", batch_tokens=SEED_BATCH_TOKENS)
    seed.model = seed.model.__class__.from_pretrained(path, attn_implementation="eager").eval()
    st = SentenceTransformer(path, device="cpu")
    tokens = sum(len(e.ids) for e in ours.tokenizer.encode_batch(texts))
    reference = st.encode(texts, batch_size=32, normalize_embeddings=True)
    cosine = float((ours.embed(texts) * reference).sum(axis=1).min())
    seconds = compare(
        {
            "engine": lambda: ours.embed(texts),
            "sentence_transformers": lambda: st.encode(texts, batch_size=32, normalize_embeddings=True),
            "seed_style": lambda: seed.embed(texts),
        },
        repeats,
        sync=False,
    )
    rates = {name: tokens / s for name, s in seconds.items()}
    peak = matmul_peak_tflops(torch.device("cpu"), torch.float32, 2048)
    flops = flops_per_token(ours.model, tokens / len(texts))
    ratio = rates["engine"] / rates["sentence_transformers"]
    return {
        "device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "model": DEFAULT_MODEL,
        "chunks": len(texts),
        "tokens": tokens,
        "tokens_per_s": {k: round(v) for k, v in rates.items()},
        "engine_vs_sentence_transformers": round(ratio, 3),
        "engine_vs_seed_style": round(rates["engine"] / rates["seed_style"], 3),
        "min_cosine_vs_sentence_transformers": round(cosine, 6),
        "matmul_peak_tflops_fp32": round(peak, 3),
        "mfu_vs_measured_peak": {k: round(v * flops / (peak * 1e12), 3) for k, v in rates.items()},
        "goal": f">= {GOALS['cpu_vs_sentence_transformers']}x sentence-transformers with cos >= 0.999",
        "pass": ratio >= GOALS["cpu_vs_sentence_transformers"] and cosine >= 0.999,
    }


def gpu_entry(n_chunks: int, repeats: int) -> dict:
    """The GPU comparison on nomic-embed-text-v1.5's architecture (random weights), or `no GPU`."""
    if not torch.cuda.is_available():
        return {"device": "no GPU", "pass": None}
    from transformers import NomicBertConfig, NomicBertModel

    device = torch.device("cuda")
    texts = chunk_corpus(n_chunks, 500)
    config = NomicBertConfig()  # nomic-embed-text-v1.5's shape: 12 layers, 768 hidden, rotary, SwiGLU
    ours_model = NomicBertModel(config).to(device, torch.bfloat16).eval()
    seed_config = NomicBertConfig(attn_implementation="eager")
    seed_model = NomicBertModel(seed_config).to(device, torch.float16).eval()
    ours = TransformersEngine(DEFAULT_MODEL, device="cuda", model=ours_model, batch_tokens=256 * 1024)
    seed = TransformersEngine(DEFAULT_MODEL, device="cuda", model=seed_model, batch_tokens=SEED_BATCH_TOKENS)
    ours.info = seed.info = ours.info.__class__(**{**ours.info.__dict__, "sequence_limit": 2048})
    tokens = sum(len(e.ids) for e in ours.tokenizer.encode_batch(texts))
    seconds = compare({"engine": lambda: ours.embed(texts), "seed_style": lambda: seed.embed(texts)}, repeats, sync=True)
    rates = {name: tokens / s for name, s in seconds.items()}
    peak = matmul_peak_tflops(device, torch.bfloat16, 8192)
    flops = flops_per_token(ours_model, tokens / len(texts))
    name = torch.cuda.get_device_name()
    return {
        "device": name,
        "model": "NomicBertModel (nomic-embed-text-v1.5 shape, random weights)",
        "chunks": len(texts),
        "tokens": tokens,
        "tokens_per_s": {k: round(v) for k, v in rates.items()},
        "engine_vs_seed_style": round(rates["engine"] / rates["seed_style"], 3),
        "matmul_peak_tflops_bf16": round(peak, 1),
        "mfu_vs_measured_peak": {k: round(v * flops / (peak * 1e12), 3) for k, v in rates.items()},
        "mfu_vs_h100_spec": {k: round(v * flops / (H100_BF16_SPEC_TFLOPS * 1e12), 3) for k, v in rates.items()} if "H100" in name else None,
        "goal": f">= {GOALS['gpu_tokens_per_s']:.0f} tokens/s and >= {GOALS['gpu_vs_seed']}x seed style",
        "pass": rates["engine"] >= GOALS["gpu_tokens_per_s"] and rates["engine"] / rates["seed_style"] >= GOALS["gpu_vs_seed"],
    }


def markdown(results: dict) -> str:
    """The table README shows."""
    lines = ["| entry | device | tokens/s (engine) | vs sentence-transformers | vs seed style | MFU (measured peak) | goal |", "|---|---|---:|---:|---:|---:|---|"]
    for name, entry in results["entries"].items():
        if entry.get("device") == "no GPU":
            lines.append(f"| {name} | no GPU | — | — | — | — | not measured |")
            continue
        verdict = "PASS" if entry["pass"] else "FAIL"
        lines.append(
            f"| {name} | {entry['device']} | {entry['tokens_per_s']['engine']:,} | {entry.get('engine_vs_sentence_transformers', '—')}× "
            f"| {entry['engine_vs_seed_style']}× | {entry['mfu_vs_measured_peak']['engine']:.0%} | {verdict}: {entry['goal']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the entries, write benchmarks/results/embed.json, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--gpu-chunks", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "entries": {"embed-cpu": cpu_entry(args.chunks, args.repeats), "embed-gpu": gpu_entry(args.gpu_chunks, args.repeats)},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps(results, indent=2))
    merge_results("embed", results["entries"])
    print(json.dumps(results, indent=2))
    print()
    print(markdown(results))


if __name__ == "__main__":
    main()
