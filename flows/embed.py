"""embed: every shard's chunks → L2-normalized vectors, rows in the chunk file's order."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, CompileMode, EmbeddingDtype, EngineName, OnlyWhich
from fineweb_modal.models import DEFAULT_MODEL
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.stage import MAX_SHARDS_IN_FLIGHT, run_stage_flow


@flow(name="embed", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT), on_cancellation=[cancel_modal_calls], flow_run_name=dataset_run_name)
def embed(
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    backend: BackendName = "local",
    max_tokens: int | str = "auto",
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    engine: EngineName = "transformers",
    shards: list[str | int] | str | int | None = None,
    only: OnlyWhich | None = None,
    max_cost: float | None = None,
    tei_url: str | None = None,
    tei_served_model: str | None = None,
    dimensions: int | None = None,
    embedding_dtype: EmbeddingDtype = "float32",
    compile: CompileMode = "auto",
):
    """Embed `<name>-chunked-<T>/<split>/*.parquet` into `<name>-chunked-<T>-<model>/<split>/`, one task per shard."""
    return run_stage_flow("embed", **locals())
