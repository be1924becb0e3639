"""download: a Hub dataset or a local folder of parquet/arrow/jsonl files → one Arrow shard per file."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, OnlyWhich
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.stage import MAX_SHARDS_IN_FLIGHT, run_stage_flow


@flow(name="download", task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS_IN_FLIGHT), on_cancellation=[cancel_modal_calls], flow_run_name=dataset_run_name)
def download(
    source: str,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    backend: BackendName = "local",
    shards: list[str | int] | str | int | None = None,
    only: OnlyWhich | None = None,
    max_cost: float | None = None,
    num_proc: int = 4,
):
    """Copy a source into `data_dir/<name>/<split>/<shard>.arrow`, one task per shard."""
    return run_stage_flow("download", **locals())
