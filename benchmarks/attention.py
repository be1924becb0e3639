"""Packed attention kernels side by side: FlashAttention-2 (torch's `varlen_attn`) against cuDNN's ragged attention.

Attention alone, on q/k/v shaped like the GPU entry's packed batches (`benchmarks/embed.py --prepare-gpu`):
the chunks are tokenized and packed exactly as the engine packs them for the cuDNN kernel (65,536 real
tokens at most per batch, each padded to that width: cuDNN caches an execution plan per shape), and each
batch gets random bf16 q/k/v of nomic-embed-text-v1.5's shape (12 heads of 64). A pass runs every batch of
a block once, as one layer of the model sees them. Two blocks of 4,096 chunks: the first pass over block A
(every plan built), the first pass over block B (new data: plans for shapes A did not have), then both
kernels alternately over block A, median of the repeats. Outputs are compared on every real row of block A.
Results are written after every step, so a run that fails half-way keeps what it measured. On a CPU both
kernels run the exact per-sequence fallback (the code path only; no kernel that matters is timed there).

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
MAX_DIFFERENCE = 0.02  # bf16 attention outputs of magnitude ≤ 1: a few units in the last place


def packed_batches(inputs: Path, chunks: int, batch_tokens: int) -> list[list[dict]]:
    """The engine's packed batches for the cuDNN kernel, for two blocks of `chunks` chunks of the GPU inputs."""
    import pyarrow.parquet as pq
    from transformers import NomicBertConfig, NomicBertModel

    texts = pq.read_table(inputs / "chunks.parquet", columns=["chunk_text"]).column("chunk_text").to_pylist()[: 2 * chunks]
    tiny = NomicBertModel(NomicBertConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=2)).eval()
    engine = TransformersEngine(
        str(inputs / "nomic-shape"), prefix=NOMIC_PREFIX, model=tiny, device="cpu", attention="packed", compile=False,
        batch_tokens=batch_tokens, attention_kernel="cudnn",
    )
    return [engine.prepare(texts[i : i + chunks]).batches for i in (0, chunks)]


def run(inputs: Path, repeats: int, output: Path | None, device: str = "cuda", chunks: int = 4096, batch_tokens: int = GPU_BATCH_TOKENS) -> dict:
    """Time both kernels over the same batches; compare their outputs; write the results after each step."""
    device_ = torch.device(device)
    on_gpu = device_.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    attention.register()
    generator = torch.Generator(device=device_).manual_seed(0)
    blocks = []
    for prepared in packed_batches(inputs, chunks, batch_tokens):
        block = []
        for batch in prepared:
            width = batch["input_ids"].shape[1]
            q, k, v = (torch.randn((1, HEADS, width, HEAD_DIM), generator=generator, device=device_, dtype=dtype) for _ in range(3))
            block.append((q, k, v, batch["cu_seq_lens_q"].to(device_), batch["max_length_q"], batch["lengths"], batch["tokens"]))
        blocks.append(block)
    block_a, block_b = blocks
    tokens = sum(b[6] for b in block_a)
    # Two matmuls (scores, mixing) of 2 FLOPs per multiply-add over every pair of positions in a sequence.
    flops = sum(4 * HEADS * HEAD_DIM * float((b[5].double() ** 2).sum()) for b in block_a)
    shapes = {(len(b[5]), b[4]) for block in blocks for b in block}

    def one_pass(kernel: str, block: list) -> list:
        return [
            attention.packed_attention(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest, kernel=kernel)[0][0, :real]
            for q, k, v, cu, longest, _, real in block
        ]

    results: dict = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({device})",
        "batches": len(block_a),
        "tokens": tokens,
        "padded_width": block_a[0][0].shape[2],
        "plan_shapes_in_both_blocks": len(shapes),
        "kernels": {},
    }

    def save() -> None:
        log(f"attention: {results}")
        if output:
            output.write_text(json.dumps(results, indent=2))

    save()
    outputs = {}
    for kernel in attention.PACKED_KERNELS:
        entry: dict = {}
        results["kernels"][kernel] = entry
        try:
            entry["first_pass_seconds_block_a"] = round(timed(lambda kernel=kernel: outputs.__setitem__(kernel, one_pass(kernel, block_a)), on_gpu), 4)
            entry["first_pass_seconds_block_b"] = round(timed(lambda kernel=kernel: one_pass(kernel, block_b), on_gpu), 4)
        except Exception as exc:  # reported; the other kernel still measures
            entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
        save()
    working = [k for k, e in results["kernels"].items() if "error" not in e]
    if len(working) == 2:
        flash, cudnn = (outputs[k] for k in attention.PACKED_KERNELS)
        difference = max(float((a.float() - b.float()).abs().max()) for a, b in zip(flash, cudnn, strict=True))
        results["max_abs_difference"] = difference
        results["outputs_agree"] = difference <= MAX_DIFFERENCE
    outputs.clear()
    save()
    times: dict[str, list[float]] = {k: [] for k in working}
    try:
        for _ in range(repeats):
            for kernel in working:
                times[kernel].append(timed(lambda kernel=kernel: one_pass(kernel, block_a), on_gpu))
    except Exception as exc:  # the repeats measured so far still count
        results["timing_error"] = f"{type(exc).__name__}: {exc}"[:400]
    for kernel in working:
        if not times[kernel]:
            continue
        seconds = statistics.median(times[kernel])
        entry = results["kernels"][kernel]
        entry["seconds_per_pass"] = round(seconds, 5)
        entry["ns_per_token_and_layer"] = round(seconds * 1e9 / tokens, 3)  # a pass is one layer
        entry["tflops"] = round(flops / seconds / 1e12, 1)
    if all(times.get(k) for k in attention.PACKED_KERNELS):
        results["cudnn_vs_flash_speed"] = round(results["kernels"]["flash"]["seconds_per_pass"] / results["kernels"]["cudnn"]["seconds_per_pass"], 3)
    save()
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
