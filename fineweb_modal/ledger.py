"""Per stage and shard, a JSON record of what happened: `done` (with stats and the config fingerprint) or `failed`.

A `done` record is written only after the output is renamed into place, so a record always describes a
whole file; a record is trusted only while its fingerprint matches and its output still has its rows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from fineweb_modal.errors import ShardBusyError
from fineweb_modal.layout import Layout
from fineweb_modal.storage import arrow_num_rows, parquet_num_rows, write_json_atomic

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


class ShardRecord(BaseModel):
    """One ledger entry."""

    schema_version: int = SCHEMA_VERSION
    stage: str
    shard: str
    status: Literal["done", "failed"]
    fingerprint: str
    output: str | None = None
    rows_out: int | None = None
    stats: dict[str, Any] = {}
    # What the output was made from: the input stage's done fingerprint (or the input file's size and mtime),
    # and the input file's size and mtime either way.
    upstream: str | None = None
    upstream_file: str | None = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 1
    time: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def file_identity(path: Path) -> str:
    """A file's size and modification time, or `missing`."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing"
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def count_rows(path: Path) -> int | None:
    """Rows in a stage output (parquet or arrow); None when missing or unreadable."""
    if path.suffix == ".parquet":
        return parquet_num_rows(path)
    if path.suffix == ".arrow":
        return arrow_num_rows(path)
    return 1 if path.is_file() else None


class Ledger:
    """Reads and writes the ledger records of one dataset layout."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def read(self, stage: str, shard: str) -> ShardRecord | None:
        """The current record of a shard, or None when there is none (or it has another schema version)."""
        path = self.layout.ledger_path(stage, shard)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ledger record %s is unreadable; treating the shard as not done", path)
            return None
        if payload.get("schema_version") != SCHEMA_VERSION:
            return None
        return ShardRecord.model_validate(payload)

    def done_record(self, stage: str, shard: str, fingerprint: str) -> ShardRecord | None:
        """The shard's `done` record if it matches `fingerprint` and its output still holds its rows."""
        return self.still_done(self.read(stage, shard), fingerprint)

    def still_done(self, record: ShardRecord | None, fingerprint: str) -> ShardRecord | None:
        """`record` (read already) if it is `done`, matches `fingerprint`, and its output still holds its rows."""
        if record is None or record.status != "done" or record.fingerprint != fingerprint:
            return None
        output = self.layout.output_path(record.stage, record.shard)
        rows = count_rows(output)
        if rows is None or rows != record.rows_out:
            found = "is missing or unreadable" if rows is None else f"has {rows}"
            log.warning("%s/%s: ledger says done with %s rows but %s %s; redoing it", record.stage, record.shard, record.rows_out, output, found)
            return None
        return record

    def input_fingerprint(self, stage: str, shard: str) -> str:
        """What a shard of a (non-download) stage is made from now: its input's done fingerprint, else the input file's identity."""
        record = self.read(self.layout.input_stage(stage), shard)
        return record.fingerprint if record and record.status == "done" else file_identity(self.layout.input_path(stage, shard))

    def outdated(self, record: ShardRecord) -> bool:
        """Whether a done record's output was made from another input than the one there now (e.g. re-chunked since).

        By the input stage's done fingerprint; while the input has none (its last attempt failed, leaving the
        file as it was, or it came from elsewhere), by the input file's size and mtime.
        """
        if record.upstream is None or record.stage == "download":
            return False  # a record from before upstreams were kept: cannot tell
        current = self.read(self.layout.input_stage(record.stage), record.shard)
        if current is not None and current.status == "done":
            return record.upstream != current.fingerprint
        made_from = record.upstream_file or record.upstream
        return made_from != file_identity(self.layout.input_path(record.stage, record.shard))

    def write_done(
        self, stage: str, shard: str, fingerprint: str, rows_out: int, stats: dict[str, Any], attempts: int, upstream: str | None = None, upstream_file: str | None = None
    ) -> ShardRecord:
        """Record a finished shard (call only after its output is in place), with the input fingerprint it was made from."""
        output = self.layout.output_path(stage, shard)
        record = ShardRecord(
            stage=stage,
            shard=shard,
            status="done",
            fingerprint=fingerprint,
            output=str(output.relative_to(self.layout.data_dir)),
            rows_out=rows_out,
            stats=stats,
            upstream=upstream,
            upstream_file=upstream_file,
            attempts=attempts,
            time=_now(),
        )
        write_json_atomic(self.layout.ledger_path(stage, shard), record.model_dump(mode="json"))
        return record

    def write_failed(self, stage: str, shard: str, fingerprint: str, exc: BaseException, attempts: int) -> ShardRecord:
        """Record a shard whose attempt failed, with the error and how many attempts it had."""
        record = ShardRecord(
            stage=stage,
            shard=shard,
            status="failed",
            fingerprint=fingerprint,
            error=f"{type(exc).__name__}: {exc}"[:2000],
            error_type=type(exc).__name__,
            stats={"traceback": "".join(traceback.format_exception(exc))[-4000:]},
            attempts=attempts,
            time=_now(),
        )
        write_json_atomic(self.layout.ledger_path(stage, shard), record.model_dump(mode="json"))
        return record

    def records(self, stage: str) -> list[ShardRecord]:
        """Every record of one stage, sorted by shard."""
        folder = self.layout.ledger_path(stage, "x").parent
        if not folder.is_dir():
            return []
        found = (self.read(stage, p.stem) for p in sorted(folder.glob("*.json")))
        return [r for r in found if r is not None]


LEASE_TTL_S = float(os.environ.get("FINEWEB_MODAL_LEASE_TTL", "600"))


def _pid_space() -> str | None:
    """This process's pid namespace and boot, e.g. `4026531836@<boot id>`: pids compare only within one (None off Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{os.stat('/proc/self/ns/pid').st_ino}@{boot}"
    except OSError:
        return None


def _process_gone(holder: dict) -> bool:
    """True when a lease's holder ran in this pid namespace (same host, same boot) and its process has exited.

    A container that shares the hostname has its own pids, so the namespace is compared too; a reused pid
    only delays the break to the TTL.
    """
    pid, space = holder.get("pid"), _pid_space()
    if holder.get("host") != socket.gethostname() or space is None or holder.get("pid_space") != space or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class ShardLease:
    """A claim on one stage/shard while a run works on it: a file created with O_EXCL beside its ledger record.

    The holder renews it (a heartbeat thread touches the file every ttl/3); a lease not renewed for `ttl`
    seconds is expired — its run crashed — and the next run breaks it. A lease whose holder ran on this
    host in a process that no longer exists (a run killed with SIGKILL) is broken at once, without waiting
    for the TTL. Breaking takes a second O_EXCL file as a mutex, so two runs that find the same expired
    lease cannot both take the shard. The same owner (a Prefect flow run retried or restarted) takes its
    own lease back at once.
    """

    def __init__(self, path: Path, owner: str, ttl_s: float = LEASE_TTL_S):
        self.path, self.owner, self.ttl_s = path, owner, ttl_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ShardLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease or raise ShardBusyError naming who holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                break
            holder = self._holder()
            gone = holder is not None and _process_gone(holder)
            if holder is not None and holder.get("owner") != self.owner and not self._expired() and not gone:
                age = time.time() - self._mtime()
                raise ShardBusyError(
                    f"{self.path.stem} is being worked on by {holder.get('owner')} on {holder.get('host')} "
                    f"(lease renewed {age:.0f} s ago, expires {self.ttl_s:.0f} s after its last renewal); rerun when it is done"
                )
            if holder and holder.get("owner") == self.owner:
                self._break(reason="its owner's retry")
            else:
                self._break(reason="its process is gone" if gone else "it expired")
        else:
            raise ShardBusyError(f"{self.path.stem}: could not take the lease (other runs keep taking it)")
        self._heartbeat = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.path.stem}")
        self._heartbeat.start()

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        payload = {"owner": self.owner, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "pid_space": _pid_space(), "taken": _now()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle)
        return True

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written by a holder that died while creating it: expires like any other

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _expired(self) -> bool:
        return time.time() - self._mtime() > self.ttl_s

    def held(self) -> bool:
        """Whether this lease is still ours (another run takes it over only after it went unrenewed for a TTL)."""
        holder = self._holder()
        return holder is not None and holder.get("token") == self.token

    def _break(self, reason: str) -> None:
        mutex = self.path.with_suffix(".breaking")
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):  # the other breaker may finish between the two calls
                if time.time() - mutex.stat().st_mtime > self.ttl_s:  # a breaker that died mid-break
                    mutex.unlink(missing_ok=True)
            return
        os.close(fd)
        try:
            holder = self._holder()
            if holder is not None and (holder.get("owner") == self.owner or self._expired() or _process_gone(holder)):
                log.warning("%s: taking over the lease of %s (%s)", self.path.stem, holder.get("owner"), reason)
                self.path.unlink(missing_ok=True)
        finally:
            mutex.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if not self.held():
                log.error("%s: the lease was taken over while this run held it (its heartbeat stalled past the TTL)", self.path.stem)
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)
