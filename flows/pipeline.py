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
from fineweb_modal.report import StageReport
from flows.chunk import chunk
from flows.download import download
from flows.embed import embed
from flows.hooks import cancel_modal_calls, dataset_run_name
from flows.outcome import failed, for_this_run, outcome, refused
from flows.reporting import publish_pipeline_summary
from flows.stage import check_before_work, check_rerunnable, failed_shards, run_tags
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
    """Run the chosen stages in order over the chosen shards; fail at the end listing every failed shard.

    Args:
        source: A Hub dataset id (`org/name`, or `hf://org/name`) or a local folder of parquet/arrow/jsonl files.
        subset: The Hub dataset's config (e.g. `sample-10BT`).
        split: The split to read and write.
        name: The dataset's name in the data dir (default: from the source).
        data_dir: Where shards, outputs and the ledger live (on Modal: the Volume, in the same layout).
        stages: Which of download, chunk, embed, summarize to run (always in that order).
        backend: `local` (this machine) or `modal` (the deployed Modal app).
        max_tokens: Tokens per chunk, [CLS]/[SEP] included; `auto` is the model's limit.
        overlap: The fraction of a chunk repeated at the start of the next one, 0 to 0.5.
        model: The embedding model (its tokenizer cuts the chunks): a Hub id or a local folder.
        prefix: A task prefix added before each chunk when embedding (e.g. `search_document: `).
        text_column: The source column holding each document's text.
        keep_columns: Source columns copied onto every chunk.
        shards: Shard names or indices to run (default: all).
        only: `failed` reruns only the shards whose last attempt failed, in every stage they need.
        max_cost: A budget in dollars: no shard starts that would take the run past it.
        engine: `transformers` (in-process) or `tei` (Text Embeddings Inference).
        tei_url: A running TEI to embed with (local backend); its API key comes from TEI_API_KEY or the Secret block `tei-api-key`.
        tei_served_model: The model id that TEI reports when it was started under another name.
        dimensions: Keep the first N dimensions of each vector (Matryoshka models such as nomic's), renormalized.
        embedding_dtype: How vectors are stored: float32 or float16.
        compile: torch.compile for the transformers engine: auto (on CUDA only), on or off.
    """
    params = {k: v for k, v in locals().items() if k != "stages"}
    logger = get_run_logger()
    try:
        run = build_run_config(stages=stages, **params)  # bad config stops here, before any stage
        check_before_work(run)  # so do an empty source, a missing text column, a TEI that is down
        if run.only == "failed":
            params.update(shards=failed_shards(run), only=None)
            if not params["shards"]:
                publish_pipeline_summary(run, {}, "No failed shards: nothing to rerun.", finished=True)
                return Completed(message="no failed shards: nothing to rerun")
            check_rerunnable(run, params["shards"])
            logger.info("rerunning the failed shards: %s", ", ".join(params["shards"]))
    except ConfigError as exc:
        return refused("pipeline", exc)
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
                return Failed(message=f"{stage}: {for_this_run(str(report))}", data=report)  # nothing ran: the setup was wrong (the CLI's exit code 2)
            return _stopped(run, f"{stage} could not run: {for_this_run(str(report))}", reports)
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
