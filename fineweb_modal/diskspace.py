"""Before a stage starts on a local data dir: estimate what its shards will write, from a sample, and refuse
to start when the disk clearly lacks the room. (A Modal Volume has no fixed size to compare with.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.chunking import check_columns, chunk_schema, chunk_table, chunk_texts
from fineweb_modal.config import RunConfig
from fineweb_modal.errors import BadDataError, DiskSpaceError
from fineweb_modal.layout import Layout
from fineweb_modal.models import hidden_size, model_info
from fineweb_modal.storage import sample_arrow_rows

SAMPLE_DOCS = 200
HEADROOM = 1.1  # estimates from a sample are not exact; ask for a tenth more
ID_BYTES_PER_ROW = 48  # id, doc_index, chunk_index beside each vector in the embedding parquet


def human_bytes(n: float) -> str:
    """1536 → `1.5 KB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _chunk_bytes(path: Path, shard: str, run: RunConfig) -> int:
    """Chunk evenly spaced documents of one arrow shard, write them as the stage would, scale to all rows."""
    schema, sample, total_rows = sample_arrow_rows(path, SAMPLE_DOCS)
    check_columns(schema, run.chunk, path)  # a shard without the text column fails on its own, not here
    texts = sample.column(run.chunk.text_column).to_pylist()
    rows, _ = chunk_texts(texts, run.chunk)
    if not rows:
        return 0
    out_schema = chunk_schema(schema, run.chunk)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, out_schema, compression="zstd") as writer:
        writer.write_table(chunk_table(sample, rows, texts, 0, shard, "id" in schema.names, out_schema, run.chunk))
    return int(sink.getvalue().size * total_rows / sample.num_rows)


def _embed_bytes(path: Path, run: RunConfig) -> int:
    """Rows of the chunk file × (vector + keys); the parts and the joined file coexist until the join ends, but
    parts are written uncompressed and shards finish one by one, so the estimate counts one copy of each shard
    plus one more copy of the largest (in `estimate_stage_bytes`)."""
    dims = run.embed.dimensions or hidden_size(model_info(run.embed.model).path) or 768
    itemsize = 2 if run.embed.embedding_dtype == "float16" else 4
    return pq.read_metadata(path).num_rows * (dims * itemsize + ID_BYTES_PER_ROW)


def _download_bytes(source_file: Path) -> int:
    """A source parquet's uncompressed size (the arrow shard is uncompressed); other files their size."""
    if source_file.suffix == ".parquet":
        meta = pq.read_metadata(source_file)
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return source_file.stat().st_size


def estimate_stage_bytes(run: RunConfig, layout: Layout, stage: str, shards: dict[str, dict]) -> int:
    """What the given shards of a stage will write, estimated from their inputs."""
    total, largest = 0, 0
    for shard, inputs in shards.items():
        before = total
        source = Path(inputs["source_file"]) if stage == "download" else layout.input_path(stage, shard)
        try:
            if stage == "download":
                total += _download_bytes(source)
            elif stage == "chunk":
                total += _chunk_bytes(source, shard, run)
            elif stage == "embed":
                total += _embed_bytes(source, run)
        except (OSError, pa.ArrowException, BadDataError, KeyError):
            # An unreadable input fails its own shard, with the file named; here it counts at its size.
            total += source.stat().st_size if source.is_file() else 0
        largest = max(largest, total - before)
    # An embed shard's parts and its joined file are on disk together for a moment.
    return total + (largest if stage == "embed" else 0)


def free_bytes(path: Path | str) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(run: RunConfig, layout: Layout, stage: str, shards: dict[str, dict]) -> int:
    """Raise DiskSpaceError, with the numbers, when the shards about to run clearly will not fit; return the bytes asked for (the estimate + 10 %)."""
    if not shards or stage == "summarize":
        return 0
    needed = int(estimate_stage_bytes(run, layout, stage, shards) * HEADROOM)
    free = free_bytes(layout.data_dir)
    if needed > free:
        raise DiskSpaceError(
            f"{stage}: the {len(shards)} shard(s) to run need about {human_bytes(needed)} (estimated from a sample, with "
            f"{HEADROOM - 1:.0%} headroom) but {layout.data_dir} has {human_bytes(free)} free; free some space or use another --data-dir"
        )
    return needed
