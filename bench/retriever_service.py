"""Benchmark the retrieval service over HTTP: latency alone, under 200 concurrent clients, beside a large
request, and the cost of oversized requests; prints the figures and ratios measured in one run.

Each service runs in a subprocess started from a checkout: this one with its default limits, this one with
limits raised so that it accepts the large request (``--raised``: what chunking alone does), and with
``--before PATH`` another checkout's (the code before a change), as it was and with OpenMP threads
waiting passively (``OMP_WAIT_POLICY=PASSIVE``, which ``distillery retriever serve`` now sets and this
checkout's servers get), to tell that change from the batching's. Each scenario runs on every server in
turn, so that a shared machine's changing load weighs on all alike. The index is the full vital-articles
index that ``bench/retrieval.py`` builds (MiniLM, Flat).

1. One client: ``--singles`` one-query requests (topk 3) one after another: p50/p95.
2. ``--clients`` concurrent clients with one query each, sent at once: p50/p95 of their latencies and the
   wall time of all; then the same queries as one request: the ratio of the two wall times (target: ~1,
   i.e. the service batches concurrent requests as if they were one).
   Scenarios 1–3 run ``--rounds`` times on each server; the summary gives medians.
3. A large request (``--big-queries`` × ``--big-topk``) and, 0.5 s after it starts, one-query requests one
   after another while it runs: their p50/p95 (target < 1 s), the large request's status, time and
   response size, and the server's peak RSS. Then the largest request the default limits allow
   (1,024 queries × topk 16) the same way. A server whose limits refuse the large request answers at once.
4. Oversized requests: a body of ``--oversized-mb`` MB holding one query: status, time, server CPU time.

    python bench/retriever_service.py --before /work/main --json results/bench/retriever_service.json
    python bench/retriever_service.py --raised '' --clients 50 --big-queries 32   # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

# Run as a script from anywhere: the project root holds the packages.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.files import cache_dir
from services.processes import free_port

DEFAULT_INDEX_DIR = cache_dir() / "bench" / "vital-articles"
# The third server: this checkout with limits that accept the large request (the chunking alone).
RAISED = {"max_queries": 4096, "max_passages": 4_096_000, "max_response_bytes": 4 << 30, "max_body_bytes": 64 << 20}
# Started in the checkout's directory, so that its own ``retrieval`` package is imported.
SERVER = """
import inspect, json, sys
from pathlib import Path
from retrieval.index import load_index
from retrieval.service import serve
index_dir, port, limits = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
kwargs = {}
if "cfg" in inspect.signature(serve).parameters:
    from retrieval.service import ServiceConfig
    kwargs["cfg"] = ServiceConfig(**limits)
elif limits:
    sys.exit("this checkout's service has no configurable limits")
serve(load_index(Path(index_dir), "minilm-l6-v2", device="cpu"), port=port, **kwargs)
"""


class Server:
    """The service of ``checkout`` in a subprocess, on a free port; its peak RSS is sampled while ``watch``ing."""

    def __init__(self, checkout: Path, index_dir: Path, limits: dict, log: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(checkout), **env}
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(index_dir), str(self.port), json.dumps(limits)],
            cwd=checkout, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        )
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within 300 s; see {log}")
            time.sleep(0.5)
        self._peak = 0
        self._watching = threading.Event()

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def watch(self) -> None:
        """Start sampling the RSS every 50 ms (until ``peak_mb``)."""
        self._peak = self.rss_mb()
        self._watching.set()

        def sample() -> None:
            while self._watching.is_set():
                self._peak = max(self._peak, self.rss_mb())
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()

    def peak_mb(self) -> float:
        self._watching.clear()
        return max(self._peak, self.rss_mb())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def post(url: str, queries: list[str], topk: int = 3, timeout: float = 1800) -> tuple[int, float, int]:
    """(status, seconds, response bytes) of one /retrieve request."""
    started = time.perf_counter()
    response = httpx.post(f"{url}/retrieve", json={"queries": queries, "topk": topk}, timeout=timeout)
    return response.status_code, time.perf_counter() - started, len(response.content)


def percentiles(seconds: list[float]) -> dict:
    return {"p50_ms": 1e3 * float(np.percentile(seconds, 50)), "p95_ms": 1e3 * float(np.percentile(seconds, 95)),
            "n": len(seconds)}


def one_client(url: str, questions: list[str], count: int) -> dict:
    latencies = []
    for question in questions[:count]:
        status, seconds, _ = post(url, [question])
        assert status == 200, status
        latencies.append(seconds)
    return percentiles(latencies)


def concurrent_clients(url: str, questions: list[str], clients: int) -> dict:
    """``clients`` one-query requests at once, vs the same queries in one request."""

    async def one(client: httpx.AsyncClient, question: str, started: float) -> float:
        response = await client.post(f"{url}/retrieve", json={"queries": [question], "topk": 3})
        assert response.status_code == 200, response.status_code
        return time.perf_counter() - started

    async def all_at_once() -> tuple[list[float], float]:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(limits=limits, timeout=1800) as client:
            started = time.perf_counter()
            latencies = await asyncio.gather(*(one(client, q, started) for q in questions[:clients]))
            return list(latencies), time.perf_counter() - started

    latencies, wall = asyncio.run(all_at_once())
    status, batch_wall, _ = post(url, questions[:clients])
    assert status == 200, status
    return {**percentiles(latencies), "wall_s": wall, "one_batch_wall_s": batch_wall,
            "ratio_concurrent_to_one_batch": wall / batch_wall}


def beside_large(server: Server, questions: list[str], big_queries: int, topk: int, probe_limit_s: float) -> dict:
    """One-query probes, one after another, while a large request runs; the server's peak RSS meanwhile."""
    rss_before = server.rss_mb()
    server.watch()
    big: dict = {}

    def send_big() -> None:
        status, seconds, size = post(server.url, questions[:big_queries], topk)
        big.update(status=status, seconds=seconds, response_mb=size / 2**20)

    thread = threading.Thread(target=send_big)
    thread.start()
    time.sleep(0.5)
    probes, started = [], time.perf_counter()
    while thread.is_alive() and time.perf_counter() - started < probe_limit_s:
        status, seconds, _ = post(server.url, [questions[-1 - len(probes)]])
        assert status == 200, status
        probes.append(seconds)
    thread.join()
    result = {"queries": big_queries, "topk": topk, **big, "rss_before_mb": rss_before, "peak_rss_mb": server.peak_mb()}
    if probes:
        result["probes"] = percentiles(probes)
        result["probes"]["max_ms"] = 1e3 * max(probes)
    return result


def oversized(server: Server, megabytes: float) -> dict:
    cpu = server.cpu_s()
    started = time.perf_counter()
    body = json.dumps({"queries": ["word " * int(megabytes * 2**20 / 5)]})
    response = httpx.post(f"{server.url}/retrieve", content=body, headers={"content-type": "application/json"},
                          timeout=1800)
    return {"body_mb": len(body) / 2**20, "status": response.status_code, "seconds": time.perf_counter() - started,
            "server_cpu_s": server.cpu_s() - cpu, "answer": response.text[:200]}


def summary(figures: dict, names: list[str]) -> dict:
    """Medians over the rounds of the figures the README quotes, per server."""

    def median(scenario: str, *keys: str) -> dict:
        values = {}
        for name in names:
            rounds = [run for run in figures[scenario][name] if _get(run, keys) is not None]
            values[name] = float(np.median([_get(run, keys) for run in rounds])) if rounds else None
        return values

    out = {
        "one_client_p50_ms": median("one_client", "p50_ms"),
        "one_client_p95_ms": median("one_client", "p95_ms"),
        "concurrent_p50_ms": median("concurrent", "p50_ms"),
        "concurrent_p95_ms": median("concurrent", "p95_ms"),
        "concurrent_wall_s": median("concurrent", "wall_s"),
        "one_request_wall_s": median("concurrent", "one_batch_wall_s"),
        "concurrent_to_one_request": median("concurrent", "ratio_concurrent_to_one_batch"),
    }
    for scenario in ("beside_large", "beside_1024x16"):
        out[f"{scenario}_seconds"] = median(scenario, "seconds")
        out[f"{scenario}_status"] = {name: figures[scenario][name][0]["status"] for name in names}
        out[f"{scenario}_probe_p50_ms"] = median(scenario, "probes", "p50_ms")
        out[f"{scenario}_probe_p95_ms"] = median(scenario, "probes", "p95_ms")
        out[f"{scenario}_peak_rss_growth_mb"] = {
            name: max(run["peak_rss_mb"] - run["rss_before_mb"] for run in figures[scenario][name]) for name in names
        }
    if "before" in names:
        out["one_request_before_to_concurrent_after"] = (out["concurrent_wall_s"]["after"]
                                                         / out["one_request_wall_s"]["before"])
    return out


def _get(run: dict, keys: tuple[str, ...]):
    for key in keys:
        run = run.get(key) if isinstance(run, dict) else None
    return run


def machine() -> dict:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return {"cpu": name or platform.processor(), "cores": os.cpu_count(), "native_bf16": "avx512_bf16" in flags
            or "amx_bf16" in flags, "load_average": os.getloadavg()}


def commit_of(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="also measure the service of this checkout (the code before)")
    parser.add_argument("--raised", default=json.dumps(RAISED), help="limits of a third server of this checkout "
                        "that accepts the large request (JSON ServiceConfig fields; '' to skip it)")
    parser.add_argument("--index-dir", type=Path, default=DEFAULT_INDEX_DIR, help="the vital-articles index")
    parser.add_argument("--singles", type=int, default=40, help="one-client requests")
    parser.add_argument("--clients", type=int, default=200, help="concurrent one-query clients")
    parser.add_argument("--rounds", type=int, default=3, help="times each scenario runs on each server (medians)")
    parser.add_argument("--big-queries", type=int, default=64, help="queries of the large request")
    parser.add_argument("--big-topk", type=int, default=1000, help="topk of the large request")
    parser.add_argument("--probe-limit-s", type=float, default=120, help="stop probing after this long")
    parser.add_argument("--oversized-mb", type=float, default=5, help="size of the one-query body (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    if not (args.index_dir / "index_meta.json").is_file():
        sys.exit(f"no index in {args.index_dir}: build it with python bench/retrieval.py first")
    import pyarrow.parquet as pq

    titles = pq.read_table(args.index_dir / "passages.parquet", columns=["title"]).column("title").to_pylist()
    rng = np.random.default_rng(0)
    questions = [f"What is known about {titles[i]}?" for i in rng.integers(0, len(titles), size=2048)]
    # This checkout's servers run as `distillery retriever serve` runs them: OpenMP threads wait passively.
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    setups = {"after": (ROOT, {}, passive)}
    if args.before:
        setups = {"before": (args.before, {}, {}), "before_passive_omp": (args.before, {}, passive), **setups}
    if args.raised:
        setups["after_raised_limits"] = (ROOT, json.loads(args.raised), passive)
    figures: dict = {"machine": machine(), "commits": {name: commit_of(path) for name, (path, _, _) in setups.items()},
                     "limits": {name: limits for name, (_, limits, _) in setups.items()},
                     "env": {name: env for name, (_, _, env) in setups.items()},
                     "args": {k: str(v) for k, v in vars(args).items()}}
    print(json.dumps(figures["machine"]), flush=True)
    # Every scenario runs on each server in turn (the others idle meanwhile), so that the load of a shared
    # machine, which changes from minute to minute, weighs on all of them alike.
    scenarios = {
        "one_client": lambda server: one_client(server.url, questions[1000:], args.singles),
        "concurrent": lambda server: concurrent_clients(server.url, questions, args.clients),
        "beside_large": lambda server: beside_large(server, questions, args.big_queries, args.big_topk,
                                                    args.probe_limit_s),
        "beside_1024x16": lambda server: beside_large(server, questions, 1024, 16, args.probe_limit_s),
    }
    with tempfile.TemporaryDirectory() as tmp:
        servers = {name: Server(path, args.index_dir, limits, Path(tmp) / f"{name}.log", env)
                   for name, (path, limits, env) in setups.items()}
        try:
            for name, server in servers.items():
                post(server.url, questions[:8])  # warm-up
                figures.setdefault("rss_idle_mb", {})[name] = server.rss_mb()
            for round_ in range(args.rounds):
                for scenario, measure in scenarios.items():
                    for name, server in servers.items():
                        figures.setdefault(scenario, {}).setdefault(name, []).append(measure(server))
                        print(f"round {round_} {scenario} [{name}]: {json.dumps(figures[scenario][name][-1])}",
                              flush=True)
            if args.oversized_mb:  # once: the code before spends seconds of CPU on it
                figures["oversized"] = {name: oversized(server, args.oversized_mb) for name, server in servers.items()}
            figures["load_average_after"] = os.getloadavg()
        finally:
            for server in servers.values():
                server.stop()
    figures["summary"] = summary(figures, list(setups))
    print(json.dumps(figures["summary"], indent=1))
    print("load average after:", figures["load_average_after"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
