"""fineweb-modal: the work on one shard (chunking, embedding, ledger, costs) with no orchestration in it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fineweb_modal.verify import load_embeddings

__all__ = ["load_embeddings"]


def __getattr__(name: str) -> Any:
    """`load_embeddings` on first use: the GPU benchmark's image has no pydantic, which the ledger behind it needs."""
    if name == "load_embeddings":
        from fineweb_modal.verify import load_embeddings

        return load_embeddings
    raise AttributeError(f"module 'fineweb_modal' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazy one included."""
    return sorted([*globals(), *__all__])
