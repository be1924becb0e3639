"""pipeline: download → chunk → embed → summarize, each a subflow; a shard that fails a stage skips the later ones."""

from __future__ import annotations

import inspect

from prefect import flow, get_run_logger, tags
from prefect.states import Completed, Failed

from fineweb_modal.config import (
    DEFAULT_KEEP_COLUMNS,
    STAGES,
    BackendName,
    CompileMode,
    EmbeddingDtype,
    EngineName,
    OnlyWhich,
    RunConfig,
    build_run_config,
)
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL
from fineweb_modal.report import StageReport, listing
from flows.chunk import chunk
from flows.download import download
from flows.embed import embed
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.outcome import failed, outcome, refused
from flows.reporting import publish_pipeline_summary
from flows.stage import check_before_work, failed_shards, run_tags, without_input
from flows.summarize import summarize

STAGE_FLOWS = {"download": download, "chunk": chunk, "embed": embed, "summarize": summarize}


@flow(name="pipeline", on_cancellation=[cancel_modal_calls], flow_run_name=dataset_run_name)
def pipeline(
    source: str | None = None,
    subset: str | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str = "./data",
    stages: list[str] | str = list(STAGES),
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
    engine: EngineName = "transformers",
    tei_url: str | None = None,
    tei_served_model: str | None = None,
    dimensions: int | None = None,
    embedding_dtype: EmbeddingDtype = "float32",
    compile: CompileMode = "auto",
):
    """Run the chosen stages in order over the chosen shards; fail at the end listing every failed shard."""
    params = {k: v for k, v in locals().items() if k != "stages"}
    run = build_run_config(stages=stages, **params)  # bad config stops here, before any stage
    logger = get_run_logger()
    try:
        check_before_work(run)  # so do an empty source, a missing text column, a TEI that is down
    except ConfigError as exc:
        return refused("pipeline", exc)
    if run.only == "failed":
        params.update(shards=failed_shards(run), only=None)
        if not params["shards"]:
            publish_pipeline_summary(run, {}, "No failed shards: nothing to rerun.", finished=True)
            return Completed(message="no failed shards: nothing to rerun")
        if lost := without_input(run, run.stages[0], params["shards"]):
            earlier = ",".join(STAGES[: STAGES.index(run.stages[0])])
            return refused("pipeline", ConfigError(f"failed shard(s) {listing(lost)} have no {run.stages[0]} input any more: rerun with the stages before it too ({earlier})"))
        logger.info("rerunning the failed shards: %s", ", ".join(params["shards"]))
    failed_by_stage: dict[str, list[str]] = {}
    reports: dict[str, StageReport] = {}
    spent = 0.0
    for stage in run.stages:
        if run.max_cost is not None:
            params["max_cost"] = max(run.max_cost - spent, 0.0)  # one budget for the whole run
        stage_flow = STAGE_FLOWS[stage]
        accepted = inspect.signature(stage_flow.fn).parameters
        with tags(*run_tags(run)):
            state = stage_flow(**{k: v for k, v in params.items() if k in accepted}, return_state=True)
        report = outcome(state)
        if not isinstance(report, StageReport):  # the stage could not start (no input, bad column, no room): stop here
            if isinstance(report, ConfigError) and not reports:
                return Failed(message=f"{stage}: {report}", data=report)  # nothing ran: the setup was wrong (the CLI's exit code 2)
            return _stopped(run, f"{stage} could not run: {report}", reports)
        reports[stage] = report
        spent += report.totals()["cost_usd"]
        if report.not_started:
            return _stopped(run, f"max cost ${run.max_cost:.2f} reached after ${spent:.2f}: {state.message}", reports)
        if report.failed:
            failed_by_stage[stage] = sorted(report.failed)
        params["shards"] = report.succeeded  # later stages work on what this one finished
        params["max_tokens"] = run.chunk.max_tokens
        if not report.succeeded:
            logger.error("%s: no shard succeeded; later stages have nothing to do", stage)
            break
    if failed_by_stage:
        by_stage = "; ".join(f"{stage}: {', '.join(shards)}" for stage, shards in failed_by_stage.items())
        return _stopped(run, f"failed shards — {by_stage}", reports)
    message = f"{', '.join(run.stages)}: all shards done"
    publish_pipeline_summary(run, reports, message, finished=True)
    return Completed(message=message, data=reports)


def _stopped(run: RunConfig, message: str, reports: dict[str, StageReport]):
    """Fail the pipeline run, leaving in the UI how to resume all of it (a stage's own summary covers that stage only)."""
    publish_pipeline_summary(run, reports, message, finished=False)
    return failed(message, reports)
