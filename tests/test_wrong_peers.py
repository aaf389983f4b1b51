"""Wrong peers against a real destination process: each gets its own precise one-line error."""

from __future__ import annotations

import socket
import struct

import numpy as np

from engine.wire.encoder import StreamEncoder
from engine.wire.packet import MultiFDInit, encode_packet_header
from support import Incoming


def _port(dst: Incoming) -> int:
    return int(dst.uri.rsplit(":", 1)[1])


def _main(port: int, *, header: bytes | None = None, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall((header if header is not None else b"QEVM\x00\x00\x00\x03") + body)
    return s


def _start_section(blocks=(("pc.ram", 1 << 20),)) -> bytes:
    enc = StreamEncoder()
    enc.configuration("none")
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size(list(blocks))
    return bytes(enc.out)


def _error_line(dst: Incoming) -> str:
    lines = [l for l in dst.stderr.splitlines() if l.startswith("engine: error:")]
    assert len(lines) == 1 and "Traceback" not in dst.stderr, dst.stderr
    return lines[0]


def test_bad_main_stream_version() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "1", "--handshake-timeout", "5") as dst:
        m = _main(_port(dst), header=b"QEVM\x00\x00\x00\x02")
        c = socket.create_connection(("127.0.0.1", _port(dst)), timeout=10)
        c.sendall(MultiFDInit(0).pack())
        assert dst.wait(30) == 1
        m.close(), c.close()
    assert _error_line(dst) == "engine: error: main channel: received stream version 2, expected 3"


def test_bad_channel_version() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        m = _main(_port(dst))
        c = socket.create_connection(("127.0.0.1", _port(dst)), timeout=10)
        c.sendall(MultiFDInit(0, version=2).pack())
        assert dst.wait(30) == 1
        m.close(), c.close()
    assert _error_line(dst) == "engine: error: multifd handshake: received version 2, expected 1"


def test_repeated_channel_id() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2") as dst:
        m = _main(_port(dst))
        socks = []
        for _ in range(2):
            c = socket.create_connection(("127.0.0.1", _port(dst)), timeout=10)
            c.sendall(MultiFDInit(0).pack())
            socks.append(c)
        assert dst.wait(30) == 1
        m.close()
        for c in socks:
            c.close()
    assert _error_line(dst) == "engine: error: multifd handshake: received channel id 0, which is already set up"


def _session(dst: Incoming, body: bytes, packet: bytes | None = None) -> None:
    m = _main(_port(dst), body=body)
    c = socket.create_connection(("127.0.0.1", _port(dst)), timeout=10)
    c.sendall(MultiFDInit(0).pack() + (packet or b""))
    assert dst.wait(30) == 1
    m.close()
    c.close()


def test_unsupported_section() -> None:
    enc = StreamEncoder()
    enc.configuration("none")
    enc.section_start(3, "block", 0, 1)
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        _session(dst, bytes(enc.out))
    assert _error_line(dst) == "engine: error: main channel: received START for unsupported live section 'block', expected only 'ram'"


def test_unsupported_record() -> None:
    body = _start_section() + struct.pack(">Q", 0x40)  # XBZRLE
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        _session(dst, body)
    assert "received ram record flags 0x40" in _error_line(dst)


def test_page_size_mismatch() -> None:
    enc = StreamEncoder()
    enc.out += bytes([0x07]) + struct.pack(">I", 4) + b"none"
    enc.out += bytes([0x05, len(b"configuration/target-page-bits")]) + b"configuration/target-page-bits"
    enc.out += struct.pack(">II", 1, 16)
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        _session(dst, bytes(enc.out))
    assert _error_line(dst) == "engine: error: main channel: received target-page-bits 16, expected 12"


def test_packet_for_unknown_block() -> None:
    body = _start_section()
    pkt = encode_packet_header(flags=0, packet_num=9, ramblock=b"other", offsets=np.array([0]), next_packet_size=4096)
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        _session(dst, body, pkt + bytes(4096))
    assert _error_line(dst) == ("engine: error: multifd channel 0 (destination): multifd channel 0, packet_num 9:"
                                " received unknown RAM block 'other', expected one of ['pc.ram']")


def test_packet_offset_outside_block() -> None:
    body = _start_section()
    pkt = encode_packet_header(flags=0, packet_num=5, ramblock=b"pc.ram", offsets=np.array([1 << 20]),
                               next_packet_size=4096)
    with Incoming("tcp:127.0.0.1:0", "--channels", "1") as dst:
        _session(dst, body, pkt + bytes(4096))
    assert _error_line(dst) == ("engine: error: multifd channel 0 (destination): multifd channel 0, packet_num 5:"
                                " received offset[0] 0x100000 in RAM block 'pc.ram', expected a multiple of 0x1000"
                                " below 0x100000")
