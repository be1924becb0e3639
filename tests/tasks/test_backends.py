"""Backends: the local one runs shard jobs in worker processes; the modal one refuses clearly without a token."""

from __future__ import annotations

import os
import signal

import pytest

from fineweb_modal.errors import BadDataError, ConfigError, WorkerLostError, is_transient
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, layout_for
from tasks.backends import LocalBackend, ModalBackend, get_backend
from tasks.shard_tasks import retry_if_transient


def test_local_backend_runs_jobs_in_worker_processes(demo_source, run_config_for):
    run = run_config_for(demo_source)
    backend = LocalBackend(max_workers=2)
    try:
        files = sorted(demo_source.glob("*.parquet"))
        results = [backend.run(ShardJob(stage="download", shard=f.stem, run=run, source_file=str(f))) for f in files]
        assert [r.rows_out for r in results] == [12, 12, 12]
        assert backend.list_shards(run, "chunk") == [f.stem for f in files]
        with pytest.raises(BadDataError):  # exceptions cross the process boundary with their type
            backend.run(ShardJob(stage="chunk", shard="nope", run=run))
    finally:
        backend.close()


def mark_and_sleep(marker, seconds: float) -> None:
    """A worker job that says it has started (its pid in `marker`), then takes a while."""
    import time

    marker.write_text(str(os.getpid()))
    time.sleep(seconds)


def wait_for(condition, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_worker_interrupted_alone_is_replaced(tmp_path):
    """Ctrl-C in a notebook reaches the kernel's workers but may set no stop request: later jobs get fresh workers."""
    from fineweb_modal.errors import Interrupted

    backend = LocalBackend(max_workers=1)
    marker = tmp_path / "running"
    try:
        import threading

        outcome: dict = {}

        def call() -> None:
            try:
                backend._in_worker(mark_and_sleep, marker, 30)
            except Exception as exc:  # recorded, to assert on
                outcome["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        wait_for(lambda: marker.exists() and marker.read_text())
        os.kill(int(marker.read_text()), signal.SIGINT)
        thread.join(timeout=30)
        assert isinstance(outcome["error"], Interrupted)
        assert backend._in_worker(os.getpid) != int(marker.read_text()), "a fresh worker runs the next job"
    finally:
        backend.close()


def test_after_a_stop_request_no_queued_job_starts_and_a_later_run_gets_fresh_workers(demo_source, run_config_for, tmp_path):
    """Ctrl-C on a local run: the job running in a worker finishes; the jobs behind it end as Interrupted, not retried."""
    import threading
    import time

    from fineweb_modal.errors import Interrupted
    from fineweb_modal.interrupt import request_stop, withdraw_stop

    run = run_config_for(demo_source)
    files = sorted(demo_source.glob("*.parquet"))
    backend = LocalBackend(max_workers=1)
    outcomes: dict[str, object] = {}

    def call(name: str, function, *args) -> None:
        try:
            outcomes[name] = backend._in_worker(function, *args)
        except Exception as exc:  # recorded, to assert on
            outcomes[name] = exc

    try:
        marker = tmp_path / "running"
        running = threading.Thread(target=call, args=("running", mark_and_sleep, marker, 1.5))
        running.start()
        wait_for(marker.exists)
        queued = threading.Thread(target=call, args=("queued", os.getpid))  # handed to the worker's queue already, or not yet
        queued.start()
        time.sleep(0.3)
        request_stop()
        running.join(timeout=30)
        queued.join(timeout=30)
        assert outcomes["running"] is None, "the job that was running finished"
        assert isinstance(outcomes["queued"], Interrupted) and not is_transient(outcomes["queued"])
        job = ShardJob(stage="download", shard=files[0].stem, run=run, source_file=str(files[0]))
        with pytest.raises(Interrupted, match="stopped on request"):
            backend.run(job)
        assert Ledger(layout_for(run)).read("download", files[0].stem) is None, "a shard that never started has no record"
        withdraw_stop()
        assert backend.run(job).status == "done", "the next run in this process starts its jobs"
    finally:
        withdraw_stop()
        backend.close()


def test_a_dead_worker_fails_the_jobs_in_its_pool_as_transient_and_later_ones_get_fresh_workers(demo_source, run_config_for):
    """A worker killed by the OS (OOM killer, a crash) breaks a process pool for good: the backend replaces it."""
    run = run_config_for(demo_source)
    backend = LocalBackend(max_workers=1)
    try:
        source = sorted(demo_source.glob("*.parquet"))[0]
        done_job = ShardJob(stage="download", shard=source.stem, run=run, source_file=str(source))
        backend.run(done_job)
        (worker,) = backend._pool._processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        # A job sent to the broken pool fails with it without having run; a shard it had done stays done.
        with pytest.raises(WorkerLostError):
            backend.run(done_job)
        assert Ledger(layout_for(run)).read("download", source.stem).status == "done"
        assert backend.run(done_job).status == "skipped", "in fresh workers"
        (worker,) = backend._pool._processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        job = ShardJob(stage="chunk", shard=source.stem, run=run)
        with pytest.raises(WorkerLostError) as lost:
            backend.run(job)
        assert is_transient(lost.value), "retried, in a fresh worker"
        record = Ledger(layout_for(run)).read("chunk", source.stem)
        assert record.status == "failed" and record.error_type == "WorkerLostError", "`--only failed` finds it"
        assert backend.run(job).status == "done", "the pool was replaced"
        assert backend._pool._processes and worker.pid not in {p.pid for p in backend._pool._processes.values()}
    finally:
        backend.close()


def test_modal_backend_without_a_token_says_how_to_set_one_up(monkeypatch, tmp_path):
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "none.toml"))
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    import modal.config

    monkeypatch.setattr(modal.config.config, "get", lambda key, *a, **k: None)
    with pytest.raises(ConfigError, match="modal token new"):
        ModalBackend()
    with pytest.raises(ConfigError, match="unknown backend"):
        get_backend("cloud")


class _State:
    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "retry"),
    [(TimeoutError("slow"), True), (ConnectionResetError("reset"), True), (OSError(5, "EIO"), True),
     (BadDataError("bad"), False), (ConfigError("bad"), False), (FileNotFoundError(2, "gone"), False), (ValueError("x"), False)],
)  # fmt: skip
def test_only_transient_errors_are_retried(exc, retry):
    assert retry_if_transient(None, None, _State(exc)) is retry
