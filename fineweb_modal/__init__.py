"""fineweb-modal: the work on one shard (chunking, embedding, ledger, costs) with no orchestration in it."""

from fineweb_modal.verify import load_embeddings

__all__ = ["load_embeddings"]
