"""The wire protocol of the sandbox: frames between host, worker and action process.

A frame is (header length, blob length) as two big-endian uint32, a UTF-8 JSON header with an
"op", then an opaque binary blob.  JSON, never pickle, crosses the process boundary towards the
host: a compromised worker can send the host nothing but data.  The blob carries the episode
state, which only workers unpickle.

Host -> worker (pipes): "run" {code} + state; "search_result" {result} or "search_error" {error}
  answering a "search".
Worker -> host: "ready" {isolation} once started, or "fatal" {error}; "search" {query} relayed
  from the action; "result" {observation, error_kind, error, is_final, final_answer,
  state_changed, variables} + new state.
Action process <-> worker (a socket pair, ``Channel`` on the action's side): "search" {query}
  and its reply; "result" + new state; "failed" {error} when the action could not run or report.

Standard library only, and no imports from the project: the worker process imports it without
the rest of the project (see ``host._BOOTSTRAP``).
"""

from __future__ import annotations

import collections
import json
import os
import socket
import struct

_LENGTHS = struct.Struct(">II")
MAX_HEADER_BYTES = 16 << 20
MAX_BLOB_BYTES = 512 << 20


class ProtocolError(Exception):
    """A peer sent bytes that are not a well-formed frame."""


def encode_frame(header: dict, blob: bytes = b"") -> bytes:
    """Serialise one frame; ``header`` must be JSON-serialisable."""
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return _LENGTHS.pack(len(head), len(blob)) + head + blob


def write_all(fd: int, data: bytes) -> None:
    """Write every byte to a blocking file descriptor (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameBuffer:
    """Incremental frame decoder: feed it whatever ``read`` returned, get complete frames back."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> list[tuple[dict, bytes]]:
        """Append ``chunk`` and return every frame now complete; raises ProtocolError on garbage."""
        self._data += chunk
        frames = []
        while len(self._data) >= _LENGTHS.size:
            head_len, blob_len = _LENGTHS.unpack_from(self._data)
            if head_len > MAX_HEADER_BYTES or blob_len > MAX_BLOB_BYTES:
                raise ProtocolError(f"frame too large (header {head_len} B, blob {blob_len} B)")
            end = _LENGTHS.size + head_len + blob_len
            if len(self._data) < end:
                break
            head = bytes(self._data[_LENGTHS.size : _LENGTHS.size + head_len])
            blob = bytes(self._data[_LENGTHS.size + head_len : end])
            del self._data[:end]
            try:
                header = json.loads(head.decode("utf-8"))
            except (ValueError, RecursionError) as exc:
                raise ProtocolError(f"malformed frame header: {exc}") from exc
            if not isinstance(header, dict) or not isinstance(header.get("op"), str):
                raise ProtocolError("frame header is not an object with an 'op'")
            frames.append((header, blob))
        return frames

    @property
    def partial(self) -> bool:
        """True while bytes of an incomplete frame are buffered."""
        return bool(self._data)


class Channel:
    """The action process's end of its socket to the zygote."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffer = FrameBuffer()
        self._pending: collections.deque = collections.deque()

    def send(self, header: dict, blob: bytes = b"") -> None:
        self._sock.sendall(encode_frame(header, blob))

    def request(self, header: dict) -> dict:
        """Send ``header`` and block until the reply frame arrives."""
        self.send(header)
        while not self._pending:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the sandbox supervisor went away")
            self._pending.extend(self._buffer.feed(chunk))
        return self._pending.popleft()[0]
