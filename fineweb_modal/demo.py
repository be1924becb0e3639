"""A small, real English dataset built offline from CPython's bundled documentation, in fineweb-edu's columns."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEMO_NAME = "fineweb-edu-demo"
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score", "int_score")


def _paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) pairs from the pydoc topics every CPython install ships, whitespace tidied."""
    from pydoc_data.topics import topics

    pairs = []
    for topic in sorted(topics):
        for block in topics[topic].split("\n\n"):
            text = " ".join(block.split())
            if len(text) > 40:
                pairs.append((topic, text))
    return pairs


def build_documents(n_docs: int = 200, seed: int = 0) -> list[dict]:
    """Documents of web-like (log-normal) length assembled from consecutive documentation paragraphs."""
    rng = random.Random(seed)
    paragraphs = _paragraphs()
    docs, cursor = [], 0
    for index in range(n_docs):
        target_chars = int(min(12_000, max(200, rng.lognormvariate(7.2, 0.9))))
        parts, topic = [], paragraphs[cursor % len(paragraphs)][0]
        while sum(len(p) for p in parts) < target_chars:
            parts.append(paragraphs[cursor % len(paragraphs)][1])
            cursor += 1
        text = "\n\n".join(parts)
        score = round(2.5 + rng.random() * 2, 3)
        docs.append(
            {
                "text": text,
                "id": f"<urn:uuid:{hashlib.md5(f'{seed}-{index}'.encode()).hexdigest()}>",
                "dump": "CC-MAIN-2024-10",
                "url": f"https://docs.python.org/3/reference/{topic}.html#p{index}",
                "file_path": "pydoc_data/topics.py",
                "language": "en",
                "language_score": 0.97,
                "token_count": len(text.split()),
                "score": score,
                "int_score": int(round(score)),
            }
        )
    return docs


def write_demo_source(folder: Path, n_docs: int = 200, n_shards: int = 4, seed: int = 0) -> Path:
    """Write the demo documents as `n_shards` parquet files (fineweb-edu's naming) into `folder`.

    A file that already holds the same bytes is left as it is: the ledger knows a source by its size and
    modification time, so rewriting it would make a second `make demo` redo every stage.
    """
    import io

    folder.mkdir(parents=True, exist_ok=True)
    docs = build_documents(n_docs, seed)
    for shard in range(n_shards):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(docs[shard::n_shards]), buffer)
        path = folder / f"data-{shard:05d}-of-{n_shards:05d}.parquet"
        if not path.is_file() or path.read_bytes() != buffer.getvalue():
            path.write_bytes(buffer.getvalue())
    return folder
