"""Rotary position embeddings as a table: each position's cos/sin computed once, looked up per call.

Compiled, a rotary model otherwise computes cos and sin of position × frequency inside every layer's rotary
kernel (inductor recomputes cheap pointwise work rather than storing it): 48 accurate sin/cos calls per token
and dimension across nomic's 12 layers, where a lookup is a load from a table that stays in cache. On an H200
the compiled nomic shape ran 1.043× with the table (benchmarks/results/model-profile-gpu-rotary.json).
"""

from __future__ import annotations

import torch


class RotaryTable(torch.nn.Module):
    """A rotary embedding's outputs (cos, sin) for positions 0..n-1; called as the module it replaces: (x, position_ids)."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the given positions, in x's dtype (as transformers' rotary embeddings return them)."""
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def _replaceable(module: torch.nn.Module) -> bool:
    """transformers' `*RotaryEmbedding` of the default rope type (no dynamic scaling that changes with the length)."""
    default = getattr(module, "rope_type", None) == "default"
    return type(module).__name__.endswith("RotaryEmbedding") and default and hasattr(module, "inv_freq")


def tabulate_rotary(model: torch.nn.Module, positions: int) -> int:
    """Replace each default rotary embedding in `model` (in place) by a RotaryTable of its own outputs for
    positions 0..positions-1; returns how many modules were replaced (a module shared by several parents counts once)."""
    tables: dict[int, RotaryTable | None] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not _replaceable(module):
            continue
        if id(module) not in tables:
            tables[id(module)] = _table_of(module, positions)
        if (table := tables[id(module)]) is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, table)
    return sum(table is not None for table in tables.values())


def _table_of(module: torch.nn.Module, positions: int) -> RotaryTable | None:
    """The module's own forward over every position (so the table holds exactly what it returns), or None where it
    does not take transformers' usual (x, position_ids) or answers in another shape: then it is left as it is."""
    device = module.inv_freq.device
    try:
        with torch.no_grad():
            cos, sin = module(torch.empty(0, device=device, dtype=torch.float32), torch.arange(positions, device=device).unsqueeze(0))
    except Exception:  # any other signature or behaviour: computing per call stays correct, only slower
        return None
    if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)) or cos.shape != sin.shape or cos.shape[:2] != (1, positions):
        return None
    return RotaryTable(cos[0], sin[0])
