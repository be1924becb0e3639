"""The Prefect user's day against a real `prefect server`: serve the deployments, run one, break a shard, resume it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import server

REPO = Path(__file__).resolve().parents[2]
SHARDS = ["data-00000-of-00003", "data-00001-of-00003", "data-00002-of-00003"]
STAGES = ("download", "chunk", "embed", "summarize")


@pytest.fixture
def real_server(tmp_path, monkeypatch):
    """A real Prefect server on a free loopback port, with its own PREFECT_HOME; stopped by pid afterwards."""
    monkeypatch.setenv("FINEWEB_MODAL_HOME", str(tmp_path / "home"))
    info = server.start(port=server._free_port(4300))
    yield info
    server.stop()


@pytest.fixture
def served(real_server, tmp_path):
    """`fineweb-modal serve` in a subprocess against that server; terminated by pid afterwards."""
    env = {
        **os.environ,
        "PREFECT_API_URL": real_server["api_url"],
        "PREFECT_HOME": str(tmp_path / "client-home"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield real_server, process, tmp_path / "serve.log"
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    log.close()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_served_pipeline_runs_reports_and_resumes_only_the_broken_shard(served, demo_source, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.flows.helpers import child_flow_run_ids, latest_artifact, task_runs_of

    info, process, log = served
    data_dir = str(tmp_path / "data")
    parameters = {"source": str(demo_source), "data_dir": data_dir, "max_tokens": 64}
    with temporary_settings({PREFECT_API_URL: info["api_url"]}):

        def deployments_ready():
            assert process.poll() is None, log.read_text()[-3000:]
            with get_client(sync_client=True) as client:
                deployments = client.read_deployments()
            return len(deployments) == 17 and deployments

        deployments = wait_for(deployments_ready, 120, "the 17 served deployments")
        with get_client(sync_client=True) as client:
            flow_names = {f.id: f.name for f in client.read_flows()}
        served_names = sorted(f"{flow_names[d.flow_id]}/{d.name}" for d in deployments)
        with_backend = ("pipeline", "download", "chunk", "embed", "summarize", "verify", "plan", "fetch")
        assert served_names == sorted([*(f"{f}/{b}" for f in with_backend for b in ("local", "modal")), "publish/local"]), "publish reads a local data dir"
        assert all(d.parameters["backend"] == d.name for d in deployments if flow_names[d.flow_id] != "publish")
        pipeline_local = next(d for d in deployments if flow_names[d.flow_id] == "pipeline" and d.name == "local")
        form = pipeline_local.parameter_openapi_schema["properties"]
        assert form["backend"]["enum"] == ["local", "modal"], "the UI's run form offers the choices"
        assert all(field.get("description") for field in form.values()), "and says what each field is"
        with pytest.raises(Exception, match="(?i)validation"):  # and the server refuses another value before any run starts
            run_deployment("pipeline/local", parameters={**parameters, "backend": "gpu"}, timeout=0)
        refused = run_deployment("pipeline/local", parameters={**parameters, "engine": "tei"}, timeout=300)
        assert refused.state.is_failed() and "needs `tei_url`" in refused.state.message, "the form's field, not the CLI's flag"

        run = run_deployment("pipeline/local", parameters=parameters, timeout=600)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        runs = task_runs_of(child_flow_run_ids(run.id), expected=len(STAGES) * len(SHARDS))
        assert sorted(r.name for r in runs) == sorted(f"{s}-{shard}" for s in STAGES for shard in SHARDS)
        assert all("tokens" in r.state.message and "$" in r.state.message for r in runs if not r.name.startswith("download"))
        table = json.loads(latest_artifact("embed-demo-shards").data)
        assert [r["shard"] for r in table] == SHARDS and all(r["tokens"] > 0 and r["modal estimate $"] > 0 for r in table)
        assert float(latest_artifact("chunk-demo-progress").data) == 100.0
        assert "3 of 3 shards succeeded" in latest_artifact("embed-demo-summary").data

        broken = demo_source / "data-00003-of-00003.jsonl"
        broken.write_text('{"text": "a fine first line"}\n{"text": oops')
        run = run_deployment("pipeline/local", parameters=parameters, timeout=600)
        assert run.state.is_failed() and "data-00003-of-00003" in run.state.message
        # A failed state's data is an exception, as Prefect's runner requires: no crash report in the serve log.
        assert "Unexpected result for failed state" not in log.read_text()

        broken.write_text('{"text": "a fine first line", "url": "u", "score": 3.0, "dump": "d"}\n{"text": "and a second", "url": "v", "score": 2.5, "dump": "d"}\n')
        run = run_deployment("pipeline/local", parameters=parameters, timeout=600)
        assert run.state.is_completed(), run.state.message
        runs = task_runs_of(child_flow_run_ids(run.id), expected=len(STAGES) * 4)
        messages = {r.name: r.state.message for r in runs}
        for stage in STAGES:
            assert not messages[f"{stage}-data-00003-of-00003"].startswith("skipped"), "the repaired shard ran"
            assert all(messages[f"{stage}-{shard}"].startswith("skipped: done earlier") for shard in SHARDS)

        # The work-pool way: the same flows as <flow>/local-worker and <flow>/modal-worker beside the served ones.
        env = {**os.environ, "PREFECT_API_URL": info["api_url"], "PREFECT_HOME": str(tmp_path / "client-home")}
        prefect = [str(Path(sys.executable).with_name("prefect"))]
        subprocess.run([*prefect, "work-pool", "create", "fineweb-modal", "--type", "process"], cwd=REPO, env=env, check=True, capture_output=True)
        deploy = subprocess.run(
            [*prefect, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], cwd=REPO, env=env, capture_output=True, text=True
        )
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        with get_client(sync_client=True) as client:
            worker_deployments = [d for d in client.read_deployments() if d.name.endswith("-worker")]
        assert sorted(f"{flow_names[d.flow_id]}/{d.name}" for d in worker_deployments) == sorted(
            [*(f"{f}/{b}-worker" for f in with_backend for b in ("local", "modal")), "publish/local-worker"]
        )
        assert all(d.work_pool_name == "fineweb-modal" for d in worker_deployments)
        assert all(d.parameters["backend"] == d.name.split("-")[0] for d in worker_deployments if flow_names[d.flow_id] != "publish")
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
