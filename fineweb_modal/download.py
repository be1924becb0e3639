"""Source files (parquet, arrow, jsonl) or a Hub dataset → one Arrow IPC stream file per shard, as `save_to_disk` writes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.phrasing import listing
from fineweb_modal.storage import atomic_path, decoding, open_arrow_batches, write_json_atomic

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 20  # for the up-front look at a Hub dataset; the download itself has the Hub client's own timeouts


@dataclass
class Converted:
    """One source file copied into a shard: rows read, rows kept, and the JSONL lines left out (1-based)."""

    rows_in: int
    rows_out: int
    left_out_lines: list[int] = field(default_factory=list)
    left_out_reason: str = ""  # why the first of them was left out


def _source_batches(path: Path, text_column: str) -> tuple[pa.Schema, Iterator[pa.RecordBatch], tuple[list[int], str]]:
    with decoding(path, f"read as {path.suffix[1:]}"):
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow, parquet.iter_batches(batch_size=8192), ([], "")
        if path.suffix == ".arrow":
            return *open_arrow_batches(path, validate=True), ([], "")  # a bad source fails here, not its chunk later
        if path.suffix in (".jsonl", ".json"):
            try:
                table, left_out = pa_json.read_json(path), ([], "")
            except pa.ArrowInvalid:  # empty, a line over its 1 MiB block, one bad value, a changing type: line by line
                table, left_out = _read_jsonl_lines(path, text_column)
            else:
                if not _text_or_absent(table.schema, text_column):  # e.g. every `text` a number: no line is a document
                    table, left_out = _read_jsonl_lines(path, text_column)
            return table.schema, iter(table.to_batches(max_chunksize=8192)), left_out
    raise BadDataError(f"{path}: unsupported file type {path.suffix!r} (parquet, arrow, jsonl)")


def _read_jsonl_lines(path: Path, text_column: str) -> tuple[pa.Table, tuple[list[int], str]]:
    """A JSONL file pyarrow refused, checked line by line with Python's json, then read by pyarrow again (the same
    column types as any other shard) from the lines kept, in blocks as long as the longest line.

    A line that is not JSON is a broken file (an error naming it); a JSON line that cannot be a document — not
    an object, a `text_column` that is not a string, a string that is not valid Unicode (a lone surrogate) — is
    left out and counted. A file with no document is an error: it has no columns to give its shard.
    """
    kept = io.BytesIO()
    left_out: list[int] = []
    first_reason = ""
    longest = 0
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line  # a UTF-8 byte-order mark
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # json's messages may end in "at": "Unterminated string starting at"
                where = f"{exc.msg.removesuffix(' at')} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise BadDataError(f"{path}: line {number} is not valid JSON ({where})") from None
            if reason := _not_a_document(row, text_column):
                left_out.append(number)
                first_reason = first_reason or f"line {number}: {reason}"
                continue
            kept.write(line if line.endswith(b"\n") else line + b"\n")
            longest = max(longest, len(line))
    if not kept.tell():
        raise BadDataError(f"{path}: holds no document" + (f" ({len(left_out)} line(s) left out; {first_reason})" if left_out else " (an empty file)"))
    if left_out:
        why = first_reason.partition(": ")[2]  # without its `line N: `
        log.warning("%s: left out %d line(s) that are no document: line %s (%s%s)", path, len(left_out), listing(left_out), "the first: " if len(left_out) > 1 else "", why)
    kept.seek(0)
    options = pa_json.ReadOptions(block_size=max(1 << 20, longest + 1024))
    try:
        return pa_json.read_json(kept, read_options=options), (left_out, first_reason)
    except pa.ArrowInvalid as exc:  # e.g. a column whose values change type; its row number counts kept lines only
        raise BadDataError(f"{path}: cannot read as jsonl ({_ROW_NUMBER.sub('', str(exc))})") from None


def _text_or_absent(schema: pa.Schema, text_column: str) -> bool:
    """Whether pyarrow read `text_column` as strings (or all nulls), or not at all (the column check names that)."""
    if text_column not in schema.names:
        return True
    kind = schema.field(text_column).type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


_ROW_NUMBER = re.compile(r" in row \d+")
_JSON_TYPE = {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "object", type(None): "null"}


def _not_a_document(row: object, text_column: str) -> str:
    """Why a parsed JSONL line cannot be a document ('' when it can)."""
    if not isinstance(row, dict):
        return f"a JSON {_JSON_TYPE[type(row)]}, not an object"
    text = row.get(text_column)
    if text is not None and not isinstance(text, str):
        return f"{text_column!r} is a {_JSON_TYPE[type(text)]}, not a string"
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "a string that is not valid Unicode (a lone surrogate escape)"
    return ""


def source_schema(path: Path, text_column: str = "text") -> pa.Schema:
    """The columns of one source file (parquet and arrow: from the header alone)."""
    return _source_batches(path, text_column)[0]


def convert_file(source: Path, output: Path, text_column: str = "text") -> Converted:
    """Copy one source file into an Arrow IPC stream file at `output` (atomically), leaving out JSONL lines that are no document."""
    if not source.is_file():
        raise BadDataError(f"{source}: source file does not exist")
    schema, batches, (left_out, reason) = _source_batches(source, text_column)
    rows = 0
    with atomic_path(output) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        with decoding(source, f"read as {source.suffix[1:]} after row {rows}"):
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
    return Converted(rows_in=rows + len(left_out), rows_out=rows, left_out_lines=left_out, left_out_reason=reason)


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


@dataclass
class HubProblem:
    """Why a Hub dataset cannot be read from here, and whether that is settled (not a Hub that failed just now: 429, 5xx)."""

    message: str
    settled: bool = True


HUB_ANSWER_TTL_S = 60.0  # a run asks from the CLI, its pipeline and its download stage: one answer serves them
_hub_answers: dict[tuple[str, str, str | None], tuple[float, "HubProblem | None"]] = {}


def hub_access_problem(repo_id: str) -> HubProblem | None:
    """Why the Hub dataset `repo_id` cannot be read from here (None when it can): its info, and for a gated one the
    access check; an answer is reused for a minute (for the same Hub address and token)."""
    from huggingface_hub import constants, get_token

    asking = (constants.ENDPOINT, repo_id, get_token())
    if (hit := _hub_answers.get(asking)) and time.monotonic() - hit[0] < HUB_ANSWER_TTL_S:
        return hit[1]
    answer = _ask_hub(repo_id)
    _hub_answers[asking] = (time.monotonic(), answer)
    return answer


def _ask_hub(repo_id: str) -> HubProblem | None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    try:
        if api.dataset_info(repo_id, timeout=HUB_TIMEOUT_S).gated:  # the info of a gated dataset is public; its files are not
            api.auth_check(repo_id, repo_type="dataset")
    except GatedRepoError:
        return HubProblem(f"the Hub dataset {repo_id} is gated: accept its terms on its page, and set HF_TOKEN to a token of that account")
    except RepositoryNotFoundError:
        return HubProblem(f"the Hub has no dataset {repo_id} (or it is private and no Hub token here can read it: set HF_TOKEN)")
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status == 401:  # a token the Hub does not know (a missing one reads as RepositoryNotFound)
            return HubProblem("the Hub refused the token here (HTTP 401: invalid credentials): set a valid HF_TOKEN (or `hf auth login`), or none for a public dataset")
        return HubProblem(f"the Hub answered HTTP {status} for the dataset {repo_id}", settled=status != 429 and status < 500)
    except Exception as exc:  # the network's own errors (DNS, refused, TLS, timeout) come from the Hub client's HTTP library
        return HubProblem(
            f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); with the dataset in the Hub's cache here, set HF_HUB_OFFLINE=1"
        )
    return None


def hub_name(repo_id: str, subset: str | None) -> str:
    """A Hub dataset as messages name it: `hf://datasets/org/name (subset s)`."""
    return f"hf://datasets/{repo_id}" + (f" (subset {subset})" if subset else "")


def hub_offline() -> bool:
    """Whether the Hub client or `datasets` is in offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE): nothing is asked of the Hub."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return constants.is_offline_mode() or datasets_config.HF_HUB_OFFLINE


def hub_load_path(repo_id: str) -> str:
    """What `load_dataset` is given for a Hub id: `hf://datasets/<id>` reads the Hub even where a local folder has the id's name."""
    return f"hf://datasets/{repo_id}"


@contextlib.contextmanager
def hub_config_errors(repo_id: str, subset: str | None) -> Iterator[None]:
    """What `datasets` raises for a subset, split or file layout it cannot use, as one ConfigError naming the dataset."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    try:
        yield
    except pa.ArrowException:  # a listed file that does not read (pyarrow's ArrowInvalid is a ValueError too): no verdict on the config
        raise
    except (ValueError, RuntimeError, DatasetNotFoundError, DataFilesNotFoundError, EmptyDatasetError) as exc:  # a bad split or subset; a script
        raise ConfigError(f"{hub_name(repo_id, subset)}: {exc}") from None


# Reused for a minute, as the Hub's answers are: a long-lived `serve` process asks again for a later run, whose
# dataset may have gained the column an earlier run was refused for.
_hub_schemas: dict[tuple[str, str | None, str], tuple[float, pa.Schema | None]] = {}


def hub_schema(repo_id: str, subset: str | None, split: str) -> pa.Schema | None:
    """The columns of a Hub dataset's split, from its first file's header (nothing downloaded); None when its format does not say.

    An unknown subset or split is a ConfigError naming the ones there are, as is a dataset only a script can
    load (`datasets` no longer runs them).
    """
    from datasets import load_dataset

    asking = (hub_load_path(repo_id), subset, split)
    if (hit := _hub_schemas.get(asking)) and time.monotonic() - hit[0] < HUB_ANSWER_TTL_S:
        return hit[1]
    with hub_config_errors(repo_id, subset):  # e.g. "Bad split: tran. Available splits: ['train']"
        features = load_dataset(asking[0], subset, split=split, streaming=True).features
    schema = features.arrow_schema if features is not None else None
    _hub_schemas[asking] = (time.monotonic(), schema)
    return schema


def download_hub(repo_id: str, subset: str | None, split: str, split_dir: Path, num_proc: int, keep_cache: bool = True) -> dict[str, int]:
    """`load_dataset` + `save_to_disk` of a Hub dataset into `split_dir`; returns rows per shard file.

    Shard files an earlier save left that this one did not write (it split the data into fewer files) are
    removed. `keep_cache=False` deletes what `load_dataset` cached (the Hub's files, the Arrow cache) once the
    shards are saved.
    """
    from datasets import load_dataset

    dataset = load_dataset(hub_load_path(repo_id), subset, split=split, num_proc=num_proc)
    if not keep_cache:
        import huggingface_hub.constants

        cached = {Path(f["filename"]).parent for f in dataset.cache_files}
        cached.add(Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}")
    split_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=split_dir.parent))
    try:
        dataset.save_to_disk(str(staging), num_proc=num_proc)
        saved = {path.name for path in staging.iterdir()}
        for earlier in split_dir.glob("*.arrow"):
            if earlier.name not in saved:
                earlier.unlink()
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
