"""Attacks on ``coworker audit serve`` found in review: each test failed before its fix."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server extra is not installed")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from coworker.audit.store import InMemoryStore
from coworker.ingest import IngestServer

TOKEN = "test-token-0123456789abcdef"


def _trickle_until_closed(sock: socket.socket, data: bytes, closed: threading.Event) -> None:
    """Send ``data`` one byte every 0.2 s until the server hangs up (then set ``closed``)."""
    sock.settimeout(0.2)
    for byte in data:
        try:
            sock.send(bytes([byte]))
        except OSError:
            break
        try:
            while chunk := sock.recv(65536):
                del chunk  # responses to earlier requests: keep draining
            break  # b"": the server closed the connection
        except TimeoutError:
            continue
        except OSError:
            break
    closed.set()


def test_a_pipelined_request_trickling_its_body_is_cut_by_the_read_timeout() -> None:
    """A complete request followed in the same packet by the headers of a second one, whose body
    then trickles in a byte at a time, is closed by the read timeout like any slow client (the
    second request never reaches ``data_received`` while h11 starts it)."""
    store = InMemoryStore()
    with IngestServer(store, token=TOKEN, read_timeout=1.0) as server:
        first = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
        second = (
            f"POST /v1/traces HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n"
            "content-type: application/x-protobuf\r\ncontent-length: 100000\r\n\r\n"
        ).encode()
        closed = threading.Event()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(first + second)
            worker = threading.Thread(
                target=_trickle_until_closed, args=(sock, b"x" * 100_000, closed)
            )
            worker.start()
            try:
                assert closed.wait(30), "the pipelined slow request kept its connection"
            finally:
                closed.set()
                worker.join(10)
        deadline = time.monotonic() + 10
        while server.stats["read_timeouts"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats["read_timeouts"] >= 1
