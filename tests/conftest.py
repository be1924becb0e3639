"""Shared fixtures: small real datasets, a session-scoped Prefect test server with its own results dir."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite asserts the CPU's behaviour (bitwise-equal resumed vectors, eager by default); on a machine with a
# GPU it would take the CUDA paths, which the GPU benchmark measures instead (python -m benchmarks.embed --gpu-only).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from fineweb_modal.config import build_run_config  # noqa: E402
from fineweb_modal.demo import build_documents, write_demo_source  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def fineweb_modal_home(tmp_path_factory):
    """No test touches the user's ~/.fineweb-modal; a local server a test leaves running is stopped and named."""
    from flows import server

    home = tmp_path_factory.mktemp("fineweb-modal-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINEWEB_MODAL_HOME", str(home))
        yield home
        left = server.status()
        if left is not None:
            server.stop()
            pytest.fail(f"a test left the local Prefect server running (pid {left['pid']}, port {left['port']})")


class _CurrentStderr:
    """Whatever `sys.stderr` is at the moment of writing (pytest swaps it per test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def prefect_console_follows_stderr():
    """Prefect's console handler keeps the stderr it was built with; built under one test's capture, it would write
    to that closed stream in every later test (a '--- Logging error ---' traceback in their captured stderr)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        handler.stream = handler.console.file = _CurrentStderr()
    yield


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A Prefect test server for the whole session (~15 s to start), with results kept out of ~/.prefect.

    PREFECT_API_URL is exported too, so that the CLI (`ensure_api`) uses it instead of starting a server.
    """
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(results)}):
        with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as patch:
            from prefect.settings import PREFECT_API_URL

            patch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
            yield PREFECT_API_URL.value()


@pytest.fixture
def demo_source(tmp_path) -> Path:
    """A 3-shard folder of parquet files (36 documents of CPython's docs, fineweb-edu's columns)."""
    return write_demo_source(tmp_path / "source" / "demo", n_docs=36, n_shards=3)


@pytest.fixture
def run_config_for(tmp_path):
    """Build a RunConfig over `tmp_path/data` with small chunks."""

    def build(source: Path | None = None, **overrides):
        params = dict(source=str(source) if source else None, name=None if source else "demo", data_dir=str(tmp_path / "data"), max_tokens=64)
        params.update(overrides)
        return build_run_config(**params)

    return build


def write_arrow_shard(path: Path, rows: list[dict]) -> Path:
    """Write rows as an Arrow IPC stream file (the format `save_to_disk` writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Write rows as a parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def demo_documents() -> list[dict]:
    """Twenty real documents with fineweb-edu's columns."""
    return build_documents(20, seed=1)


# whoami answers of other shapes, by token: an app's token (its name is the app's), fields the Hub sends as null.
WHOAMI_ODD_ANSWERS = {
    "hf_app": {"type": "app", "name": "my-app", "scope": {"entities": [{"name": "me"}]}, "auth": {"type": "access_token", "accessToken": {"role": "fineGrained"}}},
    "hf_nulls": {"type": "user", "name": "me", "orgs": None, "auth": None},
}


class _HubAPIDouble(BaseHTTPRequestHandler):
    """A test double of the Hugging Face Hub API calls the up-front checks make (a dataset's info, its access check,
    whoami), not the Hub: `org/public` is there; `org/gated` is gated (its info answers, as the Hub's does; its access
    check refuses); `org/busy` answers 503; anything else is not found; the token `hf_bad` is refused, `hf_read` is
    read-only, any other is a write token of `me`, a member of `team`. `server.paths` lists the paths asked for."""

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        path = self.path.split("?")[0].removeprefix("/api/datasets/")
        repo_id = "/".join(path.split("/")[:2])
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token == "hf_bad":
            self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        elif path == "/api/whoami-v2" and token in WHOAMI_ODD_ANSWERS:
            self._answer(200, {}, WHOAMI_ODD_ANSWERS[token])
        elif path == "/api/whoami-v2" and token == "hf_proxy_page":
            self._answer(200, {"Content-Type": "text/html"}, raw=b"<html>sign in to the proxy</html>")
        elif path == "/api/whoami-v2":
            role = "read" if token == "hf_read" else "write"
            self._answer(200, {}, {"type": "user", "name": "me", "orgs": [{"name": "team"}], "auth": {"type": "access_token", "accessToken": {"role": role}}})
        elif repo_id == "org/busy":
            self._answer(503, {})
        elif repo_id in ("org/public", "org/gated") and path.endswith("/auth-check"):
            self._answer(403, {"X-Error-Code": "GatedRepo"}) if repo_id == "org/gated" else self._answer(200, {}, {})
        elif repo_id in ("org/public", "org/gated"):
            self._answer(200, {}, {"id": repo_id, "sha": "0" * 40, "private": False, "gated": "manual" if repo_id == "org/gated" else False, "tags": []})
        else:
            self._answer(404, {"X-Error-Code": "RepoNotFound"})

    def _answer(self, status: int, headers: dict[str, str], body: dict | None = None, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else json.dumps(body or {"error": "test double"}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(payload))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(autouse=True)
def _no_hub_schema_between_tests():
    """`hub_schema`'s answers are reused for a minute; a folder one test stood in for `org/x` must not answer for another."""
    yield
    from fineweb_modal import download

    download._hub_schemas.clear()


@pytest.fixture
def folder_as_hub_repo(monkeypatch) -> None:
    """A local folder stands in for a Hub repo (no Hub here): `load_dataset` is given the folder's path itself, not
    the `hf://datasets/...` path that makes it read the Hub only, and the Hub's access check (tested on its own
    against `hub_api`) answers that it can be read; the rest of the Hub path runs as it is."""
    from fineweb_modal import download

    monkeypatch.setattr(download, "hub_load_path", lambda repo_id: repo_id)
    monkeypatch.setattr(download, "hub_access_problem", lambda repo_id: None)
    _go_online(monkeypatch)  # as a Hub run is: the folder itself needs no network


def _go_online(monkeypatch) -> None:
    """Undo the suite's HF_HUB_OFFLINE=1 for one test, as both the Hub client and `datasets` read it."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_api(monkeypatch):
    """The Hub client pointed at a test double of the Hub's dataset-info API on 127.0.0.1 (online mode for the test);
    yields the double's server (`.paths`: what was asked)."""
    import huggingface_hub.constants

    from fineweb_modal import download

    double = ThreadingHTTPServer(("127.0.0.1", 0), _HubAPIDouble)
    double.paths = []
    threading.Thread(target=double.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{double.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    _go_online(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(download, "_hub_answers", {})  # no answer from another test's double
    yield double
    double.shutdown()
    double.server_close()
