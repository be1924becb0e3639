"""Attention over packed (unpadded) sequences, plugged into transformers' attention interface.

A batch is one row of concatenated sequences; `cu_seq_lens_q` marks where each starts. On CUDA the
attention is torch's `varlen_attn` (flash attention over the packed rows: no padding is computed);
elsewhere each sequence runs through SDPA on its own, which is slow but exact, so the packing, position
ids and pooling can be checked on any machine.
"""

from __future__ import annotations

import functools
import itertools

PACKED_ATTENTION = "fineweb_packed"


def varlen_available() -> bool:
    """True where torch ships `varlen_attn` and a CUDA device is there to run it."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function: (1, heads, tokens, dim) packed q/k/v → (1, tokens, heads, dim)."""
    import torch

    if cu_seq_lens_q is None:
        raise ValueError(f"{PACKED_ATTENTION} attention needs cu_seq_lens_q (the model was called without packing)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    head_dim = q.shape[-1]
    if q.is_cuda and (scaling is None or abs(scaling - head_dim**-0.5) < 1e-9):
        from torch.nn.attention.varlen import varlen_attn

        # Only the arguments every torch release with varlen_attn takes; its default scale is 1/sqrt(dim).
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q)
        return out.unsqueeze(0), None
    bounds = cu_seq_lens_q.tolist()
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=scaling
        )
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def register() -> str:
    """Register the packed attention with transformers once per process; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    return PACKED_ATTENTION


def supports_packing(model) -> bool:
    """True when the model dispatches attention through transformers' interface and takes position ids."""
    import inspect

    if not hasattr(model, "set_attn_implementation"):
        return False
    return "position_ids" in inspect.signature(model.forward).parameters
