"""A real Prefect server for distillery, with the deployments served against it. CLI: ``distillery server``.

Starts ``prefect server start`` on 127.0.0.1 with its home and SQLite database under
``<artifact root>/prefect-server/`` (or the database in ``PREFECT_API_DATABASE_CONNECTION_URL``, e.g.
PostgreSQL for several workers), waits until ``/api/health`` answers, then runs ``distillery serve``
against it in a child process. Ctrl+C or SIGTERM stops both; the server keeps its database, so runs,
artifacts and schedules survive a restart.

    distillery server --port 4200          # UI at http://127.0.0.1:4200

With ``--pool NAME`` the deployments are registered in the process work pool NAME instead of being
served, and the server runs on: ``prefect worker start --pool NAME --type process`` processes (on this
machine or others) run the flows. Several workers need a database that takes concurrent writers:
PostgreSQL (``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://…``), see docs/scale-out.md.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

HOST = "127.0.0.1"
SERVER_DIR = "prefect-server"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATABASE_VARIABLES = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


class ServerError(RuntimeError):
    """The Prefect server did not start (the message carries the end of its log)."""


def free_port() -> int:
    """A TCP port on the loopback interface that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_env(home: Path, port: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of ``prefect server start``: home and SQLite database under ``home``.

    A database URL already in ``environ`` (PostgreSQL for multi-worker setups) is kept, and so is a
    ``PREFECT_UI_API_URL`` (a server behind a proxy).
    """
    folder = home / SERVER_DIR
    env = dict(environ)
    env["PREFECT_HOME"] = str(folder)
    # The UI asks the browser to call PREFECT_UI_API_URL, which defaults to port 4200 whatever --port says.
    env.setdefault("PREFECT_UI_API_URL", f"http://{HOST}:{port}/api")
    if not any(env.get(name) for name in DATABASE_VARIABLES):
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{folder / 'prefect.db'}"
    return env


def client_env(home: Path, api_url: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of ``distillery serve`` talking to the server at ``api_url``."""
    env = dict(environ)
    env["PREFECT_API_URL"] = api_url
    env["DISTILLERY_HOME"] = str(home)
    # The child must import this checkout's flows, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), environ.get("PYTHONPATH", "")) if p)
    return env


def wait_healthy(api_url: str, server: subprocess.Popen, log: Path, timeout_s: float) -> float:
    """Poll ``<api_url>/health`` until it answers; returns the seconds waited. Raises ServerError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.poll() is not None:
            raise ServerError(f"prefect server exited with code {server.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise ServerError(f"prefect server did not answer {api_url}/health within {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def stop(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Interrupt ``process`` (graceful shutdown), then kill it if it is still there after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_server(home: Path, port: int, serve_args: list[str], startup_timeout_s: float = 300,
               pool: str | None = None) -> int:
    """Start the server, serve the deployments against it, and stop both when either ends or on a signal.

    ``serve_args`` are the ``distillery serve`` options (``--config``, ``--set``, ``--no-schedule``).
    With ``pool`` the deployments are registered in that process work pool instead (``distillery serve
    --pool``, which exits), and only the server keeps running.
    Returns the exit code of whichever process ended first (0 after Ctrl+C/SIGTERM).
    """
    home = home.resolve()
    (home / SERVER_DIR).mkdir(parents=True, exist_ok=True)
    log = home / SERVER_DIR / "server.log"
    api_url = f"http://{HOST}:{port}/api"
    # Children stay in our process group, so whoever kills the group (a terminal, a test) stops all.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    processes: list[subprocess.Popen] = []
    try:
        with open(log, "ab") as log_file:
            command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port),
                       "--analytics-off"]
            processes.append(subprocess.Popen(command, env=server_env(home, port, os.environ), stdout=log_file,
                                              stderr=subprocess.STDOUT))
        print(f"starting the Prefect server (log: {log}) ...", flush=True)
        waited = wait_healthy(api_url, processes[0], log, startup_timeout_s)
        print(f"Prefect server up after {waited:.0f} s: UI http://{HOST}:{port}  API {api_url}", flush=True)
        serve = [sys.executable, "-m", "flows.cli", "serve", *serve_args, *(["--pool", pool] if pool else [])]
        processes.append(subprocess.Popen(serve, env=client_env(home, api_url, os.environ)))
        if pool:
            if processes[-1].wait() != 0:
                return processes[-1].returncode
            print(f"workers run the flows: PREFECT_API_URL={api_url} prefect worker start --pool {pool} "
                  "--type process", flush=True)
            return wait_first(processes[:1])
        return wait_first(processes)
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            stop(process)
        signal.signal(signal.SIGTERM, previous)


def wait_first(processes: list[subprocess.Popen]) -> int:
    """Block until one of ``processes`` exits; its exit code."""
    while True:
        for process in processes:
            if process.poll() is not None:
                return process.returncode
        time.sleep(1)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_argv(config: Path | None, overrides: list[str], no_schedule: bool) -> list[str]:
    """``distillery serve`` options that reproduce these ``distillery server`` options."""
    argv = ["--config", str(config.resolve())] if config else []
    argv += [f"--set={assignment}" for assignment in overrides]
    return argv + (["--no-schedule"] if no_schedule else [])
