"""One Prefect task per stage: a named, retryable run per shard whose state message carries tokens and dollars."""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run
from prefect.states import Completed
from prefect.tasks import exponential_backoff

from fineweb_modal.config import RunConfig
from fineweb_modal.costs import FAILED_ATTEMPTS_ATTRIBUTE, billed_on, put_dollars
from fineweb_modal.errors import is_transient
from fineweb_modal.report import state_message
from fineweb_modal.shards import ShardJob, ShardResult
from tasks.backends import get_backend
from tasks.secrets import load_tei_api_key

RETRIES = 3


def retry_when(may_pass: Callable[[BaseException], bool]) -> Callable:
    """A task's `retry_condition_fn`: retry an attempt whose exception `may_pass` says a retry can pass."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as exc:  # the state's exception, re-raised here so it can be classified
            return may_pass(exc)
        return False

    return condition


retry_if_transient = retry_when(is_transient)  # I/O errors and timeouts are retried; bad data and bad config fail at once


def _emit(outcome: str, stage: str, shard: str, run: RunConfig, payload: dict) -> None:
    """An event per shard, for automations (e.g. notify when a shard fails, or when $ passes a mark)."""
    emit_event(
        event=f"fineweb-modal.shard.{outcome}",
        resource={"prefect.resource.id": f"fineweb-modal.shard.{run.dataset.name}.{stage}.{shard}", "prefect.resource.name": f"{stage}-{shard}"},
        payload={"stage": stage, "shard": shard, "dataset": run.dataset.name, "backend": run.backend, **payload},
    )


def _lease_owner() -> str | None:
    """The top-level flow run: a `prefect flow-run retry` of a pipeline makes new stage subflows, not a new root."""
    root = current_flow_run.root_flow_run_id or current_flow_run.id
    return f"flow-run {root}" if root else None


# What the failed attempts of each task run (by id) were billed so far: its retries run in this process.
_failed_attempts_usd: dict[str, float] = {}


def settle_failed_attempts(task_run_id: object) -> None:
    """Forget a finished task run's sum of failed attempts (its final state carries it)."""
    _failed_attempts_usd.pop(str(task_run_id), None)


def run_shard_task(stage: str, shard: str, run: RunConfig, source_file: str | None = None):
    """The shared body of the stage tasks: build the job, dispatch it, turn the result into a state and an event.

    What failed attempts were billed (Modal) adds up over the task run's retries: on its final error
    (FAILED_ATTEMPTS_ATTRIBUTE) or in a later success's `extra`, so the budget and the report count it.
    """
    attempt = current_task_run.run_count or 1
    job = ShardJob(stage=stage, shard=shard, run=run, source_file=source_file, attempt=attempt, owner=_lease_owner())
    key = str(current_task_run.id)
    try:
        result: ShardResult = get_backend(run.backend).run(job)
    except Exception as exc:
        wasted = _failed_attempts_usd[key] = _failed_attempts_usd.get(key, 0.0) + (billed_on(exc) or 0.0)
        put_dollars(exc, wasted, FAILED_ATTEMPTS_ATTRIBUTE)
        _emit("failed", stage, shard, run, {"error": f"{type(exc).__name__}: {exc}"[:500], "attempt": attempt, "transient": is_transient(exc), "billed_usd": billed_on(exc) or 0.0})
        raise
    if wasted := _failed_attempts_usd.pop(key, 0.0) + result.extra.get("failed_attempts_usd", 0.0):  # earlier attempts', and this one's replaced calls
        result.extra = {**result.extra, "failed_attempts_usd": wasted}
    for warning in result.extra.get("warnings", []):  # logged where the work ran (a worker process, a Modal container)
        get_run_logger().warning(warning)
    _emit(result.status, stage, shard, run, {"tokens": result.tokens, "seconds": result.seconds, "overhead_seconds": result.overhead_seconds, "cost_usd": result.cost_usd})
    return Completed(message=state_message(result), data=result)


_RETRYABLE = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    # Resume comes from the ledger (shard + config fingerprint), not from Prefect's result cache.
    cache_policy=NO_CACHE,
)


@task(name="download", task_run_name="download-{shard}", **_RETRYABLE)
def download_task(shard: str, run: RunConfig, source_file: str) -> ShardResult:
    """Copy one source file into the data dir as an Arrow shard."""
    return run_shard_task("download", shard, run, source_file)


@task(name="chunk", task_run_name="chunk-{shard}", **_RETRYABLE)
def chunk_task(shard: str, run: RunConfig) -> ShardResult:
    """Chunk one shard."""
    return run_shard_task("chunk", shard, run)


@task(name="embed", task_run_name="embed-{shard}", **_RETRYABLE)
def embed_task(shard: str, run: RunConfig) -> ShardResult:
    """Embed one shard's chunks."""
    if run.embed.engine == "tei" and run.backend == "local":
        load_tei_api_key()
    return run_shard_task("embed", shard, run)


@task(name="summarize", task_run_name="summarize-{shard}", **_RETRYABLE)
def summarize_task(shard: str, run: RunConfig) -> ShardResult:
    """Summarize one shard's chunks."""
    return run_shard_task("summarize", shard, run)


@task(name="download-hub", task_run_name="download-hub-{name}", **_RETRYABLE)
def download_hub_task(name: str, run: RunConfig) -> list[ShardResult]:
    """Download a whole Hub dataset (one `load_dataset` + `save_to_disk`, which yields the shards)."""
    results = get_backend(run.backend).download_hub(run)
    for warning in (w for r in results for w in r.extra.get("warnings", [])):  # logged where the download ran
        get_run_logger().warning(warning)
    return Completed(message=f"{len(results)} shards, {sum(r.docs for r in results):,} docs", data=results)


STAGE_TASKS = {"download": download_task, "chunk": chunk_task, "embed": embed_task, "summarize": summarize_task}
