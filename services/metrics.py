"""Counters and histograms of a service, rendered in the Prometheus text format (version 0.0.4).

A few dozen lines instead of ``prometheus_client``: the project does not depend on it, and a service
here needs only counters, gauges and fixed-bucket histograms, each owned by the object that updates it.

    requests = Counter("retriever_requests_total", "requests answered, by status code", ("code",))
    requests.inc(code="200")
    exposition([requests])  # '# HELP retriever_requests_total ...\\n# TYPE ...\\nretriever_requests_total{code="200"} 1\\n'
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counter:
    """A monotonically increasing count, optionally split by label values. Thread-safe."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(zip(self.labels, key))} {_number(value)}" for key, value in items]

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labels)


class Gauge(Counter):
    """A value that goes up and down (no labels)."""

    kind = "gauge"

    def set(self, value: float) -> None:
        with self._lock:
            self._values[()] = value


class Histogram:
    """Observations counted into fixed cumulative buckets, with their sum and count. Thread-safe."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, cumulative = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        return [*lines, f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]


def exposition(metrics: Iterable[Counter | Histogram]) -> str:
    """The text a Prometheus server scrapes from ``GET /metrics``."""
    lines = []
    for metric in metrics:
        lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}", *metric.samples()]
    return "\n".join(lines) + "\n"


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{name}="{value}"' for name, value in pairs)
    return f"{{{text}}}" if text else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
