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
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.client import ServiceClient
from services.processes import HOST, Child, ChildError, project_env, start

SERVER_DIR = "prefect-server"
DATABASE_VARIABLES = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


class ServerError(RuntimeError):
    """The Prefect server did not start (the message carries the end of its log)."""


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
    """The environment of ``distillery serve`` talking to the server at ``api_url``: this checkout's flows
    importable, installed or not (``project_env``)."""
    return project_env(environ, PREFECT_API_URL=api_url, DISTILLERY_HOME=str(home))


def start_server(home: Path, port: int, log: Path, environ: Mapping[str, str]) -> Child:
    """``prefect server start`` on ``HOST:port`` with ``server_env``, its output appended to ``log``."""
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port),
               "--analytics-off"]
    return start(command, name="prefect server", log=log, env=server_env(home, port, environ))


def wait_healthy(api_url: str, server: Child, timeout_s: float) -> float:
    """Poll ``<api_url>/health`` until it answers; returns the seconds waited. Raises ServerError."""
    api = ServiceClient(api_url)
    try:
        return server.wait_until(lambda: api.answers("/health"), timeout_s, what=f"answer {api_url}/health",
                                 interval_s=1.0)
    except ChildError as exc:
        raise ServerError(str(exc)) from None
    finally:
        api.close()


def stop(child: Child, timeout_s: float = 30) -> None:
    """Interrupt ``child`` (the graceful shutdown of Prefect's server, like a Ctrl+C), then kill what is
    left of it after ``timeout_s``."""
    child.stop(timeout_s, signum=signal.SIGINT)


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
    processes: list[Child] = []
    try:
        processes.append(start_server(home, port, log, os.environ))
        print(f"starting the Prefect server (log: {log}) ...", flush=True)
        waited = wait_healthy(api_url, processes[0], startup_timeout_s)
        print(f"Prefect server up after {waited:.0f} s: UI http://{HOST}:{port}  API {api_url}", flush=True)
        serve = [sys.executable, "-m", "flows.cli", "serve", *serve_args, *(["--pool", pool] if pool else [])]
        processes.append(start(serve, name="distillery serve", env=client_env(home, api_url, os.environ)))
        if pool:
            if processes[-1].process.wait() != 0:
                return processes[-1].process.returncode
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


def wait_first(children: list[Child]) -> int:
    """Block until one of ``children`` exits; its exit code."""
    while True:
        for child in children:
            if child.process.poll() is not None:
                return child.process.returncode
        time.sleep(1)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_argv(config: Path | None, overrides: list[str], no_schedule: bool) -> list[str]:
    """``distillery serve`` options that reproduce these ``distillery server`` options."""
    argv = ["--config", str(config.resolve())] if config else []
    argv += [f"--set={assignment}" for assignment in overrides]
    return argv + (["--no-schedule"] if no_schedule else [])
