"""fetch: copy one output shard (chunks or embeddings) from the data dir or the Modal Volume, and preview it."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from fineweb_modal.config import BackendName, RunConfig, build_run_config
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL
from fineweb_modal.report import artifact_key
from fineweb_modal.selection import select_shards
from fineweb_modal.verify import preview
from flows.hooks import dataset_run_name
from flows.outcome import refused
from tasks.backends import get_backend

_LISTED_BY = {"download": "chunk", "chunk": "embed", "embed": "embed"}  # the stage whose inputs are these outputs


_FILE_SUFFIX = {"download": ".arrow", "chunk": "-chunks.parquet", "embed": "-embeddings.parquet"}  # one folder holds all three


def stages_for(stage: str) -> list[str]:
    """The stages a fetch's run config is built for: the download stage's own would ask for its --source."""
    return ["chunk" if stage == "download" else stage]


def fetch_shard(run: RunConfig, stage: str, shard: str | int, to: Path) -> Path:
    """Copy one output shard (by name or index) to `to`, a folder or a file; returns the local path."""
    where = get_backend(run.backend)
    (shard_name,) = select_shards(where.list_shards(run, _LISTED_BY[stage]), [str(shard)])
    destination = to / f"{shard_name}{_FILE_SUFFIX[stage]}" if to.is_dir() or not to.suffix else to
    return where.fetch(run, stage, shard_name, destination)


@flow(name="fetch", flow_run_name=dataset_run_name)
def fetch(
    name: str,
    shard: str | int,
    to: str = ".",
    stage: str = "embed",
    data_dir: str = "./data",
    split: str = "train",
    backend: BackendName = "local",
    max_tokens: int | str = "auto",
    model: str = DEFAULT_MODEL,
    prefix: str = "",
) -> str:
    """Copy the shard (by name or index) to `to` (a folder or a file) and attach a preview; returns the local path."""
    try:
        run = build_run_config(name=name, data_dir=data_dir, split=split, stages=stages_for(stage), backend=backend, max_tokens=max_tokens, model=model, prefix=prefix)
        path = fetch_shard(run, stage, shard, Path(to))
    except ConfigError as exc:
        return refused("fetch", exc)  # a shard that is not there, Modal not reached: a message, not a traceback
    text = preview(path, text_column=run.chunk.text_column)
    create_markdown_artifact(f"```\n{text}\n```", key=artifact_key("fetch", name, stage), description=f"fetch · {stage} {path.stem}")
    return str(path)
