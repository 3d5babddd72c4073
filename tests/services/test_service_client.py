"""services.client against a loopback stand-in server: one retry policy for every service (what is retried,
how often, how long it waits), and errors that name the URL and the attempts."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise

import pytest

from common.errors import ServiceUnavailable, UserError
from services.client import NoAnswer, Refused, ServiceClient
from services.processes import free_port


@pytest.fixture
def stand_in():
    """Answers ``statuses`` in turn (200 once they run out): JSON ``{"n": <request number>}``, or text."""
    calls: list[tuple[str, str, float]] = []
    statuses: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self._answer()

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer()

        def _answer(self):
            calls.append((self.command, self.path, time.monotonic()))
            status = statuses.pop(0) if statuses else 200
            data = (json.dumps({"n": len(calls)}) if self.path != "/metrics" else "counter 7\n").encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.calls, server.statuses = calls, statuses
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def test_transient_statuses_are_retried_with_doubling_waits(stand_in):
    stand_in.statuses += [503, 429, 500]
    client = ServiceClient(stand_in.url, retries=3, backoff_s=0.1)
    assert client.post("/v1/chat/completions", {"x": 1}) == {"n": 4}
    waits = [later - earlier for (_, _, earlier), (_, _, later) in pairwise(stand_in.calls)]
    assert len(waits) == 3
    assert all(backoff <= wait < backoff + 0.3 for wait, backoff in zip(waits, [0.1, 0.2, 0.4])), waits
    assert {path for _, path, _ in stand_in.calls} == {"/v1/chat/completions"}


def test_retries_are_bounded_and_the_error_names_url_attempts_and_problem(stand_in):
    stand_in.statuses += [502] * 10
    client = ServiceClient(stand_in.url, retries=2, backoff_s=0.01)
    with pytest.raises(NoAnswer) as caught:
        client.get("/health")
    assert str(caught.value).startswith(f"no answer from {stand_in.url}/health after 3 attempt(s): HTTP 502")
    assert isinstance(caught.value, ServiceUnavailable) and len(stand_in.calls) == 3


@pytest.mark.parametrize("status", [400, 404, 422, 501])
def test_a_refusal_is_not_retried(stand_in, status):
    stand_in.statuses.append(status)
    client = ServiceClient(stand_in.url, retries=3, backoff_s=0.01)
    with pytest.raises(Refused, match=rf"^{stand_in.url}/slots/0\?action=save refused the request \(HTTP {status}: ") \
            as caught:
        client.post("/slots/0?action=save", {"filename": "a.bin"})
    assert isinstance(caught.value, UserError) and not isinstance(caught.value, ServiceUnavailable)
    assert len(stand_in.calls) == 1


def test_root_endpoints_are_public_calls(stand_in):
    client = ServiceClient(stand_in.url)
    assert client.get_text("/metrics") == "counter 7\n"
    assert client.answers("/health") is True
    stand_in.statuses.append(503)
    assert client.answers("/health") is False  # one try, no retries: for polling
    assert [(method, path) for method, path, _ in stand_in.calls] == [("GET", "/metrics"), ("GET", "/health"),
                                                                      ("GET", "/health")]


def test_an_unreachable_service_fails_after_its_retries():
    url = f"http://127.0.0.1:{free_port()}"  # bound, then released: nothing listens there
    client = ServiceClient(url, retries=1, backoff_s=0.01, timeout_s=2)
    assert client.answers() is False
    with pytest.raises(NoAnswer, match=rf"^no answer from {url}/retrieve after 2 attempt\(s\): ConnectError"):
        client.post("/retrieve", {"queries": ["x"]})
