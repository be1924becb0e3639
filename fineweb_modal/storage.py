"""Atomic writes and the few file formats the stages read: output appears under its final name whole, or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.errors import BadDataError, UnreadableFileError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success fsync and rename it into place, on failure remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(final: Path) -> int:
    """Remove temp files that a killed writer of `final` left beside it (call only while holding its shard)."""
    stale = list(final.parent.glob(f".{final.name}.*.tmp")) if final.parent.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write a JSON document so readers see the old one or the new one, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def recorded_chunk_config(schema: pa.Schema) -> dict:
    """The ChunkConfig a chunk file was cut with, as its schema records it ({} for a file from elsewhere)."""
    recorded = (schema.metadata or {}).get(b"fineweb_modal.chunk_config")
    return json.loads(recorded) if recorded else {}


def first_readable_schema(paths: Iterable[Path], read_schema: Callable[[Path], pa.Schema]) -> tuple[Path, pa.Schema] | None:
    """The first of `paths` whose schema reads, with that schema; None when none does (an unreadable file is left to
    fail its own shard, naming itself)."""
    for path in paths:
        try:
            return path, read_schema(path)
        except (BadDataError, OSError):
            continue
    return None


@contextlib.contextmanager
def decoding(path: Path, what: str = "read", error: type[BadDataError] = UnreadableFileError) -> Iterator[None]:
    """Turn format errors while decoding `path` into `error` (the file cannot be read, by default); real OS errors
    (with an errno) pass through.

    pyarrow reports a truncated or garbled file as ArrowInvalid or as an OSError without an errno.
    """
    try:
        yield
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot {what} ({exc})") from None
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise error(f"{path}: cannot {what}, the file looks truncated or corrupt ({exc})") from None


def open_arrow_batches(path: Path, validate: bool = False) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Stream record batches from an Arrow IPC file in either the stream format (`save_to_disk`) or the file format.

    `validate` checks each batch in full (offsets, UTF-8) before it is yielded, as a BadDataError: a reader
    that touches the values needs it, since pyarrow can crash the process on bad offsets rather than raise.
    """
    if not path.is_file():
        raise BadDataError(f"{path}: input shard does not exist")
    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_stream(source)
        schema, batches = reader.schema, iter(reader)
    except (pa.ArrowInvalid, OSError):
        source.seek(0)
        with decoding(path, "open as an Arrow IPC stream or file"):
            file_reader = pa.ipc.open_file(source)
        schema, batches = file_reader.schema, (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
    return schema, (_validated(path, batches) if validate else batches)


def _validated(path: Path, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    with decoding(path, "read the Arrow shard"):
        for batch in batches:
            batch.validate(full=True)
            yield batch


def sample_arrow_rows(path: Path, count: int) -> tuple[pa.Schema, pa.RecordBatch, int]:
    """Evenly spaced rows of an arrow shard: (its schema, those rows as one batch, the shard's row count)."""
    schema, batches = open_arrow_batches(path)
    with decoding(path, "read a sample of the Arrow shard"):
        table = pa.Table.from_batches(list(batches), schema)
        picks = np.unique(np.linspace(0, max(table.num_rows - 1, 0), num=min(count, table.num_rows), dtype=np.int64))
        rows = [table.slice(int(row), 1) for row in picks]
        for row in rows:  # each picked row alone: cheap, and it makes reading them safe (see open_arrow_batches)
            row.validate(full=True)
        sample = pa.concat_tables(rows).combine_chunks() if rows else table.slice(0, 0)
    return schema, (sample.to_batches()[0] if sample.num_rows else pa.RecordBatch.from_pylist([], schema=schema)), table.num_rows


def parquet_num_rows(path: Path) -> int | None:
    """The row count from a parquet footer, or None when the file is missing or unreadable."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowInvalid):
        return None


def arrow_num_rows(path: Path) -> int | None:
    """The row count of an Arrow IPC shard, or None when it is missing or unreadable."""
    try:
        _, batches = open_arrow_batches(path)
        return sum(batch.num_rows for batch in batches)
    except (OSError, pa.ArrowInvalid, BadDataError):
        return None  # unreadable counts as missing: the ledger then redoes the shard


def parquet_key_values(parquet: pq.ParquetFile) -> dict[str, str]:
    """The file-level key-value metadata of a parquet file (schema metadata and what the writer added at close)."""
    return {k.decode(): v.decode() for k, v in (parquet.metadata.metadata or {}).items() if k != b"ARROW:schema"}


def read_json(path: Path) -> dict:
    """Read a JSON document."""
    return json.loads(Path(path).read_text())
