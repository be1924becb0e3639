"""Would fp8 matmuls keep the vectors? Linear layers in e4m3, scaled per row, against fp32.

fp8 is the lever left for the GPU goal: an H100 multiplies e4m3 at twice its bf16 rate. This entry
measures the other half of that trade, the vectors. It runs `torch._scaled_mm` with per-row scales (an
H100's kernel through the same call) on CPU. There it quantizes, scales and rounds as the GPU does,
summing in another order, so the cosines are what a GPU would give; speed is not measured here.

Both models run on the same chunks: the trained model available offline (all-MiniLM-L6-v2), and
nomic-embed-text-v1.5's shape with random weights (what the GPU benchmark times).

    python -m benchmarks.fp8
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import merge_results
from benchmarks.embed import chunk_corpus
from fineweb_modal.embedding import TransformersEngine
from fineweb_modal.models import DEFAULT_MODEL

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
MIN_COSINE = 0.999  # the bar every engine variant keeps against fp32

# Which linear layers run in fp8, by their place in a block (`inner`: the feed-forward's inner width).
SELECTIONS: dict[str, Callable[[torch.nn.Linear, int], bool]] = {
    "all": lambda linear, inner: True,
    "feed-forward": lambda linear, inner: inner in (linear.in_features, linear.out_features),
    "feed-forward down": lambda linear, inner: linear.in_features == inner,
}


class RowwiseFloat8Linear(torch.nn.Module):
    """A Linear in e4m3: weights scaled per output row once, inputs scaled per token row on each call."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        self.weight = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # (out, in); .t() is the column-major operand
        self.weight_scale = scale.t().contiguous()  # (1, out)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        quantized = (rows / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # Per-row scaling on an H100 requires a bf16 output.
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias, out_dtype=torch.bfloat16
        )
        return out.to(inputs.dtype).reshape(*inputs.shape[:-1], -1)


def to_fp8(model: torch.nn.Module, selection: str) -> tuple[torch.nn.Module, float]:
    """A bf16 copy of model with the selected linear layers in fp8, and their share of its matmul FLOPs."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    inner = int(model.config.intermediate_size)
    chosen = total = 0
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and "pooler" not in f"{path}.{name}":  # BERT's pooler: not in the vectors
                total += child.weight.numel()
                if SELECTIONS[selection](child, inner):
                    chosen += child.weight.numel()
                    setattr(parent, name, RowwiseFloat8Linear(child))
    return model, chosen / max(total, 1)


def min_cosines(model: torch.nn.Module, texts: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Lowest cosine against fp32 of bf16 and each fp8 selection, and each selection's share of the matmul FLOPs."""

    def vectors(variant: torch.nn.Module, dtype: torch.dtype) -> np.ndarray:
        engine = TransformersEngine(DEFAULT_MODEL, model=variant, device="cpu", attention="padded", dtype=dtype, compile=False)
        return engine.embed(texts)

    reference = vectors(copy.deepcopy(model).float(), torch.float32)
    cosines = {"bf16": float((vectors(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16) * reference).sum(axis=1).min())}
    shares = {}
    for selection in SELECTIONS:
        variant, shares[selection] = to_fp8(model, selection)
        cosines[f"fp8 {selection}"] = float((vectors(variant, torch.bfloat16) * reference).sum(axis=1).min())
    return cosines, shares


def fp8_entry(n_chunks: int, nomic_config: dict | None = None) -> dict:
    """The agreement of fp8 variants with fp32, on a trained model and on nomic's shape with random weights."""
    from transformers import AutoModel, NomicBertConfig, NomicBertModel

    from fineweb_modal.models import model_info

    texts = chunk_corpus(n_chunks, 250)  # both models take them: MiniLM's limit is 256, nomic's tokenizer is the same
    trained = AutoModel.from_pretrained(model_info(DEFAULT_MODEL).path, attn_implementation="sdpa").eval()
    torch.manual_seed(0)
    random_nomic = NomicBertModel(NomicBertConfig(**(nomic_config or {}))).eval()
    results = {}
    for label, model in (("all-MiniLM-L6-v2 (trained)", trained), ("nomic-embed-text-v1.5 shape (random weights)", random_nomic)):
        cosines, shares = min_cosines(model, texts)
        results[label] = {
            "min_cosine_vs_fp32": {k: round(v, 5) for k, v in cosines.items()},
            "fp8_share_of_matmul_flops": {k: round(v, 3) for k, v in shares.items()},
        }
    trained_ok = [s for s in SELECTIONS if results["all-MiniLM-L6-v2 (trained)"]["min_cosine_vs_fp32"][f"fp8 {s}"] >= MIN_COSINE]
    return {
        "device": "CPU: numerics of torch._scaled_mm (per-row e4m3), speed not measured",
        "chunks": len(texts),
        "models": results,
        "min_cosine_bar": MIN_COSINE,
        "trained_selections_within_bar": trained_ok,
        "goal": f"an fp8 selection with min cos >= {MIN_COSINE} vs fp32 on trained weights",
        "pass": bool(trained_ok),
    }


def main() -> None:
    """Run the entry, merge it into benchmarks/results/latest.json, print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32)
    args = parser.parse_args()
    entry = fp8_entry(args.chunks)
    merge_results("fp8", {"embed-fp8": entry})
    print(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "entry": entry}, indent=2))


if __name__ == "__main__":
    main()
