"""The frames between host, worker and action process: round trips in any chunking, garbage refused."""

from __future__ import annotations

import socket
import struct

import pytest

from agent_runtime.sandbox.protocol import Channel, FrameBuffer, ProtocolError, encode_frame

FRAMES = [({"op": "run", "code": "print('é')"}, b"\x00state\xff"), ({"op": "ready", "isolation": {}}, b"")]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1 << 20])
def test_frames_come_back_whole_whatever_the_chunking(chunk_size):
    data = b"".join(encode_frame(header, blob) for header, blob in FRAMES)
    buffer, received = FrameBuffer(), []
    for start in range(0, len(data), chunk_size):
        received += buffer.feed(data[start : start + chunk_size])
    assert received == FRAMES
    assert not buffer.partial


def test_a_partial_frame_waits_for_the_rest():
    data = encode_frame({"op": "search", "query": "x"})
    buffer = FrameBuffer()
    assert buffer.feed(data[:-1]) == []
    assert buffer.partial
    assert buffer.feed(data[-1:]) == [({"op": "search", "query": "x"}, b"")]


@pytest.mark.parametrize(("data", "message"), [
    (struct.pack(">II", 2, 0) + b"{]", "malformed frame header"),
    (struct.pack(">II", 2, 0) + b"[]", "not an object with an 'op'"),
    (struct.pack(">II", 9, 0) + b'{"op": 1}', "not an object with an 'op'"),
    (struct.pack(">II", 1 << 30, 0), "frame too large"),
])
def test_garbage_is_a_protocol_error(data, message):
    with pytest.raises(ProtocolError, match=message):
        FrameBuffer().feed(data)


def test_channel_request_returns_the_reply_frame():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(encode_frame({"op": "search_result", "result": "Doc 1"}))  # the reply, already queued
        reply = Channel(ours).request({"op": "search", "query": "q"})
        assert reply == {"op": "search_result", "result": "Doc 1"}
        assert FrameBuffer().feed(theirs.recv(1 << 16)) == [({"op": "search", "query": "q"}, b"")]


def test_channel_request_fails_when_the_peer_stops_answering():
    ours, theirs = socket.socketpair()
    theirs.shutdown(socket.SHUT_WR)  # reads the request, never replies
    with ours, theirs, pytest.raises(ConnectionError, match="supervisor went away"):
        Channel(ours).request({"op": "search", "query": "q"})
