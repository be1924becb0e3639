"""Credentials come from the environment (or secrets) and never reach a log, an artifact, a state message, a
flow run's parameters or an output file."""

from __future__ import annotations

import logging
import shutil

from prefect.client.orchestration import get_client

from tests.tei_double import TEITestDouble

SECRETS = {
    "HF_TOKEN": "hf_FakeToken0123456789abcdefSECRET",
    "HUGGING_FACE_HUB_TOKEN": "hf_FakeToken0123456789abcdefSECRET",
    "MODAL_TOKEN_ID": "ak-FakeModalId0123456789SECRET",
    "MODAL_TOKEN_SECRET": "as-FakeModalSecret0123456789SECRET",
    "TEI_API_KEY": "tei-FakeApiKey0123456789SECRET",
}


def _everything_prefect_kept() -> str:
    """Every log line, artifact, flow/task run parameter, name and state message on the test server, as text."""
    parts = []
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_logs(limit=200, offset=offset):
            parts += [log.message for log in batch]
            offset += len(batch)
        parts += [f"{a.key} {a.description} {a.data}" for a in client.read_artifacts(limit=200)]
        for run in client.read_flow_runs(limit=200):
            parts += [run.name, str(run.parameters), str(run.state.message if run.state else "")]
        for run in client.read_task_runs(limit=200):
            parts += [run.name, str(run.state.message if run.state else ""), str(run.task_inputs)]
    return "\n".join(parts)


def test_fake_credentials_appear_nowhere(prefect_api, demo_source, tmp_path, monkeypatch, capfd, caplog):
    from flows.cli import main

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    tei = TEITestDouble(api_key=SECRETS["TEI_API_KEY"]).start()
    data = tmp_path / "data"
    try:
        code = main(["run", "--source", str(demo_source), "--data-dir", str(data), "--max-tokens", "64", "--engine", "tei", "--tei-url", tei.url])
        assert code == 0
        assert set(tei.metrics.auth_headers) == {f"Bearer {SECRETS['TEI_API_KEY']}"}, "the key did reach TEI, as a bearer token"
        monkeypatch.setenv("TEI_API_KEY", "tei-WrongKey-SECRET")  # a rejected key must not be echoed either
        for embedded in data.glob("*MiniLM*"):
            shutil.rmtree(embedded)  # embed again, now with the wrong key
        refused = main(["run", "--name", demo_source.name, "--stages", "embed", "--data-dir", str(data), "--engine", "tei", "--tei-url", tei.url, "--max-tokens", "64"])
        assert refused == 2, "a refused key is bad config, found before any shard runs"
    finally:
        tei.stop()
    captured = capfd.readouterr()
    places = {
        "stdout/stderr": captured.out + captured.err,
        "python logs": caplog.text,
        "prefect (logs, artifacts, parameters, state messages)": _everything_prefect_kept(),
    }
    files = [p for p in data.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for secret in {*SECRETS.values(), "tei-WrongKey-SECRET"}:
        for where, text in places.items():
            assert secret not in text, f"{secret} leaked into {where}"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"
    assert "401" in captured.out + captured.err or "Unauthorized" in captured.out + captured.err, "the rejection itself was reported"
