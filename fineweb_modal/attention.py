"""Attention over packed (unpadded) sequences, plugged into transformers' attention interface.

A batch is one row of concatenated sequences; `cu_seq_lens_q` marks where each starts. On CUDA the
attention is one of two kernels over the packed rows (no padding is computed): torch's `varlen_attn`
(FlashAttention-2, the default) or cuDNN's fused attention on ragged sequences (`kernel="cudnn"`, through
the op torch's nested tensors use). Elsewhere each sequence runs through SDPA on its own, which is slow but
exact, so the packing, position ids and pooling can be checked on any machine.
"""

from __future__ import annotations

import functools
import itertools

PACKED_ATTENTION = "fineweb_packed"
PACKED_KERNELS = {"flash": PACKED_ATTENTION, "cudnn": "fineweb_packed_cudnn"}  # kernel → registered attention name


def varlen_available() -> bool:
    """True where torch ships `varlen_attn` and a CUDA device is there to run it."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def packed_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, max_length_q=None, kernel="flash", **kwargs
):
    """transformers attention function: (1, heads, tokens, dim) packed q/k/v → (1, tokens, heads, dim)."""
    import torch

    if cu_seq_lens_q is None:
        raise ValueError(f"{PACKED_KERNELS[kernel]} attention needs cu_seq_lens_q (the model was called without packing)")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    head_dim = q.shape[-1]
    if kernel == "cudnn":
        scale = head_dim**-0.5 if scaling is None else float(scaling)
        # Defined by register(); looked up through torch.ops, which torch.compile traces as one call.
        out = torch.ops.fineweb_modal.cudnn_packed_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, int(max_length_q), scale)
        return out.unsqueeze(0), None
    if q.is_cuda and (scaling is None or abs(scaling - head_dim**-0.5) < 1e-9):
        from torch.nn.attention.varlen import varlen_attn

        # Only the arguments every torch release with varlen_attn takes; its default scale is 1/sqrt(dim).
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q)
        return out.unsqueeze(0), None
    return _attention_per_sequence(query, key, value, cu_seq_lens_q, scaling), None


def _attention_per_sequence(query, key, value, cu_seq_lens, scale):
    """(1, heads, tokens, dim) packed q/k/v → (1, tokens, heads, dim), each sequence through SDPA on its own."""
    import torch

    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=scale
        )
        for start, end in itertools.pairwise(cu_seq_lens.tolist())
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


@functools.cache
def define_cudnn_packed_attention():
    """Define a torch custom op over packed q/k/v: cuDNN's ragged fused attention on CUDA, SDPA per sequence elsewhere.

    An op of our own, so that torch.compile sees one opaque call with a known output (as torch wraps its
    own `varlen_attn`), and so that the compiled path runs, and is tested, on a CPU.
    """
    import torch

    # The schema spelled out: this module's annotations are strings (`from __future__ import annotations`).
    schema = "(Tensor q, Tensor k, Tensor v, Tensor cu_seq_lens, SymInt max_length, float scale) -> Tensor"

    @torch.library.custom_op("fineweb_modal::cudnn_packed_attention", mutates_args=(), schema=schema)
    def cudnn_packed_attention(q, k, v, cu_seq_lens, max_length, scale):
        if not q.is_cuda:
            # Rows past the last sequence (a batch's padded tail) stay zero: no sequence attends to them.
            out = torch.zeros_like(q)
            end = int(cu_seq_lens[-1])
            head_first = (t[:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out[:end] = _attention_per_sequence(*head_first, cu_seq_lens, scale)[0]
            return out
        outputs = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu_seq_lens, cu_seq_lens, max_length, max_length, False, 0.0, False, False, scale=scale
        )
        return outputs[0].contiguous()

    @cudnn_packed_attention.register_fake
    def _(q, k, v, cu_seq_lens, max_length, scale):
        return torch.empty_like(q)

    return cudnn_packed_attention


def cudnn_attention_available() -> bool:
    """True where a CUDA device of compute capability 8.0+, cuDNN 9 and torch's cuDNN attention op are there."""
    import torch

    if not (torch.cuda.is_available() and torch.backends.cudnn.is_available() and hasattr(torch.ops.aten, "_cudnn_attention_forward")):
        return False
    # cuDNN's fused attention: Ampere or newer, cuDNN 9 (ragged sequences).
    return torch.cuda.get_device_capability() >= (8, 0) and (torch.backends.cudnn.version() or 0) >= 90000


@functools.cache
def register() -> str:
    """Register the packed attentions (one per kernel) with transformers once per process; returns the flash one's name."""
    from transformers import AttentionInterface

    define_cudnn_packed_attention()
    for kernel, name in PACKED_KERNELS.items():
        AttentionInterface.register(name, functools.partial(packed_attention, kernel=kernel))
    return PACKED_ATTENTION


def supports_packing(model) -> bool:
    """True when the model dispatches attention through transformers' interface and takes position ids."""
    import inspect

    if not hasattr(model, "set_attn_implementation"):
        return False
    return "position_ids" in inspect.signature(model.forward).parameters
