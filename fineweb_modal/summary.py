"""Per shard: rows, docs, empty docs, chunks, tokens, short chunks and a token-length histogram; then totals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fineweb_modal.storage import decoding, parquet_key_values, write_json_atomic

SHORT_CHUNK_LIMITS = (10, 50)
COUNT_FIELDS = ("rows", "docs", "empty_docs", "chunks", "tokens", "chunks_under_10", "chunks_under_50")


def histogram_edges(max_tokens: int) -> list[int]:
    """Fixed bin edges for chunk token counts (so shards can be added up): 0, 10, 50, then tenths of max_tokens."""
    step = max(1, max_tokens // 10)
    return sorted({0, 10, 50, *range(step, max_tokens + 1, step), max_tokens + 1})


def summarize_shard(chunk_path: Path, output_path: Path, max_tokens: int) -> dict[str, Any]:
    """Read one chunk parquet's token counts and the doc counts its metadata carries; write the summary JSON."""
    with decoding(chunk_path, "read as a chunk parquet"):
        chunks = pq.ParquetFile(chunk_path)
    meta = parquet_key_values(chunks)
    counts = chunks.read(columns=["chunk_token_count", "doc_index"])
    tokens = counts.column("chunk_token_count").to_numpy()
    edges = histogram_edges(max_tokens)
    histogram, _ = np.histogram(tokens, bins=edges)
    docs = int(meta.get("fineweb_modal.docs", len(np.unique(counts.column("doc_index").to_numpy()))))
    summary = {
        "shard": chunk_path.stem,
        "rows": docs,
        "docs": docs - int(meta.get("fineweb_modal.empty_docs", 0)),
        "empty_docs": int(meta.get("fineweb_modal.empty_docs", 0)),
        "chunks": int(tokens.size),
        "tokens": int(tokens.sum()),
        "source_tokens": int(meta.get("fineweb_modal.source_tokens", 0)),
        **{f"chunks_under_{limit}": int((tokens < limit).sum()) for limit in SHORT_CHUNK_LIMITS},
        "histogram": {"edges": edges, "counts": histogram.tolist()},
    }
    write_json_atomic(output_path, summary)
    return summary


def combine_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over shards: summed counts and one histogram (all shards share the edges of one max_tokens)."""
    total: dict[str, Any] = {name: sum(s.get(name, 0) for s in summaries) for name in (*COUNT_FIELDS, "source_tokens")}
    total["shards"] = len(summaries)
    if summaries:
        edges = summaries[0]["histogram"]["edges"]
        counts = np.sum([s["histogram"]["counts"] for s in summaries], axis=0).tolist()
        total["histogram"] = {"edges": edges, "counts": counts}
        total["mean_chunk_tokens"] = round(total["tokens"] / total["chunks"], 1) if total["chunks"] else 0.0
    return total
