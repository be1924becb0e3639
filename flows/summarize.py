"""summarize: per shard and in total, docs, chunks, tokens, short chunks and the chunk-length histogram."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, OnlyWhich
from fineweb_modal.models import DEFAULT_MODEL
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.stage import MAX_SHARDS_IN_FLIGHT, run_stage_flow


@flow(name="summarize", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT), on_cancellation=[cancel_modal_calls], flow_run_name=dataset_run_name)
def summarize(
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    backend: BackendName = "local",
    max_tokens: int | str = "auto",
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    shards: list[str | int] | str | int | None = None,
    only: OnlyWhich | None = None,
    max_cost: float | None = None,
):
    """Summarize `<name>-chunked-<T>/<split>/*.parquet` into `<name>-chunked-<T>/_summary/`."""
    return run_stage_flow("summarize", **locals())
