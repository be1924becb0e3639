"""Chunks → L2-normalized vectors, rows in the chunk file's order, through one of two engines.

- `transformers`: the model in this process. Batches are length-sorted and filled to a budget of padded
  tokens, so padding stays small; pooling follows the model's sentence-transformers config; fp32 on CPU,
  bf16 on CUDA.
- `tei`: a Text Embeddings Inference server (`fineweb_modal.tei`).

A shard is embedded in parts of READ_BLOCK_ROWS rows, each written atomically under a parts folder; a
restarted shard resumes after the last whole part, and the parts are joined into one parquet at the end.
Memory is bounded by one part, not the shard.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.config import EmbedConfig
from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.models import ModelInfo, load_tokenizer, model_info, prefix_token_count
from fineweb_modal.storage import atomic_path, decoding, parquet_key_values, parquet_num_rows

READ_BLOCK_ROWS = 8192
KEY_COLUMNS = ("id", "doc_index", "chunk_index")


class Engine(Protocol):
    """What embed_shard needs from an engine."""

    dims: int
    tokens_embedded: int

    def embed(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> np.ndarray: ...

    def metadata(self) -> dict[str, str]: ...


class TransformersEngine:
    """A transformers encoder with sentence-transformers pooling and normalization, fed token-budget batches.

    `model` replaces loading the weights from `model_id` (benchmarks use random weights of another
    architecture); the tokenizer, limit and pooling still come from `model_id`.
    """

    def __init__(
        self,
        model_id: str,
        prefix: str = "",
        batch_tokens: int = 16_384,
        device: str | None = None,
        dimensions: int | None = None,
        model=None,
    ):
        import torch
        from transformers import AutoModel

        self.info: ModelInfo = model_info(model_id)
        self.prefix = prefix
        self.batch_tokens = batch_tokens
        self.tokenizer = load_tokenizer(self.info.path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model if model is not None else AutoModel.from_pretrained(self.info.path, dtype=self.dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        hidden = int(self.model.config.hidden_size)
        if dimensions is not None and dimensions > hidden:
            raise ConfigError(f"dimensions={dimensions} is more than {model_id}'s {hidden}")
        self.dims = dimensions or hidden
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokens_embedded = 0  # real tokens (prefix and special tokens included), for throughput figures

    def metadata(self) -> dict[str, str]:
        """What the embedding parquet records about the model that made it."""
        return {"model": self.info.model_id, "revision": _revision(self.info.path), "pooling": self.info.pooling, "engine": "transformers"}

    def _padded_batches(self, encodings, lengths: np.ndarray, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Length-sorted batches filled to `batch_tokens` padded tokens: (rows, token ids, attention mask)."""
        start = 0
        while start < len(order):
            longest = int(lengths[order[start]])
            batch = order[start : start + max(1, self.batch_tokens // max(longest, 1))]
            ids = np.full((len(batch), longest), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), longest), dtype=np.int64)
            for row, index in enumerate(batch):
                token_ids = encodings[index].ids
                ids[row, : len(token_ids)] = token_ids
                mask[row, : len(token_ids)] = 1
            yield batch, ids, mask
            start += len(batch)

    def embed(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> np.ndarray:
        """Embed texts (the prefix is added here) into an (n, dims) float32 array in the given order."""
        import torch

        encodings = self.tokenizer.encode_batch([self.prefix + t for t in texts], add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        too_long = np.flatnonzero(lengths > self.info.sequence_limit)
        if too_long.size:
            row = int(too_long[0])
            name = row_names[row] if row_names else f"row {row}"
            raise BadDataError(
                f"chunk {name} has {lengths[row]} tokens with the prefix, over {self.info.model_id}'s limit of "
                f"{self.info.sequence_limit}: it was chunked for another model or max_tokens"
            )
        self.tokens_embedded += int(lengths.sum())
        order = np.argsort(-lengths, kind="stable")
        batches = self._padded_batches(encodings, lengths, order)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            batches = _prefetch(batches, depth=2)  # pad the next batch on the CPU while the GPU runs this one
        pooled = []
        with torch.inference_mode():
            for _, ids, mask in batches:
                input_ids, attention = torch.from_numpy(ids), torch.from_numpy(mask)
                if on_gpu:
                    input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
                    attention = attention.pin_memory().to(self.device, non_blocking=True)
                hidden = self.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
                pooled.append(self._pool(hidden, attention))
            # One device→host copy per call, not one per batch: the GPU never waits for the host.
            vectors = torch.cat(pooled).cpu().numpy() if pooled else np.zeros((0, self.dims), np.float32)
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        out[order] = vectors
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
        pooled = pooled.float()[:, : self.dims]  # Matryoshka models: keep the leading dims, then renormalize
        if self.info.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


class TEIEngine:
    """Embeds through a TEI server: real token counts for packing come from the chunk file, not a tokenizer pass."""

    def __init__(self, url: str, model_id: str, prefix: str = "", dimensions: int | None = None):
        from fineweb_modal.tei import TEIClient, check_served_model

        self.client = TEIClient(url, api_key=os.environ.get("TEI_API_KEY") or None)
        self.server = asyncio.run(self.client.info())
        check_served_model(self.server, model_id)
        self.model_id, self.prefix, self.dimensions = model_id, prefix, dimensions
        self.model_path = model_info(model_id).path
        self.prefix_tokens = prefix_token_count(self.model_path, prefix)
        self.dims = dimensions or 0  # learnt from the first response when not asked for
        self.tokens_embedded = 0

    def metadata(self) -> dict[str, str]:
        """What the embedding parquet records about the served model."""
        return {
            "model": self.model_id,
            "revision": self.server.model_sha or "unknown",
            "pooling": self.server.model_pooling or "unknown",
            "engine": f"tei {self.server.version or ''}".strip(),
            "served_model": self.server.model_id,
        }

    def embed(self, texts: list[str], token_counts: list[int] | None = None, row_names: list[str] | None = None) -> np.ndarray:
        """Embed texts through TEI; `token_counts` are the chunks' own ([CLS]/[SEP] included), the prefix is added here."""
        if token_counts is None:
            tokenizer = load_tokenizer(self.model_path)
            token_counts = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
        counts = [n + self.prefix_tokens for n in token_counts]
        inputs = [self.prefix + t for t in texts] if self.prefix else texts
        vectors = asyncio.run(self.client.embed(inputs, counts, self.server, self.dimensions, row_names))
        self.dims = vectors.shape[1]
        self.tokens_embedded += sum(counts)
        return vectors


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead of the consumer."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
        except BaseException as exc:  # handed to the consumer: a silent stop would drop rows
            failure.append(exc)
        finally:
            buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        yield item
    if failure:
        raise failure[0]


@functools.lru_cache(maxsize=2)
def get_engine(cfg: EmbedConfig) -> Engine:
    """One engine per process and config (a Modal container or a local worker serves many shards)."""
    if cfg.engine == "tei":
        if not cfg.tei_url:
            raise ConfigError("the tei engine needs tei_url")
        return TEIEngine(cfg.tei_url, cfg.model, prefix=cfg.prefix, dimensions=cfg.dimensions)
    return TransformersEngine(cfg.model, prefix=cfg.prefix, batch_tokens=cfg.batch_tokens, dimensions=cfg.dimensions)


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


def embed_shard(input_path: Path, output_path: Path, cfg: EmbedConfig, parts_dir: Path) -> EmbedStats:
    """Embed one chunk parquet into one embedding parquet (same row order), part by part, resuming after the last whole part."""
    engine = get_engine(cfg)
    with decoding(input_path, "read as a chunk parquet"):
        chunks = pq.ParquetFile(input_path)
    missing = [c for c in (*KEY_COLUMNS, "chunk_text") if c not in chunks.schema_arrow.names]
    if missing:
        raise BadDataError(f"{input_path}: missing column(s) {missing}; is it a chunk file?")
    has_counts = "chunk_token_count" in chunks.schema_arrow.names
    columns = [*KEY_COLUMNS, "chunk_text", *(["chunk_token_count"] if has_counts else [])]
    value_type = pa.float16() if cfg.embedding_dtype == "float16" else pa.float32()
    parts_dir.mkdir(parents=True, exist_ok=True)
    stats = EmbedStats()
    parts = []
    for index, block in enumerate(chunks.iter_batches(batch_size=READ_BLOCK_ROWS, columns=columns)):
        part = parts_dir / f"part-{index:05d}.parquet"
        parts.append(part)
        if parquet_num_rows(part) == block.num_rows:  # embedded before the last interruption
            stats.tokens += int(parquet_key_values(pq.ParquetFile(part)).get("fineweb_modal.tokens", 0))
            stats.chunks += block.num_rows
            continue
        texts = block.column("chunk_text").to_pylist()
        counts = block.column("chunk_token_count").to_pylist() if has_counts else None
        names = [f"(doc_index={d}, chunk_index={c})" for d, c in zip(block.column("doc_index").to_pylist(), block.column("chunk_index").to_pylist())]
        before = engine.tokens_embedded
        vectors = engine.embed(texts, counts, names)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1).astype(value_type.to_pandas_dtype())), vectors.shape[1])
        table = pa.Table.from_arrays([*(block.column(c) for c in KEY_COLUMNS), embedding], names=[*KEY_COLUMNS, "embedding"])
        tokens = engine.tokens_embedded - before
        with atomic_path(part) as tmp:
            pq.write_table(table.replace_schema_metadata({"fineweb_modal.tokens": str(tokens)}), tmp)
        stats.tokens += tokens
        stats.chunks += block.num_rows
    stats.dims = engine.dims or (pq.read_schema(parts[0]).field("embedding").type.list_size if parts else 0)
    metadata = {
        **engine.metadata(),
        "dims": str(stats.dims),
        "prefix": cfg.prefix,
        "dtype": cfg.embedding_dtype,
        "normalized": "true",
    }
    schema = pa.schema(
        [
            pa.field("id", pa.string()),
            pa.field("doc_index", pa.int64()),
            pa.field("chunk_index", pa.int32()),
            pa.field("embedding", pa.list_(value_type, stats.dims)),
        ],
        metadata={f"fineweb_modal.{k}".encode(): v.encode() for k, v in metadata.items()},
    )
    with atomic_path(output_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for part in parts:
            writer.write_table(pq.read_table(part).cast(schema))
    shutil.rmtree(parts_dir, ignore_errors=True)
    return stats
