"""Backends: the local one runs shard jobs in worker processes; the modal one refuses clearly without a token."""

from __future__ import annotations

import pytest

from fineweb_modal.errors import BadDataError, ConfigError
from fineweb_modal.shards import ShardJob
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
