"""Where a shard's work runs: here (`local`) or in a Modal function (`modal`). Both call `run_shard`."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import pyarrow as pa

import fineweb_modal
from fineweb_modal.config import RunConfig
from fineweb_modal.costs import PRICE_TABLE_DATE, billed_on, put_dollars, reconcile_rates
from fineweb_modal.errors import MODAL_LINK_ERRORS, ConfigError, Interrupted, ServiceUnavailable, ShardBusyError, WorkerLostError
from fineweb_modal.interrupt import interrupted, raise_if_stop_requested, stop_requested, stop_requested_within
from fineweb_modal.ledger import LEASE_TTL_S
from fineweb_modal.shards import (
    ShardJob,
    ShardResult,
    charge_failed_attempt,
    chunk_input_schema,
    download_hub_shards,
    finalize_stage,
    layout_for,
    plan_sample,
    record_failure,
    run_shard_exclusive,
    shard_statuses,
    stage_config_fingerprint,
    verify_outputs,
)
from fineweb_modal.status import StageStatus, ledger_status

MODAL_APP_NAME = "fineweb-modal"
MODAL_VOLUME_NAME = "fineweb-modal-data"
MODAL_DATA_DIR = "/data"
MODAL_TEI_CLASS = "TEIEmbedder"
MODAL_CALLS_DICT = "fineweb-modal-calls"
MODAL_FUNCTIONS = {"download": "download_shard", "chunk": "chunk_shard", "embed": "embed_shard", "summarize": "summarize_shard"}
MODAL_DEPLOY_COMMAND = "modal deploy deployments/modal_app.py"
DEPLOYED_SETTINGS_TTL_S = 60.0


def code_version(app_file: str | Path | None = None) -> str:
    """A fingerprint of the code a Modal container runs: the `fineweb_modal` and `tasks` packages' Python files and
    the app file (by default this checkout's `deployments/modal_app.py`), so a run can tell a stale deployment."""
    import importlib.util

    import tasks

    digest = hashlib.sha256()
    for package in (fineweb_modal, tasks):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package.__name__}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    if app_file is None:
        app_file = importlib.util.find_spec("deployments.modal_app").origin  # found, not imported: no `modal` needed
    digest.update(b"modal_app.py\0" + Path(app_file).read_bytes())
    return digest.hexdigest()[:16]


class Backend(Protocol):
    """Runs shard jobs and answers questions about the data where it lives."""

    name: str

    def run(self, job: ShardJob) -> ShardResult:
        """Runs one shard of one stage where the data lives; the ledger record is written before it returns."""

    def list_shards(self, run: RunConfig, stage: str) -> list[str]:
        """The shard names of a stage's input, sorted."""

    def download_hub(self, run: RunConfig) -> list[ShardResult]:
        """Fetches the dataset's files from the Hub into the download stage's folder."""

    def shard_statuses(self, run: RunConfig, stage: str, shards: list[str]) -> dict[str, str]:
        """Each shard's status in a stage, from its ledger: done, failed, stale or missing."""

    def ledger_status(self, data_dir: str, name: str | None) -> list[StageStatus]:
        """Every dataset, stage and split the ledger knows where the data lives (only `name`'s, when given)."""

    def chunk_input_schema(self, run: RunConfig, shards: list[str]) -> tuple[str, pa.Schema] | None:
        """The path and schema of the first of `shards` whose chunk input opens (None when none does)."""

    def verify(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Checks one shard's outputs against their inputs and ledger records."""

    def plan_sample(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Chunks a sample of one shard to forecast the run's chunks, tokens and cost."""

    def fetch(self, run: RunConfig, stage: str, shard: str, destination: Path) -> Path:
        """Copies one shard's output of a stage to a local path."""

    def finalize(self, run: RunConfig, stage: str, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Dataset-wide steps after every shard of a stage (the datasets index, the totals); returns what they wrote."""


# In a worker process: the pool's stop flag (set by the parent on a stop request; a lock-free shared bool, as
# a worker may exit inside its signal handler at any moment), whether this worker was interrupted itself
# (Ctrl-C reaches a terminal's whole process group), and whether a job runs now.
_pool_stopping: Any = None
_interrupted = False
_job_running = False


def _worker_started(stopping: Any) -> None:
    """A worker's Ctrl-C: a running job is interrupted (it fails, recording nothing done); an idle worker just exits."""
    global _pool_stopping
    _pool_stopping = stopping
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # ignored by whoever started the run: stays ignored
        return

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        global _interrupted
        _interrupted = True
        if _job_running:
            raise KeyboardInterrupt
        os._exit(130)  # quietly: a traceback per idle worker would bury the run's own message

    signal.signal(signal.SIGINT, on_interrupt)


def _as_job(function: Callable[..., Any], *args: Any) -> Any:
    """Run a job in a worker process, unless the run is stopping (a job queued before the stop does not start)."""
    global _job_running
    if _interrupted or (_pool_stopping is not None and _pool_stopping.value):
        raise interrupted("a queued shard job: stopped on request before it started")
    try:
        _job_running = True
        return function(*args)
    finally:
        _job_running = False


class LocalBackend:
    """In this machine: CPU stages in a process pool (one worker per core), embedding in-process, one at a time."""

    name = "local"

    def __init__(self, max_workers: int | None = None):
        self.max_workers = max_workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._pool_stopping: Any = None  # the pool's stop flag, seen by its workers
        self._pool_lock = threading.Lock()
        # torch already uses every core for one shard; two at once would only thrash.
        self._embed_lock = threading.Lock()

    def _executor(self) -> tuple[ProcessPoolExecutor, Any]:
        with self._pool_lock:
            if self._pool is not None and self._pool_stopping.value and not stop_requested():
                self._pool.shutdown(wait=False, cancel_futures=True)  # stopped by an earlier run's Ctrl-C
                self._pool = None
            if self._pool is None:
                # spawn, not fork: the parent runs Prefect's threads and event loops, which fork would copy mid-flight.
                context = multiprocessing.get_context("spawn")
                self._pool_stopping = context.RawValue(ctypes.c_bool, False)
                self._pool = ProcessPoolExecutor(self.max_workers, mp_context=context, initializer=_worker_started, initargs=(self._pool_stopping,))
            return self._pool, self._pool_stopping

    def _retire(self, pool: ProcessPoolExecutor) -> None:
        """Stop using `pool`: the next call starts fresh workers."""
        with self._pool_lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def _in_worker(self, function: Callable[..., Any], *args: Any) -> Any:
        """Call `function` in a worker process; a pool broken by a dead worker is replaced, and the call fails as WorkerLostError.

        After a stop request (Ctrl-C) no queued call starts, and one the interrupt reached in its worker ends
        as Interrupted: neither is retried.
        """
        raise_if_stop_requested("a queued shard job")
        pool, stopping = self._executor()
        try:
            future = pool.submit(_as_job, function, *args)
            while not future.done():
                wait([future], timeout=0.25)
                if stop_requested():
                    stopping.value = True  # calls already handed to the workers do not start either
                    if future.cancel():
                        raise_if_stop_requested("a queued shard job")
            try:
                return future.result()
            except KeyboardInterrupt as exc:  # the job's own exception: the interrupt reached its worker
                self._retire(pool)  # that worker refuses every later job
                raise interrupted("a shard job was interrupted in its worker process") from exc
        except BrokenProcessPool as exc:
            self._retire(pool)  # every later submit would fail too
            # Idle workers exit on the same Ctrl-C, maybe before this process's handler has run: wait for it a moment.
            if stop_requested_within(0.5):
                raise interrupted("the worker processes stopped on request") from exc
            raise WorkerLostError(
                "a worker process died while this ran (killed by the OS, e.g. out of memory, or crashed); its retry runs in a fresh one"
            ) from exc

    def run(self, job: ShardJob) -> ShardResult:
        """Run one shard job here and wait for it."""
        job = job.model_copy(update={"where": "local"})
        if job.stage == "embed":
            with self._embed_lock:
                return run_shard_exclusive(job)
        try:
            return self._in_worker(run_shard_exclusive, job)
        except WorkerLostError as exc:
            record_failure(job, exc)  # for `--only failed`: the dead worker wrote nothing
            raise

    def list_shards(self, run: RunConfig, stage: str) -> list[str]:
        """The shards a stage can run on, from the local data dir."""
        return layout_for(run).list_shards(stage)

    def shard_statuses(self, run: RunConfig, stage: str, shards: list[str]) -> dict[str, str]:
        """done / failed / missing per shard, from the local ledger."""
        return shard_statuses(run, stage, shards)

    def ledger_status(self, data_dir: str, name: str | None) -> list[StageStatus]:
        """What the ledger under the local `data_dir` says."""
        return ledger_status(data_dir, name)

    def chunk_input_schema(self, run: RunConfig, shards: list[str]) -> tuple[str, pa.Schema] | None:
        """The first readable chunk input's path and schema, from the local data dir."""
        return _schema_of(chunk_input_schema(run, shards))

    def fetch(self, run: RunConfig, stage: str, shard: str, destination: Path) -> Path:
        """Copy one output shard to `destination`."""
        source = layout_for(run).output_path(stage, shard)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist (run the {stage} stage first)")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
        return destination

    def verify(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Check one shard's outputs, in a worker process."""
        return self._in_worker(verify_outputs, run, shard)

    def plan_sample(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Sample one shard for the forecast, in a worker process."""
        return self._in_worker(plan_sample, run, shard)

    def download_hub(self, run: RunConfig) -> list[ShardResult]:
        """Download a Hub dataset into the local data dir."""
        return download_hub_shards(run)

    def finalize(self, run: RunConfig, stage: str, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Dataset-wide step after a stage."""
        return finalize_stage(run, stage, summaries)

    def close(self) -> None:
        """Stop the worker processes."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None


def _schema_of(found: tuple[str, bytes] | None) -> tuple[str, pa.Schema] | None:
    return None if found is None else (found[0], pa.ipc.read_schema(pa.py_buffer(found[1])))


def lost_modal_link(exc: BaseException) -> bool:
    """Whether `exc` is the Modal client losing its link to Modal (the call waited on may still run and bill), not a call's own failure."""
    kind = type(exc)
    return kind.__module__.split(".")[0] in ("modal", "grpclib") and kind.__name__ in MODAL_LINK_ERRORS


def modal_refusal(exc: BaseException) -> ServiceUnavailable | None:
    """The one-line refusal for a Modal that cannot be reached or refuses the token (None for any other failure)."""
    if lost_modal_link(exc) and type(exc).__name__ in ("InternalError", "ServiceError"):  # Modal answered, with a failure of its own
        return ServiceUnavailable(f"Modal could not answer just now ({type(exc).__name__}: {exc}): rerun in a minute")
    if lost_modal_link(exc) or isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):  # not an OSError of the function's own
        return ServiceUnavailable(f"cannot reach Modal ({type(exc).__name__}: {exc}): check the network, then rerun")
    if type(exc).__name__ == "AuthError":
        return ServiceUnavailable(f"Modal refused the token ({exc}): run `modal token new` (or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET)")
    return None


def call_key(job: ShardJob) -> str:
    """The key of a shard job's Modal call record, which is also its lease on Modal: the local lease file's path.

    One per output file (dataset, split, the stage's folder, shard), whatever the config: two runs never write
    one file at once. Which config the call runs is in its record (call_config).
    """
    layout = job.layout()
    return layout.lease_path(job.stage, job.shard).relative_to(layout.data_dir).as_posix()


def call_config(job: ShardJob) -> str:
    """What shapes a shard job's output, digested: a run re-attaches only to a call with its own, and two runs that
    pick shards differently (`--shards`, `--only failed`) or have other budgets still share it."""
    return hashlib.sha256(stage_config_fingerprint(job).encode()).hexdigest()[:12]


def _same_run(record: dict, reservation: dict) -> bool:
    """Whether a call record was made by the run that holds `reservation` (the same root flow run, or both outside one)."""
    return (record.get("root_flow_run_id") or record.get("flow_run_id")) == (reservation.get("root_flow_run_id") or reservation.get("flow_run_id"))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flow_run_ids() -> dict[str, str]:
    """The current flow run and its root, so cancelling either finds the call."""
    from prefect.runtime import flow_run

    return {"flow_run_id": str(flow_run.id or ""), "root_flow_run_id": str(flow_run.root_flow_run_id or "")}


def _log(message: str) -> None:
    """Into the task run's log when there is one (the UI shows it), else the module logger."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().info(message)
    except MissingContextError:
        logging.getLogger(__name__).info(message)


def _dashboard_url(call: Any) -> str:
    try:
        return call.get_dashboard_url()
    except Exception:  # the URL is a convenience: never fail a shard over it
        return "(no dashboard URL)"


def live_rates(modal_module) -> dict[str, float]:
    """The workspace's rates from Modal's billing API, reconciled with the price table; {} when unreadable."""
    try:
        reported = modal_module.Workspace.from_context().billing.rates()
    except Exception as exc:  # no billing access, an older client, no network: the dated table stands
        logging.getLogger(__name__).info("Modal billing rates unavailable (%s); using the %s price table", type(exc).__name__, PRICE_TABLE_DATE)
        return {}
    accepted = reconcile_rates(reported)
    logging.getLogger(__name__).info("Modal billing rates: %s from the API, the rest from the %s table", sorted(accepted) or "none", PRICE_TABLE_DATE)
    return accepted


MODAL_POLL_S = 5.0  # how often a wait on a Modal call looks for a stop request

MODAL_TOKEN_MISSING = (
    "the modal backend needs a Modal token: run `modal token new` (or set MODAL_TOKEN_ID and "
    "MODAL_TOKEN_SECRET), then deploy the app once with `modal deploy deployments/modal_app.py`"
)


def modal_token_configured() -> bool:
    """Whether a Modal token is set (env or ~/.modal.toml), decided without touching the network."""
    import modal.config

    return bool(modal.config.config.get("token_id")) and bool(modal.config.config.get("token_secret"))


class ModalBackend:
    """In the deployed Modal app: each shard job is one call of that stage's function; data lives on the Volume.

    Every call is spawned, and its id kept in the `modal.Dict` `fineweb-modal-calls` (keyed by the shard's
    output file, with the config it runs) until it returns: a run restarted after its worker died re-attaches
    to the call still running instead of paying for it twice, and cancelling a flow run cancels its calls.
    """

    name = "modal"

    def __init__(self, modal_module=None) -> None:
        if modal_module is None:
            if not modal_token_configured():
                raise ConfigError(MODAL_TOKEN_MISSING)
            import modal as modal_module
        self._modal = modal_module
        self._volume = modal_module.Volume.from_name(MODAL_VOLUME_NAME, create_if_missing=True)
        self._calls = modal_module.Dict.from_name(MODAL_CALLS_DICT, create_if_missing=True)
        self.rates = live_rates(modal_module)
        self._deployed: tuple[float, dict[str, str]] | None = None  # (when asked, the answer)

    def _on_volume(self, run: RunConfig) -> RunConfig:
        return run.model_copy(update={"dataset": run.dataset.model_copy(update={"data_dir": MODAL_DATA_DIR})})

    def _function(self, name: str):
        return self._modal.Function.from_name(MODAL_APP_NAME, name)

    def run(self, job: ShardJob) -> ShardResult:
        """Call the stage's Modal function on one shard; a local source file is uploaded to the Volume first."""
        raise_if_stop_requested(f"{job.stage}/{job.shard}")
        update: dict[str, Any] = {"run": self._on_volume(job.run), "where": "modal", "rates": self.rates}
        if job.stage == "download" and job.source_file and not job.source_file.startswith(MODAL_DATA_DIR + "/"):
            remote = f"/_sources/{job.run.dataset.name}/{Path(job.source_file).name}"
            with self._volume.batch_upload(force=True) as upload:
                upload.put_file(job.source_file, remote)
            update["source_file"] = MODAL_DATA_DIR + remote
        payload = job.model_copy(update=update).model_dump(mode="json")
        # A shard done on an earlier run is answered from the ledger: no GPU container starts to say so. Only
        # when no call is recorded for it: a recorded one is re-attached to (and forgotten) by _call.
        if job.stage == "embed" and not self._calls.get(call_key(job)) and (earlier := self._remote("done_result_fn", payload, in_flight=True)) is not None:
            return ShardResult.model_validate(earlier)
        if job.stage == "embed" and job.run.embed.engine == "tei":
            target = self._modal.Cls.from_name(MODAL_APP_NAME, MODAL_TEI_CLASS)().embed_shard
        else:
            target = self._function(MODAL_FUNCTIONS[job.stage])
        failed_calls: list[float] = []  # what this attempt's calls that failed were billed

        def bill(error: BaseException, seconds: float) -> None:
            if billed_on(error) is None:  # its container could not say (killed out of memory or at its timeout, preempted)
                how = "at most: its call's whole life, queue and start-up included"
                charge_failed_attempt(error, job.model_copy(update={"rates": self.rates}), seconds, how)
            failed_calls.append(billed_on(error) or 0.0)

        try:
            output, call_id = self._call(call_key(job), lambda: target.spawn(payload), call_config(job), bill)
        except Exception as exc:
            if failed_calls:  # a re-attached call that failed, then the one started after it: all on this error
                put_dollars(exc, sum(failed_calls))
            raise
        result = ShardResult.model_validate(output)
        result.extra["modal_call_id"] = call_id
        result.extra["rates"] = "modal billing API" if self.rates else f"price table {PRICE_TABLE_DATE}"
        if failed_calls:
            result.extra["failed_attempts_usd"] = sum(failed_calls)
        return result

    def _call(self, key: str, spawn: Callable[[], Any], config: str = "", bill: Callable[[BaseException, float], None] | None = None) -> tuple[Any, str]:
        """Re-attach to the running call for `key`, or spawn one; wait for its (result, call id); forget it once it returned.

        The record in the Dict is also the shard's lease on Modal (a Volume has no atomic create): a run
        reserves the key with `put(..., skip_if_exists=True)` before spawning, so two runs at once never
        spawn two calls for one shard — the second waits on the first's call, or, when that call runs another
        `config` (it writes the same file differently), fails with ShardBusyError as a local run would. A
        reservation left by a run that died before spawning expires after the lease TTL. Only a returned call
        (a result or a remote error) is forgotten: when this process is stopped or loses its link to Modal
        while waiting, the record stays, and the next attempt or run re-attaches to the call instead of
        starting another. `bill(error, seconds)` hears of each failure of a call this run started (a lost link is
        none), with the seconds since it was spawned.
        """
        reservation = {"call_id": None, "config": config, "reserved": _now(), "reserved_at": time.time(), **_flow_run_ids()}
        while not self._calls.put(key, reservation, skip_if_exists=True):
            record = self._calls.get(key)
            if not record:
                continue  # forgotten meanwhile: reserve again
            if record.get("config", "") != config:
                if self._still_running(record):
                    raise ShardBusyError(
                        f"{key}: another run's Modal call {record.get('call_id') or '(starting)'} (since {record.get('reserved')}) writes this "
                        f"shard with another config; rerun it once that run is done"
                    )
                self._forget(key, record)  # it ended: its result was for another config, nothing to re-attach to
                continue
            if record.get("call_id"):
                _log(f"re-attaching to Modal call {record['call_id']} (started {record.get('started')}) instead of starting another")
                ours = _same_run(record, reservation)  # this run's own call (a retry re-attaching), or another run's
                try:
                    output = self._wait(self._modal.FunctionCall.from_id(record["call_id"]), cancel_on_stop=ours)
                except Interrupted:
                    if ours:
                        self._forget(key, record)  # cancelled: nothing to re-attach to
                    raise
                except Exception as exc:  # the old call failed, or its result expired: start afresh
                    if lost_modal_link(exc):
                        raise  # whether that call still runs is unknown: keep its record for the next attempt
                    _log(f"Modal call {record['call_id']} returned no result ({type(exc).__name__}); starting a new one")
                    if ours and bill is not None:  # another run's call is that run's to count
                        bill(exc, time.time() - record.get("spawned_at", record.get("reserved_at", time.time())))
                    self._forget(key, record)
                    continue
                self._forget(key, record)
                return output, record["call_id"]
            if time.time() - record.get("reserved_at", 0) > LEASE_TTL_S:
                _log(f"{key}: dropping a reservation from {record.get('reserved')} that never started a call")
                self._forget(key, record)
                continue
            time.sleep(1)  # another run is starting this shard's call right now; its id appears in a moment
        try:
            call = spawn()
        except BaseException:
            self._forget(key, reservation)  # nothing started: a retry must not wait on this reservation
            raise
        started = {**reservation, "call_id": call.object_id, "started": _now(), "spawned_at": time.time()}
        self._calls.put(key, started)
        _log(f"Modal call {call.object_id}: {_dashboard_url(call)}")
        try:
            output = self._wait(call, cancel_on_stop=True)
        except Exception as exc:
            if not lost_modal_link(exc):
                self._forget(key, started)  # a failed call is not re-attached to: the retry spawns a new one
                if bill is not None and not isinstance(exc, Interrupted):
                    bill(exc, time.time() - started["spawned_at"])
            raise  # a lost link keeps the record: the retry re-attaches to the call, which may still run
        self._forget(key, started)
        return output, call.object_id

    def _still_running(self, record: dict) -> bool:
        """Whether a recorded call (or a reservation about to spawn one) may still run, asked without waiting."""
        if not record.get("call_id"):
            return time.time() - record.get("reserved_at", 0) <= LEASE_TTL_S
        try:
            self._modal.FunctionCall.from_id(record["call_id"]).get(timeout=0)
        except TimeoutError as exc:
            return not exc.args  # a bare one: no result yet (a call's own comes with a message, and ended it)
        except Exception as exc:
            return lost_modal_link(exc)  # unknown: count it as running; any other error is the call's own end
        return False

    def _wait(self, call: Any, cancel_on_stop: bool) -> Any:
        """The call's result, waited for in slices: after a stop request (Ctrl-C) the call is cancelled and its
        container stopped, so none keeps billing for a stopped run, and Interrupted is raised (an embed shard's rerun resumes
        from the parts the Volume kept). Another run's call, waited on for the same shard, is left running."""
        while True:
            started = time.monotonic()
            try:
                return call.get(timeout=MODAL_POLL_S)
            except TimeoutError as exc:
                # Modal's poll raises a bare TimeoutError after waiting the whole slice; a call's own comes back at once.
                if exc.args or time.monotonic() - started < MODAL_POLL_S / 2:
                    raise
            if stop_requested():
                if not cancel_on_stop:
                    raise interrupted(f"stopped on request while waiting on another run's Modal call {call.object_id}, which runs on")
                call.cancel(terminate_containers=True)  # else its GPU container idles, billed, until scale-down
                raise interrupted(f"Modal call {call.object_id} cancelled on request")

    def _forget(self, key: str, seen: dict) -> None:
        """Drop the record of `key` if it is still the one seen (a modal.Dict has no compare-and-delete, so this
        narrows, not closes, the window in which another run's newer record could go)."""
        current = self._calls.get(key)
        if current is not None and current.get("call_id") == seen.get("call_id") and current.get("reserved_at") == seen.get("reserved_at"):
            self._calls.pop(key, None)

    def cancel_calls(self, flow_run_id: str) -> list[str]:
        """Cancel every running call started by this flow run or any run under it; returns the cancelled call ids."""
        cancelled = []
        for key, record in list(self._calls.items()):
            if flow_run_id not in (record.get("flow_run_id"), record.get("root_flow_run_id")):
                continue
            if record.get("call_id"):
                try:
                    self._modal.FunctionCall.from_id(record["call_id"]).cancel(terminate_containers=True)
                except Exception as exc:  # keep cancelling the others: each one left running keeps billing
                    _log(f"could not cancel Modal call {record['call_id']}: {type(exc).__name__}: {exc}")
                    continue
                cancelled.append(record["call_id"])
            self._calls.pop(key, None)  # a reservation that never started a call goes too
        return cancelled

    def list_shards(self, run: RunConfig, stage: str) -> list[str]:
        """The shards a stage can run on, as the Volume holds them."""
        return self._remote("list_shards", self._on_volume(run).model_dump(mode="json"), stage)

    def fetch(self, run: RunConfig, stage: str, shard: str, destination: Path) -> Path:
        """Download one output shard from the Volume to `destination`."""
        remote = layout_for(self._on_volume(run)).output_path(stage, shard).relative_to(MODAL_DATA_DIR)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.partial")  # a failed read leaves no half file under the name
        try:
            with open(partial, "wb") as handle:
                for block in self._volume.read_file(str(remote)):
                    handle.write(block)
        except BaseException as exc:  # Ctrl-C too: no hidden half file stays behind
            partial.unlink(missing_ok=True)
            if not isinstance(exc, Exception) or (refusal := modal_refusal(exc)) is None:
                raise
            raise refusal from None
        partial.replace(destination)
        return destination

    def plan_sample(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Sample one shard on the Volume for the forecast."""
        return self._remote("plan_sample_fn", self._on_volume(run).model_dump(mode="json"), shard, in_flight=True)  # in a task: retried

    def verify(self, run: RunConfig, shard: str) -> dict[str, Any]:
        """Check one shard's outputs on the Volume."""
        return self._remote("verify_shard_fn", self._on_volume(run).model_dump(mode="json"), shard, in_flight=True)  # in a task: retried

    def ledger_status(self, data_dir: str, name: str | None) -> list[StageStatus]:
        """What the ledger on the Volume says (`data_dir` is the Volume's: the argument is not used)."""
        return [StageStatus.from_dict(view) for view in self._remote("ledger_status_fn", MODAL_DATA_DIR, name)]

    def shard_statuses(self, run: RunConfig, stage: str, shards: list[str]) -> dict[str, str]:
        """done / failed / missing per shard, from the ledger on the Volume."""
        return self._remote("shard_statuses_fn", self._on_volume(run).model_dump(mode="json"), stage, shards)

    def chunk_input_schema(self, run: RunConfig, shards: list[str]) -> tuple[str, pa.Schema] | None:
        """The first readable chunk input's path and schema, as the Volume holds it (one small CPU call)."""
        return _schema_of(self._remote("chunk_input_schema_fn", self._on_volume(run).model_dump(mode="json"), shards))

    def download_hub(self, run: RunConfig) -> list[ShardResult]:
        """Download a Hub dataset straight onto the Volume."""
        payload = self._on_volume(run).model_dump(mode="json")
        digest = hashlib.sha256(run.download.model_dump_json().encode()).hexdigest()[:12]
        key = f"{run.dataset.name}/{run.dataset.split}/download-hub/{digest}"
        # Spawned and recorded like a shard's call: a retry after a lost link re-attaches, not downloads twice.
        results, _ = self._call(key, lambda: self._function("download_hub").spawn(payload, self.rates))
        return [ShardResult.model_validate(r) for r in results]

    def deployed_settings(self) -> dict[str, str]:
        """The deployed app's GPU, TEI model and code version, or ConfigError when the app is missing or older than this code.

        An answer is reused for a minute (a run's checks come together); a worker that serves for days sees a redeploy.
        """
        if self._deployed is None or time.monotonic() - self._deployed[0] > DEPLOYED_SETTINGS_TTL_S:
            self._deployed = (time.monotonic(), self._remote("deployed_settings"))
        return self._deployed[1]

    def check_deployment(self, tei_model: str | None = None) -> None:
        """ConfigError unless the deployed app runs the code of this checkout (else its containers would run other
        chunking, embedding or ledger code than this run expects: a `git pull` without a redeploy, a local edit),
        and, given `tei_model`, its TEI serves that model (else each embed shard would start a GPU to find out).

        A refusal is not reused: after a redeploy, the next check asks again. A Modal that cannot be reached, or that
        refuses the token, is said here too (by `_remote`): this is a run's first call to it.
        """
        settings = self.deployed_settings()
        if other_code := self.other_code(settings):
            self._deployed = None
            raise ConfigError(other_code)
        if tei_model is not None and (served := settings["tei_model"]) != tei_model:
            self._deployed = None
            raise ConfigError(
                f"the deployed Modal app's TEI serves {served}, not --model {tei_model}: pass --model {served}, or "
                f"redeploy with FINEWEB_MODAL_TEI_MODEL={tei_model} {MODAL_DEPLOY_COMMAND}"
            )

    def other_code(self, settings: dict[str, Any] | None = None) -> str | None:
        """What to do when the deployed app runs other code than this checkout (a `git pull` without a redeploy), else None."""
        if settings is None:
            settings = self.deployed_settings()
        if (deployed := settings.get("code")) == (here := code_version()):
            return None
        gpu = f" (it was deployed for GPU {settings['gpu']}: keep FINEWEB_MODAL_GPU={settings['gpu']} and the other FINEWEB_MODAL_* settings you deployed with)" if settings.get("gpu") else ""
        return (
            f"the deployed Modal app {MODAL_APP_NAME!r} runs other code than this checkout (deployed {deployed or 'before code versions'}, "
            f"here {here}, the code in {Path(fineweb_modal.__file__).parent.parent}): redeploy it from there with `{MODAL_DEPLOY_COMMAND}`{gpu}"
        )

    def reader_warning(self, command: str) -> str | None:
        """For `status` and `verify`, which only read and run anyway: a warning when the deployed code, which does the
        reading, is not this checkout's (an older one may not report what this code would, such as mixed settings)."""
        try:
            other_code = self.other_code()
        except ServiceUnavailable:
            raise
        except ConfigError as exc:  # an app deployed before `deployed_settings` existed, or none
            other_code = f"cannot tell which code the deployed Modal app runs ({exc})"
        return f"{other_code}; until then this {command} is the deployed code's view" if other_code else None

    def _remote(self, name: str, *args: Any, in_flight: bool = False) -> Any:
        """`.remote(*args)` of a deployed function. One the deployment lacks (none, or an older one) is a ConfigError
        saying to deploy, not NotFoundError; a Modal that cannot be reached or refuses the token is a one-line
        ServiceUnavailable (a ConfigError) too, unless `in_flight` (a call in a task, whose retries take a lost link)."""
        try:
            return self._function(name).remote(*args)
        except Exception as exc:
            if type(exc).__name__ == "NotFoundError":
                raise ConfigError(f"the Modal app {MODAL_APP_NAME!r} is not deployed, or is older than this code: run `{MODAL_DEPLOY_COMMAND}`") from None
            if in_flight or (refusal := modal_refusal(exc)) is None:
                raise
            raise refusal from None

    def finalize(self, run: RunConfig, stage: str, summaries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Dataset-wide step after a stage, on the Volume."""
        return self._remote("finalize_stage_fn", self._on_volume(run).model_dump(mode="json"), stage, summaries, in_flight=True)


_backends: dict[str, Backend] = {}
_backends_lock = threading.Lock()


def get_backend(name: str) -> Backend:
    """The process-wide backend of that name (the local one keeps its warm worker processes between flow runs)."""
    with _backends_lock:
        if name not in _backends:
            if name == "local":
                _backends[name] = LocalBackend()
            elif name == "modal":
                _backends[name] = ModalBackend()
            else:
                raise ConfigError(f"unknown backend {name!r}: choose local or modal")
        return _backends[name]
