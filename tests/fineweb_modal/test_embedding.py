"""The in-process engine gives sentence-transformers' vectors, in the chunk file's row order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fineweb_modal.config import EmbedConfig
from fineweb_modal.embedding import TransformersEngine, embed_shard, get_engine
from fineweb_modal.errors import BadDataError
from fineweb_modal.models import DEFAULT_MODEL, model_info

TEXTS = [
    "A short sentence.",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "Unicode: café, naïve, 中文, emoji 😀.",
    "x",
    "Python's `for` statement iterates over the items of any sequence, in the order that they appear.",
]


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_info(DEFAULT_MODEL).path, device="cpu")


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_sentence_transformers(sentence_transformer):
    ours = get_engine(DEFAULT_MODEL, "", 512).embed(TEXTS)  # a small budget: several batches of mixed lengths
    reference = sentence_transformer.encode(TEXTS, normalize_embeddings=True)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert cosine_rows(ours, reference).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_prefix_is_embedded_with_the_text(sentence_transformer):
    prefix = "search_document: "
    ours = TransformersEngine(DEFAULT_MODEL, prefix=prefix).embed(TEXTS[:2])
    reference = sentence_transformer.encode([prefix + t for t in TEXTS[:2]], normalize_embeddings=True)
    plain = sentence_transformer.encode(TEXTS[:2], normalize_embeddings=True)
    assert cosine_rows(ours, reference).min() >= 0.999
    assert cosine_rows(ours, plain).max() < 0.999


def test_chunk_over_the_model_limit_is_reported():
    with pytest.raises(BadDataError, match="chunk 1 has .* tokens"):
        get_engine(DEFAULT_MODEL, "", 16_384).embed(["fine", "word " * 400])


def test_embed_shard_keeps_row_order_and_records_metadata(tmp_path, sentence_transformer):
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(23)]
    chunks = pa.table(
        {
            "id": [f"doc{i // 3}" for i in range(23)],
            "doc_index": pa.array([i // 3 for i in range(23)], pa.int64()),
            "chunk_index": pa.array([i % 3 for i in range(23)], pa.int32()),
            "chunk_text": pa.array(texts, pa.large_string()),
        }
    )
    pq.write_table(chunks, tmp_path / "c.parquet")
    stats = embed_shard(tmp_path / "c.parquet", tmp_path / "e.parquet", EmbedConfig(model=DEFAULT_MODEL, batch_tokens=256))
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["id", "doc_index", "chunk_index", "embedding"]
    assert table.column("id").to_pylist() == chunks.column("id").to_pylist()
    assert table.column("chunk_index").to_pylist() == chunks.column("chunk_index").to_pylist()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    reference = sentence_transformer.encode(texts, normalize_embeddings=True)
    assert cosine_rows(vectors, reference).min() >= 0.999
    metadata = table.schema.metadata
    assert metadata[b"fineweb_modal.dims"] == b"384" and metadata[b"fineweb_modal.pooling"] == b"mean"
    assert metadata[b"fineweb_modal.model"] == DEFAULT_MODEL.encode() and metadata[b"fineweb_modal.normalized"] == b"true"
    assert stats.chunks == 23 and stats.tokens > 23 * 3
