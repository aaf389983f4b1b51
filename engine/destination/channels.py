"""Destination side multifd channels: the receive loop and the ``multifd_recv_sync_main`` barrier.

Theory of operation
-------------------
Each channel process owns one socket (already past its 64-byte handshake) and one
decompression context. It reads a 1344-byte header into a reused buffer, validates every field
against the RAM block table *before* touching memory, then receives the payload into its
buffer and writes it into the segment (``none``: one ``pwrite`` per run of pages) or through
its decompressor. Pages are always written before the packet's SYNC flag is acted on (a merged
data+SYNC packet, doc 2.4). For ``none``, almost every packet is plain (raw pages of a known
block, no flags): :func:`wire.plain_packet` validates its offsets in C (no Python loop), the
pages are written as their runs are found (one pass over the offsets), and only the other
packets go through the general decoder and the method's contract.

On a SYNC packet the channel reports ``synced`` to the parent and blocks until released. The
parent's main-stream loader releases all channels only when it has reached the matching EOS
record *and* all N channels have synced: so nothing from section k+1 is applied before all of
section k, on any channel or on the main channel.

EOF on a packet boundary is a clean end (reported as ``eof``); EOF inside a packet is an error.

Zero pages (ZERO records on the main channel, or zero pages listed in packets) need a write
only where the segment holds data: a page never written is a hole of the tmpfs file and reads
as zero, and writing it would allocate it. The parent asks each block once per section, at
the barrier, whether it holds any data, and :meth:`HeldData.zero_pages` serves the main
channel's ZERO records and the channels alike: in a block that held none when the section
began (a migration into fresh memory, its first pass) zero pages cost nothing, and elsewhere
:meth:`RamBlock.zero_runs` asks the file where its data is. So the channels keep no
per-page record of what they wrote: marking it cost 3-10% of their CPU (two A/B runs).
"""

from __future__ import annotations

import mmap
import os
import socket
import time
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from ..compression import MultiFDMethod
from ..compression.base import Buffer
from ..errors import ChannelError, MigrationTimeout
from ..memory.ram import GuestRam, RamBlock, byte_offsets, page_runs
from ..runtime.buffers import aligned_bytes
from ..runtime.procs import _CTX, ChildGroup, Connection, self_usage
from ..runtime.trace import (
    BARRIER,
    DECOMPRESS,
    RECV_HEADER,
    RECV_PAYLOAD,
    WRITE,
    Trace,
    now_ns,
)
from ..runtime.transport import (
    recv_at_least_into,
    recv_exact_into,
    recv_exact_into_many,
)
from ..stats import (
    C_ANON_RSS,
    C_BYTES,
    C_CPU_US,
    C_NCOUNTERS,
    C_PACKETS,
    C_PAGES,
    C_PEAK_RSS,
    C_ZERO,
    ChannelStats,
)
from ..wire.packet import (
    MAX_PACKET_PAYLOAD,
    MULTIFD_FLAG_NOCOMP,
    PACKET_HEADER_SIZE,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
    decode_packet_header,
    plain_packet,
)

RELEASE = b"r"
QUIT = b"q"


class HeldData:
    """Per block, whether it held any data when the current section began: one byte each in
    a shared anonymous mapping (survives fork), written by the parent at each sync barrier
    while every channel waits, read by the channels and the main-stream loader."""

    def __init__(self, ram: GuestRam) -> None:
        self._ram = ram
        self._mm = mmap.mmap(-1, max(len(ram), 1))
        self.flags = np.frombuffer(self._mm, dtype=np.uint8, count=len(ram))
        self.refresh()

    def refresh(self) -> None:
        for i, block in enumerate(self._ram):
            self.flags[i] = block.holds_data()

    def zero_pages(self, name: str, idx: npt.NDArray[np.int64]) -> None:
        """Make pages ``idx`` of block ``name`` read as zero (ZERO records, zero pages listed in
        packets): nothing to do in a block that held no data when the section began (every
        page of it is still a hole), else :meth:`RamBlock.zero_runs`."""
        if self.flags[self._ram.index_of(name)]:
            self._ram[name].zero_runs(page_runs(idx))


class _Sink:
    """The packet being received (implements ``compression.PacketSink``)."""

    def __init__(self, sock: socket.socket, what: str) -> None:
        self.sock = sock
        self.what = what
        self.payload_what = f"{what} payload"
        # + the next header, read ahead; page-aligned, so that pwrite's copies run at full speed
        self.payload_view = aligned_bytes(MAX_PACKET_PAYLOAD + PACKET_HEADER_SIZE)
        self.block: RamBlock | None = None
        self.idx: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.next_packet_size = 0
        self.trace: Trace | None = None
        self._t = 0  # end of the last span (tracing)

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
        """Write through the segment's file descriptor: on fresh shared memory about 2x faster
        than faulting pages in through the mapping (tmpfs does not zero a page written whole),
        and the channel never maps guest pages, so its RSS does not grow with the guest."""
        return self.block is not None and self.block.fd >= 0

    def recv_into_pages(self) -> None:
        assert self.block is not None
        if self._by_fd():
            self.recv_and_pwrite(self.block, byte_offsets(self.idx))
            return
        buf = self.block.buf
        views = [buf[a * TARGET_PAGE_SIZE:b * TARGET_PAGE_SIZE] for a, b in page_runs(self.idx)]
        t0 = now_ns()
        recv_exact_into_many(self.sock, views, self.payload_what)
        if self.trace is not None:
            self.trace.span(RECV_PAYLOAD, t0)

    def recv_and_pwrite(self, block: RamBlock, offsets: tuple[int, ...], read_ahead: bool = False) -> int:
        """Raw pages (at byte ``offsets``): receive them into the (cache-hot) packet buffer,
        then one ``pwrite`` per run of pages into the segment. With ``read_ahead`` the same
        receive also takes up to a header's worth of what follows (the next packet, usually
        there already: one receive per packet instead of two); returns how many bytes of it
        came, at ``payload_view[len(offsets) * 4096:]``."""
        size = len(offsets) * TARGET_PAGE_SIZE
        t0 = now_ns() if self.trace is not None else 0
        if read_ahead:
            got = recv_at_least_into(self.sock, self.payload_view[: size + PACKET_HEADER_SIZE], size,
                                     self.payload_what)
        else:
            recv_exact_into(self.sock, self.payload_view[:size], self.payload_what)
            got = size
        t1 = now_ns() if self.trace is not None else 0
        block.pwrite_offsets(offsets, self.payload_view)
        if self.trace is not None:
            self.trace.span(RECV_PAYLOAD, t0, t1)
            self.trace.span(WRITE, t1)
        return got - size

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


def _channel_loop(
    events: Connection,
    channel: int,
    sock: socket.socket,
    control: Connection,
    ram: GuestRam,
    held: HeldData,
    method: MultiFDMethod,
    counters: npt.NDArray[np.uint64],
    stall_timeout: float,
    tracing: bool,
) -> None:
    ctx = method.recv_setup()
    tr = sink_trace = Trace(f"destination channel {channel}") if tracing else None
    what = f"multifd channel {channel}"
    header = bytearray(PACKET_HEADER_SIZE)
    hview = memoryview(header)
    sink = _Sink(sock, what)
    lengths = ram.lengths
    mine = counters[channel].data  # item updates: half the cost of numpy scalar ones
    sink.trace = sink_trace
    sock.settimeout(stall_timeout)
    # plain packets skip the method's contract: raw pages written with pwrite
    plain_path = method.flag == MULTIFD_FLAG_NOCOMP and all(b.fd >= 0 for b in ram)
    header_what = f"{what} packet header"
    ahead = 0  # bytes of the next header already received with the last payload
    payload = sink.payload_view
    try:
        while True:
            t0 = now_ns() if tr is not None else 0
            if not recv_exact_into(sock, hview, header_what, eof_ok=True, start=ahead):
                if tr is not None:
                    events.send(("trace", channel, tr.name, os.getpid(), tr.to_bytes()))
                events.send(("eof", channel))
                return
            if tr is not None:
                tr.span(RECV_HEADER, t0)
            ahead = 0
            plain = plain_packet(header, lengths) if plain_path else None
            if plain is not None:
                pages = len(plain.listed)
                ahead = sink.recv_and_pwrite(ram[plain.ramblock], plain.listed, read_ahead=True)
                if ahead:
                    end = pages * TARGET_PAGE_SIZE
                    hview[:ahead] = payload[end:end + ahead]
                mine[C_PACKETS] += 1
                mine[C_PAGES] += pages
                mine[C_BYTES] += PACKET_HEADER_SIZE + pages * TARGET_PAGE_SIZE
                continue
            hdr = decode_packet_header(header, channel=channel, expected_compression=method.flag, blocks=lengths,
                                       expected_name=method.name)
            mine[C_PACKETS] += 1
            wire_bytes = PACKET_HEADER_SIZE
            if hdr.zero_pages:  # zero-page-detection=multifd: before the data, as QEMU 9.0 does
                held.zero_pages(hdr.ramblock, hdr.zero_offsets >> TARGET_PAGE_BITS)
                mine[C_ZERO] += hdr.zero_pages
            if hdr.normal_pages:
                sink.block = ram[hdr.ramblock]
                sink.idx = hdr.offsets >> 12
                sink.next_packet_size = hdr.next_packet_size or hdr.normal_pages * TARGET_PAGE_SIZE
                ctx.recv_pages(sink)
                mine[C_PAGES] += hdr.normal_pages
                wire_bytes += sink.next_packet_size
            mine[C_BYTES] += wire_bytes
            if hdr.sync:
                events.send(("synced", channel, hdr.packet_num))
                t0 = now_ns()
                if not _wait_release(control, channel):
                    return
                if tr is not None:
                    tr.span(BARRIER, t0)
    finally:
        ctx.recv_cleanup()
        mine[C_CPU_US], mine[C_PEAK_RSS], mine[C_ANON_RSS] = self_usage()


def _wait_release(control: Connection, channel: int) -> bool:
    """Block at the sync barrier; True when released, False when told to quit."""
    parent = os.getppid()
    while not control.poll(1.0):
        if os.getppid() != parent:
            raise ChannelError(f"multifd channel {channel}: parent process went away at the sync barrier")
    return control.recv_bytes() == RELEASE


class RecvChannels:
    """The destination's N channel processes and the sync barrier (``multifd_recv_state``)."""

    def __init__(
        self,
        socks: Sequence[socket.socket],
        ram: GuestRam,
        method: MultiFDMethod,
        *,
        stall_timeout: float,
        close_in_children: Sequence[Any] = (),
        tracing: bool = False,
    ) -> None:
        n = len(socks)
        self.traces: list[tuple[str, int, bytes]] = []  # (track name, pid, records) from children
        self.n = n
        self.stall_timeout = stall_timeout
        self.held = HeldData(ram)
        self._shared = mmap.mmap(-1, 8 * n * C_NCOUNTERS)
        self._counters = np.frombuffer(self._shared, dtype=np.uint64).reshape(n, C_NCOUNTERS)
        self.group = ChildGroup("destination")
        self._control: list[Connection] = []
        self.synced: dict[int, int] = {}  # channel -> packet_num of its pending SYNC
        self.ended: set[int] = set()
        self.max_packet_num = 0
        self.barrier_wait = 0.0
        self.syncs = 0
        self._closed = False
        try:
            for i, sock in enumerate(socks):
                c_read, c_write = _CTX.Pipe(duplex=False)
                self.group.start(
                    i, _channel_loop,
                    (i, sock, c_read, ram, self.held, method, self._counters, stall_timeout, tracing),
                    own=sock, others=[*socks, *close_in_children, *self._control],
                )
                c_read.close()
                self._control.append(c_write)
        except BaseException:
            self.close(graceful=False)
            raise

    @property
    def event_handles(self) -> list[Any]:
        """Everything :meth:`poll` wants to hear about (for the main loop's select)."""
        return [*self.group.events, *[p.sentinel for p in self.group.procs]]

    def poll(self, timeout: float = 0.0) -> None:
        """Take in channel messages; raises on a channel error or death."""
        try:
            msgs = self.group.wait_events(timeout)
        except ChannelError:
            raise
        for msg in msgs:
            if msg[0] == "synced":
                self.synced[msg[1]] = msg[2]
                self.max_packet_num = max(self.max_packet_num, msg[2])
            elif msg[0] == "eof":
                self.ended.add(msg[1])
            elif msg[0] == "trace":
                self.traces.append((msg[2], msg[3], msg[4]))

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
        for conn in self._control:
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

    def stats(self) -> list[ChannelStats]:
        pids = self.group.pids
        return [ChannelStats.from_counters(i, pids[i], c) for i, c in enumerate(self._counters)]

    def close(self, *, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if not graceful:
            for conn in self._control:
                try:
                    conn.send_bytes(QUIT)
                except OSError:
                    pass
        self.group.close(graceful=graceful)
        for conn in self._control:
            conn.close()
