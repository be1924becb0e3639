"""chunk: every shard's documents → chunks that are exact substrings of the source, with offsets."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import DEFAULT_KEEP_COLUMNS, BackendName, OnlyWhich
from fineweb_modal.models import DEFAULT_MODEL
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.stage import MAX_SHARDS_IN_FLIGHT, run_stage_flow


@flow(name="chunk", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT), on_cancellation=[cancel_modal_calls], flow_run_name=dataset_run_name)
def chunk(
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    backend: BackendName = "local",
    max_tokens: int | str = "auto",
    overlap: float = 0.1,
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    text_column: str = "text",
    keep_columns: list[str] | str = list(DEFAULT_KEEP_COLUMNS),
    shards: list[str | int] | str | int | None = None,
    only: OnlyWhich | None = None,
    max_cost: float | None = None,
):
    """Chunk `<name>/<split>/*.arrow` into `<name>-chunked-<max_tokens>/<split>/*.parquet`, one task per shard."""
    return run_stage_flow("chunk", **locals())
