"""runtime.iov.PageIO over real sockets: a packet's header and scattered pages leave in order and
land at their offsets however the kernel splits the calls; the read-ahead stops at a header's
worth; stalls and a peer that goes away give the transport's errors."""

from __future__ import annotations

import mmap
import socket
import threading

import numpy as np
import pytest

from engine.errors import ChannelError, MigrationTimeout, TruncatedError
from engine.runtime.iov import PageIO, address_of
from engine.runtime.splice import PageSplicer, can_splice
from engine.wire.packet import PACKET_HEADER_SIZE, TARGET_PAGE_SIZE

PAGES = np.array([3, 4, 5, 9, 10, 40, 41, 42, 43, 63], dtype=np.int64)
#: the source's two ways to send a packet: the kernel copies the pages, or passes references
SENDERS = [PageIO, pytest.param(PageSplicer, marks=pytest.mark.skipif(not can_splice(), reason="no vmsplice"))]


def _ram(seed: int, pages: int = 64) -> np.ndarray:
    """Pages on page boundaries, as guest RAM is (a mapping)."""
    ram = np.frombuffer(mmap.mmap(-1, pages * TARGET_PAGE_SIZE), dtype=np.uint8).reshape(pages, TARGET_PAGE_SIZE)
    ram[:] = np.random.default_rng(seed).integers(0, 256, size=ram.shape, dtype=np.uint8)
    return ram


def _pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # many partial sendmsg calls
    a.settimeout(10)
    b.settimeout(10)
    return a, b


@pytest.mark.parametrize("io", SENDERS)
def test_send_packet_sends_header_then_pages_in_order_through_partial_sends(io: type[PageIO]) -> None:
    ram = _ram(1)
    header = bytearray(np.random.default_rng(2).integers(0, 256, PACKET_HEADER_SIZE, dtype=np.uint8).tobytes())
    want = bytes(header) + b"".join(ram[p].tobytes() for p in PAGES)
    total = len(want) + PACKET_HEADER_SIZE + 2 * TARGET_PAGE_SIZE
    a, b = _pair(sndbuf=4096)
    with a, b:
        got = bytearray()

        def read() -> None:
            while len(got) < total:
                chunk = b.recv(3000)  # a slow reader: the sender's calls end mid-page
                if not chunk:
                    return
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        pio = io(a, "multifd channel 0", header)
        assert pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), PAGES) == len(want)
        # the entries cut by partial calls are whole again for the next packet
        assert pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), PAGES[:2]) == PACKET_HEADER_SIZE + 2 * 4096
        reader.join(10)
        pio.close()
    assert bytes(got[:len(want)]) == want
    assert bytes(got[len(want):]) == bytes(header) + ram[3].tobytes() + ram[4].tobytes()


@pytest.mark.parametrize("piece", [1000, 4096, 5000, 70_000])
def test_recv_pages_lands_each_page_at_its_offset_and_reads_ahead_at_most_a_header(piece: int) -> None:
    src, dst = _ram(3), np.zeros((64, TARGET_PAGE_SIZE), dtype=np.uint8)
    payload = b"".join(src[p].tobytes() for p in PAGES)
    following = bytes(range(256)) * 8  # the next header's first bytes, and more behind them
    a, b = _pair()
    with a, b:
        data = payload + following[:PACKET_HEADER_SIZE - 100] + following

        def write() -> None:
            for i in range(0, len(data), piece):
                a.sendall(data[i:i + piece])

        writer = threading.Thread(target=write)
        writer.start()
        header = bytearray(PACKET_HEADER_SIZE)
        pio = PageIO(b, "multifd channel 1 payload", header)
        offsets = (PAGES * TARGET_PAGE_SIZE).astype(">u8")
        ahead = pio.recv_pages(address_of(dst), offsets, PACKET_HEADER_SIZE)
        writer.join(10)
    assert 0 <= ahead <= PACKET_HEADER_SIZE
    assert bytes(header[:ahead]) == data[len(payload):len(payload) + ahead]
    assert np.array_equal(dst[PAGES], src[PAGES])
    untouched = np.setdiff1d(np.arange(64), PAGES)
    assert not dst[untouched].any()


def test_recv_pages_times_out_with_the_transport_message() -> None:
    a, b = _pair()
    with a, b:
        b.settimeout(0.2)
        pio = PageIO(b, "multifd channel 2 payload", bytearray(PACKET_HEADER_SIZE))
        dst = np.zeros((64, TARGET_PAGE_SIZE), dtype=np.uint8)
        with pytest.raises(MigrationTimeout, match=r"^multifd channel 2 payload: nothing received for 0\.2s$"):
            pio.recv_pages(address_of(dst), (PAGES * TARGET_PAGE_SIZE).astype(">u8"), PACKET_HEADER_SIZE)


def test_recv_pages_names_a_peer_that_closes_inside_the_payload() -> None:
    a, b = _pair()
    with b:
        a.sendall(b"x" * 5000)
        a.close()
        pio = PageIO(b, "multifd channel 3 payload", bytearray(PACKET_HEADER_SIZE))
        dst = np.zeros((64, TARGET_PAGE_SIZE), dtype=np.uint8)
        with pytest.raises(TruncatedError,
                           match=r"^multifd channel 3 payload: connection closed after 5000 of 40960 bytes$"):
            pio.recv_pages(address_of(dst), (PAGES * TARGET_PAGE_SIZE).astype(">u8"), PACKET_HEADER_SIZE)


@pytest.mark.parametrize("io", SENDERS)
def test_send_packet_to_a_peer_that_stops_reading_times_out(io: type[PageIO]) -> None:
    ram = _ram(4)
    a, b = _pair(sndbuf=4096)
    with a, b:
        a.settimeout(0.2)
        pio = io(a, "multifd channel 4", bytearray(PACKET_HEADER_SIZE))
        with pytest.raises(MigrationTimeout,
                           match=r"^multifd channel 4: sending stalled for 0\.2s \(the peer is not reading\)$"):
            for _ in range(200):
                pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), PAGES)
        pio.close()


@pytest.mark.parametrize("io", SENDERS)
def test_send_packet_to_a_closed_peer_is_a_channel_error(io: type[PageIO]) -> None:
    ram = _ram(5)
    a, b = _pair()
    b.close()
    with a:
        pio = io(a, "multifd channel 5", bytearray(PACKET_HEADER_SIZE))
        with pytest.raises(ChannelError, match=r"^multifd channel 5: send failed: Broken pipe$"):
            pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), PAGES)
        pio.close()


@pytest.mark.parametrize("io", SENDERS)
def test_a_packet_of_more_pages_than_iov_max_goes_whole_both_ways(io: type[PageIO]) -> None:
    """packet-pages 1024: 1025 entries to send, 1026 to receive, more than one call takes."""
    from engine.runtime.iov import IOV_MAX
    from engine.wire.packet import MAX_PACKET_PAGES, header_size

    pages = np.random.default_rng(6).permutation(2 * MAX_PACKET_PAGES)[:MAX_PACKET_PAGES].astype(np.int64)
    assert len(pages) + 1 > IOV_MAX
    src = _ram(7, 2 * MAX_PACKET_PAGES)
    dst = np.zeros_like(src)
    size = header_size(MAX_PACKET_PAGES)
    out_header = bytearray(np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8).tobytes())
    in_header = bytearray(size)
    a, b = _pair(sndbuf=65536)
    with a, b:
        received: list[int] = []

        def read() -> None:
            got = 0
            while got < size:  # the header the plain way, then the pages through the iovec array
                got += b.recv_into(memoryview(in_header)[got:])
            pio = PageIO(b, "multifd channel 6 payload", in_header, MAX_PACKET_PAGES)
            received.append(pio.recv_pages(address_of(dst), (pages * TARGET_PAGE_SIZE).astype(">u8"), 0))

        reader = threading.Thread(target=read)
        reader.start()
        pio = io(a, "multifd channel 6", out_header, MAX_PACKET_PAGES)
        assert pio.send_packet(size, address_of(src), pages) == size + MAX_PACKET_PAGES * TARGET_PAGE_SIZE
        reader.join(10)
        pio.close()
    assert received == [0]
    assert in_header == out_header
    assert np.array_equal(dst[pages], src[pages])
    assert not np.delete(dst, pages, axis=0).any()


def test_a_spliced_packet_leaves_its_header_as_it_was_when_sent() -> None:
    """The header buffer is reused by the next packet at once: it goes into the pipe as a copy,
    so what the peer reads is the header of its own packet (the pages go by reference)."""
    if not can_splice():
        pytest.skip("no vmsplice")
    ram = _ram(9)
    header = bytearray(b"A" * PACKET_HEADER_SIZE)
    a, b = _pair()
    with a, b:
        pio = PageSplicer(a, "multifd channel 7", header)
        pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), PAGES[:1])
        header[:] = b"B" * PACKET_HEADER_SIZE
        pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), np.zeros(0, dtype=np.int64))  # a header alone
        pio.close()
        want = b"A" * PACKET_HEADER_SIZE + ram[PAGES[0]].tobytes() + b"B" * PACKET_HEADER_SIZE
        got = bytearray()
        while len(got) < len(want):
            got += b.recv(len(want) - len(got))
    assert bytes(got) == want


def test_pages_off_page_boundaries_are_sent_by_copy() -> None:
    """vmsplice takes a reference per kernel page: a 4 KiB page that straddles two would take
    two pipe slots, so such a buffer goes through sendmsg instead, byte-exact."""
    if not can_splice():
        pytest.skip("no vmsplice")
    backing = np.frombuffer(mmap.mmap(-1, 65 * TARGET_PAGE_SIZE), dtype=np.uint8)
    ram = backing[100:100 + 64 * TARGET_PAGE_SIZE].reshape(64, TARGET_PAGE_SIZE)
    ram[:] = np.random.default_rng(10).integers(0, 256, size=ram.shape, dtype=np.uint8)
    header = bytearray(b"H" * PACKET_HEADER_SIZE)
    want = bytes(header) + b"".join(ram[p].tobytes() for p in PAGES)
    a, b = _pair()
    with a, b:
        assert _sent(PageSplicer(a, "multifd channel 8", header), b, ram, PAGES, len(want)) == want


def _sent(pio: PageIO, peer: socket.socket, ram: np.ndarray, pages: np.ndarray, size: int) -> bytes:
    """What ``peer`` reads while ``pio`` sends one packet of ``size`` bytes (its header, then
    ``pages`` of ``ram``); ``pio`` is closed after."""
    got = bytearray()

    def read() -> None:
        while len(got) < size:
            got.extend(peer.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert pio.send_packet(PACKET_HEADER_SIZE, address_of(ram), pages) == size
    finally:
        reader.join(10)
        pio.close()
    return bytes(got)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


@pytest.mark.parametrize("pipe_size, spliced", [(8192, False), (64 << 10, False), (128 << 10, True), (1 << 20, True)])
def test_the_source_splices_where_its_pipe_holds_enough_pages(monkeypatch: pytest.MonkeyPatch, pipe_size: int,
                                                              spliced: bool) -> None:
    """page_io: by reference over TCP when the pipe gets enough slots, in as many pieces as the
    pipe needs; else (a low pipe-max-size, or no vmsplice) by sendmsg; the bytes are the same."""
    from engine.runtime import splice

    if not can_splice():
        pytest.skip("no vmsplice")
    monkeypatch.setattr(splice, "PIPE_SIZE", pipe_size)
    ram = _ram(11, 256)
    pages = np.arange(0, 256, 2, dtype=np.int64)  # 128 pages: more than a 32-slot pipe takes at once
    header = bytearray(b"h" * PACKET_HEADER_SIZE)
    want = bytes(header) + b"".join(ram[p].tobytes() for p in pages)
    a, b = _tcp_pair()
    with a, b:
        pio = splice.page_io(a, "multifd channel 9", header)
        assert isinstance(pio, PageSplicer) is spliced
        assert _sent(pio, b, ram, pages, len(want)) == want
