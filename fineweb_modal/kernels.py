"""A Triton kernel for SwiGLU feed-forwards: both input projections and the gate in one pass.

nomic-embed-text-v1.5's feed-forward is `down(silu(x @ gate.T) * (x @ up.T))`. Run as torch ops (even
compiled), the gate and up matmuls write 2 × 3072 values per token and layer, and the gate reads them
back; here one kernel keeps both accumulators in registers and writes only the gated 3072 — ~24 KB of
bf16 memory traffic saved per token and layer. Whether that beats cuBLAS plus inductor's separate
elementwise kernel is a GPU measurement (`benchmarks/embed.py`, variant `engine_fused`); the engine
leaves it off unless asked (`TransformersEngine(fused_swiglu=True)`).

Importing this module needs triton (CUDA builds of torch bring it). Tests run the kernel on the CPU in
Triton's interpreter (`TRITON_INTERPRET=1`, set before this import) with fp16 operands: the interpreter's
bf16 `tl.dot` returns garbage (triton 3.8), while the kernel's code is the same for both 16-bit types.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Hopper-sized tiles; two fp32 accumulators per program bound BLOCK_M × BLOCK_N by the register file.
AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
K_MULTIPLE = max(c.kwargs["BLOCK_K"] for c in AUTOTUNE_CONFIGS)  # any config may win, so K must suit them all
HALF_TYPES = (torch.float16, torch.bfloat16)
INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}  # autotuning times on a GPU; the interpreter has none


@triton.jit
def _swiglu_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[M, N] = silu(x @ w[:N].T) * (x @ w[N:].T) for x (M, K) and w (2N, K), both row-major; K % BLOCK_K == 0."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    # Programs walk GROUP_M row blocks down each column block, so the rows of x they share stay in L2.
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows × 3072 passes 2**31 at ~700 k rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    gate_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # (BLOCK_K, BLOCK_N): w's rows read as columns
    up_ptrs = gate_ptrs + N * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(K // BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok, other=0.0)
        gate = tl.dot(x, tl.load(gate_ptrs, mask=col_ok, other=0.0), gate)
        up = tl.dot(x, tl.load(up_ptrs, mask=col_ok, other=0.0), up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    gated = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], gated.to(out_ptr.dtype.element_ty), mask=row_ok & col_ok)


_swiglu_autotuned = triton.autotune(configs=AUTOTUNE_CONFIGS, key=["N", "K"])(_swiglu_kernel)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, config: dict[str, int] | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for gate_up = cat([gate, up]) of shape (2N, K); x is (M, K). `config`: fixed tiles (tests)."""
    if x.dim() != 2 or gate_up.dim() != 2 or x.shape[1] != gate_up.shape[1] or gate_up.shape[0] % 2:
        raise ValueError(f"swiglu takes x (M, K) and gate_up (2N, K); got {tuple(x.shape)} and {tuple(gate_up.shape)}")
    if x.dtype not in HALF_TYPES or gate_up.dtype != x.dtype or gate_up.device != x.device:
        # fp32 would run tl.dot in TF32, silently less precise than the matmul it replaces.
        raise ValueError(f"swiglu takes fp16 or bf16 x and gate_up of one dtype on one device; got {x.dtype} and {gate_up.dtype}")
    gate_up = gate_up.contiguous()
    k = x.shape[1]
    multiple = config["BLOCK_K"] if config else K_MULTIPLE
    if k % multiple:
        raise ValueError(f"swiglu needs K (here {k}) to be a multiple of {multiple}")
    return _swiglu_op(x, gate_up) if config is None else _launch(x, gate_up, tiles=config)


class FusedSwiGLU(torch.nn.Module):
    """A SwiGLU feed-forward (gate_proj, up_proj, down_proj, SiLU, no biases) whose gate and up projections run in `swiglu`."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        if mlp.gate_proj.in_features % K_MULTIPLE:
            raise ValueError(f"FusedSwiGLU needs the hidden size (here {mlp.gate_proj.in_features}) to be a multiple of {K_MULTIPLE}")
        if mlp.gate_proj.weight.dtype not in HALF_TYPES:
            raise ValueError(f"FusedSwiGLU needs fp16 or bf16 weights, got {mlp.gate_proj.weight.dtype}")
        self.gate_up = torch.nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().contiguous(), requires_grad=False)
        self.down_proj = mlp.down_proj

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, hidden) → (…, hidden), as the feed-forward it replaces."""
        gated = _swiglu_op(hidden.reshape(-1, hidden.shape[-1]), self.gate_up)
        return self.down_proj(gated).reshape(*hidden.shape[:-1], -1)


def is_swiglu(module: torch.nn.Module) -> bool:
    """True for a bias-free gate/up/down feed-forward with SiLU, the shape FusedSwiGLU computes."""
    linears = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(layer, torch.nn.Linear) and layer.bias is None for layer in linears):
        return False
    activation = getattr(module, "act_fn", None)
    return isinstance(activation, torch.nn.SiLU) or type(activation).__name__ == "SiLUActivation"


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Replace every SwiGLU feed-forward in `model` with FusedSwiGLU, in place; returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if name and is_swiglu(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, FusedSwiGLU(module))
    return len(targets)


def _launch(x: torch.Tensor, gate_up: torch.Tensor, launch=lambda kernel: kernel, tiles: dict[str, int] | None = None) -> torch.Tensor:
    """Run the kernel: with `tiles`, else autotuned (fixed tiles in the interpreter: no GPU to time on); `launch` wraps it for torch.compile."""
    x = x.contiguous()
    (m, k), n = x.shape, gate_up.shape[0] // 2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (x, gate_up, out, m, n, k, x.stride(0), gate_up.stride(0), out.stride(0))
    if tiles or INTERPRETED:
        launch(_swiglu_kernel)[grid](*args, **(tiles or INTERPRETER_TILES))
    else:
        launch(_swiglu_autotuned)[grid](*args)
    return out


if hasattr(torch.library, "triton_op"):
    # A custom op, so torch.compile keeps the kernel whole instead of tracing into it.
    @torch.library.triton_op("fineweb_modal::swiglu", mutates_args=())
    def _swiglu_op(x: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
        return _launch(x, gate_up, torch.library.wrap_triton)

else:  # torch < 2.6: eager only
    _swiglu_op = _launch
