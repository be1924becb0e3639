"""plan: before spending, sample every shard and forecast chunks, tokens, GPU hours and $ per engine and GPU."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, RunConfig, build_run_config
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL, SCALE_MODEL
from fineweb_modal.plan import ShardSample, forecast, sample_hub
from fineweb_modal.report import artifact_key, group_digits
from fineweb_modal.selection import select_shards
from flows.hooks import dataset_run_name
from flows.outcome import refused
from tasks.backends import get_backend
from tasks.shard_tasks import retry_if_transient


@task(name="plan", task_run_name="plan-{shard}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def plan_task(shard: str, run: RunConfig) -> ShardSample:
    """Sample and chunk a few hundred documents of one shard."""
    sample = ShardSample(**get_backend(run.backend).plan_sample(run, shard))
    return Completed(message=f"≈{group_digits(sample.est_embed_tokens)} tokens from {sample.sampled} of {sample.rows} docs", data=sample)


@task(name="plan-hub", task_run_name="plan-hub-{name}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def plan_hub_task(name: str, run: RunConfig) -> ShardSample:
    """Before a Hub dataset's download: count its rows from the Hub, stream and chunk its first documents (here, on any backend)."""
    assert run.download is not None
    sample = sample_hub(run.download.source, run.download.subset, run.dataset.split, run.chunk, run.embed.prefix)
    return Completed(message=f"≈{group_digits(sample.est_embed_tokens)} tokens from the first {sample.sampled} of {group_digits(sample.rows)} docs (not downloaded)", data=sample)


@flow(name="plan", task_runner=ThreadPoolTaskRunner(max_workers=16), flow_run_name=dataset_run_name)
def plan(
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
    shards: list[str | int] | str | int | None = None,
) -> list[dict]:
    """Forecast the embed stage's cost for the downloaded shards, as a table artifact; before a Hub dataset's download,
    from its first documents and its row count (pass its `source`)."""
    try:
        run = build_run_config(
            source=source, subset=subset, split=split, name=name, data_dir=data_dir, stages=["chunk"], backend=backend,
            max_tokens=max_tokens, overlap=overlap, model=model, prefix=prefix, text_column=text_column, keep_columns=[], shards=shards,
        )  # fmt: skip
        available = get_backend(backend).list_shards(run, "chunk")
        from_hub = not available and run.download is not None and run.download.source_kind == "hub"
        if not available and not from_hub:
            before = "" if run.download is not None else " (a Hub dataset can be planned before: pass its --source)"
            raise ConfigError(f"no downloaded shards for {run.dataset.name}; run the download stage first{before}")
        if from_hub and run.shards:
            raise ConfigError("--shards names downloaded shards; before the download a Hub dataset is planned whole")
        chosen = [] if from_hub else select_shards(available, run.shards)
    except ConfigError as exc:
        return refused("plan", exc)  # a message, not a traceback
    if from_hub:
        hub_state = plan_hub_task(run.dataset.name, run, return_state=True)
        if not hub_state.is_completed():
            return refused("plan", error) if isinstance(error := hub_state.result(raise_on_failure=False), ConfigError) else hub_state
        samples = [hub_state.result()]
    else:
        samples = [f.result() for f in [plan_task.submit(shard=s, run=run) for s in chosen]]
    rows = forecast(samples)
    # The default rates are for a BERT-base-sized model: a smaller one (the demo's MiniLM) runs faster, costs less.
    sized = "" if model == SCALE_MODEL else f"; GPU rates for a BERT-base-sized model such as {SCALE_MODEL}"
    sampled = f"the first {samples[0].sampled} of {group_digits(samples[0].rows)} docs streamed from the Hub" if from_hub else f"{len(samples)} shards sampled"
    create_table_artifact(rows, key=artifact_key("plan", run.dataset.name, "forecast"), description=f"plan · {run.dataset.name}: {sampled}{sized}")
    h100 = next(r for r in rows if r["engine"] == "transformers" and r["gpu"] == "H100")
    return Completed(message=f"≈{group_digits(h100['embed tokens'])} embed tokens: ≈${h100['cost $']} on an H100 (transformers){sized}; from {sampled}", data=rows)
