"""Checks of one shard's outputs against each other and the source: the promises, tested on real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fineweb_modal.layout import Layout
from fineweb_modal.ledger import Ledger
from fineweb_modal.phrasing import listing
from fineweb_modal.storage import arrow_num_rows, decoding, open_arrow_batches, recorded_chunk_config

NORM_TOLERANCE = 1e-2  # float16 storage rounds norms to about 1e-3


def verify_shard(layout: Layout, shard: str, text_column: str = "text", expected_dims: int | None = None) -> dict[str, Any]:
    """Row counts, unique keys, exact spans, finite unit-norm vectors of the right size; `problems` lists what failed,
    `made_with` the settings the files record (the flow compares them across shards)."""
    problems: list[str] = []
    chunk_path, embed_path = layout.output_path("chunk", shard), layout.output_path("embed", shard)
    outcome: dict[str, Any] = {"shard": shard, "chunks": None, "embeddings": None, "dims": None}
    if not chunk_path.is_file():
        return {**outcome, "problems": [f"no chunk file {chunk_path}"]}
    chunks = pq.read_table(chunk_path, columns=["doc_index", "chunk_index", "chunk_text", "char_start", "char_end"])
    outcome["chunks"] = chunks.num_rows
    keys = np.stack([chunks.column("doc_index").to_numpy(), chunks.column("chunk_index").to_numpy().astype(np.int64)], axis=1)
    if len(np.unique(keys, axis=0)) != len(keys):
        problems.append("(doc_index, chunk_index) is not unique")
    problems += [f"the {stage} output was made from a {layout.input_stage(stage)} output since replaced: rerun {stage}" for stage in outdated_stages(layout, shard)]
    # The column the chunks were cut from, as the chunk file records it: `text_column` is for files from elsewhere.
    cut_from = recorded_chunk_config(pq.read_schema(chunk_path)).get("text_column") or text_column
    problems += _check_spans(layout.output_path("download", shard), chunks, cut_from)
    if embed_path.is_file():
        problems += _check_embeddings(embed_path, chunks, expected_dims, outcome)
    else:
        problems.append(f"no embedding file {embed_path}")
    return {**outcome, "problems": problems, "made_with": made_with(layout, shard)}  # compared across shards by the flow


def outdated_stages(layout: Layout, shard: str, stages: tuple[str, ...] = ("chunk", "embed")) -> list[str]:
    """The stages whose done output for `shard` was made from an input that has been replaced since."""
    ledger = Ledger(layout)
    records = [ledger.read(stage, shard) for stage in stages]
    return [r.stage for r in records if r is not None and r.status == "done" and ledger.outdated(r)]


def _check_spans(source_path: Path, chunks: pa.Table, text_column: str) -> list[str]:
    if not source_path.is_file():
        return [f"no source shard {source_path} to check spans against"]
    schema, batches = open_arrow_batches(source_path, validate=True)
    with decoding(source_path, "read the source shard"):
        texts = pa.Table.from_batches(list(batches), schema).column(text_column).to_pylist()
    bad = 0
    first = None
    for row, (doc, text, start, end) in enumerate(
        zip(chunks.column("doc_index").to_pylist(), chunks.column("chunk_text").to_pylist(), chunks.column("char_start").to_pylist(), chunks.column("char_end").to_pylist())
    ):
        if doc >= len(texts) or texts[doc] is None or texts[doc][start:end] != text:
            bad += 1
            first = first if first is not None else row
    return [f"{bad} chunk(s) are not the source substring at their offsets (first: row {first})"] if bad else []


def _check_embeddings(path: Path, chunks: pa.Table, expected_dims: int | None, outcome: dict) -> list[str]:
    problems = []
    table = pq.read_table(path)
    outcome["embeddings"] = table.num_rows
    if table.num_rows != chunks.num_rows:
        return [f"{table.num_rows} embeddings for {chunks.num_rows} chunks"]
    if not (table.column("doc_index").equals(chunks.column("doc_index")) and table.column("chunk_index").equals(chunks.column("chunk_index"))):
        problems.append("embedding rows are not in the chunk file's order")
    dims = table.schema.field("embedding").type.list_size
    outcome["dims"] = dims
    if expected_dims and dims != expected_dims:
        problems.append(f"{dims} dimensions, expected {expected_dims}")
    if table.num_rows:
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dims).astype(np.float32)
        if not np.isfinite(vectors).all():
            problems.append(f"{int((~np.isfinite(vectors).all(axis=1)).sum())} embedding(s) hold NaN or inf")
        norms = np.linalg.norm(vectors, axis=1)
        off = np.flatnonzero(np.abs(norms - 1) > NORM_TOLERANCE)
        if off.size:
            problems.append(f"{off.size} embedding(s) are not unit-norm (first: row {int(off[0])}, norm {norms[off[0]]:.4f})")
    return problems


# What changes the chunks or the vectors. Not the engine: TEI and the in-process engine agree to cos >= 0.999. Not
# the model's revision either (recorded in each file): a commit to a model's repo may change only its card.
_MADE_WITH = {
    "chunk": ("model", "tokenizer_sha256", "max_tokens", "overlap", "text_column", "keep_columns"),
    "embed": ("model", "pooling", "prefix", "dims", "dtype"),
}


# Settings that are no part of the run's config: the model's files say them (a Hub model updated between two runs).
_NOT_CONFIG = {"pooling"}
# Values that tell nothing to compare: a file from before the key was recorded; a TEI that does not report its pooling.
_UNTOLD = {("pooling", repr("unknown"))}
_UNRECORDED = "(unrecorded)"


def _recorded_settings(path: Path, stage: str) -> dict[str, Any]:
    schema = pq.read_schema(path)
    if stage == "chunk":
        return recorded_chunk_config(schema)
    return {k.decode().removeprefix("fineweb_modal."): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"fineweb_modal.")}


def made_with(layout: Layout, shard: str, stages: tuple[str, ...] = tuple(_MADE_WITH)) -> dict[str, dict[str, Any]]:
    """Per stage (chunk, embed, or those of `stages`), the settings that shaped the shard's file there, as the file records them."""
    made: dict[str, dict[str, Any]] = {}
    for stage, keys in _MADE_WITH.items():
        if stage in stages and (path := layout.output_path(stage, shard)).is_file():
            recorded = _recorded_settings(path, stage)
            made[stage] = {key: recorded.get(key, _UNRECORDED) for key in keys}
    return made


def mixed_settings(made: dict[str, dict[str, dict[str, Any]]]) -> str:
    """'' when every shard's chunks were cut, and its vectors made, with the same settings (`made`: `made_with` per
    shard); else the first setting that differs, with the shards of each value (e.g. after a partial rerun with another `--prefix`)."""
    for stage, keys in _MADE_WITH.items():
        for key in keys:
            by_value: dict[str, list[str]] = {}
            for shard, stages in sorted(made.items()):
                if stage in stages and (value := stages[stage][key]) != _UNRECORDED and (key, repr(value)) not in _UNTOLD:
                    by_value.setdefault(repr(value), []).append(shard)
            if len(by_value) > 1:
                groups = "; ".join(f"{value} for {listing(names, limit=5)}" for value, names in sorted(by_value.items(), key=lambda item: -len(item[1])))
                if key in _NOT_CONFIG:  # the same config made both (the model changed under it): a run would skip them all
                    return f"the shards' {stage} files differ in their {key}: {groups}; delete the {stage} files of the shards to make again, then rerun {stage}"
                return f"the shards' {stage} files differ in their {key}: {groups}; rerun {stage} over all of them with one config (a run redoes the shards another config made)"
    return ""


def load_embeddings(data_dir: str | Path, name: str, max_tokens: int, model: str, split: str = "train") -> tuple[np.ndarray, pa.Table]:
    """All of a dataset's embeddings as one (N, d) float32 array, with the matching (id, doc_index, chunk_index, shard) keys."""
    from fineweb_modal.models import model_slug

    layout = Layout(data_dir=str(data_dir), name=name, split=split, max_tokens=max_tokens, model_slug=model_slug(model))
    paths = sorted(layout.shard_dir("embed").glob("*.parquet"))
    if not paths:
        raise FileNotFoundError(f"no embedding shards in {layout.shard_dir('embed')}")
    if stale := [path.stem for path in paths if outdated_stages(layout, path.stem, ("embed",))]:
        raise ValueError(f"embeddings of shard(s) {stale} were made from chunk files since replaced: rerun the embed stage")
    if mixed := mixed_settings({path.stem: made_with(layout, path.stem) for path in paths}):
        raise ValueError(mixed)
    tables = []
    for path in paths:
        table = pq.read_table(path, memory_map=True)  # the file is mapped; decoded columns live in memory
        tables.append(table.append_column("shard", pa.array([path.stem] * table.num_rows, pa.string())))
    table = pa.concat_tables(tables)
    column = table.column("embedding").combine_chunks()
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size).astype(np.float32, copy=False)
    return vectors, table.select(["id", "doc_index", "chunk_index", "shard"])


def preview(path: str | Path, rows: int = 3, text_column: str = "text") -> str:
    """A few lines about an output shard: rows, columns, the first documents, chunks or embeddings' norms."""
    with open(path, "rb") as head:
        if head.read(4) != b"PAR1":  # by its bytes, not its name (`fetch --to` names the copy): the download's Arrow file
            return _preview_download(Path(path), rows, text_column)
    parquet = pq.ParquetFile(path)
    lines = [f"{path}: {parquet.metadata.num_rows} rows, {parquet.metadata.num_row_groups} row group(s)", f"columns: {', '.join(parquet.schema_arrow.names)}"]
    head = next(parquet.iter_batches(batch_size=rows), None)
    if head is None:
        return "\n".join(lines)
    if "chunk_text" in head.schema.names:
        for row in head.to_pylist():
            text = row["chunk_text"].replace("\n", " ")
            lines.append(f"  [{row['doc_index']}:{row['chunk_index']}] {row['chunk_token_count']} tokens, chars {row['char_start']}–{row['char_end']}: {text[:100]}{'…' if len(text) > 100 else ''}")
    if "embedding" in head.schema.names:
        dims = head.schema.field("embedding").type.list_size
        vectors = head.column("embedding").flatten().to_numpy(zero_copy_only=False).reshape(-1, dims).astype(np.float32)
        norms = ", ".join(f"{n:.4f}" for n in np.linalg.norm(vectors, axis=1))
        lines.append(f"  {dims} dims; first norms: {norms}; first values: {np.array2string(vectors[0, :4], precision=4)}")
    return "\n".join(lines)


def _preview_download(path: Path, rows: int, text_column: str) -> str:
    """A downloaded shard's rows, columns and first documents (their start, and their length in characters)."""
    schema, batches = open_arrow_batches(path, validate=True)
    lines = [f"{path}: {arrow_num_rows(path)} rows", f"columns: {', '.join(schema.names)}"]
    texts = [text_column] if text_column in schema.names else [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)][:1]
    head = next((batch for batch in batches if batch.num_rows), None)
    if head is not None and texts:
        for row, text in enumerate(head.column(texts[0]).to_pylist()[:rows]):
            shown = "(null)" if text is None else f"{len(text)} chars: {text[:100].replace(chr(10), ' ')}{'…' if len(text) > 100 else ''}"
            lines.append(f"  [{row}] {shown}")
    return "\n".join(lines)
