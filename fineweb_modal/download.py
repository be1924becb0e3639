"""Source files (parquet, arrow, jsonl) or a Hub dataset → one Arrow IPC stream file per shard, as `save_to_disk` writes."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from fineweb_modal.errors import BadDataError
from fineweb_modal.storage import atomic_path, decoding, open_arrow_batches, write_json_atomic

log = logging.getLogger(__name__)


def _source_batches(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    with decoding(path, f"read as {path.suffix[1:]}"):
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow, parquet.iter_batches(batch_size=8192)
        if path.suffix == ".arrow":
            return open_arrow_batches(path)
        if path.suffix in (".jsonl", ".json"):
            table = pa_json.read_json(path)
            return table.schema, iter(table.to_batches(max_chunksize=8192))
    raise BadDataError(f"{path}: unsupported file type {path.suffix!r} (parquet, arrow, jsonl)")


def source_schema(path: Path) -> pa.Schema:
    """The columns of one source file (parquet and arrow: from the header alone)."""
    return _source_batches(path)[0]


def convert_file(source: Path, output: Path) -> int:
    """Copy one source file into an Arrow IPC stream file at `output` (atomically); returns its row count."""
    if not source.is_file():
        raise BadDataError(f"{source}: source file does not exist")
    schema, batches = _source_batches(source)
    rows = 0
    with atomic_path(output) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        with decoding(source, f"read as {source.suffix[1:]} after row {rows}"):
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
    return rows


def write_dataset_index(split_dir: Path, split: str) -> bool:
    """Write `state.json` and `dataset_info.json` so `datasets.load_from_disk(split_dir)` reads the shards."""
    shards = sorted(split_dir.glob("*.arrow"))
    if not shards:
        return False
    schemas = {open_arrow_batches(p)[0].remove_metadata() for p in shards}
    if len(schemas) != 1:
        log.warning("%s: shards have different schemas; not writing a datasets index", split_dir)
        return False
    from datasets import Features

    features = Features.from_arrow_schema(schemas.pop())
    state = {
        "_data_files": [{"filename": p.name} for p in shards],
        "_fingerprint": "fineweb-modal",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    write_json_atomic(split_dir / "state.json", state)
    write_json_atomic(split_dir / "dataset_info.json", {"features": features.to_dict()})
    return True


def download_hub(repo_id: str, subset: str | None, split: str, split_dir: Path, num_proc: int, keep_cache: bool = True) -> dict[str, int]:
    """`load_dataset` + `save_to_disk` of a Hub dataset into `split_dir`; returns rows per shard file.

    `keep_cache=False` deletes what `load_dataset` cached (the Hub's files, the Arrow cache) once the shards are saved.
    """
    from datasets import load_dataset

    dataset = load_dataset(repo_id, subset, split=split, num_proc=num_proc)
    if not keep_cache:
        import huggingface_hub.constants

        cached = {Path(f["filename"]).parent for f in dataset.cache_files}
        cached.add(Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}")
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=split_dir.parent))
    try:
        dataset.save_to_disk(str(staging), num_proc=num_proc)
        split_dir.mkdir(parents=True, exist_ok=True)
        rows = {}
        for path in sorted(staging.iterdir()):
            path.replace(split_dir / path.name)
            if path.suffix == ".arrow":
                _, batches = open_arrow_batches(split_dir / path.name)
                rows[path.stem] = sum(b.num_rows for b in batches)
        if not keep_cache:
            del dataset  # its Arrow files are memory-mapped
            for folder in cached:
                shutil.rmtree(folder, ignore_errors=True)
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)
