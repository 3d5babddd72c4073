"""Rehearse docs/scale-out.md on one machine: every service a separate process on loopback.

    python bench/rehearse_scale_out.py               # 2-3 minutes on 2 cores
    python bench/rehearse_scale_out.py --keep /tmp/rehearsal   # keep the artifacts and the logs

What the document puts on separate machines runs here side by side:

| on the cluster                                   | in the rehearsal                                          |
|--------------------------------------------------|-----------------------------------------------------------|
| PostgreSQL for the Prefect server                | a throw-away PostgreSQL (initdb + pg_ctl) on 127.0.0.1    |
| `distillery server --pool distillery`            | the same, on a free port                                  |
| `prefect worker start --type process` per node   | 2 process workers on the pool                             |
| 8-GPU FSDP training (`configs/accelerate/fsdp.yaml`) | `distillery` train run with `configs/accelerate/cpu_ddp.yaml` (2 CPU processes, gloo) |
| N Dask workers for evaluation shards             | `dask scheduler` + 2 `dask worker` processes              |
| 32B teacher on vLLM servers                      | the scripted teacher (replays fixed actions)              |
| FAISS IVF/PQ index shards over wiki-18           | a Flat index of 24 passages (20 vital articles, MiniLM)   |

Steps: start PostgreSQL, the server with the deployments registered in the pool, the 2 Prefect workers and
the Dask cluster; run the ``train`` deployment (index → rollouts → SFT data → LoRA with 2 training
processes) and then the ``evaluate`` deployment (the demo's methods and datasets on 4 questions, 4 shards
each, on the Dask workers; the trained adapter reused); print what they wrote (artifacts, training
processes, shards per Dask worker); stop everything. Exit code 0 when both runs completed.
Measured on the development machine (2 cores, shared): 2.3 min, 20 shards on each Dask worker.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.local_services import (
    dask_cluster,
    postgres,
    prefect_workers,
    registered,
    start_service,
    stop,
)
from flows.server import wait_healthy
from services.processes import PROJECT_ROOT, free_port, project_env

POOL = "distillery"
ACTION = 'Thought: I answer directly.\nCode:\n```py\nfinal_answer("42")\n```<end_code>'


def rehearsal_config(script: Path, address: str) -> dict:
    """The demo profile shrunk to minutes: scripted teacher and student, SmolLM2-135M trained for 2 steps
    by 2 processes, evaluation shards on the Dask cluster at ``address``."""
    from flows.config import PipelineConfig
    from flows.settings import load_config

    overrides = [
        "index.corpus.limit=20", "sandbox.workers=1",
        "teacher.kind=scripted", f"teacher.script={script}", "student.kind=scripted", f"student.script={script}",
        "rollout.limit=4", "rollout.num_parts=1", "sft.require_correct=false",
        "train.max_steps=2", "train.max_length=512", "train.per_device_batch_size=1", "train.grad_accum=1",
        "train.lora.r=8", "train.lora.alpha=16", "evaluate.limit=4", "evaluate.num_shards=4",
        "evaluate.runner=dask", f"evaluate.address={address}",
    ]
    return load_config(PipelineConfig, None, overrides).model_dump(mode="json")


def run(api_url: str, deployment: str, parameters: dict, timeout_s: float):
    """Run a deployment through the pool's workers and wait for its final state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        flow_run = run_deployment(f"{deployment}/distillery", parameters=parameters, timeout=timeout_s,
                                  poll_interval=3)
    print(f"  {deployment}: {flow_run.state.name} after {time.monotonic() - started:.0f} s "
          f"(flow run {flow_run.name})", flush=True)
    return flow_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="folder for the artifacts and logs (default: temporary)")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="distillery-rehearsal-"))
    home, logs = folder / "home", folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    script = folder / "script.json"
    script.write_text(json.dumps([ACTION] * 400))
    started = time.monotonic()
    ok = False
    with postgres() as database:
        print(f"PostgreSQL: {database.url}", flush=True)
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        server = start_service([sys.executable, "-m", "flows.cli", "--home", str(home), "server", "--port",
                                str(port), "--pool", POOL, "--no-schedule"], logs / "distillery-server.log",
                               project_env(PREFECT_API_DATABASE_CONNECTION_URL=database.url))
        try:
            wait_healthy(api_url, server, timeout_s=300)
            server.wait_until(lambda: registered(api_url, "evaluate/distillery", POOL), 300,
                              what=f"register the deployments in work pool {POOL!r}", interval_s=2.0)
            print(f"Prefect server: {api_url} (UI http://127.0.0.1:{port}), deployments in pool {POOL!r}",
                  flush=True)
            worker_env = {"PREFECT_API_URL": api_url, "DISTILLERY_HOME": str(home)}
            with prefect_workers(POOL, 2, api_url, logs, env={"PREFECT_WORKER_QUERY_SECONDS": "2"}), \
                    dask_cluster(2, logs, env=worker_env) as address:
                print(f"2 Prefect process workers on {POOL!r}; Dask scheduler {address} with 2 workers", flush=True)
                parameters = {"cfg": rehearsal_config(script, address), "home": str(home)}
                accelerate = str(PROJECT_ROOT / "configs" / "accelerate" / "cpu_ddp.yaml")
                train = run(api_url, "train", {**parameters, "accelerate_config": accelerate}, timeout_s=1800)
                evaluate = run(api_url, "evaluate", parameters, timeout_s=1800) if train.state.is_completed() else None
                ok = bool(evaluate and evaluate.state.is_completed())
        finally:
            stop(server)
    report(home, logs, ok, time.monotonic() - started)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


def report(home: Path, logs: Path, ok: bool, seconds: float) -> None:
    """What the rehearsal wrote: the artifacts, the adapter's training processes, the shards' workers."""
    from storage.store import ArtifactStore

    store = ArtifactStore(home)
    for manifest in store.list():
        print(f"  {manifest['stage']:<13} {manifest['id']}  rows {manifest.get('row_counts', {})}")
    adapters = store.list("train")
    if adapters:
        checkpoints = home / "train" / adapters[-1]["id"] / "checkpoints"
        ranks = {p.name for p in checkpoints.glob("step-*/random_states_*.pkl")}
        print(f"  adapter trained by {len(ranks)} processes ({adapters[-1]['metrics']['steps']} steps, "
              f"{adapters[-1]['metrics']['tokens']} tokens)")
    # A Dask worker logs each Prefect task run it executes.
    shards = [len(re.findall(r"Task run 'evaluate-shard-\w+' - Finished", (logs / f"dask-worker-{i}.log").read_text(
        errors="replace"))) for i in (0, 1)]
    print(f"  evaluation shards finished per Dask worker: {shards}")
    print(f"rehearsal {'passed' if ok else 'FAILED'} in {seconds / 60:.1f} min; logs in {logs}")


if __name__ == "__main__":
    raise SystemExit(main())
