"""The shape every stage flow shares: choose shards, fan out one task per shard, gather, report, fail at the end."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from prefect import get_run_logger, tags
from prefect.exceptions import MissingContextError
from prefect.futures import as_completed
from prefect.states import Completed, State

from fineweb_modal.charts import data_uri
from fineweb_modal.chunking import check_columns
from fineweb_modal.config import STAGES, RunConfig, build_run_config
from fineweb_modal.costs import FAILED_ATTEMPTS_ATTRIBUTE, billed_on
from fineweb_modal.diskspace import check_disk_space, human_bytes
from fineweb_modal.download import hub_access_problem, hub_name, hub_offline, hub_schema, source_schema
from fineweb_modal.errors import BadDataError, ConfigError, ServiceUnavailable
from fineweb_modal.layout import SAVE_TO_DISK_METADATA, SOURCE_SUFFIXES, list_source_files
from fineweb_modal.phrasing import listing
from fineweb_modal.report import StageReport, group_digits, resume_command, shards_of, text_histogram
from fineweb_modal.selection import select_shards
from fineweb_modal.shards import earlier_hub_download, layout_for
from fineweb_modal.storage import first_readable_schema
from fineweb_modal.tei import check_tei_server
from flows.outcome import failed, refused
from flows.reporting import StageProgress, publish_stage
from tasks.backends import get_backend
from tasks.secrets import TEI_API_KEY_ENV, load_tei_api_key
from tasks.shard_tasks import STAGE_TASKS, download_hub_task, settle_failed_attempts

log = logging.getLogger(__name__)

# Shards in flight at once; the backend bounds real parallelism (local: one process per core; Modal: each
# function's max_containers). Not fewer than chunk's 100 containers, or sample-10BT's 99 shards chunk in two
# waves; a tag concurrency limit (`stage:embed`) bounds a stage lower, this setting (at import) higher.
def _shards_in_flight() -> int:
    value = os.environ.get("FINEWEB_MODAL_MAX_SHARDS_IN_FLIGHT", "128").strip()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"FINEWEB_MODAL_MAX_SHARDS_IN_FLIGHT={value!r} must be a whole number of shards, at least 1")
    return int(value)


MAX_SHARDS_IN_FLIGHT = _shards_in_flight()
BUDGET_PROBE_SHARDS = 2


def _candidates(stage: str, run: RunConfig) -> dict[str, dict]:
    """Every shard a stage could run on, each with the extra task inputs it needs."""
    if stage == "download":
        if run.download is None or run.download.source_kind != "folder":
            return {}
        try:
            files = list_source_files(run.download.source)
        except ValueError as exc:  # several files per shard name
            raise ConfigError(str(exc)) from None
        if not files:
            raise ConfigError(_no_source_files(Path(run.download.source)))
        return {f.stem: {"source_file": str(f)} for f in files}
    available = get_backend(run.backend).list_shards(run, stage)
    if not available:
        where = layout_for(run).shard_dir(layout_for(run).input_stage(stage))
        raise ConfigError(f"no input shards in {where}; run the earlier stages first")  # refused as `<stage>: …`
    return {shard: {} for shard in available}


def _no_source_files(folder: Path) -> str:
    """Why a source folder gives no shard, with what it does hold (files in subfolders are not read)."""
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    found = [f"{p.name}/" if p.is_dir() else p.name for p in entries if not p.name.startswith(".")]
    message = f"download: no shard files ({', '.join(SOURCE_SUFFIXES)}) in {folder}"
    message += f"; it holds {listing(found, limit=8)}" if found else "; it is empty"
    # Two levels down at most (a Hub repo's `data/`, `data/<config>/`): a home folder must not be walked whole.
    below = [*folder.glob("[!.]*/[!.]*"), *folder.glob("[!.]*/[!.]*/[!.]*")]
    nested = sorted({p.parent for p in below if p.suffix in SOURCE_SUFFIXES and p.name not in SAVE_TO_DISK_METADATA})
    if nested:
        message += f" (subfolders are not read: pass the folder that holds the files, e.g. {nested[0]})"
    return message


def _only_failed(run: RunConfig, stage: str, shards: list[str]) -> list[str]:
    """The shards whose last attempt at this stage failed, as the ledger says."""
    statuses = get_backend(run.backend).shard_statuses(run, stage, shards)
    return [shard for shard in shards if statuses[shard] == "failed"]


def _shards_and_inputs(stage: str, run: RunConfig) -> dict[str, dict]:
    """The chosen shards of a stage, each with the extra task inputs it needs."""
    candidates = _candidates(stage, run)
    chosen = select_shards(list(candidates), run.shards)
    if run.only == "failed":
        chosen = _only_failed(run, stage, chosen)
    if chosen and stage == "chunk" and (found := get_backend(run.backend).chunk_input_schema(run, chosen)):
        _check_columns(found[1], run, Path(found[0]))  # a missing text or kept column: said before any shard starts
    return {shard: candidates[shard] for shard in chosen}


def _check_columns(schema, run: RunConfig, path: object) -> None:
    try:
        check_columns(schema, run.chunk, path)
    except BadDataError as exc:
        raise ConfigError(f"{exc} (set --text-column / --keep-columns)") from None


def check_before_work(run: RunConfig) -> None:
    """What can be checked before any shard runs, or ConfigError: the deployed Modal app, the source's files and
    columns, the TEI server."""
    check_modal_deployment(run)
    check_source_columns(run)
    check_hub_source(run)
    if "embed" in run.stages and run.embed.engine == "tei" and _embedding_left(run):
        check_tei(run)


def _embedding_left(run: RunConfig) -> bool:
    """Whether any shard of the dataset is not yet embedded with this config, as far as can be told before the
    earlier stages run (a rerun that only redoes summarize must not need TEI; the embed stage checks again)."""
    shards = set(layout_for(run).dataset_shards())
    if run.download is not None and run.download.source_kind == "folder":
        shards |= set(_candidates("download", run))
    statuses = get_backend(run.backend).shard_statuses(run, "embed", sorted(shards))
    return not shards or any(status != "done" for status in statuses.values())


def check_modal_deployment(run: RunConfig) -> None:
    """On the Modal backend: the app must be deployed, from this checkout's code (one small CPU call per process)."""
    if run.backend == "modal":
        get_backend("modal").check_deployment()


def check_tei(run: RunConfig) -> None:
    """The TEI that will embed must serve the run's model: at --tei-url it must also answer and take the API key (one
    `GET /info`); on Modal, the deployed app's TEI model is read (else every shard would start a GPU to find out)."""
    if run.embed.engine != "tei":
        return
    if run.backend == "modal":
        get_backend("modal").check_deployment(tei_model=run.embed.model)
        return
    load_tei_api_key()
    check_tei_server(run.embed.tei_url, run.embed.model, run.embed.tei_served_model, os.environ.get(TEI_API_KEY_ENV))


def check_source_columns(run: RunConfig) -> None:
    """Before a run that downloads from a folder: it must hold shard files, and (when chunk follows) the first must have the text and kept columns."""
    if "download" not in run.stages or run.download is None or run.download.source_kind != "folder":
        return
    chosen = set(select_shards(list(_candidates("download", run)), run.shards))  # an empty folder is refused here
    if "chunk" not in run.stages:
        return
    paths = (f for f in list_source_files(run.download.source) if f.stem in chosen)
    if found := first_readable_schema(paths, lambda path: source_schema(path, run.chunk.text_column)):
        _check_columns(found[1], run, found[0])


def check_hub_source(run: RunConfig) -> None:
    """Before a run that downloads from the Hub: the dataset must be readable, its subset and split must exist, and
    (when chunk follows) its columns must fit — all from the Hub's API and the first file's header, not after a
    download of the whole dataset.

    Nothing is asked when nothing will be downloaded (every shard done from this source), nor in offline mode
    (`HF_HUB_OFFLINE=1`: the download reads the Hub's cache). What cannot be settled from here is a warning
    only: a Hub that failed just now (429, 5xx), a file it lists that does not read, and on the Modal backend
    any problem of this machine's (no network, no HF_TOKEN here): the download runs on Modal, with its own.
    """
    if "download" not in run.stages or run.download is None or run.download.source_kind != "hub":
        return
    if hub_offline():
        return
    if run.backend == "local" and earlier_hub_download(run) is not None:
        return
    repo_id, subset = run.download.source, run.download.subset
    if problem := hub_access_problem(repo_id):
        if run.backend == "modal" or not problem.settled:
            _warn(f"download: could not check the Hub dataset from here ({problem.message}); the download will try")
            return
        raise ConfigError(f"download: {problem.message}")
    try:
        schema = hub_schema(repo_id, subset, run.dataset.split)
    except ConfigError:
        raise
    except Exception as exc:  # the Hub answered a moment ago: listing or reading its files failed now; the download will say more
        _warn(f"download: could not read the columns of {repo_id} up front ({type(exc).__name__}: {exc}); they are checked once it is downloaded")
        return
    if schema is not None and "chunk" in run.stages:
        _check_columns(schema, run, hub_name(repo_id, subset))


def _warn(message: str) -> None:
    """A warning in the flow run's log; before a run exists (the CLI's checks) only at debug level, since the run that follows says it."""
    try:
        get_run_logger().warning(message)
    except MissingContextError:
        log.debug(message)


def failed_shards(run: RunConfig) -> list[str]:
    """Shards with a `failed` ledger record in any of the run's stages (what `--only failed` reruns).

    Every shard the dataset has made or tried is looked at, not only those whose input is there now: a shard
    whose chunk failed and whose downloaded copy was deleted since is still failed (its download redoes it).
    """
    known = set(get_backend(run.backend).list_shards(run, "download"))
    failed: set[str] = set()
    for stage in run.stages:
        try:
            candidates = set(_candidates(stage, run))
        except ServiceUnavailable:
            raise
        except ConfigError:  # nothing reached this stage yet
            candidates = set()
        if shards := sorted(candidates | known):
            failed |= set(_only_failed(run, stage, shards))
    return sorted(failed)


def check_rerunnable(run: RunConfig, failed: list[str]) -> None:
    """Refuse an `--only failed` run when some failed shard cannot be redone from its first stage, saying what to do."""
    first = run.stages[0]
    if not (lost := without_input(run, first, failed)):
        return
    if first == "download":
        statuses = get_backend(run.backend).shard_statuses(run, "download", lost)
        if gone := [shard for shard in lost if statuses.get(shard) != "done"]:  # their download is what failed
            raise ConfigError(
                f"failed shard(s) {listing(gone)} are no longer in the source {run.download.source}: put the file(s) back, "
                f"or drop the shard(s) for good by deleting their record(s) in {layout_for(run).ledger_dir('download')}"
            )
        raise ConfigError(
            f"failed shard(s) {listing(lost)} are no longer in the source {run.download.source}, but their downloaded copies are: "
            f"rerun them without the download stage (--stages {','.join(run.stages[1:]) or 'chunk'})"
        )
    earlier = ",".join(STAGES[: STAGES.index(first)])
    raise ConfigError(f"failed shard(s) {listing(lost)} have no {first} input any more: rerun with the stages before it too ({earlier})")


def without_input(run: RunConfig, stage: str, shards: list[str]) -> list[str]:
    """The shards among `shards` whose input to `stage` is not there (nothing made it, or it was deleted since; for
    download from a folder: no source file of that name any more)."""
    if stage == "download" and (run.download is None or run.download.source_kind != "folder"):
        return []
    try:
        available = set(_candidates(stage, run))
    except ServiceUnavailable:
        raise
    except ConfigError:  # nothing reached this stage yet
        available = set()
    return [shard for shard in shards if shard not in available]


def run_stage_flow(stage: str, **params) -> State:
    """The body of a stage's flow: its parameters as a run config (bad config refused: a message, no traceback), then the stage."""
    try:
        run = build_run_config(stages=[stage], **params)
    except ConfigError as exc:
        return refused(stage, exc)
    return run_stage(stage, run)


def run_stage(stage: str, run: RunConfig) -> State:
    """Run one stage over its shards; Completed with a StageReport, or Failed listing the failed shards.

    A stage that cannot start (no input, a missing column, no room on the disk) ends Failed holding the
    ConfigError: its message, not a traceback.
    """
    try:
        with tags(*run_tags(run), f"stage:{stage}"):  # on every shard's task run: filter by them, or limit concurrency per tag
            return _run_stage(stage, run)
    except ConfigError as exc:
        return refused(stage, exc)


def run_tags(run: RunConfig) -> tuple[str, ...]:
    """The tags of a run's flow and task runs: its dataset and backend."""
    return f"dataset:{run.dataset.name}", f"backend:{run.backend}"


def _run_stage(stage: str, run: RunConfig) -> State:
    logger = get_run_logger()
    get_backend(run.backend)  # the modal backend without a token is refused here, not once per shard
    check_modal_deployment(run)  # so is an app that is not deployed, or deployed from other code
    report = StageReport(stage=stage, name=run.dataset.name, backend=run.backend)
    if stage == "download" and run.download is not None and run.download.source_kind == "hub":
        check_hub_source(run)  # again for a download flow run alone; once the download is done, nothing is asked
        results = download_hub_task(run.dataset.name, run)
        report.results = list(results)
        get_backend(run.backend).finalize(run, stage)
        publish_stage(report, run)
        return Completed(message=f"download: {len(results)} shard(s)", data=report)

    inputs = _shards_and_inputs(stage, run)
    logger.info("%s: %d shard(s) on the %s backend", stage, len(inputs), run.backend)
    if run.backend == "local":
        statuses = get_backend(run.backend).shard_statuses(run, stage, list(inputs))
        to_run = {shard: extra for shard, extra in inputs.items() if statuses.get(shard) != "done"}
        if stage == "embed" and to_run:
            check_tei(run)  # a TEI that is down or serves another model: refused here, not once per shard
        if needed := check_disk_space(run, layout_for(run), stage, to_run):
            logger.info("%s: %d shard(s) to run will write about %s", stage, len(to_run), human_bytes(needed))
    elif stage == "embed" and run.embed.engine == "tei":
        statuses = get_backend(run.backend).shard_statuses(run, stage, list(inputs))
        if any(statuses.get(shard) != "done" for shard in inputs):
            check_tei(run)  # the deployed TEI's model: refused here, not after each shard's GPU started it
    progress = StageProgress(stage, run.dataset.name, len(inputs))
    for shard, state in _run_shards(STAGE_TASKS[stage], inputs, run, report):
        if state.is_completed():
            report.results.append(state.result())
        else:
            error = state.result(raise_on_failure=False)
            report.failed[shard] = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(state.message)
            logger.error("%s-%s failed: %s", stage, shard, report.failed[shard])
        progress.advance()
    report.results.sort(key=lambda r: r.shard)

    extra_markdown = ""
    if report.results and stage in ("download", "summarize"):
        # Skipped shards carry their summary too: the ledger kept the whole result.
        summaries = [r.extra["summary"] for r in report.results if "summary" in r.extra]
        report.extra = get_backend(run.backend).finalize(run, stage, summaries)
        if stage == "summarize":
            extra_markdown = _summary_markdown(report.extra.get("totals", {}), report.extra.get("charts", {}))
    publish_stage(report, run, extra_markdown)

    totals = report.totals()
    message = f"{stage}: {len(report.results)} shard(s), {report.amount()}"
    if report.not_started:
        return failed(
            f"{stage}: max cost ${run.max_cost:.2f} reached (${totals['cost_usd']:.2f} spent); {len(report.not_started)} shard(s) "
            f"not started — resume with: {resume_command(run, stage, shards_of(run, report))}",
            report,
        )
    if report.failed:
        return failed(f"{stage}: {len(report.failed)} shard(s) failed: {', '.join(sorted(report.failed))}", report)
    return Completed(message=message, data=report)


def _run_shards(task, inputs: dict[str, dict], run: RunConfig, report: StageReport):
    """Submit shard tasks (at most MAX_SHARDS_IN_FLIGHT at once) and yield (shard, final state) as they finish.

    With a max cost, a shard is started only while spent (failed attempts' bills included) + the in-flight
    shards' estimated cost (the mean of the done ones; before any, of what failed ones were billed) + its
    own stays within it; until a first shard is done, two run at a time. A budget
    spent already (an earlier stage used it up) starts no shard on Modal; local shards cost nothing.
    """
    queue = list(inputs.items())
    held_back: list[str] = []
    if run.max_cost is not None and run.max_cost <= 0 and run.backend != "local":
        statuses = get_backend(run.backend).shard_statuses(run, report.stage, list(inputs))
        held_back = [shard for shard, _ in queue if statuses.get(shard) != "done"]  # done ones are only skipped: they go
        queue = [(shard, extra) for shard, extra in queue if shard not in held_back]
    running: dict = {}
    costs: list[float] = []  # of the shards done
    failed_bills: list[float] = []  # of the shards that failed in the end
    wasted = 0.0  # what all failed attempts were billed (of shards done after a retry too)
    while queue or running:
        while queue and len(running) < MAX_SHARDS_IN_FLIGHT:
            if run.max_cost is not None:
                if not costs and len(running) >= BUDGET_PROBE_SHARDS:
                    break
                samples = costs or failed_bills  # until a shard is done, what failed ones were billed is the best guess
                estimate = sum(samples) / len(samples) if samples else 0.0
                if sum(costs) + wasted + (len(running) + 1) * estimate > run.max_cost:
                    break
            shard, extra = queue.pop(0)
            running[task.submit(shard=shard, run=run, **extra)] = shard
        if not running:
            report.not_started = held_back + [shard for shard, _ in queue]
            return
        future = next(as_completed(list(running)))
        shard = running.pop(future)
        future.wait()  # sets the final state locally; without it `.state` asks the API, which may lag
        state = future.state
        settle_failed_attempts(future.task_run_id)
        if failed_attempts := _failed_attempts_usd(state):
            report.failed_attempts_usd[shard] = failed_attempts
            wasted += failed_attempts
        if state.is_completed() and state.result().status == "done":
            costs.append(state.result().cost_usd)
        elif not state.is_completed() and failed_attempts:
            failed_bills.append(failed_attempts)
        yield shard, state
    report.not_started = held_back


def _failed_attempts_usd(state: State) -> float:
    """What a shard task's failed attempts were billed: on its final error, or in the `extra` of a retry that passed."""
    if state.is_completed():
        return float(state.result().extra.get("failed_attempts_usd", 0.0))
    return billed_on(state.result(raise_on_failure=False), FAILED_ATTEMPTS_ATTRIBUTE) or 0.0


def _summary_markdown(totals: dict, charts: dict[str, str]) -> str:
    if not totals:
        return ""
    pictures = []
    for title, path in (("Chunk token lengths", charts.get("histogram")), ("Tokens/s per shard", charts.get("throughput"))):
        if path:
            # Inlined, so the UI shows it without serving files; the PNG stays beside the summary JSON.
            image = f"![{title}]({data_uri(Path(path))})" if Path(path).is_file() else ""
            pictures += [f"### {title}", "", image, "", f"PNG: `{path}`", ""]
    hist = totals.get("histogram", {})
    return "\n".join(
        [
            "## Chunks",
            "",
            "| rows | docs | empty docs | chunks | tokens | mean tokens/chunk | chunks < 10 tokens | chunks < 50 tokens |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {group_digits(totals['rows'])} | {group_digits(totals['docs'])} | {group_digits(totals['empty_docs'])} "
            f"| {group_digits(totals['chunks'])} | {group_digits(totals['tokens'])} | {totals.get('mean_chunk_tokens', 0)} "
            f"| {group_digits(totals['chunks_under_10'])} | {group_digits(totals['chunks_under_50'])} |",
            "",
            "Chunk token-length histogram ([CLS] and [SEP] included):",
            "",
            "```",
            text_histogram(hist.get("edges", []), hist.get("counts", [])),
            "```",
            "",
            *pictures,
        ]
    )
