"""transport.send_all over real sockets: every byte in order however the kernel splits the
sends (with and without the caller's byte count), and a stalled peer's exact error."""

from __future__ import annotations

import re
import socket
import threading

import numpy as np
import pytest

from engine.errors import MigrationTimeout, TruncatedError
from engine.runtime.transport import recv_at_least_into, recv_exact_into, send_all


def _parts() -> list[object]:
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, size=(40, 4096), dtype=np.uint8)
    block = memoryview(rng.integers(0, 256, size=300_000, dtype=np.uint8).tobytes())
    return [b"header" * 200, pages, block[1000:90_000], b"", block[200_000:], bytearray(b"tail")]


def _expected(parts: list[object]) -> bytes:
    return b"".join(memoryview(p).cast("B").tobytes() for p in parts)  # type: ignore[arg-type]


@pytest.mark.parametrize("known_total", [False, True], ids=["total-unknown", "total-known"])
def test_every_byte_arrives_in_order_through_partial_sends(known_total: bool) -> None:
    parts = _parts()
    want = _expected(parts)
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many partial sendmsg calls
        a.settimeout(10)
        got = bytearray()

        def read() -> None:
            while len(got) < len(want):
                chunk = b.recv(3000)
                if not chunk:
                    break
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sent = send_all(a, parts, "test channel", len(want) if known_total else None)
        reader.join(10)
    assert sent == len(want)
    assert bytes(got) == want


def test_a_peer_that_stops_reading_is_a_timeout_naming_the_channel() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.settimeout(0.2)
        with pytest.raises(MigrationTimeout, match=re.escape(
            "multifd channel 5: sending stalled for 0.2s (the peer is not reading)"
        )):
            send_all(a, [bytes(8 << 20)], "multifd channel 5", 8 << 20)


def test_recv_at_least_into_takes_what_is_there_and_never_waits_for_more() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(b"x" * 100 + b"y" * 30)
        buf = bytearray(200)
        got = recv_at_least_into(b, memoryview(buf), 100, "test payload")
        assert 100 <= got <= 130 and buf[:100] == b"x" * 100  # the read-ahead never blocks past 100
        a.sendall(b"z" * 10)
        a.close()
        with pytest.raises(TruncatedError, match=r"^test payload: connection closed after \d+ of 500 bytes$"):
            recv_at_least_into(b, memoryview(bytearray(600)), 500, "test payload")


def test_recv_exact_into_completes_a_partly_received_buffer() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        buf = bytearray(b"head" + bytes(6))
        a.sendall(b"123456")
        assert recv_exact_into(b, memoryview(buf), "header", start=4)
        assert bytes(buf) == b"head123456"
        assert recv_exact_into(b, memoryview(buf), "header", start=10)  # already whole: no receive
        a.close()
        with pytest.raises(TruncatedError, match=r"^header: connection closed after 4 of 10 bytes$"):
            recv_exact_into(b, memoryview(buf), "header", eof_ok=True, start=4)  # EOF inside a header
