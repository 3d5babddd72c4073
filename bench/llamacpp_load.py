"""How llama.cpp servers behave when they share the CPU: per-request latency under contention.

Starts ``--servers`` llama.cpp servers (the project's ``llamacpp_server``, ``--threads`` threads and
``--poll`` spin each, 2 slots) and optionally ``--hogs`` busy-looping processes, then sends each server
agent-like requests (a ~200-token system prompt shared by all, a different question each, greedy,
``--max-tokens`` tokens) from 2 client threads, ``--requests`` each, and prints the latency distribution,
the servers' CPU seconds per request and their share of the machine's cores. What it answers: does a
server stall (a request taking many times the median) when another process takes CPU time, and which
settings keep it steady (README, Reliability)::

    python bench/llamacpp_load.py --servers 1 --threads 2                 # alone
    python bench/llamacpp_load.py --servers 2 --threads 2                 # two servers, 4 threads, 2 cores
    python bench/llamacpp_load.py --servers 2 --threads 1
    python bench/llamacpp_load.py --servers 1 --threads 2 --hogs 1 --poll 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM = "You are a careful assistant that writes short Python programs. " + " ".join(
    f"Rule {i}: variable number {i} must be named v{i} and hold the value {i * 7 % 13}." for i in range(8))


def run_client(base_url: str, model: str, name: str, requests: int, max_tokens: int, out: list) -> None:
    """``requests`` sequential requests; appends (server, latency_s, completion_tokens) to ``out``."""
    import httpx

    with httpx.Client(timeout=3600) as http:
        for question in range(1, requests + 1):
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": True,
                    "messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": f"{name}: write a function returning v{question % 8} "
                                                             f"times {question}."}]}
            started = time.monotonic()
            answer = http.post(f"{base_url}/v1/chat/completions", json=body).json()
            out.append((name, time.monotonic() - started, answer["usage"]["completion_tokens"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads of each server")
    parser.add_argument("--poll", type=int, default=50, help="llama.cpp's --poll of each server (0-100)")
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes beside the servers")
    parser.add_argument("--requests", type=int, default=4, help="sequential requests of each client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)

    import os

    import psutil

    from agent_runtime.backends.llamacpp_backend import gguf_path
    from services.client import ServiceClient
    from services.processes import HOST, free_port, start

    servers = []
    for index in range(args.servers):
        port = free_port()
        servers.append((start([sys.executable, "-m", "agent_runtime.backends.llamacpp_server", "--model",
                               str(gguf_path(args.model)), "--alias", args.model, "--port", str(port), "--slots",
                               "2", "--ctx-per-slot", "2048", "--threads", str(args.threads), "--poll",
                               str(args.poll), "--cache-ram-mib", "0", "--quiet"], name=f"server {index}"),
                        f"http://{HOST}:{port}"))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    try:
        for child, url in servers:
            child.wait_until(lambda url=url: ServiceClient(url).answers("/health"), 600, what=f"answer {url}")
        load_before = os.getloadavg()[0]
        processes = [psutil.Process(child.pid) for child, _ in servers]
        cpu_before = sum(sum(process.cpu_times()[:2]) for process in processes)
        started = time.monotonic()
        latencies: list = []
        clients = [threading.Thread(target=run_client, args=(url, args.model, f"s{i}", args.requests,
                                                             args.max_tokens, latencies))
                   for i, (_, url) in enumerate(servers) for _ in range(2)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        wall_s = time.monotonic() - started
        cpu_s = sum(sum(process.cpu_times()[:2]) for process in processes) - cpu_before
        load_after = os.getloadavg()[0]
    finally:
        for hog in hogs:
            hog.kill()
        for child, _ in servers:
            child.stop()
    seconds = sorted(latency for _, latency, _ in latencies)
    result = {
        "model": args.model, "servers": args.servers, "threads": args.threads, "poll": args.poll,
        "hogs": args.hogs, "cores": len(os.sched_getaffinity(0)), "load_before": round(load_before, 2),
        "load_after": round(load_after, 2), "requests": len(seconds), "wall_s": round(wall_s, 1),
        "min_s": round(seconds[0], 2), "p50_s": round(statistics.median(seconds), 2), "max_s": round(seconds[-1], 2),
        "server_cpu_s_per_request": round(cpu_s / len(seconds), 2),
        "server_cpu_share": round(cpu_s / wall_s / len(os.sched_getaffinity(0)), 2),
    }
    print(json.dumps(result))
    print("latencies:", [round(x, 1) for _, x, _ in latencies])
    if args.out:
        with open(args.out, "a") as out:
            out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
