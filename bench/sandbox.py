"""Latency of the sandboxed executor, measured in one run.

Prints p50/p95 of (1) a trivial action, (2) an action calling ``web_search`` once (an in-process
search callable standing in for the retriever, so this measures the relay, not retrieval), both
as one job per ``run`` call, i.e. what one agent step waits for, and (3) the throughput of a batch
of trivial jobs spread over the workers.

    PYTHONPATH=. python bench/sandbox.py [--n 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile of ``samples`` (q in 0..100)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="actions per measurement")
    parser.add_argument("--workers", type=int, default=2, help="sandbox worker processes")
    args = parser.parse_args(argv)

    from agent_runtime.sandbox import Sandbox, SandboxConfig

    def search(query: str) -> str:
        return f"Doc 1 (Title: {query})\nSome passage about {query}."

    started = time.perf_counter()
    with Sandbox(SandboxConfig(workers=args.workers), search=search) as sandbox:
        print(f"start-up of {args.workers} workers: {time.perf_counter() - started:.2f} s")
        _, state = sandbox.run([(sandbox.new_state(), "import numpy as np\nx = 1")])[0]
        actions = {
            "trivial action (x + 1)": "y = x + 1",
            "web_search action": "print(web_search('Eiffel tower'))",
        }
        for label, code in actions.items():
            latencies = []
            for _ in range(args.n):
                begin = time.perf_counter()
                [(result, _)] = sandbox.run([(state, code)])
                latencies.append(time.perf_counter() - begin)
                assert result.error_kind == "none", result.observation
            p50, p95 = 1000 * percentile(latencies, 50), 1000 * percentile(latencies, 95)
            mean = 1000 * statistics.mean(latencies)
            print(f"{label:28s} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   mean {mean:7.1f} ms")
        begin = time.perf_counter()
        results = sandbox.run([(state, "y = x + 1")] * args.n)
        elapsed = time.perf_counter() - begin
        assert all(r.error_kind == "none" for r, _ in results)
        print(f"batch of {args.n} trivial jobs over {args.workers} workers: {args.n / elapsed:.1f} actions/s")


if __name__ == "__main__":
    main()
