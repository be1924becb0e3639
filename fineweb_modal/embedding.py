"""Chunks → L2-normalized vectors with an in-process transformers model, rows in the chunk file's order.

Batches are length-sorted and filled to a budget of padded tokens, so padding stays small; pooling follows
the model's sentence-transformers config. fp32 on CPU, bf16 on CUDA. Memory is bounded by one read block.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.config import EmbedConfig
from fineweb_modal.errors import BadDataError
from fineweb_modal.models import ModelInfo, load_tokenizer, model_info
from fineweb_modal.storage import atomic_path, decoding

READ_BLOCK_ROWS = 8192
KEY_COLUMNS = ("id", "doc_index", "chunk_index")


class TransformersEngine:
    """A transformers encoder with sentence-transformers pooling and normalization, fed token-budget batches."""

    def __init__(self, model_id: str, prefix: str = "", batch_tokens: int = 16_384, device: str | None = None):
        import torch
        from transformers import AutoModel

        self.info: ModelInfo = model_info(model_id)
        self.prefix = prefix
        self.batch_tokens = batch_tokens
        self.tokenizer = load_tokenizer(self.info.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(self.info.path, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.dims = int(self.model.config.hidden_size)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokens_embedded = 0  # real tokens (prefix and special tokens included), for throughput figures

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed texts (the prefix is added here) into an (n, dims) float32 array in the given order."""
        import torch

        encodings = self.tokenizer.encode_batch([self.prefix + t for t in texts], add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        too_long = np.flatnonzero(lengths > self.info.sequence_limit)
        if too_long.size:
            row = int(too_long[0])
            raise BadDataError(
                f"chunk {row} has {lengths[row]} tokens with the prefix, over {self.info.model_id}'s limit of "
                f"{self.info.sequence_limit}: it was chunked for another model or max_tokens"
            )
        self.tokens_embedded += int(lengths.sum())
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        start = 0
        with torch.inference_mode():
            while start < len(order):
                longest = int(lengths[order[start]])
                count = max(1, self.batch_tokens // max(longest, 1))
                batch = order[start : start + count]
                ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(batch), longest), dtype=np.int64)
                for row, index in enumerate(batch):
                    token_ids = encodings[index].ids
                    ids[row, : len(token_ids)] = token_ids
                    mask[row, : len(token_ids)] = 1
                input_ids = torch.from_numpy(ids).to(self.device)
                attention = torch.from_numpy(mask).to(self.device)
                hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
                out[batch] = self._pool(hidden, attention).float().cpu().numpy()
                start += len(batch)
        return out

    def _pool(self, hidden, attention):
        import torch

        if self.info.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.info.pooling == "last":
            last = attention.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        pooled = pooled.float()
        if self.info.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


@functools.lru_cache(maxsize=2)
def get_engine(model_id: str, prefix: str, batch_tokens: int) -> TransformersEngine:
    """One engine per process (a Modal container or a local worker serves many shards)."""
    return TransformersEngine(model_id, prefix=prefix, batch_tokens=batch_tokens)


@dataclass
class EmbedStats:
    """Counts for one embedded shard."""

    chunks: int = 0
    tokens: int = 0
    dims: int = 0


def _revision(path: str) -> str:
    config = Path(path) / "config.json"
    payload = json.loads(config.read_text()) if config.is_file() else {}
    # A Hub snapshot folder is named by its commit; a bundled or local folder has no revision.
    parent = Path(path).parent.name
    return payload.get("_commit_hash") or (Path(path).name if parent == "snapshots" else "local")


def embed_shard(input_path: Path, output_path: Path, cfg: EmbedConfig) -> EmbedStats:
    """Embed one chunk parquet into one embedding parquet, rows in the same order, written atomically."""
    engine = get_engine(cfg.model, cfg.prefix, cfg.batch_tokens)
    with decoding(input_path, "read as a chunk parquet"):
        chunks = pq.ParquetFile(input_path)
    missing = [c for c in (*KEY_COLUMNS, "chunk_text") if c not in chunks.schema_arrow.names]
    if missing:
        raise BadDataError(f"{input_path}: missing column(s) {missing}; is it a chunk file?")
    metadata = {
        "model": cfg.model,
        "revision": _revision(engine.info.path),
        "dims": str(engine.dims),
        "prefix": cfg.prefix,
        "pooling": engine.info.pooling,
        "dtype": "float32",
        "normalized": str(engine.info.normalize).lower(),
        "engine": cfg.engine,
    }
    schema = pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("doc_index", pa.int64()),
            pa.field("chunk_index", pa.int32()),
            pa.field("embedding", pa.list_(pa.float32(), engine.dims)),
        ],
        metadata={f"fineweb_modal.{k}".encode(): v.encode() for k, v in metadata.items()},
    )
    stats = EmbedStats(dims=engine.dims)
    tokens_before = engine.tokens_embedded
    with atomic_path(output_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for block in chunks.iter_batches(batch_size=READ_BLOCK_ROWS, columns=[*KEY_COLUMNS, "chunk_text"]):
            texts = block.column("chunk_text").to_pylist()
            vectors = engine.embed(texts)
            embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), engine.dims)
            writer.write_table(pa.Table.from_arrays([*(block.column(c) for c in KEY_COLUMNS), embedding], schema=schema))
            stats.chunks += block.num_rows
    stats.tokens = engine.tokens_embedded - tokens_before
    return stats
