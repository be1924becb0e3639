"""The `fineweb-modal` CLI: exit 2 for bad usage or config with nothing run, 0 when all shards pass, 1 when some fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fineweb_modal.models import DEFAULT_MODEL, resolve_model_path
from flows import server
from flows.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--name", "d", "--stages", "chunk", "--overlap", "0.9"], "overlap=0.9 is outside"),
        (["run", "--name", "d", "--stages", "chunk,embedd"], "unknown stage"),
        (["run", "--name", "d", "--stages", "chunk", "--max-tokens", "9999"], "at most 256"),
        (["run", "--name", "d", "--stages", "chunk", "--model", "/nowhere/model"], "unknown model"),
        (["run", "--stages", "download"], "download stage needs --source"),
        (["run", "--name", "d", "--stages", "chunk", "--shards", ""], "shards='' names no shard: leave it out to run every shard"),
        (["verify", "--name", "d", "--shards", ","], "names no shard"),
        (["run", "--name", "d", "--stages", "embed", "--engine", "tei", "--tei-url", "https://me:s3cr3t@tei.example:8080"], "must carry no credentials"),
        (["run", "--name", "d", "--stages", "embed", "--engine", "tei", "--tei-url", "https://tei.example/?key=s3cr3t"], "must carry no credentials"),
        (["run", "--name", "d", "--stages", "chunk", "--backend", "modal", "--model", str(resolve_model_path(DEFAULT_MODEL))], "which Modal's containers do not have"),
    ],
)
def test_bad_config_exits_2_before_anything_runs(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "s3cr3t" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_local_folder_or_a_file_as_data_dir_exits_2_at_once(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "src").mkdir()
    assert main(["run", "--source", "src/nope", "--stages", "download"]) == 2
    assert "for the Hub dataset write hf://src/nope" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["run", "--name", "d", "--stages", "chunk", "--data-dir", "afile"]) == 2
    assert "data_dir 'afile' is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"], "nothing written"


def test_modal_backend_without_token_exits_2(capsys, monkeypatch, tmp_path):
    import modal.config

    monkeypatch.setattr(modal.config.config, "get", lambda key, *a, **k: None)
    assert main(["run", "--name", "d", "--stages", "chunk", "--backend", "modal", "--data-dir", str(tmp_path)]) == 2
    assert "modal token new" in capsys.readouterr().err


def test_bad_usage_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--backend", "cloud"])
    assert exit_info.value.code == 2


def test_run_exits_0_then_1_when_a_shard_fails(prefect_api, demo_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    argv = ["run", "--source", str(demo_source), "--data-dir", str(tmp_path / "data"), "--stages", "download,chunk", "--max-tokens", "64"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "chunk      3 ok (0 skipped), 0 failed" in out
    assert re.search(r"chunk      3 ok .* s · ≈\$\S+ on Modal · ", out), "what the stage would cost on Modal"
    (demo_source / "data-00003-of-00003.jsonl").write_text('{"text": "fine"}\n{"text": broken')
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "download   3 ok (3 skipped), 1 failed" in captured.out and "data-00003-of-00003" in captured.err
    # The command it suggests reruns the failed stage and the stages after it, from any folder.
    assert f"--data-dir {(tmp_path / 'data').resolve()} --split train --stages download,chunk" in captured.err

    assert main(["status", "--data-dir", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "failed  data-00003-of-00003: BadDataError" in out
    header, download_row = out.splitlines()[0].split(), next(line for line in out.splitlines() if " download " in line).split()
    assert header[-5:] == ["docs", "chunks", "tokens", "seconds", "cost"] and download_row[7:9] == ["36", "0"], "download counts docs (36), not tokens"
    assert main(["status", "--data-dir", str(tmp_path / "data"), "--json"]) == 1
    import json

    by_stage = {s["stage"]: s for s in json.loads(capsys.readouterr().out)}
    assert by_stage["download"]["counts"] == {"done": 3, "failed": 1, "missing": 0, "stale": 0}
    # The shard that never downloaded is missing downstream: every stage's counts add up to the dataset's shards.
    assert by_stage["chunk"]["counts"] == {"done": 3, "failed": 0, "missing": 1, "stale": 0} and by_stage["chunk"]["tokens"] > 0

    # A misspelt data dir or name finds nothing: that must not pass a script's check.
    assert main(["status", "--data-dir", str(tmp_path / "no-such-dir"), "--json"]) == 1
    assert main(["verify", "--name", "no-such-name", "--data-dir", str(tmp_path / "data"), "--max-tokens", "64"]) == 1
    assert "verify: no embedded shards of no-such-name" in capsys.readouterr().out


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # /proc stores each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_a_server_started_on_another_port_says_why(monkeypatch, capsys):
    from flows import cli

    info = {"pid": 1, "port": server.DEFAULT_PORT + 7, "api_url": "http://127.0.0.1:4207/api", "ui_url": "http://127.0.0.1:4207", "log": "server.log"}
    monkeypatch.setattr(server, "ensure_api", lambda: (info["api_url"], True))
    monkeypatch.setattr(server, "status", lambda: info)
    cli._connect()
    assert f"UI http://127.0.0.1:4207 (port {server.DEFAULT_PORT} is taken)" in capsys.readouterr().out
    monkeypatch.setattr(server, "status", lambda: {**info, "port": server.DEFAULT_PORT})
    cli._connect()
    assert "is taken" not in capsys.readouterr().out


def test_a_reader_that_stops_early_gets_no_traceback(demo_source, run_config_for):
    """`fineweb-modal status --json | head -1`: the pipe closes under the output."""
    import os
    import subprocess
    import sys

    from fineweb_modal.shards import ShardJob, run_shard

    run = run_config_for(demo_source)
    for source in sorted(demo_source.glob("*.parquet")):
        run_shard(ShardJob(stage="download", shard=source.stem, run=run, source_file=str(source)))
    command = [sys.executable, "-m", "flows.cli", "status", "--data-dir", str(run.dataset.data_dir), "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line
    stderr = process.communicate(timeout=120)[1].decode()
    assert process.returncode == 1 and "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_local_server_starts_answers_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEWEB_MODAL_HOME", str(tmp_path))
    info = server.start(port=server._free_port(4290))
    try:
        assert info["api_url"].startswith("http://127.0.0.1:") and server.healthy(info["api_url"])
        assert listening_addresses(info["port"]) == {"127.0.0.1"}, "bound to the loopback interface only"
        assert server.status()["pid"] == info["pid"]
        assert server.start()["pid"] == info["pid"], "a second start finds the running server"
    finally:
        assert server.stop()
    assert server.status() is None and not server.healthy(info["api_url"], timeout=0.5)


def test_prefect_is_first_imported_after_the_cli_has_set_its_api_url(demo_source, tmp_path):
    """Prefect fixes its settings when first imported: imported before `ensure_api` sets PREFECT_API_URL, the run
    would go to a temporary server whose records are lost. Checked in a fresh interpreter (pytest has Prefect loaded)."""
    import os
    import subprocess
    import sys

    probe = f"""
import sys
from flows import cli, server
seen = {{}}
def ensure_api():
    seen["prefect imported"] = "prefect" in sys.modules
    raise SystemExit(7)
server.ensure_api = ensure_api
try:
    cli.main(["run", "--source", {str(demo_source)!r}, "--data-dir", {str(tmp_path / "data")!r}, "--stages", "download"])
except SystemExit as stop:
    assert stop.code == 7, stop.code
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "{'prefect imported': False}", done.stdout + done.stderr


def test_a_prefect_api_url_where_nothing_answers_is_refused_with_what_to_do(tmp_path, monkeypatch, capsys):
    port = server._free_port(4990)
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    assert main(["verify", "--name", "demo", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no Prefect API answers at PREFECT_API_URL=http://127.0.0.1:{port}/api" in err and "server start" in err
    assert "Traceback" not in err
