"""The summarize stage's numbers: fixed histogram bins, one shard's counts, totals over shards."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.summary import combine_summaries, histogram_edges, summarize_shard


def _chunk_file(path, token_counts, doc_indexes, metadata=None):
    table = pa.table({"doc_index": pa.array(doc_indexes, pa.int64()), "chunk_token_count": pa.array(token_counts, pa.int32())})
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def test_bins_cover_every_chunk_length_once_and_keep_the_short_chunk_limits():
    for max_tokens in (5, 64, 256, 512, 8192):
        edges = histogram_edges(max_tokens)
        assert edges == sorted(set(edges)) and edges[0] == 0 and edges[-1] > max_tokens
        counts, _ = np.histogram(np.arange(1, max_tokens + 1), bins=edges)
        assert counts.sum() == max_tokens, f"max_tokens {max_tokens}: each length lands in exactly one bin"
    assert histogram_edges(256) == [0, 10, 25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 257]


def test_a_shard_is_counted_from_its_chunk_file_and_written_as_json(tmp_path):
    tokens = [3, 9, 10, 49, 50, 64, 64]
    path = _chunk_file(tmp_path / "s0.parquet", tokens, [0, 0, 1, 2, 2, 3, 5], {"fineweb_modal.docs": "8", "fineweb_modal.empty_docs": "2", "fineweb_modal.source_tokens": "240"})
    summary = summarize_shard(path, tmp_path / "out" / "s0.json", max_tokens=64)
    assert json.loads((tmp_path / "out" / "s0.json").read_text()) == summary
    assert {k: summary[k] for k in ("shard", "rows", "docs", "empty_docs", "chunks", "tokens", "source_tokens", "chunks_under_10", "chunks_under_50")} == {
        "shard": "s0", "rows": 8, "docs": 6, "empty_docs": 2, "chunks": 7, "tokens": sum(tokens), "source_tokens": 240, "chunks_under_10": 2, "chunks_under_50": 4,
    }  # fmt: skip
    assert sum(summary["histogram"]["counts"]) == 7 and summary["histogram"]["edges"] == histogram_edges(64)


def test_a_chunk_file_from_elsewhere_counts_its_distinct_documents(tmp_path):
    """Without the docs the chunk stage records, the documents are those the chunks come from (empty ones unseen)."""
    summary = summarize_shard(_chunk_file(tmp_path / "x.parquet", [12, 20, 30], [4, 4, 7]), tmp_path / "x.json", max_tokens=32)
    assert (summary["rows"], summary["docs"], summary["empty_docs"], summary["source_tokens"]) == (2, 2, 0, 0)


def test_totals_add_counts_and_histograms_over_shards(tmp_path):
    first = summarize_shard(_chunk_file(tmp_path / "a.parquet", [5, 30, 64], [0, 1, 1]), tmp_path / "a.json", max_tokens=64)
    second = summarize_shard(_chunk_file(tmp_path / "b.parquet", [40, 41], [0, 0]), tmp_path / "b.json", max_tokens=64)
    total = combine_summaries([first, second])
    assert (total["shards"], total["chunks"], total["tokens"], total["docs"]) == (2, 5, 180, 3)
    assert total["histogram"]["counts"] == [a + b for a, b in zip(first["histogram"]["counts"], second["histogram"]["counts"])]
    assert total["mean_chunk_tokens"] == 36.0
    assert combine_summaries([]) == {**dict.fromkeys(("rows", "docs", "empty_docs", "chunks", "tokens", "chunks_under_10", "chunks_under_50", "source_tokens"), 0), "shards": 0}
