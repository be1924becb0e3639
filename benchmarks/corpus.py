"""A web-like benchmark corpus built offline: real English paragraphs (CPython's bundled docs), resampled into
documents of log-normal length (median ~700 tokens, a long tail past 100 k tokens)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from fineweb_modal.demo import _paragraphs

CHARS_PER_TOKEN = 4.6  # measured on these paragraphs with the bert-base-uncased vocabulary


def web_like_documents(total_tokens: int, seed: int = 0, median_tokens: int = 700, sigma: float = 1.2) -> list[str]:
    """Documents until about `total_tokens` tokens, lengths log-normal around `median_tokens`."""
    import math

    rng = random.Random(seed)
    paragraphs = [text for _, text in _paragraphs()]
    docs, tokens = [], 0
    while tokens < total_tokens:
        target = int(min(150_000, rng.lognormvariate(math.log(median_tokens), sigma)) * CHARS_PER_TOKEN)
        parts, size = [], 0
        while size < target:
            part = rng.choice(paragraphs)
            parts.append(part)
            size += len(part) + 2
        docs.append("\n\n".join(parts)[:target])
        tokens += int(target / CHARS_PER_TOKEN)
    return docs


def write_shard(texts: list[str], path: Path) -> Path:
    """The documents as an Arrow IPC stream shard (the download stage's format), with fineweb-edu's kept columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(texts)
    table = pa.table(
        {
            "text": pa.array(texts, pa.large_string()),
            "id": [f"doc-{i}" for i in range(n)],
            "url": [f"https://example.org/{i}" for i in range(n)],
            "score": pa.array([3.0] * n, pa.float64()),
            "dump": ["bench"] * n,
        }
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    return path
