"""JSON over HTTP to one service (an OpenAI-compatible model server, the retriever, Prefect's API) under one
retry policy.

A connection error, a timeout, or an answer of 408, 409, 429 or 5xx is tried again up to ``retries`` times
with exponential backoff (``backoff_s``, then twice that, ...; tenacity), then ``NoAnswer`` names the URL,
the attempts and the last problem. Any other error status is ``Refused`` at once: the same request would
be refused again.

    server = ServiceClient("http://127.0.0.1:8080", retries=2)
    server.post("/v1/chat/completions", {...})     # the parsed JSON answer
    server.get_text("/metrics")                    # a server's root endpoints, public
    server.answers("/health")                      # True once it is up (one try, for polling)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from common.errors import ServiceUnavailable, UserError

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class NoAnswer(ServiceUnavailable):
    """The service did not answer (refused the connection, timed out, 429, 5xx) within its retries."""

    def __init__(self, url: str, attempts: int, problem: str):
        super().__init__(f"no answer from {url} after {attempts} attempt(s): {problem}")
        self.url, self.attempts, self.problem = url, attempts, problem


class Refused(UserError):
    """The service answered with an error status that a retry would not change (400, 404, 422, ...)."""

    def __init__(self, url: str, status: int, text: str):
        super().__init__(f"{url} refused the request (HTTP {status}: {text[:500]})")
        self.url, self.status = url, status


class _Transient(Exception):
    """One failed attempt that is worth another (raised and caught inside ServiceClient)."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


class ServiceClient:
    """Client of the HTTP service at ``base_url`` (paths are appended to it). Thread-safe."""

    def __init__(self, base_url: str, *, timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.5,
                 headers: Mapping[str, str] | None = None, max_connections: int = 10):
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._http = httpx.Client(timeout=timeout_s, headers=dict(headers or {}),
                                  limits=httpx.Limits(max_connections=max_connections))

    def post(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON; the parsed JSON answer."""
        return self._request("POST", path, json=body).json()

    def get(self, path: str) -> Any:
        """GET; the parsed JSON answer."""
        return self._request("GET", path).json()

    def get_text(self, path: str) -> str:
        """GET; the answer's text (e.g. Prometheus ``/metrics``)."""
        return self._request("GET", path).text

    def answers(self, path: str = "/health", timeout_s: float = 5.0) -> bool:
        """True when one GET of ``path`` succeeds now (no retries: for polling until a server is up)."""
        try:
            return self._http.get(self.base_url + path, timeout=timeout_s).is_success
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.base_url + path
        retrying = Retrying(stop=stop_after_attempt(self.retries + 1), wait=wait_exponential(multiplier=self.backoff_s),
                            retry=retry_if_exception_type(_Transient), reraise=True)
        try:
            return retrying(self._attempt, method, url, **kwargs)
        except _Transient as exc:
            raise NoAnswer(url, self.retries + 1, exc.problem) from None

    def _attempt(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:  # refused, DNS, reset, timeout
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        if response.is_success:
            return response
        if response.status_code in RETRY_STATUSES:
            raise _Transient(f"HTTP {response.status_code}: {response.text[:500]}")
        raise Refused(url, response.status_code, response.text)
