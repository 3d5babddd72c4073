"""Prefect on PostgreSQL: a throw-away PostgreSQL cluster on loopback (Debian's ``postgresql`` package),
``distillery server --pool`` against it, two ``process`` workers on the pool, and two deployment runs at
once that both complete, each on its own worker, and are visible in the server's API and in PostgreSQL.

Skipped when PostgreSQL is not installed, except under CI (``CI`` set), where ``.ci/run`` installs it
and a missing server is a failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest
from flows_fixtures import demo

from bench.local_services import (
    postgres,
    postgres_bin,
    prefect_workers,
    registered,
    start_service,
    stop,
)
from flows.deployments import DEPLOYMENT_NAME
from services.processes import free_port, project_env

POOL = "distillery-postgres"
if postgres_bin() is None and not os.environ.get("CI"):
    pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run installs it)",
                allow_module_level=True)


def completed_flow_runs_in_postgres(database) -> int:
    import asyncpg

    async def count() -> int:
        connection = await asyncpg.connect(host="127.0.0.1", port=database.port, user=database.user,
                                           database=database.database)
        try:
            return await connection.fetchval("select count(*) from flow_run where state_type = 'COMPLETED'")
        finally:
            await connection.close()

    return asyncio.run(count())


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.shares_cores
def test_two_concurrent_deployment_runs_on_two_workers_with_postgres(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home, logs, port = tmp_path / "home", tmp_path / "logs", free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    with postgres() as database:
        env = project_env(PREFECT_API_DATABASE_CONNECTION_URL=database.url)
        command = [sys.executable, "-m", "flows.cli", "--home", str(home), "server", "--port", str(port),
                   "--pool", POOL, "--no-schedule"]
        server = start_service(command, logs / "server.log", env)
        try:
            server.wait_until(lambda: registered(api_url, f"index/{DEPLOYMENT_NAME}", POOL), 420,
                              what=f"register the deployments in {POOL!r}", interval_s=2.0)
            # Workers poll every second (default 10 s), so that both runs start together.
            with prefect_workers(POOL, 2, api_url, logs, env={"PREFECT_WORKER_QUERY_SECONDS": "1"}) as worker_logs, \
                    temporary_settings(updates={PREFECT_API_URL: api_url}):
                # Two index builds of different sizes: two artifacts, so the runs share nothing but the server.
                runs = [run_deployment(f"index/{DEPLOYMENT_NAME}", timeout=0, parameters={
                    "cfg": demo(f"index.corpus.limit={limit}").model_dump(mode="json"), "home": str(home)})
                    for limit in (12, 16)]
                deadline = time.monotonic() + 900
                with get_client(sync_client=True) as client:
                    while time.monotonic() < deadline:
                        runs = [client.read_flow_run(run.id) for run in runs]
                        if all(run.state.is_final() for run in runs):
                            break
                        time.sleep(3)
                    listed = client.read_flow_runs()
                worker_text = [log.read_text(errors="replace") for log in worker_logs]
        finally:
            stop(server)
        assert all(run.state.is_completed() for run in runs), (
            [str(run.state) for run in runs], server.tail(60), worker_text)
        # The runs overlapped in time, and each worker ran one of them (each may run one at a time).
        first, second = runs
        assert first.start_time < second.end_time and second.start_time < first.end_time
        # (Both workers may try to take the same run first; the server lets one have it, the other aborts.)
        # (Whitespace collapsed: a console narrower than the line wraps it between words.)
        worker_text = [" ".join(text.split()) for text in worker_text]
        ran = [tuple(f"Beginning flow run '{run.name}'" in text for run in runs) for text in worker_text]
        assert sorted(ran) == [(False, True), (True, False)], ran
        assert {run.id for run in runs} <= {run.id for run in listed if run.state.is_completed()}
        assert completed_flow_runs_in_postgres(database) >= 2
    built = sorted(home.glob("index/*/manifest.json"))
    assert len(built) == 2
