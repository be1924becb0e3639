"""One config object per stage, built once from the flat run parameters and validated before any work."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MAX_TOKENS, DEFAULT_MODEL, check_dimensions, hidden_size, load_tokenizer, model_info, prefix_token_count

STAGES = ("download", "chunk", "embed", "summarize")
MIN_MAX_TOKENS = 16
DEFAULT_KEEP_COLUMNS = ("url", "score", "dump")  # fineweb-edu's
CHUNK_COLUMNS = ("id", "doc_index", "chunk_index", "chunk_text", "char_start", "char_end", "chunk_token_count")
# The choices of the run's options, as flow parameters too (the Prefect UI offers them as a list and checks them).
BackendName = Literal["local", "modal"]
EngineName = Literal["transformers", "tei"]
OnlyWhich = Literal["failed"]
EmbeddingDtype = Literal["float32", "float16"]
CompileMode = Literal["auto", "on", "off"]
BACKENDS, ENGINES, EMBEDDING_DTYPES, COMPILE_CHOICES = (get_args(choices) for choices in (BackendName, EngineName, EmbeddingDtype, CompileMode))

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[\w.-]+$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset()

    def fingerprint(self) -> str:
        """A short stable hash of the fields that shape the output: what the ledger compares to decide 'done earlier'."""
        fields = self.model_dump(mode="json", exclude=set(self.not_fingerprinted))
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class DatasetConfig(_Frozen):
    """Where a dataset's shards live: `data_dir/<name>/<split>/`."""

    data_dir: str
    name: str
    split: str = "train"


class DownloadConfig(_Frozen):
    """Where the shards come from: a Hub dataset id or a local folder of parquet/arrow/jsonl files."""

    source: str
    source_kind: Literal["hub", "folder"]
    subset: str | None = None


class ChunkConfig(_Frozen):
    """How documents become chunks; the tokenizer's hash makes a changed tokenizer a changed config."""

    model: str
    tokenizer_sha256: str
    max_tokens: int
    overlap: float
    text_column: str = "text"
    keep_columns: tuple[str, ...] = DEFAULT_KEEP_COLUMNS


class EmbedConfig(_Frozen):
    """How chunks become vectors. Where the engine runs (URL) and its batch size do not change the vectors."""

    model: str
    prefix: str = ""
    engine: EngineName = "transformers"
    tei_url: str | None = None
    # The model id a TEI reports for --model when it was started under another name (e.g. `/repository` on
    # Inference Endpoints): the user vouches that it serves --model.
    tei_served_model: str | None = None
    dimensions: int | None = None
    embedding_dtype: EmbeddingDtype = "float32"
    batch_tokens: int | None = None  # None: the engine picks per device (4 k padded tokens on CPU, 64 k packed on CUDA)
    compile: CompileMode = "auto"  # torch.compile; auto: on CUDA only (on the CPU it costs 15-30 s per worker)
    not_fingerprinted: ClassVar[frozenset[str]] = frozenset({"tei_url", "tei_served_model", "batch_tokens", "compile"})


class RunConfig(_Frozen):
    """Everything one run needs, validated: the flows build it from their flat parameters."""

    dataset: DatasetConfig
    download: DownloadConfig | None
    chunk: ChunkConfig
    embed: EmbedConfig
    stages: tuple[str, ...]
    backend: BackendName
    shards: tuple[str, ...] = ()
    only: OnlyWhich | None = None
    max_cost: float | None = None
    num_proc: int = 4


def split_list(value: str | int | list[str | int] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Accept `a,b`, `["a", "b"]`, one number or nothing; the CLI passes strings, the Prefect UI lists (`-p shards=3` an int)."""
    if value is None:
        return ()
    items = str(value).split(",") if isinstance(value, (str, int)) else [str(v) for v in value]
    return tuple(item.strip() for item in items if item.strip())


def _carries_secrets(url: str) -> bool:
    """Whether a URL holds credentials or a query (where API keys go), or cannot be parsed (so cannot be shown safely)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    return bool(parts.username or parts.password or parts.query)


def default_name(source: str, subset: str | None) -> str:
    """`<folder name>` for a local folder, `<repo>-<subset>` for a Hub id."""
    if Path(source).expanduser().exists():
        return Path(source).expanduser().resolve().name
    repo = source.rstrip("/").split("/")[-1]
    return f"{repo}-{subset}" if subset else repo


def check_prefix(prefix: str, model: str) -> None:
    """A prefix must tokenize apart from the text after it, and be pooled with it: else ConfigError."""
    if prefix and not _tokenizes_apart(prefix, model):
        # "passage" + "hello" tokenizes as passage ##hell ##o: the chunker's count of the prefix would be short.
        raise ConfigError(f"prefix {prefix!r} ends inside a word, which the tokenizer would join to each chunk's first word: end it with a space or punctuation, e.g. {prefix + ': '!r}")
    if prefix and not model_info(model).pooling_includes_prompt:
        raise ConfigError(f"model {model!r} pools without its prompt (include_prompt: false), which this engine does not do: drop --prefix or pick another model")


_PROBE_WORDS = ("hello", "the", "x", "42", "Über")


def _tokenizes_apart(prefix: str, model: str) -> bool:
    """Whether the prefix adds its own token count to any text after it (probed with a few words)."""
    tokenizer = load_tokenizer(model_info(model).path)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return all(count(prefix + word) == count(prefix) + count(word) for word in _PROBE_WORDS)


def resolve_max_tokens(max_tokens: int | str, model: str, prefix: str) -> int:
    """`auto` → min(500, model limit − prefix tokens); an explicit value must fit the model."""
    info = model_info(model)
    room = info.sequence_limit - prefix_token_count(info.path, prefix)
    if str(max_tokens).strip().lower() == "auto":
        if room < MIN_MAX_TOKENS:
            raise ConfigError(f"the prefix takes {info.sequence_limit - room} of {model}'s {info.sequence_limit} tokens, leaving {room} for a chunk (at least {MIN_MAX_TOKENS})")
        return min(DEFAULT_MAX_TOKENS, room)
    try:
        value = int(str(max_tokens).strip())
    except ValueError:
        raise ConfigError(f"max_tokens must be 'auto' or an integer, got {max_tokens!r}") from None
    if value < MIN_MAX_TOKENS:
        raise ConfigError(f"max_tokens={value} is below the minimum of {MIN_MAX_TOKENS}")
    if value > room:
        raise ConfigError(
            f"max_tokens={value} does not fit {model}: its sequence limit is {info.sequence_limit} tokens"
            + (f" and the prefix takes {info.sequence_limit - room}" if room != info.sequence_limit else "")
            + f", so at most {room}"
        )
    return value


def build_run_config(
    *,
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    stages: str | list[str] = STAGES,
    backend: str = "local",
    max_tokens: int | str = "auto",
    overlap: float = 0.1,
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    text_column: str = "text",
    keep_columns: str | list[str] = DEFAULT_KEEP_COLUMNS,
    shards: str | list[str] | None = None,
    engine: str = "transformers",
    tei_url: str | None = None,
    tei_served_model: str | None = None,
    dimensions: int | None = None,
    embedding_dtype: str = "float32",
    compile: str = "auto",
    only: str | None = None,
    max_cost: float | None = None,
    num_proc: int = 4,
) -> RunConfig:
    """Validate the flat run parameters (CLI flags, flow parameters) into a RunConfig, or raise ConfigError."""
    stage_list = split_list(stages)
    unknown = [s for s in stage_list if s not in STAGES]
    if not stage_list:
        raise ConfigError(f"no stage given: choose from {', '.join(STAGES)}")
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    stage_list = tuple(s for s in STAGES if s in stage_list)  # run order is fixed, whatever the given order
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "tei" and backend == "local" and not tei_url:
        raise ConfigError("--engine tei with the local backend needs --tei-url (a running TEI); on Modal the app starts TEI")
    if tei_url and _carries_secrets(tei_url):
        # The URL is a flow parameter (stored, shown in the UI) and goes into resume commands: no secret in it.
        raise ConfigError("tei_url must carry no credentials or query (they would show in the Prefect UI): put the key in TEI_API_KEY or the Secret block 'tei-api-key'")
    if tei_url and not re.match(r"^https?://[^\s/]+", tei_url):
        raise ConfigError(f"tei_url {tei_url!r} must be an http(s) URL like http://127.0.0.1:8080")
    if tei_url and engine != "tei":
        raise ConfigError("--tei-url is only used with --engine tei")
    if tei_url and backend == "modal":
        raise ConfigError("--tei-url is for the local backend: on Modal each GPU container runs its own TEI (drop --tei-url)")
    if backend == "modal" and Path(model).expanduser().is_dir():
        raise ConfigError(
            f"model {model!r} is a folder on this machine, which Modal's containers do not have: "
            "push it to the Hub and pass its id, or run it with the local backend"
        )
    if tei_served_model and not tei_url:
        raise ConfigError("--tei-served-model names what a TEI at --tei-url reports as its model; it needs --tei-url")
    if max_cost is not None:
        try:
            max_cost = float(max_cost)
        except (TypeError, ValueError):
            raise ConfigError(f"max_cost must be a number of dollars, got {max_cost!r}") from None
        if not max_cost >= 0:  # NaN too: no spend would ever reach it
            raise ConfigError(f"max_cost={max_cost} must be a number of dollars, not negative")
    if only not in (None, "", "failed"):
        raise ConfigError(f"only must be 'failed' (or unset), got {only!r}")
    if embedding_dtype not in EMBEDDING_DTYPES:
        raise ConfigError(f"embedding_dtype must be one of {EMBEDDING_DTYPES}, got {embedding_dtype!r}")
    if compile not in COMPILE_CHOICES:
        raise ConfigError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    if compile == "on" and engine == "tei":
        raise ConfigError("compile=on is for the transformers engine; TEI compiles its own kernels")
    if dimensions is not None and (not str(dimensions).isdigit() or int(dimensions) < 1):
        raise ConfigError(f"dimensions must be a positive integer, got {dimensions!r}")
    try:
        overlap = float(overlap)
    except (TypeError, ValueError):
        raise ConfigError(f"overlap must be a number in [0, 0.5], got {overlap!r}") from None
    if not 0.0 <= overlap <= 0.5:
        raise ConfigError(f"overlap={overlap} is outside [0, 0.5] (a fraction of the window)")
    if not text_column:
        raise ConfigError("text_column must not be empty")
    if shards not in (None, [], ()) and not split_list(shards):  # `--shards "$FAILED"` with nothing in it must not run every shard
        raise ConfigError(f"shards={shards!r} names no shard: leave it out to run every shard")
    if not split or not _NAME.match(split) or not split.strip("."):
        raise ConfigError(f"split {split!r} must be a plain name (letters, digits, '.', '_', '-')")

    download = None
    if source:
        hub_named = source.removeprefix("hf://datasets/").removeprefix("hf://") if source.startswith("hf://") else None
        if hub_named is not None:  # a Hub id said to be one, whatever folders are here
            if not _HUB_ID.match(hub_named):
                raise ConfigError(f"source {source!r}: after hf:// comes a Hub id like 'org/name'")
            source = hub_named
            download = DownloadConfig(source=source, source_kind="hub", subset=subset or None)
        elif Path(source).expanduser().exists():
            if not Path(source).expanduser().is_dir():
                raise ConfigError(f"source {source!r} is a file: pass the folder that holds the shard files")
            if subset:
                raise ConfigError(f"subset {subset!r} is for a Hub dataset; source {source!r} is a local folder (drop --subset)")
            download = DownloadConfig(source=str(Path(source).expanduser().resolve()), source_kind="folder")
        elif _HUB_ID.match(source) and Path(source).parent.is_dir():
            raise ConfigError(
                f"source {source!r}: no such folder (not taken as a Hub id, since {Path(source).parent}/ is a folder here; "
                f"for the Hub dataset write hf://{source})"
            )
        elif _HUB_ID.match(source):
            download = DownloadConfig(source=source, source_kind="hub", subset=subset or None)
        else:
            raise ConfigError(f"source {source!r} is neither an existing folder nor a Hub id like 'org/name'")
    elif "download" in stage_list:
        raise ConfigError("the download stage needs --source (a Hub id or a local folder)")
    if Path(data_dir).expanduser().exists() and not Path(data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {data_dir!r} is a file, not a folder")
    dataset_name = name or (default_name(source, subset) if source else None)
    if not dataset_name:
        raise ConfigError("give --name (or --source, from which the name is derived)")
    if not _NAME.match(dataset_name) or not dataset_name.strip("."):  # `..` would leave the data dir
        raise ConfigError(f"name {dataset_name!r} must be a plain name (letters, digits, '.', '_', '-')")

    info = model_info(model)  # raises ConfigError for an unknown model
    check_prefix(prefix, model)
    check_dimensions(model, dimensions, hidden_size(info.path))
    keep = split_list(keep_columns)
    if clashes := [c for c in keep if c in (*CHUNK_COLUMNS, "embedding") and c != "id"]:  # `embedding`: publish joins it
        raise ConfigError(f"keep_columns {clashes} would clash with the chunk file's own columns {list(CHUNK_COLUMNS)} or the published `embedding`")
    if repeated := sorted({c for c in keep if keep.count(c) > 1}):
        raise ConfigError(f"keep_columns names {repeated} more than once")
    chunk = ChunkConfig(
        model=model,
        tokenizer_sha256=info.tokenizer_sha256,
        max_tokens=resolve_max_tokens(max_tokens, model, prefix),
        overlap=overlap,
        text_column=text_column,
        keep_columns=tuple(c for c in keep if c != "id"),  # the chunk file's `id` already is the source's id
    )
    return RunConfig(
        dataset=DatasetConfig(data_dir=str(Path(data_dir).expanduser()), name=dataset_name, split=split),
        download=download,
        chunk=chunk,
        embed=EmbedConfig(
            model=model,
            prefix=prefix,
            engine=engine,
            tei_url=tei_url or None,
            tei_served_model=tei_served_model or None,
            dimensions=int(dimensions) if dimensions is not None else None,
            embedding_dtype=embedding_dtype,
            compile=compile,
        ),
        stages=stage_list,
        backend=backend,
        shards=split_list(shards),
        only=only or None,
        max_cost=max_cost,
        num_proc=num_proc,
    )
