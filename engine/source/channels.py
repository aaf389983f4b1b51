"""Source side multifd channels: the migration thread hands out jobs, N channel processes send.

The migration thread batches the pages of one RAM block into packets of at most
``packet-pages`` pages (QEMU's 128 by default) and writes them, two 128-page packets to a job
(half the hand-offs, wake-ups and pipe calls), into the job pipe of an idle channel, like
QEMU's ``multifd_send_pages``. A job names pages and never carries their bytes; every job of a
migration has one size, each is written and read whole (the pipe has one writer), and the order
holds: a SYNC job written after data jobs is handled after them. A channel process owns one
socket and one compression context; per packet it encodes the header from the page indices and
sends the header and the pages (``runtime.splice``: by reference) or the payload. For a SYNC
job it writes an empty SYNC packet and reports :class:`Synced`:
:meth:`SendChannels.sync` returns once every channel has *written* its SYNC packet
(``multifd_send_sync_main``), and only then may the main channel carry the EOS. The setup
section's round, which has no pages, is written by the migration thread before it forks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt

from ..compression import MultiFDMethod
from ..errors import ChannelError, MigrationTimeout
from ..memory.ram import GuestRam
from ..runtime.channels import ChannelEnd, ChannelSet, Synced
from ..runtime.iov import PageIO, address_of
from ..runtime.procs import FORK
from ..runtime.splice import page_io
from ..runtime.tls import close_notify
from ..runtime.trace import COMPRESS, GATHER, SEND, WAIT, ZERO_SCAN, Trace, now_ns
from ..runtime.transport import send_all
from ..runtime.zerocopy import ZeroCopySender
from ..stats import Counters
from ..wire.packet import (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_SYNC, PAGES_PER_PACKET, TARGET_PAGE_SIZE,
                           PacketEncoder, header_size)
from .batch import NO_PAGES, Batch

#: Jobs a channel may have queued in its pipe. QEMU 7.2 uses 1 (one ``pages`` buffer per
#: channel); with processes, a wake-up on a busy 2-core machine costs more than a thread
#: switch, so a short queue keeps every socket busy. The wire format is unaffected.
QUEUE_DEPTH = 2

JOB_DATA = 1
JOB_SYNC = 2
JOB_QUIT = 3
#: A packet's record in a job: kind, page count, block index, packet_num, flags (padded to 24
#: bytes); then the page indices (8-byte aligned int64), which become the header's offsets.
_JOB = struct.Struct("<BxHIQI4x")
_PAGE_INDEX = np.dtype("<i8")
#: Pages a job carries at most: two of QEMU's packets (2096 bytes, < PIPE_BUF), one bigger one.
JOB_PAGES = 2 * PAGES_PER_PACKET


class JobLayout:
    """The jobs of a migration with ``packet_pages``-page packets: ``records`` offsets of
    packet records (an unused one has kind 0) in ``size`` bytes."""

    def __init__(self, packet_pages: int) -> None:
        record = _JOB.size + _PAGE_INDEX.itemsize * packet_pages
        self.size = max(1, JOB_PAGES // packet_pages) * record
        self.records = tuple(range(0, self.size, record))
# the counter columns a channel updates per packet
_PACKETS, _PAGES, _ZERO, _BYTES = Counters.PACKETS, Counters.PAGES, Counters.ZERO, Counters.BYTES
_ZC_MISSED = Counters.ZERO_COPY_MISSED

@dataclass(frozen=True)
class SendSetup:
    """What a source channel process works with (its job pipe is ``ChannelEnd.control``)."""

    sock: socket.socket
    ram: GuestRam
    method: MultiFDMethod
    level: int
    ready: Any  # channels_ready: the semaphore a channel posts after each job
    done: npt.NDArray[np.uint64]  # jobs done, per channel: each channel writes only its own
    tracing: bool
    #: zero-page-detection=multifd (QEMU 9.0): each channel finds the zero pages among those it
    #: reads and lists them in the header's ``zero_pages`` slots, so the scan runs in parallel
    detect_zero: bool
    #: zero-copy-send: guest pages go with MSG_ZEROCOPY (the socket has SO_ZEROCOPY already)
    zero_copy: bool = False
    packet_pages: int = PAGES_PER_PACKET


def write_sync(sock: socket.socket, enc: PacketEncoder, packet_num: int, row: Any, what: str) -> None:
    """An empty packet with the SYNC flag on ``sock``, counted in the channel's counter ``row``
    (a channel's own, or the parent's for the setup round written before the fork)."""
    header = enc.encode(flags=MULTIFD_FLAG_SYNC, packet_num=packet_num)
    row[_BYTES] += send_all(sock, [header], what)
    row[_PACKETS] += 1


def _channel_loop(me: ChannelEnd, setup: SendSetup) -> None:
    _Sender(me, setup).run()


class _Sender:
    """A source channel process: the job loop and a method per job kind."""

    def __init__(self, me: ChannelEnd, setup: SendSetup) -> None:
        method = setup.method
        self.me, self.counters, self.sock = me, me.counters, setup.sock
        self.ready, self.done = setup.ready, setup.done.data
        self.ctx, self.flag = method.send_setup(setup.level), method.flag
        self.jobs = JobLayout(setup.packet_pages)
        self.enc, self.batch = PacketEncoder(setup.packet_pages), Batch(setup.packet_pages)
        self.header_size = len(self.enc.buf)
        self.trace = Trace(f"source channel {me.index}") if setup.tracing else None
        self.blocks = setup.ram.blocks
        self.names = [b.name.encode() for b in self.blocks]
        self.what = f"multifd channel {me.index}"
        self.raw = method.flag == MULTIFD_FLAG_NOCOMP  # the payload is the pages themselves
        self.detect_zero = setup.detect_zero
        self.prepare_span = GATHER if method.flag == 0 else COMPRESS
        self.zc = ZeroCopySender(self.sock, self.what, self.sock.gettimeout() or 20.0) if setup.zero_copy else None
        # the common case (none, plain socket): the packet's pages by reference (runtime.splice)
        self.pio: PageIO | None = None
        if self.raw and self.zc is None and type(self.sock) is socket.socket:
            self.pio = page_io(self.sock, self.what, self.enc.buf, setup.packet_pages)
        self.bases = [address_of(b.pages) for b in self.blocks]

    def run(self) -> None:
        """Jobs until QUIT, or until the parent closes the pipe (it is tearing the migration down)."""
        read, jobs, tr, data, sync = os.read, self.me.control, self.trace, self.data, self.sync
        size = self.jobs.size
        try:
            while True:
                t0 = now_ns() if tr is not None else 0
                msg = read(jobs, size)
                if len(msg) != size:
                    if not msg:
                        break
                    msg = self.rest_of_job(msg)
                if tr is not None:
                    t0 = tr.span(WAIT, t0)
                kind = msg[0]  # a SYNC or QUIT job is one record; a data job's records are data or unused
                if kind == JOB_DATA:
                    data(msg, t0)
                elif kind == JOB_SYNC:
                    sync(msg, t0)
                else:  # JOB_QUIT
                    break
            self.flush_zero_copy()
        finally:
            self.ctx.send_cleanup()
            if self.zc is not None:
                self.zc.close()
            if self.pio is not None:
                self.pio.close()
        self.me.hand_over(tr)
        close_notify(self.sock)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def rest_of_job(self, msg: bytes) -> bytes:
        """A job bigger than the pipe's atomic size can come in pieces: read the rest."""
        parts, got = [msg], len(msg)
        while got < self.jobs.size:
            more = os.read(self.me.control, self.jobs.size - got)
            if not more:
                raise ChannelError(f"{self.what}: a job of {got} bytes, expected {self.jobs.size}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def data(self, msg: bytes, t0: int) -> None:
        """A data job: its packets, then the job counted done and ``channels_ready`` posted."""
        for rec in self.jobs.records:
            if msg[rec] == JOB_DATA:
                t0 = self.packet(msg, rec, t0)
        self.done[self.me.index] += 1  # only this process writes done[channel]
        self.ready.release()

    def packet(self, msg: bytes, rec: int, t0: int) -> int:
        """Send the packet of the job's record at ``rec``; returns the trace clock."""
        _, npages, block_idx, packet_num, flags = _JOB.unpack_from(msg, rec)
        pages = np.frombuffer(msg, _PAGE_INDEX, npages, rec + _JOB.size)
        batch, tr = self.batch, self.trace
        batch.start(self.blocks[block_idx], pages)
        nzero = 0
        if self.detect_zero:
            zeros = batch.drop_zero_pages()
            if len(zeros):  # the header lists the normal pages first, then the zero pages
                pages, nzero = np.concatenate((batch.idx, zeros)), len(zeros)
            if tr is not None:
                t0 = tr.span(ZERO_SCAN, t0)
        normal = npages - nzero
        payload: Sequence[Any] = ()
        if self.raw:  # the pages themselves: through the iovec array, else as views of guest RAM
            size = normal * TARGET_PAGE_SIZE
            if self.pio is None:
                payload = batch.views()
        else:
            payload = self.ctx.send_prepare(batch) if normal else ()
            size = sum(memoryview(p).nbytes for p in payload)  # type: ignore[arg-type,misc]
        header = self.enc.encode_pages(flags=flags | self.flag, packet_num=packet_num, ramblock=self.names[block_idx],
                                       pages=pages, next_packet_size=size, zero_pages=nzero)
        if tr is not None:
            t0 = tr.span(self.prepare_span, t0)
        if self.pio is not None:
            sent = self.pio.send_packet(self.header_size, self.bases[block_idx], batch.idx)
        elif self.zc is not None and payload:  # the header copied, then guest RAM pinned (as QEMU does)
            sent = send_all(self.sock, [header], self.what, self.header_size) + self.zc.send(payload, size)
        else:
            sent = send_all(self.sock, [header, *payload], self.what, self.header_size + size)
        if tr is not None:
            t0 = tr.span(SEND, t0)
        mine = self.counters
        mine[_PACKETS] += 1
        mine[_PAGES] += normal
        mine[_ZERO] += nzero
        mine[_BYTES] += sent
        return t0

    def flush_zero_copy(self) -> None:
        """Before a SYNC packet (and the end): the kernel is done reading every page sent."""
        if self.zc is not None:
            self.zc.flush()
            self.counters[_ZC_MISSED] = self.zc.missed

    def sync(self, msg: bytes, t0: int) -> None:
        """A SYNC job: an empty packet with the SYNC flag, then :class:`Synced` to the parent."""
        packet_num = _JOB.unpack_from(msg)[3]
        self.flush_zero_copy()
        write_sync(self.sock, self.enc, packet_num, self.counters, self.what)
        if self.trace is not None:
            self.trace.span(SEND, t0)
        self.me.send(Synced(self.me.index, packet_num))


class SendChannels(ChannelSet):
    """The parent's handle on N source channel processes (``multifd_send_state``).

    A hand-off takes a ``channels_ready`` token (a channel posts one whenever it finishes a
    job), then scans round-robin from the channel after the last one used for one with room in
    its queue (``issued - done < queue_depth``; QEMU's ``pending_job``) and writes the job into
    its pipe. ``issued`` is written only here and ``done`` only by the channel, so no counter
    is ever updated by two processes."""

    def __init__(self, socks: Sequence[socket.socket], ram: GuestRam, method: MultiFDMethod, level: int, *,
                 stall_timeout: float, close_in_children: Sequence[socket.socket] = (),
                 queue_depth: int = QUEUE_DEPTH, should_stop: Callable[[], None] = lambda: None,
                 tracing: bool = False, detect_zero: bool = False, zero_copy: bool = False,
                 packet_pages: int = PAGES_PER_PACKET) -> None:
        n = len(socks)
        super().__init__(n, "source")
        self.packet_pages, self.header_size = packet_pages, header_size(packet_pages)
        self.jobs = jobs = JobLayout(packet_pages)
        self.method, self.stall_timeout, self.queue_depth = method, stall_timeout, queue_depth
        self.bytes_committed = 0  # header + raw page bytes of every packet handed off
        self.should_stop = should_stop  # raises to abandon a wait (cancellation)
        self.packet_num = 0  # the global counter shared by all channels
        self._next = 0
        self._ready = FORK.Semaphore(0)
        self._done_shared = mmap.mmap(-1, 8 * n)  # jobs done per channel: the children write it
        self._done = np.frombuffer(self._done_shared, dtype=np.uint64)
        self._done_v = self._done.data  # read per packet (plain ints, cheaper than numpy scalars)
        self._issued = [0] * n
        self._job = bytearray(jobs.size)  # the job being written (reused)
        self._job_pages = [np.frombuffer(self._job, dtype=_PAGE_INDEX, count=packet_pages, offset=rec + _JOB.size)
                           for rec in jobs.records]
        self._held = 0  # data records already written into the job, waiting for the next packet
        self.sync_wait = 0.0  # seconds spent waiting for SYNC rounds
        self._sync_ahead = False
        self._sync_before_fork(socks)
        try:
            for sock in socks:
                setup = SendSetup(sock, ram, method, level, self._ready, self._done, tracing, detect_zero, zero_copy,
                                  packet_pages)
                self.start(_channel_loop, setup, os.pipe(), own=sock, others=[*socks, *close_in_children])
        except BaseException:
            self.close(graceful=False)
            raise
        for _ in range(n * self.queue_depth):  # every channel starts idle
            self._ready.release()

    def _sync_before_fork(self, socks: Sequence[socket.socket]) -> None:
        """The setup section's sync round carries no pages, and the sockets are still this
        thread's: it writes every channel's SYNC packet itself, before forking, so that
        ``setup-time`` does not wait for new processes to get a CPU. The first :meth:`sync`
        then returns at once. The packets are the ones the channels would have written."""
        enc = PacketEncoder(self.packet_pages)
        for ch, sock in enumerate(socks):
            write_sync(sock, enc, self.packet_num, self.counters[ch], f"multifd channel {ch}")
            self.packet_num += 1
        self.bytes_committed += self.n * self.header_size
        self._sync_ahead = True

    # -- the migration thread's side

    def _record(self, rec: int, kind: int, block_idx: int, flags: int, idx: npt.NDArray[np.int64] = NO_PAGES) -> None:
        """Write packet record ``rec`` of the job (the next packet_num goes with it)."""
        _JOB.pack_into(self._job, self.jobs.records[rec], kind, len(idx), block_idx, self.packet_num, flags)
        self.packet_num += 1
        self._job_pages[rec][: len(idx)] = idx

    def _send_job(self, ch: int, used: int) -> None:
        """The job's first ``used`` records into channel ``ch``'s pipe (the rest marked unused)."""
        job = self._job
        for rec in self.jobs.records[used:]:
            job[rec] = 0
        try:
            sent = os.write(self.control[ch], job)
            while sent < len(job):  # a job bigger than PIPE_BUF may go in parts
                sent += os.write(self.control[ch], memoryview(job)[sent:])
        except OSError as exc:  # the channel process is gone: say why, if it told us
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                self._check()
                time.sleep(0.01)
            raise ChannelError(f"multifd channel {ch} (source): its process stopped taking work ({exc})") from exc

    def _check(self) -> None:
        for ev in self.events(0):
            self.unexpected(ev)

    def send_pages(self, block_idx: int, idx: npt.NDArray[np.int64]) -> None:
        """Queue one packet (at most ``packet_pages`` page indices of one block). 128-page
        packets go to the channels two to a job: the first waits in the job until the second
        comes, or until :meth:`flush` (which every sync round calls first)."""
        self.bytes_committed += self.header_size + len(idx) * TARGET_PAGE_SIZE
        self._record(self._held, JOB_DATA, block_idx, 0, idx)
        self._held += 1
        if self._held == len(self.jobs.records):
            self.flush()

    def flush(self) -> None:
        """Hand the packets held in the job to the next idle channel."""
        if not self._held:
            return
        waited = 0.0
        while not self._ready.acquire(timeout=0.05):
            self._check()  # a dead or failed channel would never post channels_ready
            self.should_stop()
            waited += 0.05
            if waited >= self.stall_timeout:
                raise MigrationTimeout(
                    f"no multifd channel became idle for {self.stall_timeout:g}s (the destination is not reading)"
                )
        n = self.n
        issued, done, depth = self._issued, self._done_v, self.queue_depth
        for k in range(n):
            ch = (self._next + k) % n
            if issued[ch] - done[ch] < depth:
                break
        else:  # cannot happen: a token means some channel is idle
            raise ChannelError("channels_ready was posted but no channel is idle")
        self._next = (ch + 1) % n
        issued[ch] += 1
        used, self._held = self._held, 0
        self._send_job(ch, used)

    def _to_every_channel(self, kind: int, flags: int) -> None:
        """A one-record SYNC or QUIT job into every channel's pipe, after the packets held in
        the job (which go first, so every data packet precedes it on its channel)."""
        self.flush()
        for ch in range(self.n):
            self._record(0, kind, 0, flags)
            self._send_job(ch, 1)

    def sync(self) -> None:
        """``multifd_send_sync_main``: a SYNC packet on every channel, all of them written."""
        if self._sync_ahead and not self._held and not any(self._issued):  # written before the fork
            self._sync_ahead = False
            return
        self._sync_ahead = False
        t0 = time.perf_counter()
        self.bytes_committed += self.n * self.header_size
        self._to_every_channel(JOB_SYNC, MULTIFD_FLAG_SYNC)
        synced: set[int] = set()
        deadline = time.monotonic() + self.stall_timeout
        while len(synced) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.n)) - synced)
                raise MigrationTimeout(
                    f"multifd channels {missing} did not write their SYNC packet within {self.stall_timeout:g}s"
                )
            self.should_stop()
            for ev in self.events(min(left, 0.2)):
                if isinstance(ev, Synced):
                    synced.add(ev.channel)
                else:
                    self.unexpected(ev)
        self.sync_wait += time.perf_counter() - t0

    def quit(self, timeout: float = 10.0) -> None:
        """Graceful end: every channel finishes its queue, closes its socket and exits 0."""
        self._to_every_channel(JOB_QUIT, 0)
        deadline = time.monotonic() + timeout
        procs = self.group.procs
        while any(p.exitcode is None for p in procs):
            if time.monotonic() > deadline:
                ch = next(i for i, p in enumerate(procs) if p.exitcode is None)
                raise MigrationTimeout(f"multifd channel {ch} (source) did not finish within {timeout:g}s")
            for ev in self.events(0.05):  # raises on an error or a non-zero exit
                self.unexpected(ev)
        self._check()

    def bytes_sent(self) -> int:
        return self.total(Counters.BYTES)
