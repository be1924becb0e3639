"""Packed attention kernels side by side: FlashAttention-2 (torch's `varlen_attn`) against cuDNN's ragged attention.

Attention alone, on q/k/v shaped like the GPU entry's packed batches (`benchmarks/embed.py --prepare-gpu`):
the chunks are tokenized and packed exactly as the engine packs them (65,536 real tokens per batch), and each
batch gets random bf16 q/k/v of nomic-embed-text-v1.5's shape (12 heads of 64). One pass = every batch of
the first 8,192 chunks once, as one layer of the model sees them; alternating kernels, median of the repeats.
The first call of each kernel is timed apart (cuDNN builds an execution plan per shape). The outputs of the
two kernels are compared on every batch. On a CPU both run the exact per-sequence fallback (the code path
only; no kernel is timed there that matters).

    python -m benchmarks.attention --gpu-inputs .gpu --output $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.embed import NOMIC_PREFIX, log, timed
from fineweb_modal import attention
from fineweb_modal.embedding import GPU_BATCH_TOKENS, TransformersEngine

HEADS, HEAD_DIM = 12, 64  # nomic-embed-text-v1.5


def packed_batches(inputs: Path, chunks: int, batch_tokens: int) -> list[dict]:
    """The engine's packed batches (cu_seq_lens_q, max_length_q) for the first `chunks` chunks of the GPU inputs."""
    import pyarrow.parquet as pq
    from transformers import NomicBertConfig, NomicBertModel

    texts = pq.read_table(inputs / "chunks.parquet", columns=["chunk_text"]).column("chunk_text").to_pylist()[:chunks]
    tiny = NomicBertModel(NomicBertConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2)).eval()
    engine = TransformersEngine(
        str(inputs / "nomic-shape"), prefix=NOMIC_PREFIX, model=tiny, device="cpu", attention="packed", compile=False, batch_tokens=batch_tokens
    )
    return engine.prepare(texts).batches


def run(inputs: Path, repeats: int, output: Path | None, device: str = "cuda", chunks: int = 8192, batch_tokens: int = GPU_BATCH_TOKENS) -> dict:
    """Time both kernels over the same batches; compare their outputs."""
    device_ = torch.device(device)
    on_gpu = device_.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    attention.register()
    generator = torch.Generator(device=device_).manual_seed(0)
    batches = []
    for batch in packed_batches(inputs, chunks, batch_tokens):
        cu = batch["cu_seq_lens_q"].to(device_)
        tokens = int(cu[-1])
        q, k, v = (torch.randn((1, HEADS, tokens, HEAD_DIM), generator=generator, device=device_, dtype=dtype) for _ in range(3))
        batches.append((q, k, v, cu, batch["max_length_q"], batch["lengths"]))
    tokens = sum(int(b[3][-1]) for b in batches)
    # Two matmuls (scores, mixing) of 2 FLOPs per multiply-add over every pair of positions in a sequence.
    flops = sum(4 * HEADS * HEAD_DIM * float((b[5].double() ** 2).sum()) for b in batches)

    def one_pass(kernel: str) -> list:
        return [
            attention.packed_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest, kernel=kernel)[0]
            for q, k, v, cu, longest, _ in batches
        ]

    results: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({device})",
        "batches": len(batches),
        "tokens": tokens,
        "kernels": {},
    }
    outputs = {}
    for kernel in attention.PACKED_KERNELS:
        entry: dict = {}
        results["kernels"][kernel] = entry
        try:
            entry["first_pass_seconds"] = round(timed(lambda kernel=kernel: outputs.__setitem__(kernel, one_pass(kernel)), on_gpu), 4)
        except Exception as exc:  # reported; the other kernel still measures
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
        log(f"attention {kernel}: {entry}")
    working = [k for k, e in results["kernels"].items() if "error" not in e]
    times: dict[str, list[float]] = {k: [] for k in working}
    for _ in range(repeats):
        for kernel in working:
            times[kernel].append(timed(lambda kernel=kernel: one_pass(kernel), on_gpu))
    layers = 1  # one pass is one layer's attention for every token
    for kernel in working:
        seconds = statistics.median(times[kernel])
        entry = results["kernels"][kernel]
        entry["seconds_per_pass"] = round(seconds, 5)
        entry["ns_per_token_and_layer"] = round(seconds * 1e9 / tokens / layers, 3)
        entry["tflops"] = round(flops / seconds / 1e12, 1)
    if len(working) == 2:
        flash, cudnn = (outputs[k] for k in attention.PACKED_KERNELS)
        results["max_abs_difference"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(flash, cudnn, strict=True))
        results["cudnn_vs_flash_speed"] = round(results["kernels"]["flash"]["seconds_per_pass"] / results["kernels"]["cudnn"]["seconds_per_pass"], 3)
    log(f"attention: {results}")
    if output:
        output.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    """Run on the GPU (a CPU run checks the code path only) and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-inputs", type=Path, required=True, help="a folder written by `python -m benchmarks.embed --prepare-gpu`")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(json.dumps(run(args.gpu_inputs, args.repeats, args.output, device=device), indent=2))


if __name__ == "__main__":
    main()
