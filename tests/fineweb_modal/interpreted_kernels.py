"""Checks of fineweb_modal.kernels in Triton's interpreter, on the CPU.

Not collected on its own (the name has no test_ prefix): `test_kernels.py` runs this file under pytest in a
child process with TRITON_INTERPRET=1, which must be set before triton decorates the kernel.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fineweb_modal import kernels
from fineweb_modal.embedding import TransformersEngine
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL

# fp16, not bf16: the interpreter's bf16 tl.dot is wrong (triton 3.8); the kernel's code is the same for both.
DTYPE = torch.float16


def reference_swiglu(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The feed-forward's first half as NomicBertMLP computes it, in fp32."""
    gate, up = gate_up.float().chunk(2)
    return torch.nn.functional.silu(x.float() @ gate.T) * (x.float() @ up.T)


def tiny_nomic(layers: int = 2):
    """Random weights large enough that the feed-forward moves the output (at the default 0.02, a wrong gate keeps cos 0.99999)."""
    from transformers import NomicBertConfig, NomicBertModel

    torch.manual_seed(0)
    config = NomicBertConfig(num_hidden_layers=layers, hidden_size=64, intermediate_size=80, num_attention_heads=2, initializer_range=0.1)
    return NomicBertModel(config).eval()


def test_runs_interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1" and kernels.INTERPRETED


@pytest.mark.parametrize(("rows", "n"), [(100, 80), (7, 32), (256, 64)])
def test_swiglu_matches_the_unfused_math(rows, n):
    """Rows and columns that do not fill the last tile (masks), several row blocks per group (the L2 walk)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 64, dtype=DTYPE)
    gate_up = (torch.randn(2 * n, 64) / 8).to(DTYPE)
    expected = reference_swiglu(x, gate_up)
    for out in (kernels.swiglu(x, gate_up, kernels.INTERPRETER_TILES), kernels.swiglu(x, gate_up)):  # fixed tiles; the custom op
        assert out.shape == (rows, n) and out.dtype == DTYPE
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("config", [c.kwargs for c in kernels.AUTOTUNE_CONFIGS], ids=lambda c: "x".join(str(v) for v in c.values()))
def test_every_tile_shape_the_autotuner_may_pick_is_right(config):
    """The shipped configs, which only a GPU autotunes between: each on rows and columns that leave partial tiles."""
    torch.manual_seed(1)
    x = torch.randn(150, 128, dtype=DTYPE)
    gate_up = (torch.randn(2 * 200, 128) / 8).to(DTYPE)
    out = kernels.swiglu(x, gate_up, config)
    torch.testing.assert_close(out.float(), reference_swiglu(x, gate_up), atol=2e-2, rtol=2e-2)


def test_swiglu_rejects_shapes_it_cannot_run():
    x = torch.zeros(4, 64, dtype=DTYPE)
    with pytest.raises(ValueError, match="swiglu takes x"):
        kernels.swiglu(x, torch.zeros(3, 64, dtype=DTYPE))  # odd number of rows: no gate/up halves
    with pytest.raises(ValueError, match="swiglu takes x"):
        kernels.swiglu(x, torch.zeros(4, 32, dtype=DTYPE))
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.swiglu(torch.zeros(4, 48, dtype=DTYPE), torch.zeros(8, 48, dtype=DTYPE))
    with pytest.raises(ValueError, match="fp16 or bf16"):  # fp32 would multiply in TF32 on a GPU
        kernels.swiglu(torch.zeros(4, 64), torch.zeros(8, 64))
    with pytest.raises(ValueError, match="one dtype"):
        kernels.swiglu(x, torch.zeros(8, 64, dtype=torch.bfloat16))


def test_fuse_swiglu_replaces_every_feed_forward_and_keeps_the_outputs():
    model = tiny_nomic().to(DTYPE)
    ids = torch.randint(0, 1000, (2, 37))
    hidden = torch.randn(2, 37, 64, dtype=DTYPE)
    with torch.inference_mode():
        mlp = model.layers[0].mlp
        torch.testing.assert_close(kernels.FusedSwiGLU(mlp)(hidden).float(), mlp(hidden).float(), atol=2e-2, rtol=2e-2)
        before = model(input_ids=ids).last_hidden_state.float()
        assert kernels.fuse_swiglu(model) == 2
        after = model(input_ids=ids).last_hidden_state.float()
    assert all(isinstance(layer.mlp, kernels.FusedSwiGLU) for layer in model.layers)
    assert kernels.fuse_swiglu(model) == 0, "a fused model has nothing left to fuse"
    cosine = torch.nn.functional.cosine_similarity(before.flatten(0, 1), after.flatten(0, 1))
    assert cosine.min() >= 0.9999


def test_engine_with_fused_swiglu_embeds_as_the_plain_engine():
    """Packed batches, pooling and normalization around the fused model, against the same weights unfused."""
    import copy

    texts = ["A short sentence.", "The quick brown fox jumps over the lazy dog. " * 6, "x", "Unicode: café, naïve."]
    model = tiny_nomic().to(DTYPE)
    plain = TransformersEngine(DEFAULT_MODEL, model=model, attention="packed", dtype=DTYPE, compile=False, device="cpu")
    fused = TransformersEngine(DEFAULT_MODEL, model=copy.deepcopy(model), attention="packed", dtype=DTYPE, compile=False, device="cpu", fused_swiglu=True)
    assert isinstance(fused.model.layers[0].mlp, kernels.FusedSwiGLU)
    ours, expected = fused.embed(texts), plain.embed(texts)
    assert ours.shape == (4, 64)
    assert float(np.min((ours * expected).sum(axis=1))) >= 0.9999


def test_engine_refuses_fused_swiglu_on_a_model_without_one():
    with pytest.raises(ConfigError, match="has no SwiGLU feed-forward"):
        TransformersEngine(DEFAULT_MODEL, compile=False, device="cpu", fused_swiglu=True)  # all-MiniLM-L6-v2: GELU, biases


def test_engine_refuses_fused_swiglu_in_fp32():
    with pytest.raises(ConfigError, match="fused_swiglu: FusedSwiGLU needs fp16 or bf16 weights"):
        TransformersEngine(DEFAULT_MODEL, model=tiny_nomic(), attention="packed", dtype=torch.float32, compile=False, device="cpu", fused_swiglu=True)
