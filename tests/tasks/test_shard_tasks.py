"""The stage tasks: transient failures are retried as declared, bad data is not, and the ledger counts attempts."""

from __future__ import annotations

import pytest

from fineweb_modal.errors import BadDataError
from fineweb_modal.ledger import Ledger
from fineweb_modal.shards import ShardJob, ShardResult, layout_for, run_shard
from tasks import shard_tasks


class FlakyBackend:
    """A test double: runs shards in this process, after raising the given errors one per attempt."""

    name = "local"

    def __init__(self, errors: list[Exception]):
        self.errors, self.attempts = list(errors), []

    def run(self, job: ShardJob) -> ShardResult:
        self.attempts.append(job.attempt)
        if self.errors:
            raise self.errors.pop(0)
        return run_shard(job)


@pytest.fixture
def downloaded_shard(demo_source, run_config_for):
    run = run_config_for(demo_source)
    source = sorted(demo_source.glob("*.parquet"))[0]
    run_shard(ShardJob(stage="download", shard=source.stem, run=run, source_file=str(source)))
    return run, source.stem


def chunk_once(run, shard, backend, monkeypatch) -> dict:
    """The chunk task in a flow, with its declared retries but no wait between them: how its run ended."""
    from prefect import flow

    monkeypatch.setattr(shard_tasks, "get_backend", lambda name: backend)

    @flow
    def one_shard() -> dict:
        state = shard_tasks.chunk_task.with_options(retry_delay_seconds=0, retry_jitter_factor=None)(shard, run, return_state=True)
        # Not the state itself: a flow returning a failed state fails, and would raise here.
        return {"type": state.type.value, "message": state.message, "result": state.result() if state.is_completed() else None}

    return one_shard()


def test_transient_failures_are_retried_until_the_shard_is_done(prefect_api, downloaded_shard, monkeypatch):
    run, shard = downloaded_shard
    backend = FlakyBackend([TimeoutError("read timed out"), ConnectionResetError("reset by peer"), OSError(5, "Input/output error")])
    ended = chunk_once(run, shard, backend, monkeypatch)
    assert ended["type"] == "COMPLETED" and ended["result"].status == "done"
    assert backend.attempts == [1, 2, 3, 4], "three retries, each attempt numbered"
    assert Ledger(layout_for(run)).read("chunk", shard).attempts == 4


def test_retries_are_bounded(prefect_api, downloaded_shard, monkeypatch):
    run, shard = downloaded_shard
    backend = FlakyBackend([TimeoutError("read timed out")] * (shard_tasks.RETRIES + 1))
    ended = chunk_once(run, shard, backend, monkeypatch)
    assert ended["type"] == "FAILED" and backend.attempts == [1, 2, 3, 4]
    assert shard_tasks.RETRIES == 3


def test_bad_data_fails_at_once(prefect_api, downloaded_shard, monkeypatch):
    run, shard = downloaded_shard
    backend = FlakyBackend([BadDataError("s0.arrow: text column 'text' has type int64, expected a string")])
    ended = chunk_once(run, shard, backend, monkeypatch)
    assert ended["type"] == "FAILED" and backend.attempts == [1]
    assert "expected a string" in ended["message"]


def billed(exc: Exception, dollars: float) -> Exception:
    """An attempt's error as a Modal container sends it back: with what the attempt was billed."""
    from fineweb_modal.costs import mark_billed

    mark_billed(exc, dollars, "test")
    return exc


def test_what_failed_attempts_were_billed_adds_up_over_retries_into_the_shards_state(prefect_api, downloaded_shard, monkeypatch):
    run, shard = downloaded_shard
    backend = FlakyBackend([billed(TimeoutError("read timed out"), 0.5), billed(OSError(5, "Input/output error"), 0.25)])
    ended = chunk_once(run, shard, backend, monkeypatch)
    assert ended["type"] == "COMPLETED" and ended["result"].extra["failed_attempts_usd"] == pytest.approx(0.75)
    assert "(+$0.75 billed for failed attempts)" in ended["message"]
