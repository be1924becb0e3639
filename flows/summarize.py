"""summarize: per shard and in total, docs, chunks, tokens, short chunks and the chunk-length histogram."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, OnlyWhich, build_run_config
from fineweb_modal.models import DEFAULT_MODEL
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.stage import MAX_SHARDS_IN_FLIGHT, run_stage


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
    run = build_run_config(
        source=source, subset=subset, split=split, name=name, data_dir=data_dir, stages=["summarize"], backend=backend,
        max_tokens=max_tokens, model=model, prefix=prefix, shards=shards, only=only, max_cost=max_cost,
    )  # fmt: skip
    return run_stage("summarize", run)
