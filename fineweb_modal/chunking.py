"""Documents → token windows → chunks whose text is the exact source substring `text[char_start:char_end]`.

A document of at most W = max_tokens − 2 tokens ([CLS] and [SEP] take the other two) is one chunk. A longer
one is cut into windows of at most W tokens that start on word boundaries, overlap by `overlap × W` tokens,
and each reach further than the one before; the last window ends at the document's end and starts at the
first word boundary that lets it fit, so no chunk is pure overlap. Only a word longer than a window is cut
inside; such a chunk is re-tokenized to prove it fits, and where it does not, it is shrunk and the rest of its
window becomes the next chunk, so no character is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fineweb_modal.config import ChunkConfig
from fineweb_modal.errors import BadDataError
from fineweb_modal.heap import pin_mmap_threshold
from fineweb_modal.models import load_tokenizer, model_info
from fineweb_modal.storage import atomic_path, decoding, open_arrow_batches

SPECIAL_TOKENS = 2  # [CLS] and [SEP]
ENCODE_BATCH_DOCS = 512
# The tokenizer's Encoding objects cost ~100 bytes per token: batches are also capped by characters, so a
# long-tailed shard (documents of 100 k+ tokens) does not hold half a million tokens' encodings at once.
ENCODE_BATCH_CHARS = 1_000_000


@dataclass
class ChunkStats:
    """Counts for one shard: what went in and what came out."""

    docs: int = 0
    empty_docs: int = 0
    chunks: int = 0
    source_tokens: int = 0
    chunk_tokens: int = 0


def plan_windows(n_tokens: int, is_word_start: Callable[[int], bool], window: int, overlap_tokens: int) -> list[tuple[int, int]]:
    """Token windows `[start, end)` over one document; `is_word_start(i)` says whether token i begins a word.

    Boundaries are found by stepping from the planned cut to the nearest word start, so the cost is per
    window (a few tokens each), never per token of the document.
    """
    if n_tokens <= window:
        return [(0, n_tokens)] if n_tokens else []

    def boundary(position: int) -> bool:  # a window may start or end here without cutting a word
        return position <= 0 or position >= n_tokens or is_word_start(position)

    def last_boundary_at_or_before(position: int) -> int:
        position = min(position, n_tokens)
        while not boundary(position):
            position -= 1
        return position

    def first_boundary_at_or_after(position: int) -> int:
        while not boundary(position):
            position += 1
        return min(position, n_tokens)

    windows: list[tuple[int, int]] = []
    start, previous_end = 0, 0
    while True:
        end = last_boundary_at_or_before(start + window)
        if end <= start + window // 2 or end <= previous_end:
            end = start + window  # a long word follows: cut inside it rather than emit a stub
        windows.append((start, end))
        previous_end = end
        target = max(end - overlap_tokens, start + 1)
        after, before = first_boundary_at_or_after(target), last_boundary_at_or_before(target)
        candidates = [after] if start < after <= end and after < n_tokens else []
        if before > start and first_boundary_at_or_after(before + 1) - before <= window:
            candidates.append(before)  # the word starting here fits a window
        # The word boundary nearest the planned overlap; inside a word only when the word outgrows a window.
        next_start = min(candidates, key=lambda b: (abs(b - target), b)) if candidates else target
        if n_tokens - next_start <= window:
            last_start = min(first_boundary_at_or_after(n_tokens - window), next_start)
            windows.append((last_start, n_tokens))
            return windows
        start = next_start


def chunk_texts(texts: list[str | None], cfg: ChunkConfig) -> tuple[list[tuple[int, int, int, int, int]], ChunkStats]:
    """Chunk a batch of documents: rows of (doc offset in batch, chunk index, char start, char end, tokens).

    The tokenizer is the limit: per document this does O(1) work, and per window O(a few tokens) — it never
    materializes a document's offsets or word ids (that alone cost ~20 % of the encoding time).
    """
    tokenizer = load_tokenizer(model_info(cfg.model).path)
    window = cfg.max_tokens - SPECIAL_TOKENS
    overlap_tokens = int(cfg.overlap * window)
    stats = ChunkStats(docs=len(texts))
    cleaned = [t if isinstance(t, str) else "" for t in texts]
    encodings = tokenizer.encode_batch(cleaned, add_special_tokens=False)
    rows: list[tuple[int, int, int, int, int]] = []
    for doc, (text, encoding) in enumerate(zip(cleaned, encodings)):
        n_tokens = len(encoding)
        if n_tokens == 0:
            stats.empty_docs += 1
            continue
        stats.source_tokens += n_tokens
        chars = encoding.token_to_chars
        if n_tokens <= window:
            rows.append((doc, 0, chars(0)[0], chars(n_tokens - 1)[1], n_tokens + SPECIAL_TOKENS))
            continue
        word = encoding.token_to_word

        def is_word_start(i: int, word=word) -> bool:
            return word(i) != word(i - 1)

        def inside_word(i: int, n_tokens=n_tokens, is_word_start=is_word_start) -> bool:
            return 0 < i < n_tokens and not is_word_start(i)

        chunk_index = 0
        windows = plan_windows(n_tokens, is_word_start, window, overlap_tokens)
        for number, (start, end) in enumerate(windows):
            next_start = windows[number + 1][0] if number + 1 < len(windows) else n_tokens
            while start < end and start < next_start:  # a rest the next window starts within is its to cover
                piece_end, count = end, end - start
                if inside_word(start) or inside_word(end):
                    # Cut inside a word, WordPiece may split the piece differently on its own (and a token that
                    # shares its character with the next, as Hangul's jamo do, brings that one in): measure,
                    # shrink to fit, and go on from where it stopped, so no character of the window is lost.
                    while True:
                        count = len(tokenizer.encode(text[chars(start)[0] : chars(piece_end - 1)[1]], add_special_tokens=False))
                        if count <= window or piece_end == start + 1:
                            break
                        piece_end = max(start + 1, piece_end - (count - window))
                rows.append((doc, chunk_index, chars(start)[0], chars(piece_end - 1)[1], count + SPECIAL_TOKENS))
                chunk_index += 1
                start = piece_end
    stats.chunks = len(rows)
    stats.chunk_tokens = sum(r[4] for r in rows)
    return rows, stats


def chunk_schema(source_schema: pa.Schema, cfg: ChunkConfig) -> pa.Schema:
    """The chunk parquet's columns: keys, exact span, token count, then the kept source columns."""
    fields = [
        pa.field("id", pa.string()),
        pa.field("doc_index", pa.int64()),
        pa.field("chunk_index", pa.int32()),
        pa.field("chunk_text", pa.large_string()),
        pa.field("char_start", pa.int64()),
        pa.field("char_end", pa.int64()),
        pa.field("chunk_token_count", pa.int32()),
    ]
    fields += [source_schema.field(name) for name in cfg.keep_columns]
    return pa.schema(fields, metadata={b"fineweb_modal.chunk_config": cfg.model_dump_json().encode()})


def check_columns(source_schema: pa.Schema, cfg: ChunkConfig, path: object) -> None:
    """Raise BadDataError naming the columns that exist when the text column or a kept column is missing."""
    names = source_schema.names
    missing = [c for c in (cfg.text_column, *cfg.keep_columns) if c not in names]
    if missing:
        raise BadDataError(f"{path}: column(s) {missing} not found; the shard has {names}")
    text_type = source_schema.field(cfg.text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type) or pa.types.is_null(text_type)):
        raise BadDataError(f"{path}: text column {cfg.text_column!r} has type {text_type}, expected a string")


def _rebatch(batches: Iterator[pa.RecordBatch], text_column: str, max_rows: int, max_chars: int) -> Iterator[pa.RecordBatch]:
    """Slices of at most `max_rows` rows and about `max_chars` characters (one longer document goes alone)."""
    for batch in batches:
        texts = batch.column(text_column)
        if pa.types.is_null(texts.type):  # a column of only nulls (e.g. from JSON): no text, no kernel
            lengths = [0] * batch.num_rows
        else:
            lengths = pc.fill_null(pc.utf8_length(texts), 0).to_numpy(zero_copy_only=False) if batch.num_rows else []
        start, chars = 0, 0
        for row, length in enumerate(lengths):
            if row > start and (row - start >= max_rows or chars + length > max_chars):
                yield batch.slice(start, row - start)
                start, chars = row, 0
            chars += length
        if start < batch.num_rows:
            yield batch.slice(start)


def chunk_shard(input_path, output_path, shard: str, cfg: ChunkConfig) -> ChunkStats:
    """Chunk one arrow shard into one parquet file, written under a temp name and renamed into place."""
    pin_mmap_threshold()
    source_schema, batches = open_arrow_batches(input_path, validate=True)
    check_columns(source_schema, cfg, input_path)
    schema = chunk_schema(source_schema, cfg)
    has_id = "id" in source_schema.names
    total = ChunkStats()
    row_offset = 0
    with atomic_path(output_path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        # Each batch was validated as it was read (an unreadable file says so there): what fails here is its data.
        with decoding(input_path, "chunk the input shard", error=BadDataError):
            for batch in _rebatch(batches, cfg.text_column, ENCODE_BATCH_DOCS, ENCODE_BATCH_CHARS):
                texts = batch.column(cfg.text_column).to_pylist()
                rows, stats = chunk_texts(texts, cfg)
                total.docs += stats.docs
                total.empty_docs += stats.empty_docs
                total.chunks += stats.chunks
                total.source_tokens += stats.source_tokens
                total.chunk_tokens += stats.chunk_tokens
                if rows:
                    writer.write_table(chunk_table(batch, rows, texts, row_offset, shard, has_id, schema, cfg))
                row_offset += batch.num_rows
        # The counts travel with the file, so summaries need nothing but the chunk parquet.
        writer.add_key_value_metadata(
            {
                "fineweb_modal.docs": str(total.docs),
                "fineweb_modal.empty_docs": str(total.empty_docs),
                "fineweb_modal.source_tokens": str(total.source_tokens),
            }
        )
    return total


def chunk_table(batch, rows, texts, row_offset, shard, has_id, schema, cfg) -> pa.Table:
    """The chunk rows of one batch of documents as an Arrow table of the chunk schema (text sliced from the source)."""
    doc, chunk_index, char_start, char_end, tokens = (np.asarray(col) for col in zip(*rows))
    if has_id:
        ids = pc.cast(batch.column("id"), pa.string()).take(pa.array(doc))
        ids = pc.if_else(pc.is_null(ids), pa.array([f"{shard}:{row_offset + d}" for d in doc]), ids)
    else:
        ids = pa.array([f"{shard}:{row_offset + d}" for d in doc], pa.string())
    chunk_text = pa.array([texts[d][s:e] for d, s, e in zip(doc.tolist(), char_start.tolist(), char_end.tolist())], pa.large_string())
    columns = [
        ids,
        pa.array(doc + row_offset, pa.int64()),
        pa.array(chunk_index, pa.int32()),
        chunk_text,
        pa.array(char_start, pa.int64()),
        pa.array(char_end, pa.int64()),
        pa.array(tokens, pa.int32()),
    ]
    columns += [batch.column(name).take(pa.array(doc)) for name in cfg.keep_columns]
    return pa.Table.from_arrays(columns, schema=schema)
