"""One stage on one shard, start to finish: skip if done earlier, do the work, write the ledger, report stats.

`run_shard` is the single body both backends execute: in-process (local) and inside a Modal function.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from fineweb_modal import chunking, download, embedding, summary
from fineweb_modal.config import RunConfig
from fineweb_modal.costs import mark_billed, rate_per_second, stage_resources
from fineweb_modal.errors import ConfigError, ShardBusyError, UnreadableFileError
from fineweb_modal.interrupt import raise_if_stop_requested
from fineweb_modal.layout import Layout
from fineweb_modal.ledger import Ledger, ShardLease, ShardRecord, count_rows, file_identity
from fineweb_modal.models import model_info
from fineweb_modal.plan import gpu_tokens_per_s
from fineweb_modal.storage import first_readable_schema, open_arrow_batches, remove_stale_temps, write_json_atomic

log = logging.getLogger(__name__)


class ShardJob(BaseModel):
    """What a backend needs to run one stage on one shard; small and serializable (it crosses into Modal)."""

    stage: Literal["download", "chunk", "embed", "summarize"]
    shard: str
    run: RunConfig
    source_file: str | None = None  # download from a local folder: the file that becomes this shard
    attempt: int = 1
    where: Literal["local", "modal"] = "local"
    owner: str | None = None  # who runs it (the Prefect flow run id): the shard's lease is held in this name
    # $/second rates read from Modal's billing API by the caller ({}: the dated price table): the cost in the
    # result and in the ledger record is computed once, with them.
    rates: dict[str, float] = {}

    def layout(self) -> Layout:
        """The paths this job reads and writes."""
        return layout_for(self.run)


class ShardResult(BaseModel):
    """What one stage did to one shard: counts, seconds, resources and dollars."""

    stage: str
    shard: str
    status: Literal["done", "skipped"]
    rows_in: int = 0
    rows_out: int = 0
    docs: int = 0
    empty_docs: int = 0
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the work's, what tokens/s divides by
    # Billed container time outside any shard's work, paid by this one (start-up, model load, Volume sync).
    overhead_seconds: float = 0.0
    bytes_out: int = 0
    where: str = "local"
    host: str = ""
    cpu: float = 0.0
    memory_gib: float = 0.0
    gpu: str | None = None
    cost_usd: float = 0.0
    modal_estimate_usd: float = 0.0
    extra: dict[str, Any] = {}

    @property
    def billed_seconds(self) -> float:
        """What Modal bills for this shard: its work and the container overhead it pays for."""
        return self.seconds + self.overhead_seconds

    @property
    def tokens_per_second(self) -> float:
        """Throughput of the work itself (0 for a skipped shard)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def layout_for(run: RunConfig) -> Layout:
    """The Layout of a run's dataset, with its chunk size and model in the folder names."""
    return Layout(
        data_dir=run.dataset.data_dir,
        name=run.dataset.name,
        split=run.dataset.split,
        max_tokens=run.chunk.max_tokens,
        model_slug=model_info(run.chunk.model).slug if run.chunk.model else "",
    )


def stage_config_fingerprint(job: ShardJob) -> str:
    """The fingerprint of the part of the run config that shapes this stage's output (not which shards, not the budget)."""
    run = job.run
    if job.stage == "download":
        config = run.download.fingerprint() if run.download else "none"
        # Which JSONL lines are documents (and kept) depends on the text column; other formats are copied whole.
        return f"{config}|text={run.chunk.text_column}" if Path(job.source_file or "").suffix in (".jsonl", ".json") else config
    if job.stage == "chunk":
        return run.chunk.fingerprint()
    if job.stage == "embed":
        return run.embed.fingerprint()
    return f"summarize-{run.chunk.max_tokens}"


def job_fingerprint(job: ShardJob, ledger: Ledger, upstream: str | None = None) -> str:
    """Config fingerprint + the fingerprint of the input it reads (`upstream`, read when not given): a re-chunk invalidates the embeddings."""
    payload = f"{job.stage}|{stage_config_fingerprint(job)}|{upstream or _upstream(job, ledger)}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _upstream(job: ShardJob, ledger: Ledger) -> str:
    if job.stage == "download":
        return f"{Path(job.source_file or '').name}:{file_identity(Path(job.source_file or ''))}"
    return ledger.input_fingerprint(job.stage, job.shard)


def _do_stage(job: ShardJob, fingerprint: str) -> dict[str, Any]:
    layout = job.layout()
    output = layout.output_path(job.stage, job.shard)
    if job.stage == "download":
        converted = download.convert_file(Path(job.source_file), output, job.run.chunk.text_column)
        extra = {"left_out_lines": converted.left_out_lines[:100], "left_out_reason": converted.left_out_reason} if converted.left_out_lines else {}
        return {"rows_in": converted.rows_in, "rows_out": converted.rows_out, "docs": converted.rows_out, "extra": extra}
    source = layout.input_path(job.stage, job.shard)
    if job.stage == "chunk":
        try:
            stats = chunking.chunk_shard(source, output, job.shard, job.run.chunk)
        except UnreadableFileError as exc:
            if not _download_undone(layout, job.shard, exc):
                raise
            raise UnreadableFileError(f"{exc}; its download is marked failed, so a rerun with --only failed makes the copy again") from None
        return {
            "rows_in": stats.docs,
            "rows_out": stats.chunks,
            "docs": stats.docs,
            "empty_docs": stats.empty_docs,
            "chunks": stats.chunks,
            "tokens": stats.source_tokens,
            "extra": {"chunk_tokens": stats.chunk_tokens},
        }
    if job.stage == "embed":
        stats = embedding.embed_shard(source, output, job.run.embed, layout.parts_dir("embed", job.shard, fingerprint))
        extra = {"dims": stats.dims, **({"tei_requests": stats.tei_requests} if stats.tei_requests else {})}
        return {"rows_in": stats.chunks, "rows_out": stats.chunks, "docs": stats.docs, "chunks": stats.chunks, "tokens": stats.tokens, "extra": extra}
    shard_summary = summary.summarize_shard(source, output, job.run.chunk.max_tokens)
    return {
        "rows_in": shard_summary["chunks"],
        "rows_out": 1,
        "docs": shard_summary["docs"],
        "empty_docs": shard_summary["empty_docs"],
        "chunks": shard_summary["chunks"],
        "tokens": shard_summary["tokens"],
        "extra": {"summary": shard_summary},
    }


def _download_undone(layout: Layout, shard: str, exc: BaseException) -> bool:
    """Mark a shard's download failed when the copy it made cannot be read (damaged since): a done record would keep it."""
    ledger = Ledger(layout)
    record = ledger.read("download", shard)
    if record is None or record.status != "done":
        return False
    ledger.write_failed("download", shard, record.fingerprint, exc, record.attempts)
    return True


class _ThreadWarnings(logging.Handler):
    """The warnings this package logs in one thread: they travel back with the shard's result, so the task run
    shows them in Prefect (a worker process or a Modal container has no Prefect logger of its own)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the message of a warning logged on this thread (the first 20)."""
        if record.thread == self.thread and len(self.messages) < 20:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_kept() -> Iterator[list[str]]:
    """The warnings this package logs in this thread meanwhile; on a failure they go on the error as notes."""
    warnings = _ThreadWarnings()
    package_logger = logging.getLogger("fineweb_modal")
    package_logger.addHandler(warnings)
    try:
        yield warnings.messages
    except BaseException as exc:
        for message in warnings.messages:
            exc.add_note(f"warning: {message}")
        raise
    finally:
        package_logger.removeHandler(warnings)


def run_shard(job: ShardJob, still_ours: Callable[[], bool] | None = None, overhead_seconds: float = 0.0) -> ShardResult:
    """Run one stage on one shard: skip when the ledger says done with this config, else work and record.

    `still_ours` (the shard's lease) is asked before the done record is written: a run that lost its lease
    while it worked records nothing, and the run that took over records the shard. `overhead_seconds`: a
    Modal container's billed time outside any shard's work, which this shard pays for if it works. The
    warnings logged meanwhile come back in `extra["warnings"]` (not in the ledger record).
    """
    with _warnings_kept() as warnings:
        result = _run_shard(job, still_ours, overhead_seconds)
    if warnings:
        result.extra = {**result.extra, "warnings": warnings}
    return result


def _run_shard(job: ShardJob, still_ours: Callable[[], bool] | None, overhead_seconds: float) -> ShardResult:
    raise_if_stop_requested(f"{job.stage}/{job.shard}")  # not started: no record at all
    layout = job.layout()
    ledger = Ledger(layout)
    upstream = _upstream(job, ledger)
    upstream_file = file_identity(layout.input_path(job.stage, job.shard)) if job.stage != "download" else None
    fingerprint = job_fingerprint(job, ledger, upstream)
    if (skipped := _skipped_result(job, ledger, fingerprint)) is not None:
        return skipped
    common = _result_fields(job)
    if removed := remove_stale_temps(layout.output_path(job.stage, job.shard)):
        log.info("%s/%s: removed %d temp file(s) left by an interrupted writer", job.stage, job.shard, removed)
    rate = rate_per_second(stage_resources(job.stage), job.rates)  # an unpriced GPU fails here, before the work, not after it
    started = time.perf_counter()
    try:
        stats = _do_stage(job, fingerprint)
    except BaseException as exc:
        failure = _explain_disk_full(exc, layout, job) or exc
        try:
            ledger.write_failed(job.stage, job.shard, fingerprint, failure, job.attempt)
        except OSError as ledger_error:  # a full disk can refuse the record too; the task still fails with the cause
            log.warning("%s/%s: could not write the failed record (%s)", job.stage, job.shard, ledger_error)
        if failure is exc:
            raise
        raise failure from exc
    seconds = time.perf_counter() - started
    output = layout.output_path(job.stage, job.shard)
    estimate = (seconds + overhead_seconds) * rate
    if job.where == "local" and job.stage == "embed" and (gpu := stage_resources("embed").gpu):
        # These were this machine's seconds, not a Modal GPU's: price the tokens at that GPU's throughput, as `plan` does.
        estimate = stats["tokens"] / gpu_tokens_per_s(job.run.embed.engine, gpu) * rate
    result = ShardResult(
        **common,
        **stats,
        status="done",
        seconds=round(seconds, 3),
        overhead_seconds=round(overhead_seconds, 3),
        bytes_out=output.stat().st_size,
        cost_usd=estimate if job.where == "modal" else 0.0,
        modal_estimate_usd=estimate,
    )
    if still_ours is not None and not still_ours():
        raise ShardBusyError(f"{job.stage}/{job.shard}: another run took over this shard's lease while this one worked; it records the shard")
    ledger.write_done(job.stage, job.shard, fingerprint, result.rows_out, result.model_dump(mode="json"), job.attempt, upstream=upstream, upstream_file=upstream_file)
    for stale in layout.shard_dir(job.stage).joinpath(".parts").glob(f"{job.shard}-*"):
        if re.fullmatch(rf"{re.escape(job.shard)}-[0-9a-f]{{16}}", stale.name):  # not shard `s2-b`'s when this is `s2`
            shutil.rmtree(stale, ignore_errors=True)  # parts of earlier configs of this shard
    return result


def _result_fields(job: ShardJob) -> dict[str, Any]:
    resources = stage_resources(job.stage)
    return {"stage": job.stage, "shard": job.shard, "where": job.where, "host": socket.gethostname(), "cpu": resources.cpu, "memory_gib": resources.memory_gib, "gpu": resources.gpu}


def _done_fingerprint(job: ShardJob, ledger: Ledger, record: ShardRecord, current: str) -> str:
    """The fingerprint `record` must hold for `job` to count as done: `current` (this config, this input), or, while
    the record is not `outdated` (its input file is the one it was made from, though that stage's last attempt may
    have failed since, leaving the file in place), this config over the input the record names."""
    if job.stage == "download" or record.status != "done" or record.upstream is None or ledger.outdated(record):
        return current
    return job_fingerprint(job, ledger, upstream=record.upstream)


def _skipped_result(job: ShardJob, ledger: Ledger, fingerprint: str) -> ShardResult | None:
    if (found := ledger.read(job.stage, job.shard)) is None:
        return None
    record = ledger.still_done(found, _done_fingerprint(job, ledger, found, fingerprint))
    if record is None:
        return None
    earlier = {k: v for k, v in record.stats.items() if k in ("rows_in", "rows_out", "docs", "empty_docs", "chunks", "tokens", "bytes_out", "extra")}
    return ShardResult(**_result_fields(job), **earlier, status="skipped")


def done_result(job: ShardJob) -> ShardResult | None:
    """The `skipped` result run_shard would return for a shard done earlier with this config, else None (no work done)."""
    ledger = Ledger(job.layout())
    return _skipped_result(job, ledger, job_fingerprint(job, ledger))


def _explain_disk_full(exc: BaseException, layout: Layout, job: ShardJob) -> OSError | None:
    """An ENOSPC as an error that says what happened and what to do (still an ENOSPC, so it is not retried)."""
    if not isinstance(exc, OSError) or exc.errno != errno.ENOSPC:
        return None
    from fineweb_modal.diskspace import free_bytes, human_bytes

    return OSError(
        errno.ENOSPC,
        f"out of disk space while writing the {job.stage} output of {job.shard} under {layout.data_dir} "
        f"({human_bytes(free_bytes(layout.data_dir))} free now); nothing partial was kept — free some space or use another --data-dir, then rerun",
    )


def charge_failed_attempt(exc: BaseException, job: ShardJob, billed_seconds: float, how: str) -> None:
    """Put what a failed attempt of `job` was billed (`billed_seconds` of its stage's container) on its error."""
    resources = stage_resources(job.stage)
    try:
        dollars = billed_seconds * rate_per_second(resources, job.rates)
    except ConfigError:  # an unpriced GPU: the error already says so
        return
    mark_billed(exc, dollars, f"{billed_seconds:.0f} s of its {resources.gpu or f'{resources.cpu:g}-CPU'} container, {how}")


def run_shard_exclusive(job: ShardJob) -> ShardResult:
    """run_shard under the shard's lease: a second run on the same data dir gets ShardBusyError, not a second writer."""
    owner = job.owner or f"{socket.gethostname()}:{os.getpid()}"
    with ShardLease(job.layout().lease_path(job.stage, job.shard), owner) as lease:
        return run_shard(job, still_ours=lease.held)


def record_failure(job: ShardJob, exc: BaseException) -> None:
    """Write the failed record of a job whose worker process died before it could write its own.

    Not over a matching `done` record: a job queued behind the worker that died fails with it without
    having started, and its shard may be done already.
    """
    ledger = Ledger(job.layout())
    fingerprint = job_fingerprint(job, ledger)
    if ledger.done_record(job.stage, job.shard, fingerprint) is not None:
        return
    try:
        ledger.write_failed(job.stage, job.shard, fingerprint, exc, job.attempt)
    except OSError as error:  # the task still fails with the worker's loss, not with this
        log.warning("%s/%s: could not write the failed record (%s)", job.stage, job.shard, error)


def shard_statuses(run: RunConfig, stage: str, shards: list[str]) -> dict[str, str]:
    """`shard_status` of many shards at once (one Modal call for the modal backend)."""
    return {shard: shard_status(run, stage, shard) for shard in shards}


def shard_status(run: RunConfig, stage: str, shard: str) -> str:
    """`done` (with this run's config), `failed`, `stale` (made from an input since replaced, or with another config:
    this run would redo it) or `missing`, as the ledger and the output files say."""
    layout = layout_for(run)
    ledger = Ledger(layout)
    record = ledger.read(stage, shard)
    if record is None:
        return "missing"
    if record.status == "done" and count_rows(layout.output_path(stage, shard)) != record.rows_out:
        return "missing"
    if record.status == "done" and ledger.outdated(record):
        return "stale"
    # The config, as run_shard's skip test compares it (not outdated: the input the record names is the one there).
    # A download's needs its source file, which only the stage's run knows: it is not compared here.
    if record.status == "done" and stage != "download":
        if record.fingerprint != job_fingerprint(ShardJob(stage=stage, shard=shard, run=run), ledger, upstream=record.upstream):
            return "stale"
    return record.status


def download_hub_shards(run: RunConfig, where: Literal["local", "modal"] = "local", rates: dict[str, float] | None = None) -> list[ShardResult]:
    """The Hub path of the download stage: one call yields every shard; each gets its ledger record and a share of the cost.

    Skipped when every shard it knows (files and records) is done from this source, its file holding its rows
    (delete the download ledger to fetch it again). On Modal the Hub's files and `datasets`' Arrow cache are deleted once the shards are saved: on
    the Volume they would keep two more copies of the dataset.
    """
    with _warnings_kept() as warnings:
        results = _download_hub_shards(run, where, rates)
    if warnings and results:
        results[0].extra = {**results[0].extra, "warnings": warnings}
    return results


def _hub_fingerprint(run: RunConfig) -> str:
    assert run.download is not None and run.download.source_kind == "hub"
    return hashlib.sha256(f"download|{run.download.fingerprint()}|hub".encode()).hexdigest()[:16]


def earlier_hub_download(run: RunConfig, where: Literal["local", "modal"] = "local") -> list[ShardResult] | None:
    """The Hub download's results when every shard it knows (files and records) is done from this source; None when it must run."""
    layout = layout_for(run)
    ledger, fingerprint = Ledger(layout), _hub_fingerprint(run)
    known = layout.list_shards("download")  # files and records: a file deleted since (or a failed record) is not done
    earlier = [_skipped_result(ShardJob(stage="download", shard=shard, run=run, where=where), ledger, fingerprint) for shard in known]
    return [result for result in earlier if result is not None] if known and None not in earlier else None


def _download_hub_shards(run: RunConfig, where: Literal["local", "modal"], rates: dict[str, float] | None) -> list[ShardResult]:
    if (earlier := earlier_hub_download(run, where)) is not None:
        return earlier
    layout = layout_for(run)
    ledger, fingerprint = Ledger(layout), _hub_fingerprint(run)
    known = layout.list_shards("download")
    resources = stage_resources("download-hub")
    rate = rate_per_second(resources, rates)
    started = time.perf_counter()
    rows = download.download_hub(
        run.download.source, run.download.subset, run.dataset.split, layout.shard_dir("download"), run.num_proc, keep_cache=where == "local"
    )
    seconds = time.perf_counter() - started
    gone = sorted(set(known) - set(rows))  # this save split the dataset into other files: their records go with them
    for shard in gone:
        layout.ledger_path("download", shard).unlink(missing_ok=True)
    if chunked := [shard for shard in gone if layout.output_path("chunk", shard).exists()]:
        log.warning("download: shard(s) %s are no longer in the dataset but still chunked in %s: delete those files", ", ".join(chunked), layout.shard_dir("chunk"))
    results = []
    share = seconds / max(len(rows), 1)
    for shard, count in rows.items():
        result = ShardResult(
            stage="download", shard=shard, status="done", rows_in=count, rows_out=count, docs=count, seconds=round(share, 3), host=socket.gethostname(),
            where=where, cpu=resources.cpu, memory_gib=resources.memory_gib, cost_usd=share * rate if where == "modal" else 0.0, modal_estimate_usd=share * rate,
        )  # fmt: skip
        ledger.write_done("download", shard, fingerprint, count, result.model_dump(mode="json"), 1)
        results.append(result)
    return results


def finalize_stage(run: RunConfig, stage: str, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Dataset-wide steps after every shard of a stage: the datasets index after download, totals after summarize."""
    layout = layout_for(run)
    if stage == "download":
        return {"datasets_index": download.write_dataset_index(layout.shard_dir("download"), run.dataset.split)}
    if stage == "summarize":
        # The totals are the split's, not this run's: a run over some shards (--shards, --only failed) adds
        # the summaries the ledger holds for the others, where they are current for this config.
        by_shard = {s["shard"]: s for s in summaries or []}
        for record in Ledger(layout).records("summarize"):
            if record.shard in by_shard:
                continue
            earlier = done_result(ShardJob(stage="summarize", shard=record.shard, run=run))
            if earlier is not None and "summary" in earlier.extra:
                by_shard[record.shard] = earlier.extra["summary"]
        summaries = [by_shard[shard] for shard in sorted(by_shard)]
        totals = summary.combine_summaries(summaries)
        path = layout.summary_dir() / f"{run.dataset.split}.json"
        write_json_atomic(path, {"totals": totals, "shards": summaries})
        return {"totals": totals, "path": str(path), "charts": _summary_charts(run, layout, totals)}
    return {}


def chunk_input_schema(run: RunConfig, shards: list[str]) -> tuple[str, bytes] | None:
    """The path and (serialized) schema of the first of `shards` whose chunk input opens; None when none does
    (an unreadable one fails its own shard, naming the file)."""
    paths = (layout_for(run).input_path("chunk", shard) for shard in shards)
    found = first_readable_schema(paths, lambda path: open_arrow_batches(path)[0])
    return None if found is None else (str(found[0]), found[1].serialize().to_pybytes())


def verify_outputs(run: RunConfig, shard: str) -> dict[str, Any]:
    """Check one shard's chunk and embedding files against each other and the source (see fineweb_modal.verify)."""
    from fineweb_modal.verify import verify_shard

    return verify_shard(layout_for(run), shard, run.chunk.text_column, run.embed.dimensions)


def plan_sample(run: RunConfig, shard: str) -> dict[str, Any]:
    """Sample one downloaded shard for the cost forecast (see fineweb_modal.plan)."""
    from dataclasses import asdict

    from fineweb_modal.plan import sample_shard

    layout = layout_for(run)
    return asdict(sample_shard(layout.output_path("download", shard), shard, run.chunk, run.embed.prefix))


def _summary_charts(run: RunConfig, layout: Layout, totals: dict[str, Any]) -> dict[str, str]:
    """PNG pictures beside the summary: the token-length histogram and each stage's tokens/s per shard."""
    from fineweb_modal import charts

    out: dict[str, str] = {}
    split = run.dataset.split
    if totals.get("histogram"):
        title = f"{run.dataset.name}: {totals['chunks']:,} chunks, mean {totals.get('mean_chunk_tokens', 0)} tokens"
        hist = totals["histogram"]
        out["histogram"] = str(charts.histogram_png(hist["edges"], hist["counts"], layout.summary_dir() / f"{split}-chunk-tokens.png", title))
    ledger = Ledger(layout)
    rates = {}
    for stage in ("chunk", "embed"):
        # The embed ledger lives under the embedding dataset's folder; the chunk ledger under the chunk dataset's.
        records = [r for r in ledger.records(stage) if r.status == "done" and r.stats.get("seconds")]
        if records:
            rates[stage] = {r.shard: r.stats["tokens"] / r.stats["seconds"] for r in records}
    if rates:
        out["throughput"] = str(charts.throughput_png(rates, layout.summary_dir() / f"{split}-throughput.png", f"{run.dataset.name}: tokens/s per shard"))
    return out
