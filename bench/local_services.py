"""A cluster's services as separate processes on this machine's loopback interface, for the one-machine
rehearsal of docs/scale-out.md (``bench/rehearse_scale_out.py``), the benchmarks and the tests:

- :func:`postgres`: a throw-away PostgreSQL cluster (Debian's ``postgresql`` package: ``initdb`` +
  ``pg_ctl``, run as the ``postgres`` user when we are root), in a temporary folder, on 127.0.0.1 only;
- :func:`prefect_server`: ``prefect server start`` (SQLite under the artifact root, or ``database_url``);
- :func:`dask_cluster`: ``dask scheduler`` and N ``dask worker`` processes;
- :func:`prefect_workers`: N ``prefect worker start --type process`` processes polling one work pool.

Each is a context manager that stops what it started (and deletes the PostgreSQL folder) on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.server import start_server, wait_healthy
from services.client import NoAnswer, Refused, ServiceClient
from services.processes import HOST, PROJECT_ROOT, Child, free_port, port_open, project_env, start, tail


def start_service(command: list[str], log: Path, env: Mapping[str, str] | None = None) -> Child:
    """Start ``command`` in this checkout, in a session of its own (so ``stop`` reaches every process it
    starts), output to ``log``."""
    return start(command, name=" ".join(Path(part).name for part in command[:4]), log=log, env=env,
                 new_session=True, cwd=PROJECT_ROOT)


def stop(child: Child, timeout_s: float = 30) -> None:
    """SIGTERM ``child`` and everything it started, SIGKILL whatever is left after ``timeout_s``."""
    child.stop(timeout_s)


# ----------------------------------------------------------------------------- PostgreSQL

@dataclass(frozen=True)
class Postgres:
    """A running throw-away cluster: ``url`` is what Prefect's database setting takes."""

    port: int
    database: str
    user: str

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@{HOST}:{self.port}/{self.database}"


def postgres_bin() -> Path | None:
    """The folder with ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH), or None without PostgreSQL."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres(database: str = "prefect", user: str = "prefect", timeout_s: float = 120) -> Iterator[Postgres]:
    """Start a PostgreSQL cluster in a new temporary folder on 127.0.0.1 (trust auth: loopback, test data
    only); stop it and delete the folder on exit. PostgreSQL refuses to run as root, so as root the
    server runs as the ``postgres`` user that Debian's package creates."""
    binaries = postgres_bin()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="distillery-postgres-"))
    data, log, port = folder / "data", folder / "server.log", free_port()
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")

    try:
        run = [*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", user, "--auth=trust",
               "--encoding=UTF8", "--no-sync"]
        subprocess.run(run, check=True, capture_output=True, timeout=timeout_s)
        options = f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories='{folder}' -c fsync=off"
        subprocess.run([*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                        "-w", "-t", str(int(timeout_s)), "start"], check=True, capture_output=True)
        subprocess.run([*as_postgres, str(binaries / "createdb"), "-h", HOST, "-p", str(port), "-U", user,
                        database], check=True, capture_output=True, timeout=timeout_s)
        yield Postgres(port, database, user)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(f"{' '.join(error.cmd)} failed: {error.stderr.decode(errors='replace')}\n"
                           + "\n".join(tail(log, 30))) from error
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                            "stop"], check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- Prefect server

@contextmanager
def prefect_server(home: Path, logs: Path, database_url: str | None = None,
                   timeout_s: float = 300) -> Iterator[str]:
    """``prefect server start`` on a free loopback port, home and SQLite database under ``home`` (or
    the PostgreSQL of ``database_url``); yields its API URL once ``/api/health`` answers."""
    port = free_port()
    environ = project_env(**({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {}))
    (home / "prefect-server").mkdir(parents=True, exist_ok=True)
    server = start_server(home, port, logs / "prefect-server.log", environ)
    try:
        api_url = f"http://{HOST}:{port}/api"
        wait_healthy(api_url, server, timeout_s)
        yield api_url
    finally:
        stop(server)


# ----------------------------------------------------------------------------- Dask

@contextmanager
def dask_cluster(workers: int, logs: Path, env: Mapping[str, str] | None = None,
                 threads_per_worker: int = 1, timeout_s: float = 120) -> Iterator[str]:
    """A ``dask scheduler`` and ``workers`` single-process ``dask worker`` processes (each under a nanny
    that restarts it if it dies); yields the scheduler address ``tcp://127.0.0.1:PORT``."""
    port = free_port()
    address = f"tcp://{HOST}:{port}"
    env = project_env(**(env or {}))
    scheduler = [sys.executable, "-m", "dask", "scheduler", "--host", HOST, "--port", str(port), "--no-dashboard"]
    processes = [start_service(scheduler, logs / "dask-scheduler.log", env)]
    try:
        processes[0].wait_until(lambda: port_open(port), timeout_s, what=f"listen on {HOST}:{port}", interval_s=0.2)
        for index in range(workers):
            worker = [sys.executable, "-m", "dask", "worker", address, "--host", HOST, "--nthreads",
                      str(threads_per_worker), "--name", f"worker-{index}", "--no-dashboard"]
            processes.append(start_service(worker, logs / f"dask-worker-{index}.log", env))
        wait_for_workers(address, workers, timeout_s)
        yield address
    finally:
        for process in reversed(processes):
            stop(process)


def wait_for_workers(address: str, count: int, timeout_s: float) -> None:
    from distributed import Client

    with Client(address, timeout=timeout_s) as client:
        client.wait_for_workers(count, timeout=timeout_s)


# ----------------------------------------------------------------------------- Prefect workers

def registered(api_url: str, deployment: str, pool: str | None = None) -> bool:
    """True when the server at ``api_url`` answers and knows ``deployment`` ("flow/name"), in work pool
    ``pool`` if one is named (for polling while ``distillery server`` registers its deployments)."""
    api = ServiceClient(api_url, retries=0, timeout_s=10)
    try:
        found = api.get(f"/deployments/name/{deployment}")
    except (NoAnswer, Refused):  # not answering yet, or not registered yet (404)
        return False
    finally:
        api.close()
    return pool is None or found["work_pool_name"] == pool


@contextmanager
def prefect_workers(pool: str, count: int, api_url: str, logs: Path, limit: int = 1,
                    env: Mapping[str, str] | None = None) -> Iterator[list[Path]]:
    """``count`` process workers polling ``pool`` at ``api_url``, each running at most ``limit`` flow
    runs at a time; yields their log files (a worker logs the id of every run it submits)."""
    # A wide console: without a terminal, rich wraps log lines at 80 columns. INFO whatever the caller's
    # level (CI runs at WARNING): the run each worker began is an INFO line.
    env = project_env(PREFECT_API_URL=api_url, COLUMNS="500", PREFECT_LOGGING_LEVEL="INFO", **(env or {}))
    names = [f"{pool}-worker-{index}" for index in range(count)]
    processes = [start_service([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type",
                                "process", "--limit", str(limit), "--name", name], logs / f"{name}.log", env)
                 for name in names]
    try:
        yield [logs / f"{name}.log" for name in names]
    finally:
        for process in processes:
            stop(process)
