"""A local `prefect server` on 127.0.0.1 (SQLite under a state dir), started in the background and found again.

Ephemeral Prefect loses task-run records when the process exits, so runs the UI must show need a real server.
Nothing here imports prefect: the API URL has to be in the environment before prefect reads its settings.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORT = 4200
HOST = "127.0.0.1"


def state_dir() -> Path:
    """Where the server's SQLite database, log and pid file live (`FINEWEB_MODAL_HOME`, default ~/.fineweb-modal)."""
    return Path(os.environ.get("FINEWEB_MODAL_HOME", Path.home() / ".fineweb-modal")).expanduser()


def _server_file() -> Path:
    return state_dir() / "server.json"


def _health_status(api_url: str, timeout: float) -> int | None:
    """The HTTP status of a Prefect API's health check; None when nothing answers (0: a TLS handshake that failed
    here, where Prefect itself may trust another CA — still an answer)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:  # e.g. Prefect Cloud's 401 without a key
        return exc.code
    except urllib.error.URLError as exc:
        return 0 if isinstance(exc.reason, ssl.SSLError) else None
    except (OSError, ValueError):  # refused, no such host, timed out; not a URL at all
        return None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check."""
    return _health_status(api_url, timeout) == 200


def reachable(api_url: str, timeout: float = 5.0) -> bool:
    """Whether anything answers at a Prefect API's address (an HTTP error or a TLS failure here is an answer)."""
    return _health_status(api_url, timeout) is not None


def _free_port(preferred: int) -> int:
    with socket.socket() as probe:
        if probe.connect_ex((HOST, preferred)) != 0:
            return preferred
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status() -> dict | None:
    """The server this tool started, if it is still running and healthy: {pid, port, api_url, ui_url, log}."""
    path = _server_file()
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if _pid_alive(info["pid"]) and healthy(info["api_url"]):
        return info
    return None


def start(port: int = DEFAULT_PORT, host: str = HOST, timeout: float = 120.0) -> dict:
    """Start `prefect server` in the background (or find the one already running) and wait until it is healthy."""
    running = status()
    if running:
        return running
    port = _free_port(port)
    home = state_dir()
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        # The UI calls this address from the browser; without it a UI on another port than 4200 calls 4200.
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log_path = home / "server.log"
    prefect_bin = Path(sys.executable).with_name("prefect")
    command = [str(prefect_bin) if prefect_bin.exists() else "prefect", "server", "start", "--host", host, "--port", str(port)]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    info = {"pid": process.pid, "port": port, "api_url": api_url, "ui_url": f"http://{host}:{port}", "log": str(log_path)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode}; see {log_path}")
        if healthy(api_url):
            _server_file().write_text(json.dumps(info))
            return info
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"prefect server did not become healthy within {timeout:.0f} s; see {log_path}")


def stop() -> bool:
    """Stop the server this tool started; True if one was running."""
    path = _server_file()
    if not path.is_file():
        return False
    info = json.loads(path.read_text())
    path.unlink()
    if not _pid_alive(info["pid"]):
        return False
    try:
        os.killpg(info["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return False
    for _ in range(40):
        if not _pid_alive(info["pid"]):
            break
        time.sleep(0.25)
    else:
        os.killpg(info["pid"], signal.SIGKILL)
    return True


def ensure_api() -> tuple[str, bool]:
    """Point this process at a Prefect API: `PREFECT_API_URL` if set, else a local server (started if needed).

    Returns the API URL and whether this call started the server.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], False
    was_running = status() is not None
    info = start()
    os.environ["PREFECT_API_URL"] = info["api_url"]
    return info["api_url"], not was_running
