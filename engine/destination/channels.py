"""Destination side multifd channels: the receive loop and the ``multifd_recv_sync_main`` barrier.

Each channel process owns one socket and one decompression context. It reads a header and
validates every field against the RAM block table *before* touching memory. Then the pages go
into guest RAM: ``none`` is received straight into views of the mapping (one copy, by the
kernel), a compressed payload through its decompressor; always before acting on the packet's
SYNC flag (a merged data+SYNC packet, doc 2.4). With pre-allocated RAM the channels start
before the migration (standby) and map every page first, so no page faults during it. On a SYNC packet it reports :class:`Synced` and blocks until
released: the loader releases all channels only when it has reached the matching EOS record
*and* all of them have synced, so nothing of section k+1 is applied before all of section k,
on any channel. EOF on a packet boundary is a clean end (:class:`Eof`), inside a packet an error.
"""

from __future__ import annotations

import mmap
import os
import socket
import time
from dataclasses import dataclass
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from ..compression import MultiFDMethod
from ..compression.base import Buffer
from ..errors import ChannelError, MigrationTimeout
from ..memory.ram import GuestRam, RamBlock
from ..memory.runs import page_runs
from ..runtime.buffers import aligned_bytes
from ..runtime.channels import ChannelEnd, ChannelSet, Eof, Ready, Synced
from ..runtime.iov import PageIO, address_of
from ..runtime.procs import FORK, Connection, self_usage
from ..runtime.trace import BARRIER, DECOMPRESS, RECV_HEADER, RECV_PAYLOAD, WRITE, Trace, now_ns
from ..runtime.transport import recv_at_least_into_many, recv_exact_into, recv_exact_into_many
from ..stats import Counters
from ..wire.packet import (MULTIFD_FLAG_NOCOMP, PACKET_FIXED_SIZE, PAGES_PER_PACKET, TARGET_PAGE_BITS,
                           TARGET_PAGE_SIZE, check_header_start, decode_packet_header, header_size, max_payload,
                           plain_packet)

RELEASE = b"r"
QUIT = b"q"
SOCKET = b"s"  # a standby channel's socket follows (SCM_RIGHTS)
# the counter columns a channel updates per packet
_PACKETS, _PAGES, _ZERO, _BYTES = Counters.PACKETS, Counters.PAGES, Counters.ZERO, Counters.BYTES


class HeldData:
    """Per block, whether it held any data when the current section began: one byte each in
    a shared anonymous mapping (survives fork), written by the parent at each sync barrier
    while every channel waits, read by the channels and the main-stream loader.

    Zero pages (ZERO records on the main channel, or zero pages listed in packets) need a write
    only where the block may hold data. In fresh memory a page never written is a hole of the
    tmpfs file and reads as zero, so the segment itself says where data is
    (:meth:`RamBlock.holds_data`); pre-allocated memory whose pages the channels mapped ahead
    (``known_zero``) holds only the zeros of that allocation until a page arrives, so there the
    writers' own marks (:meth:`mark_written`) say it; so does any RAM declared up front (``--ram``),
    which nothing but the migration writes (with TLS and ``--prealloc`` its pages are allocated
    and zeroed, so the file would say "data" everywhere). Elsewhere :meth:`RamBlock.zero_runs`
    asks the file where its data is; the channels keep no per-page record of what they wrote."""

    def __init__(self, ram: GuestRam, *, known_zero: bool = False) -> None:
        self._ram = ram
        self.known_zero = known_zero
        n = len(ram)
        self._mm = mmap.mmap(-1, max(2 * n, 1))
        self.flags = np.frombuffer(self._mm, dtype=np.uint8, count=n)
        self.written = np.frombuffer(self._mm, dtype=np.uint8, count=n, offset=n)  # set by any writer
        self.refresh()

    def refresh(self) -> None:
        for i, block in enumerate(self._ram):
            self.flags[i] = self.written[i] or (not self.known_zero and block.holds_data())

    def mark_written(self, index: int) -> None:
        """Pages of block ``index`` received data (any writer, any process)."""
        if not self.written[index]:
            self.written[index] = 1

    def zero_pages(self, name: str, idx: npt.NDArray[np.int64]) -> None:
        """Make pages ``idx`` of block ``name`` read as zero (ZERO records, zero pages listed in
        packets): nothing to do in a block that held no data when the section began, else
        :meth:`RamBlock.zero_runs`."""
        if self.flags[self._ram.index_of(name)]:
            self._ram[name].zero_runs(page_runs(idx))


class _Sink:
    """The packet being received (implements ``compression.PacketSink``)."""

    def __init__(self, sock: socket.socket, what: str, packet_pages: int = PAGES_PER_PACKET) -> None:
        self.sock = sock
        self.what = what
        self.payload_what = f"{what} payload"
        # a compressed payload; page-aligned, so that pwrite's copies run at full speed
        self.payload_view = aligned_bytes(max_payload(packet_pages))
        self.block: RamBlock | None = None
        self.idx: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.next_packet_size = 0
        self.trace: Trace | None = None
        self._t = 0  # end of the last span (tracing)
        self.mapped = False  # this process mapped all of guest RAM ahead (standby): copy into the mapping
        self.pio: PageIO | None = None  # a plain socket's iovec path (runtime.iov)

    @property
    def normal_pages(self) -> int:
        return len(self.idx)

    def read_payload(self) -> memoryview:
        view = self.payload_view[: self.next_packet_size]
        t0 = now_ns()
        recv_exact_into(self.sock, view, self.payload_what)
        if self.trace is not None:
            self._t = self.trace.span(RECV_PAYLOAD, t0)
        return view

    def _by_fd(self) -> bool:
        """Write decompressed pages through the segment's file descriptor: into fresh shared
        memory faster than faulting pages in through the mapping (tmpfs does not zero a page
        written whole); a standby channel has every page mapped already, so it copies into them."""
        return self.block is not None and self.block.fd >= 0 and not self.mapped

    def recv_into_pages(self) -> None:
        """``none`` pages of a packet that is not plain (merged data+SYNC, zero pages listed):
        received straight into guest RAM, like the plain ones."""
        block, page = self.block, TARGET_PAGE_SIZE
        assert block is not None
        t0 = now_ns()
        if self.pio is not None:
            self.pio.recv_pages(address_of(block.pages), self.idx << TARGET_PAGE_BITS, 0)
        else:
            buf = block.buf
            recv_exact_into_many(self.sock, [buf[a * page:b * page] for a, b in page_runs(self.idx)],
                                 self.payload_what)
        if self.trace is not None:
            self.trace.span(RECV_PAYLOAD, t0)

    def scatter(self, data: Buffer) -> None:
        assert self.block is not None
        t0 = now_ns()
        if self.trace is not None:
            self.trace.span(DECOMPRESS, self._t, t0)
        try:
            self._scatter(data)
        finally:
            if self.trace is not None:
                self.trace.span(WRITE, t0)

    def _scatter(self, data: Buffer) -> None:
        assert self.block is not None
        if self._by_fd():
            self.block.pwrite_pages(self.idx, memoryview(data).cast("B"))  # type: ignore[arg-type]
            return
        pages = np.frombuffer(data, dtype=np.uint8).reshape(len(self.idx), TARGET_PAGE_SIZE)
        idx = self.idx
        if idx[-1] - idx[0] == len(idx) - 1:  # one contiguous run: a slice, no fancy indexing
            self.block.pages[idx[0]:idx[-1] + 1] = pages
        else:
            self.block.pages[idx] = pages


@dataclass(frozen=True)
class RecvSetup:
    """What a destination channel process works with (its release pipe is ``ChannelEnd.control``)."""

    #: None for a channel started ahead of its connection (pre-allocated RAM): it maps the RAM
    #: first, reports :class:`Ready`, and then gets its socket through its control pipe
    sock: socket.socket | None
    ram: GuestRam
    held: HeldData
    method: MultiFDMethod
    stall_timeout: float
    tracing: bool
    packet_pages: int = PAGES_PER_PACKET


def _channel_loop(me: ChannelEnd, setup: RecvSetup) -> None:
    """Packets until EOF. For ``none`` almost every packet is plain (raw pages of a known block,
    no flags): :func:`plain_packet` validates its offsets in C (no Python loop) and the pages are
    received at their offsets; only the other packets go through the general decoder and the
    method's contract. A plain packet's pages are received straight into the mapping (one copy,
    by the kernel), together with up to a header's worth of what follows: usually one
    ``recvmsg`` of an iovec array per packet (``runtime.iov``; a TLS socket takes views)."""
    ram, method, sock, mine = setup.ram, setup.method, setup.sock, me.counters
    if sock is None:
        sock = _standby(me, setup)
        if sock is None:
            return
    ctx = method.recv_setup()
    tr = Trace(f"destination channel {me.index}") if setup.tracing else None
    what = f"multifd channel {me.index}"
    packet_pages = setup.packet_pages
    header_len = header_size(packet_pages)
    header = bytearray(header_len)
    hview = memoryview(header)
    sink = _Sink(sock, what, packet_pages)
    sink.trace = tr
    sink.mapped = setup.sock is None  # a standby channel has mapped every page
    lengths = ram.lengths
    sock.settimeout(setup.stall_timeout)
    plain_path = method.flag == MULTIFD_FLAG_NOCOMP
    header_what = f"{what} packet header"
    ahead = 0  # bytes of the next header already received with the last payload
    held, index_of = setup.held, {b.name: i for i, b in enumerate(ram)}
    page = TARGET_PAGE_SIZE
    # none on a plain socket: a packet's pages come with one recvmsg of an iovec array
    pio = PageIO(sock, sink.payload_what, header, packet_pages) if plain_path and type(sock) is socket.socket else None
    sink.pio = pio
    bases = {b.name: address_of(b.pages) for b in ram}
    # a header's length follows packet-pages: with bigger packets than QEMU's, read its fixed
    # part first, so that a source with other packets is named rather than misread
    fixed_first = packet_pages != PAGES_PER_PACKET
    try:
        while True:
            t0 = now_ns() if tr is not None else 0
            if fixed_first and ahead < PACKET_FIXED_SIZE:
                if recv_exact_into(sock, hview[:PACKET_FIXED_SIZE], header_what, eof_ok=True, start=ahead):
                    ahead = PACKET_FIXED_SIZE
                    check_header_start(header, channel=me.index, packet_pages=packet_pages)
            if not recv_exact_into(sock, hview, header_what, eof_ok=True, start=ahead):
                me.hand_over(tr)
                me.send(Eof(me.index))
                return
            if tr is not None:
                tr.span(RECV_HEADER, t0)
            ahead = 0
            plain = plain_packet(header, lengths, packet_pages) if plain_path else None
            if plain is not None:
                pages = len(plain.offsets)
                held.mark_written(index_of[plain.ramblock])
                t0 = now_ns() if tr is not None else 0
                if pio is not None:  # the offsets go into the iovecs before the next header lands
                    ahead = pio.recv_pages(bases[plain.ramblock], plain.offsets, header_len)
                else:
                    buf = ram[plain.ramblock].buf
                    views = [buf[a * page:b * page] for a, b in page_runs(plain.offsets >> TARGET_PAGE_BITS)]
                    views.append(hview)  # and up to a header's worth of what follows
                    ahead = recv_at_least_into_many(sock, views, pages * page, sink.payload_what) - pages * page
                if tr is not None:
                    tr.span(RECV_PAYLOAD, t0)
                mine[_PACKETS] += 1
                mine[_PAGES] += pages
                mine[_BYTES] += header_len + pages * TARGET_PAGE_SIZE
                continue
            hdr = decode_packet_header(header, channel=me.index, expected_compression=method.flag, blocks=lengths,
                                       expected_name=method.name, packet_pages=packet_pages)
            mine[_PACKETS] += 1
            wire_bytes = header_len
            if hdr.zero_pages:  # zero-page-detection=multifd: before the data, as QEMU 9.0 does
                held.zero_pages(hdr.ramblock, hdr.zero_offsets >> TARGET_PAGE_BITS)
                mine[_ZERO] += hdr.zero_pages
            if hdr.normal_pages:
                sink.block = ram[hdr.ramblock]
                sink.idx = hdr.offsets >> TARGET_PAGE_BITS
                sink.next_packet_size = hdr.next_packet_size or hdr.normal_pages * TARGET_PAGE_SIZE
                ctx.recv_pages(sink)
                held.mark_written(index_of[hdr.ramblock])
                mine[_PAGES] += hdr.normal_pages
                wire_bytes += sink.next_packet_size
            mine[_BYTES] += wire_bytes
            if hdr.sync:
                me.send(Synced(me.index, hdr.packet_num))
                t0 = now_ns()
                if not _wait_release(me.control, me.index):
                    return
                if tr is not None:
                    tr.span(BARRIER, t0)
    finally:
        ctx.recv_cleanup()


def _standby(me: ChannelEnd, setup: RecvSetup) -> socket.socket | None:
    """A channel started before its connection: map every page of the (pre-allocated) RAM now,
    outside the migration (one page fault each would cost more than the copy of the page),
    report :class:`Ready`, then wait for the socket; None when told to quit instead."""
    for block in setup.ram:
        block.populate_mapping()
    me.cpu_base_us = self_usage()[0]
    me.send(Ready(me.index))
    try:
        if _wait_command(me.control, me.index, "before the migration") != SOCKET:
            return None
        return socket.socket(fileno=recv_handle(me.control))
    except EOFError:
        return None


def _wait_release(control: Connection, channel: int) -> bool:
    """Block at the sync barrier; True when released, False when told to quit."""
    return _wait_command(control, channel, "at the sync barrier") == RELEASE


def _wait_command(control: Connection, channel: int, where: str) -> bytes:
    """The parent's next command; a channel whose parent died fails instead of waiting forever."""
    parent = os.getppid()
    while not control.poll(1.0):
        if os.getppid() != parent:
            raise ChannelError(f"multifd channel {channel}: parent process went away {where}")
    return control.recv_bytes()


class RecvChannels(ChannelSet):
    """The destination's N channel processes and the sync barrier (``multifd_recv_state``)."""

    def __init__(self, socks: Sequence[socket.socket] | int, ram: GuestRam, method: MultiFDMethod, *,
                 stall_timeout: float, close_in_children: Sequence[Any] = (), tracing: bool = False,
                 known_zero: bool = False, packet_pages: int = PAGES_PER_PACKET) -> None:
        """``socks``: the channels' connections; or, for pre-allocated RAM, how many channels to
        start ahead of them (standby: each maps all of the RAM now, :meth:`wait_ready`, and
        receives plain packets straight into it once :meth:`attach` hands it its socket).
        ``known_zero``: ``ram`` is fresh, nothing has written it (standby RAM always is)."""
        standby = isinstance(socks, int)
        n = socks if isinstance(socks, int) else len(socks)
        super().__init__(n, "destination")
        self.stall_timeout = stall_timeout
        self.held = HeldData(ram, known_zero=standby or known_zero)
        self.synced: dict[int, int] = {}  # channel -> packet_num of its pending SYNC
        self.ended: set[int] = set()
        self.max_packet_num = 0
        self.barrier_wait = 0.0
        self.syncs = 0
        try:
            if isinstance(socks, int):
                for _ in range(n):
                    setup = RecvSetup(None, ram, self.held, method, stall_timeout, tracing, packet_pages)
                    self.start(_channel_loop, setup, FORK.Pipe(duplex=True), others=close_in_children)
            else:
                for sock in socks:
                    setup = RecvSetup(sock, ram, self.held, method, stall_timeout, tracing, packet_pages)
                    self.start(_channel_loop, setup, FORK.Pipe(duplex=False), own=sock,
                               others=[*socks, *close_in_children])
        except BaseException:
            self.close(graceful=False)
            raise

    def wait_ready(self, timeout: float) -> None:
        """Standby channels: wait until every one has mapped the RAM."""
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.n)) - ready)
                raise MigrationTimeout(f"multifd channels {missing} did not map the RAM within {timeout:g}s")
            for ev in self.events(min(left, 1.0)):
                if not isinstance(ev, Ready):
                    self.unexpected(ev)
                ready.add(ev.channel)

    def attach(self, socks: Sequence[socket.socket]) -> None:
        """Standby channels: hand channel i its connection ``socks[i]`` (this process's copy closes)."""
        for conn, sock, pid in zip(self.control, socks, self.group.pids):
            try:
                conn.send_bytes(SOCKET)
                send_handle(conn, sock.fileno(), pid)
            except OSError:  # the channel is gone: say how it ended
                self.events(1.0)
                raise ChannelError("multifd channel (destination): it ended before its connection arrived") from None
            finally:
                sock.close()

    @property
    def event_handles(self) -> list[Any]:
        """Everything :meth:`poll` wants to hear about (for the main loop's select)."""
        return [*self.group.events, *[p.sentinel for p in self.group.procs]]

    def poll(self, timeout: float = 0.0) -> None:
        """Take in channel events; raises on a channel error or death."""
        for ev in self.events(timeout):
            if isinstance(ev, Synced):
                self.synced[ev.channel] = ev.packet_num
                self.max_packet_num = max(self.max_packet_num, ev.packet_num)
            elif isinstance(ev, Eof):
                self.ended.add(ev.channel)

    def barrier(self, where: str) -> None:
        """At an EOS: wait until every channel has synced, then release them all."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.stall_timeout
        while len(self.synced) < self.n:
            gone = self.ended - set(self.synced)
            if gone:
                raise ChannelError(
                    f"multifd channel {min(gone)} (destination): connection closed before the SYNC for {where}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.n)) - set(self.synced))
                raise MigrationTimeout(
                    f"multifd channels {missing} sent no SYNC packet for {where} within {self.stall_timeout:g}s"
                )
            self.poll(min(left, 1.0))
        self.synced.clear()
        self.syncs += 1
        self.held.refresh()  # every page of the section is in place; none of the next one yet
        for conn in self.control:
            conn.send_bytes(RELEASE)
        self.barrier_wait += time.perf_counter() - t0

    def finish(self, timeout: float) -> None:
        """After the main stream ended: every channel must reach EOF on a packet boundary."""
        deadline = time.monotonic() + timeout
        while len(self.ended) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.n)) - self.ended)
                raise MigrationTimeout(
                    f"multifd channels {missing} did not close within {timeout:g}s after the end of the stream"
                )
            if self.synced:
                ch = min(self.synced)
                raise ChannelError(f"multifd channel {ch} (destination): SYNC packet after the last EOS")
            self.poll(min(left, 1.0))
        for ch, proc in enumerate(self.group.procs):
            proc.join(max(0.1, deadline - time.monotonic()))
        self.poll(0)

    def close(self, *, graceful: bool) -> None:
        if not graceful and not self._closed:  # channels waiting at the barrier quit
            for conn in self.control:
                try:
                    conn.send_bytes(QUIT)
                except OSError:
                    pass
        super().close(graceful=graceful)
