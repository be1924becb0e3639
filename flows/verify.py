"""verify: per shard, chunk and embedding files agree with each other and with the source; fail on any violation."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from fineweb_modal.config import BackendName, RunConfig, build_run_config
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL
from fineweb_modal.report import artifact_key
from fineweb_modal.selection import select_shards
from fineweb_modal.verify import mixed_settings
from flows.hooks import dataset_run_name
from flows.outcome import failed, outcome, refused
from tasks.backends import get_backend
from tasks.shard_tasks import retry_if_transient


@task(name="verify", task_run_name="verify-{shard}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def verify_task(shard: str, run: RunConfig) -> dict:
    """Check one shard's outputs."""
    outcome = get_backend(run.backend).verify(run, shard)
    message = "ok" if not outcome["problems"] else "; ".join(outcome["problems"])
    return Completed(message=message, data=outcome) if not outcome["problems"] else failed(message, outcome)


@flow(name="verify", task_runner=ThreadPoolTaskRunner(max_workers=16), flow_run_name=dataset_run_name)
def verify(
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    backend: BackendName = "local",
    max_tokens: int | str = "auto",
    model: str = DEFAULT_MODEL,
    prefix: str = "",
    text_column: str = "text",
    dimensions: int | None = None,
    shards: list[str | int] | str | int | None = None,
):
    """Row counts match, keys unique, spans exact, vectors finite and unit-norm with the right dims; a table artifact."""
    # All: every shard the dataset has, not only the chunked ones (one whose download or chunk failed is a problem
    # too). Chosen: by name or by index among the chunked ones, as `fetch` and `plan` count them.
    try:
        run = build_run_config(
            source=source, subset=subset, split=split, name=name, data_dir=data_dir, stages=["embed"], backend=backend,
            max_tokens=max_tokens, model=model, prefix=prefix, text_column=text_column, dimensions=dimensions, shards=shards,
        )  # fmt: skip
        if backend == "modal" and (warning := get_backend("modal").reader_warning("check")):
            get_run_logger().warning(warning)
        chunked = get_backend(backend).list_shards(run, "embed")
        if not chunked:  # a misspelt name, data dir or chunk size must not pass as "0 shard(s) ok"
            return Failed(message=f"verify: no embedded shards of {run.dataset.name} under {run.dataset.data_dir}{_other_embeddings(run)}")
        chosen = select_shards(chunked, run.shards) if run.shards else sorted(set(chunked) | set(get_backend(backend).list_shards(run, "download")))
    except ConfigError as exc:
        return refused("verify", exc)  # a shard that is not there, Modal not reached: a message, not a traceback
    futures = [verify_task.submit(shard=shard, run=run) for shard in chosen]
    for future in futures:
        future.wait()  # sets each final state locally
    outcomes = [outcome(f.state) for f in futures]
    rows = [
        {"shard": o["shard"], "chunks": o["chunks"], "embeddings": o["embeddings"], "dims": o["dims"], "ok": not o["problems"], "problems": "; ".join(o["problems"])}
        if isinstance(o, dict)
        else {"shard": shard, "chunks": None, "embeddings": None, "dims": None, "ok": False, "problems": str(o)}
        for shard, o in zip(chosen, outcomes)
    ]
    create_table_artifact(rows, key=artifact_key("verify", run.dataset.name, "shards"), description=f"verify · {run.dataset.name}")
    bad = [row["shard"] for row in rows if not row["ok"]]
    mixed = mixed_settings({o["shard"]: o["made_with"] for o in outcomes if isinstance(o, dict) and "made_with" in o})
    if bad or mixed:
        found = [f"{len(bad)} of {len(rows)} shard(s) have problems: {', '.join(bad)}"] if bad else []
        return failed(f"verify: {'; and '.join([*found, *([mixed] if mixed else [])])}", rows)
    return Completed(message=f"verify: {len(rows)} shard(s) ok", data=rows)


def _other_embeddings(run: RunConfig) -> str:
    """A hint naming the embedded datasets of this name that other chunk sizes or models made (local data dirs)."""
    if run.backend != "local":
        return ""
    found = sorted(p.name for p in Path(run.dataset.data_dir).glob(f"{run.dataset.name}-chunked-*-*") if p.is_dir())
    return f"; found {', '.join(found)}: pass the --max-tokens and --model they were made with" if found else ""
