"""The stall watchdog of a llama.cpp server: a server that stops making progress while requests wait on it
becomes one error naming the server, its slots and the requests, instead of a silent wait.

While at least one request is in flight (``Watchdog.watch``), a thread samples the server every
``interval_s``:

- the process (psutil): its state (running, sleeping, stopped ``T``, uninterruptible ``D``) and the CPU
  seconds it has used;
- ``/slots`` (with a short timeout): per slot, the task it runs, its prompt tokens processed and tokens
  decoded, and the request's seed, which tells which request the slot holds.

Progress is a change of any slot's counters, or at least ``CPU_PROGRESS_S`` of CPU time since the last
progress: llama.cpp answers ``/slots`` from its main loop, so while one long prompt batch is decoded
``/slots`` does not answer for minutes, but the CPU time still advances. When neither happens for
``stall_timeout_s``, the watchdog writes down why (``stall``), probes ``/health`` for the message, and
kills the server (SIGKILL, the one signal a stopped process obeys): the requests waiting on it then end
at once, and the backend raises ``ServerStalled`` with that message. A server that died on its own is
not a stall; the backend names its exit status as before.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psutil

from agent_runtime.generation import EndpointUnavailable
from services.client import ServiceClient
from services.processes import Child

CPU_PROGRESS_S = 0.05  # an idle server uses ~0.01 s a minute; a decoding one ~1 s/s, ~0.2 s/s on a loaded machine


class ServerStalled(EndpointUnavailable):
    """A llama.cpp server made no progress for ``stall_timeout_s`` while requests waited; it was killed.
    An ``EndpointUnavailable``: the stage's task retries once, and the backend starts a new server."""


@dataclass(frozen=True)
class Slot:
    """One slot as ``/slots`` shows it."""

    slot: int
    processing: bool
    task: int | None = None
    seed: int | None = None
    prompt_tokens: int = 0
    prompt_processed: int = 0
    decoded: int = 0

    @classmethod
    def parse(cls, entry: dict) -> Slot:
        if not entry.get("is_processing"):
            return cls(entry["id"], False)
        decoded = (entry.get("next_token") or [{}])[0].get("n_decoded", 0)
        return cls(entry["id"], True, entry.get("id_task"), (entry.get("params") or {}).get("seed"),
                   entry.get("n_prompt_tokens", 0), entry.get("n_prompt_tokens_processed", 0), decoded)

    def counters(self) -> tuple:
        return self.slot, self.processing, self.task, self.prompt_processed, self.decoded


@dataclass(frozen=True)
class Sample:
    """The server at one moment: process state (None once it is gone), CPU seconds, slots (None when
    ``/slots`` did not answer in time)."""

    at: float
    state: str | None
    cpu_s: float
    slots: tuple[Slot, ...] | None


class Watchdog:
    """Watches ``server`` (reached at ``base_url``) while requests are in flight; see the module docstring.
    ``name`` starts its messages ("llama.cpp server pid 123 (127.0.0.1:8080, model M)")."""

    def __init__(self, server: Child, base_url: str, name: str, stall_timeout_s: float):
        self.server = server
        self.name = name
        self.stall_timeout_s = stall_timeout_s
        self.interval_s = min(5.0, max(0.2, stall_timeout_s / 10))
        self.stall: str | None = None  # why the server was killed, once it stalled
        self.last_slots: tuple[Slot, ...] | None = None  # the latest answer of /slots
        self._api = ServiceClient(base_url, timeout_s=max(1.0, self.interval_s), retries=0)
        self._process = psutil.Process(server.pid)
        self._lock = threading.Lock()
        self._in_flight: dict[int, str] = {}  # seed of each request (sample) in flight -> its label
        self._busy = 0  # watch() blocks open
        self._since = 0.0  # when progress was last seen (or the server last became busy)
        self._progress_cpu_s = 0.0
        self._progress_slots: tuple | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"llamacpp-watchdog-{server.pid}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, requests: Mapping[int, str]) -> Iterator[None]:
        """Requests in flight while the block runs, as {seed sent to the server: label for messages}."""
        with self._lock:
            if not self._busy:  # it was idle: no progress was due until now
                self._since, self._progress_cpu_s, self._progress_slots = time.monotonic(), self._cpu_s(), None
            self._busy += 1
            self._in_flight.update(requests)
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                for seed in requests:
                    self._in_flight.pop(seed, None)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)
        self._api.close()

    def _run(self) -> None:
        while not self._closed.wait(self.interval_s):
            if self._busy and self.stall is None:
                self.check(self.sample())

    def sample(self) -> Sample:
        """The server now (the /slots probe waits at most ~``interval_s``)."""
        try:
            state = self._process.status()
        except psutil.NoSuchProcess:
            return Sample(time.monotonic(), None, 0.0, None)
        cpu_s = self._cpu_s()
        try:
            slots = tuple(Slot.parse(entry) for entry in self._api.get("/slots"))
        except Exception:  # noqa: BLE001 - no answer, a refusal or a malformed one: no evidence either way
            slots = None
        return Sample(time.monotonic(), state, cpu_s, slots)

    def check(self, sample: Sample) -> None:
        """Compare ``sample`` with the last progress; past ``stall_timeout_s`` without any, kill the server."""
        if sample.state is None or sample.state == psutil.STATUS_ZOMBIE:
            return  # it died on its own: the backend names its exit status
        with self._lock:
            if not self._busy:
                return
            counters = None if sample.slots is None else tuple(slot.counters() for slot in sample.slots)
            if sample.slots is not None:
                self.last_slots = sample.slots
            if counters is not None and self._progress_slots is None:
                self._progress_slots = counters  # the first answer is the reference, not progress
            elif ((counters is not None and counters != self._progress_slots)
                  or sample.cpu_s - self._progress_cpu_s >= CPU_PROGRESS_S):
                self._since, self._progress_cpu_s = sample.at, sample.cpu_s
                self._progress_slots = counters if counters is not None else self._progress_slots
                return
            if sample.at - self._since < self.stall_timeout_s:
                return
            self.stall = self.describe(sample)
        self.server.process.kill()  # the waiting requests end now (connection reset), not at their timeout

    def describe(self, sample: Sample) -> str:
        """Why the server counts as stalled, and what it was doing (called with the lock held)."""
        state = {psutil.STATUS_STOPPED: "process stopped (state T)",
                 psutil.STATUS_DISK_SLEEP: "process in uninterruptible sleep (state D)"}.get(
            sample.state, f"process {sample.state}")
        cpu = f"CPU time flat at {sample.cpu_s:.1f} s (+{sample.cpu_s - self._progress_cpu_s:.2f} s)"
        slots_answer = "unanswered" if sample.slots is None else "unchanged"
        health = "answers" if self._api.answers("/health", timeout_s=1.0) else "unanswered"
        busy = [slot for slot in self.last_slots or () if slot.processing]
        if busy:
            held = "; ".join(f"slot {slot.slot} on request {self._label(slot.seed)} (task {slot.task}, "
                             f"{slot.prompt_processed}/{slot.prompt_tokens} prompt tokens, {slot.decoded} decoded)"
                             for slot in busy)
        else:
            held = "no slot seen processing; requests in flight: " + ", ".join(sorted(set(self._in_flight.values())))
        return (f"{self.name} made no progress for {sample.at - self._since:.0f} s (stall_timeout_s="
                f"{self.stall_timeout_s:g}): {state}, {cpu}, /slots {slots_answer}, /health {health}; {held}; "
                "the server was killed")

    def _label(self, seed: int | None) -> str:
        return self._in_flight.get(seed, f"with seed {seed} (not one of this backend's)")

    def _cpu_s(self) -> float:
        try:
            times = self._process.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return times.user + times.system
