"""ASGI middleware shared by the HTTP services the project serves (today: ``retrieval.service``).

``CountResponses`` counts the responses by path and status code (for ``GET /metrics``).

``BodySizeLimit`` answers 413 to a request whose body is over ``max_bytes`` before the app sees any of
it: at once when the declared ``Content-Length`` is over, else as soon as the bytes received pass it
(chunked uploads). The body is read into memory only up to the limit, so a 5 GB upload costs the server
at most ``max_bytes`` of memory and no parsing.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from services.metrics import Counter

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodySizeLimit:
    """Reject request bodies over ``max_bytes`` with 413 ``{"error": ..., "limit": name, "value", "max"}``.

    ``on_reject()`` is called once per rejected request (to count it). The rejected connection is closed
    (``Connection: close``): the rest of its body is never read.
    """

    def __init__(self, app: Callable, max_bytes: int, limit_name: str = "max_body_bytes",
                 on_reject: Callable[[], None] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.limit_name = limit_name
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._reject(send, declared, "declared")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, size, "received at least")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _reject(self, send: Send, size: int, how: str) -> None:
        if self.on_reject is not None:
            self.on_reject()
        error = f"body: {how} {size:,} bytes, over {self.limit_name} = {self.max_bytes:,}"
        body = json.dumps({"error": error, "limit": self.limit_name, "value": size, "max": self.max_bytes})
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body.encode()})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself refuses a malformed length
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the whole body at once, then defers to the server's (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class CountResponses:
    """Count every response in ``counter`` (labels ``path``, ``code``); a path not in ``paths`` counts as
    ``other``, so unknown URLs cannot grow the counter without bound."""

    def __init__(self, app: Callable, counter: Counter, paths: tuple[str, ...]):
        self.app, self.counter, self.paths = app, counter, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.inc(path=path, code=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)
