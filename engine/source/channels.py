"""Source side multifd channels: the channel process loop and the parent's handle on them.

Theory of operation
-------------------
The migration thread (the source's main process) batches non-zero pages of one RAM block into
packets of at most 128 pages and hands them to an idle channel, like QEMU's
``multifd_send_pages``, two packets to a job (half the hand-offs, wake-ups and pipe calls; a
lone packet waits in the job for the next one, or for the sync round, which hands it off
first): it takes a token from the ``channels_ready`` semaphore (a channel posts one whenever
it finishes a job), then scans round-robin from the channel after the last one used for one
with room in its queue (``issued - done < QUEUE_DEPTH``; QEMU's ``pending_job``), and writes
the job into that channel's pipe. A job carries, per packet, only the block index, the page
offsets, the packet_num and the flags: never page bytes. Every job has one fixed size
(:data:`JOB_SIZE`, below the pipe's atomic-write size), so each ``write`` lands whole and each
``read`` of that size returns exactly one job. The pipe is ordered, so a SYNC job written
after data jobs is handled after them.

A channel process owns one socket and one compression context for the whole migration. For a
data job it builds the header in its reused 1344-byte buffer, gets the payload buffers from the
method (for ``none``: views of the pages in guest RAM, whose page-table entries it drops again
every few packets so its RSS does not grow; its mapping is advised ``MADV_SEQUENTIAL``, so a
drop does not also mark the pages recently used) and writes header + payload with one ``sendmsg``.
With ``zero-page-detection=multifd`` (QEMU 9.0) the main process does not scan for zero pages:
each channel scans the pages it read, sends only the non-zero ones and lists the zero ones in
the header's ``zero_pages`` slots, so the scan runs in parallel. Then it counts the job done
and posts ``channels_ready``. (``issued`` is written only by the parent and ``done`` only by
the child, so no counter is ever updated by two processes.) For a SYNC job it
writes an empty packet with flags=SYNC and reports ``synced`` on its event pipe: the parent's
:meth:`SendChannels.sync` returns once every channel has *written* its SYNC packet
(``multifd_send_sync_main``), and only then may the main channel carry the EOS.

Per-channel counters (packets, normal_pages, bytes) live in a shared anonymous mapping that the
child writes and the parent reads for statistics.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt

from ..compression import MultiFDMethod
from ..errors import ChannelError, MigrationTimeout
from ..memory.ram import GuestRam, RamBlock, page_runs, zero_pages
from ..runtime.buffers import aligned_pages
from ..runtime.procs import _CTX, ChildGroup, Connection, self_usage
from ..runtime.trace import COMPRESS, GATHER, SEND, WAIT, ZERO_SCAN, Trace, now_ns
from ..runtime.transport import send_all
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
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_SYNC,
    PACKED_OFFSETS,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
    PacketEncoder,
    consecutive_runs,
)

#: Jobs a channel may have queued in its pipe. QEMU 7.2 uses 1 (one ``pages`` buffer per
#: channel); with processes, a wake-up on a busy 2-core machine costs more than a thread
#: switch, so a short queue keeps every socket busy. The wire format is unaffected.
QUEUE_DEPTH = 2
_PT_PAGES = 512  # pages per page table (2 MiB on x86-64)
#: A channel drops the page-table entries its views brought in once the packets sent since the
#: last drop span this many pages (8 MiB): one madvise per few packets instead of one each,
#: and at most a few MiB of guest pages mapped in the channel at any time.
_UNMAP_SPAN = 4 * _PT_PAGES

JOB_DATA = 1
JOB_SYNC = 2
JOB_QUIT = 3
_JOB = struct.Struct("<BxHIQI")  # kind, page count, block index, packet_num, flags; then the offsets
RECORD_SIZE = _JOB.size + 8 * PAGES_PER_PACKET  # one packet's record: 1044 bytes
#: A job carries up to two packets (half the hand-offs, wake-ups and pipe calls of one each);
#: 2088 bytes, < PIPE_BUF: written and read whole. An unused second record has kind 0.
PACKETS_PER_JOB = 2
JOB_SIZE = PACKETS_PER_JOB * RECORD_SIZE
_RECORDS = tuple(range(0, JOB_SIZE, RECORD_SIZE))

_NO_PAGES: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)


class _Batch:
    """The pages of the packet being sent (implements ``compression.PageBatch``)."""

    def __init__(self) -> None:
        self.scratch = aligned_pages(PAGES_PER_PACKET)  # preadv's copies from the page cache at full speed
        self.block: RamBlock | None = None
        self.idx: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self.gathered: npt.NDArray[np.uint8] | None = None  # this job's pages, already read
        self._mapped: tuple[int, int] | None = None  # pages views() faulted into this process
        self._unmap: tuple[RamBlock, int, int] | None = None  # mapped since the last drop

    def start(self, block: RamBlock, idx: npt.NDArray[np.int64]) -> None:
        self.block, self.idx, self.gathered = block, idx, None

    def done(self) -> None:
        """After the packet is sent: note the page-table entries :meth:`views` brought in, and
        drop them all once they span :data:`_UNMAP_SPAN` pages or another block begins."""
        if self._mapped is None:
            return
        block, (lo, hi) = self.block, self._mapped
        assert block is not None
        self._mapped = None
        if self._unmap is not None:
            was, wlo, whi = self._unmap
            if was is block:
                lo, hi = min(lo, wlo), max(hi, whi)
            else:
                was.unmap_pages(wlo, whi)
        if hi - lo >= _UNMAP_SPAN:
            block.unmap_pages(lo, hi)
            self._unmap = None
        else:
            self._unmap = (block, lo, hi)

    def drop_zero_pages(self) -> npt.NDArray[np.int64]:
        """``zero-page-detection=multifd``: read the pages, keep the non-zero ones (in order,
        compacted in the buffer) as this batch and return the zero pages' indices."""
        pages = self.gather()
        zero = zero_pages(pages.view(np.uint64))
        if not zero.any():
            return _NO_PAGES
        keep = ~zero
        zeros = self.idx[zero]
        self.idx = self.idx[keep]
        n = len(self.idx)
        if n:
            pages[:n] = pages[keep]
        self.gathered = pages[:n]
        return zeros

    @property
    def normal_pages(self) -> int:
        return len(self.idx)

    def views(self) -> Sequence[Any]:
        """Views of the pages in guest RAM, one per run; or, when the channel has already read
        them (its own zero-page scan), that copy: the same bytes, not read twice."""
        assert self.block is not None
        if self.gathered is not None:
            return [self.gathered]
        if not len(self.idx):
            return []
        return self.views_at(self.block, (self.idx * TARGET_PAGE_SIZE).tolist())

    def views_at(self, block: RamBlock, offsets: Sequence[int]) -> list[memoryview]:
        """:meth:`views` for a job's byte offsets (sorted, as RamSaver.save_section hands them
        out; at least one), without numpy: the channel's common path for ``none``."""
        self.block, self.gathered = block, None
        buf = block.buf
        runs = consecutive_runs(offsets, TARGET_PAGE_SIZE)
        self._note_mapped(runs[0][0] >> TARGET_PAGE_BITS, runs[-1][1] >> TARGET_PAGE_BITS)
        return [buf[a:b] for a, b in runs]

    def _note_mapped(self, first: int, end: int) -> None:
        """Pages ``[first, end)`` are about to be read through the mapping. Whole 2 MiB page
        tables: read faults map neighbouring pages too (fault-around, at most one page table's
        worth), and those must go as well or RSS would creep."""
        assert self.block is not None
        lo = first // _PT_PAGES * _PT_PAGES
        hi = -(-end // _PT_PAGES) * _PT_PAGES
        self._mapped = (lo, min(hi, self.block.npages))

    def gather(self) -> npt.NDArray[np.uint8]:
        """Copy the pages into the scratch buffer with positioned reads of the segment (the
        channel never maps guest pages, so its RSS does not grow with the guest); falls back
        to a numpy gather from the mapping for segments without a file descriptor."""
        if self.gathered is not None:
            return self.gathered
        block = self.block
        assert block is not None
        out = self.gathered = self.scratch[: len(self.idx)]
        fd = block.fd
        if fd < 0:
            np.take(block.pages, self.idx, axis=0, out=out)
            return out
        flat = memoryview(out).cast("B")  # type: ignore[arg-type]
        pos = 0
        for a, b in page_runs(self.idx):
            end = pos + (b - a) * TARGET_PAGE_SIZE
            got = os.preadv(fd, (flat[pos:end],), a * TARGET_PAGE_SIZE)
            if got != end - pos:
                raise ChannelError(f"short read of RAM block {block.name!r}: {got} of {end - pos} bytes")
            pos = end
        return out


def _channel_loop(
    events: Connection,
    channel: int,
    sock: socket.socket,
    jobs: int,
    ram: GuestRam,
    method: MultiFDMethod,
    level: int,
    ready: object,
    done: npt.NDArray[np.uint64],
    counters: npt.NDArray[np.uint64],
    tracing: bool,
    detect_zero: bool,
) -> None:
    ctx = method.send_setup(level)
    tr = Trace(f"source channel {channel}") if tracing else None
    enc = PacketEncoder()
    batch = _Batch()
    blocks = ram.blocks
    names = [b.name.encode() for b in blocks]
    what = f"multifd channel {channel}"
    # item updates through memoryviews cost half of numpy scalar ones, every packet
    mine = counters[channel].data
    done_v = done.data
    raw = method.flag == MULTIFD_FLAG_NOCOMP
    lean = raw and not detect_zero  # the numpy-free path below
    if lean:  # the only path that reads guest pages through the mapping (the others use preadv)
        for block in blocks:
            block.read_once()

    def send_packet(msg: bytes, rec: int, t0: int) -> int:
        """Send the data packet of the job's record at ``rec``; returns the trace clock."""
        _, npages, block_idx, packet_num, flags = _JOB.unpack_from(msg, rec)
        first = rec + _JOB.size
        packed = msg[first:first + 8 * npages]  # the header's offsets, as they go out
        zeros = _NO_PAGES
        payload: Sequence[Any]
        if lean:  # 'none' from views, runs straight from the job: no numpy call per packet
            payload = batch.views_at(blocks[block_idx], PACKED_OFFSETS[npages].unpack_from(msg, first))
        else:
            batch.start(blocks[block_idx], np.frombuffer(packed, dtype=">i8") >> TARGET_PAGE_BITS)
            if detect_zero:
                zeros = batch.drop_zero_pages()
                if tr is not None:
                    t0 = tr.span(ZERO_SCAN, t0)
            payload = ctx.send_prepare(batch) if len(batch.idx) else ()
        normal = npages - len(zeros)
        if raw:  # 'none': the payload is the pages themselves
            size = normal * TARGET_PAGE_SIZE
        else:
            size = sum(memoryview(p).nbytes for p in payload)  # type: ignore[arg-type,misc]
        if len(zeros):  # normal pages first, then the zero pages the channel found
            header = enc.encode(
                flags=flags | method.flag, packet_num=packet_num, ramblock=names[block_idx],
                offsets=np.concatenate((batch.idx, zeros)) * TARGET_PAGE_SIZE, next_packet_size=size,
                zero_pages=len(zeros),
            )
        else:
            header = enc.encode_packed(
                flags=flags | method.flag, packet_num=packet_num, ramblock=names[block_idx],
                packed_offsets=packed, next_packet_size=size,
            )
        if tr is not None:
            t0 = tr.span(GATHER if method.flag == 0 else COMPRESS, t0)
        sent = send_all(sock, [header, *payload], what, PACKET_HEADER_SIZE + size)
        batch.done()
        if tr is not None:
            t0 = tr.span(SEND, t0)
        mine[C_PACKETS] += 1
        mine[C_PAGES] += normal
        mine[C_ZERO] += len(zeros)
        mine[C_BYTES] += sent
        return t0

    try:
        while True:
            t0 = now_ns() if tr is not None else 0
            msg = os.read(jobs, JOB_SIZE)
            if len(msg) != JOB_SIZE:
                if not msg:  # the parent closed the pipe: it is tearing the migration down
                    break
                raise ChannelError(f"{what}: a job of {len(msg)} bytes, expected {JOB_SIZE}")
            if tr is not None:
                t0 = tr.span(WAIT, t0)
            kind = msg[0]  # a SYNC or QUIT job is one record; a data job's records are data or unused
            if kind == JOB_DATA:
                for rec in _RECORDS:
                    if msg[rec] == JOB_DATA:
                        t0 = send_packet(msg, rec, t0)
                done_v[channel] += 1  # only this process writes done[channel]
                ready.release()  # type: ignore[attr-defined]
            elif kind == JOB_SYNC:
                packet_num = _JOB.unpack_from(msg)[3]
                mine[C_BYTES] += send_all(sock, [enc.encode(flags=MULTIFD_FLAG_SYNC, packet_num=packet_num)], what)
                mine[C_PACKETS] += 1
                if tr is not None:
                    tr.span(SEND, t0)
                events.send(("synced", channel, packet_num))
            else:  # JOB_QUIT
                break
    finally:
        ctx.send_cleanup()
        mine[C_CPU_US], mine[C_PEAK_RSS], mine[C_ANON_RSS] = self_usage()
    if tr is not None:
        events.send(("trace", channel, tr.name, os.getpid(), tr.to_bytes()))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class SendChannels:
    """The parent's handle on N source channel processes (``multifd_send_state``)."""

    def __init__(
        self,
        socks: Sequence[socket.socket],
        ram: GuestRam,
        method: MultiFDMethod,
        level: int,
        *,
        stall_timeout: float,
        close_in_children: Sequence[socket.socket] = (),
        queue_depth: int = QUEUE_DEPTH,
        should_stop: Callable[[], None] = lambda: None,
        tracing: bool = False,
        detect_zero: bool = False,
    ) -> None:
        n = len(socks)
        self.n = n
        self.method = method
        self.stall_timeout = stall_timeout
        self.queue_depth = queue_depth
        self.bytes_committed = 0  # header + raw page bytes of every packet handed off
        self.traces: list[tuple[str, int, bytes]] = []  # (track name, pid, records) from children
        self.should_stop = should_stop  # raises to abandon a wait (cancellation)
        self.packet_num = 0  # the global counter shared by all channels
        self._next = 0
        self._ready = _CTX.Semaphore(0)
        # shared with the children: counters and done (children write), issued stays here
        self._shared = mmap.mmap(-1, 8 * n * (C_NCOUNTERS + 1))
        self._counters = np.frombuffer(self._shared, dtype=np.uint64, count=n * C_NCOUNTERS).reshape(n, C_NCOUNTERS)
        self._done = np.frombuffer(self._shared, dtype=np.uint64, count=n, offset=8 * n * C_NCOUNTERS)
        self._done_v = self._done.data  # read per packet (plain ints, cheaper than numpy scalars)
        self._issued = [0] * n
        self._jobs: list[int] = []  # write ends of the job pipes
        self._job = bytearray(JOB_SIZE)  # the job being written (reused)
        self._job_offsets = [np.frombuffer(self._job, dtype=">i8", count=PAGES_PER_PACKET, offset=rec + _JOB.size)
                             for rec in _RECORDS]
        self._held = 0  # data records already written into the job, waiting for the next packet
        self.group = ChildGroup("source")
        self._closed = False
        self.sync_wait = 0.0  # seconds spent waiting for SYNC rounds
        try:
            for i, sock in enumerate(socks):
                job_read, job_write = os.pipe()
                self._jobs.append(job_write)  # closed in close(); no child keeps a write end
                try:
                    self.group.start(
                        i, _channel_loop,
                        (i, sock, job_read, ram, method, level, self._ready, self._done, self._counters, tracing,
                         detect_zero),
                        own=sock, others=[*socks, *close_in_children, *self._jobs],
                    )
                finally:
                    os.close(job_read)
        except BaseException:
            self.close(graceful=False)
            raise
        for _ in range(n * self.queue_depth):  # every channel starts idle
            self._ready.release()

    # -- the migration thread's side

    def _next_packet_num(self) -> int:
        num = self.packet_num
        self.packet_num += 1
        return num

    def _record(self, rec: int, kind: int, block_idx: int, flags: int, idx: npt.NDArray[np.int64] = _NO_PAGES) -> None:
        """Write packet record ``rec`` of the job (the next packet_num goes with it)."""
        _JOB.pack_into(self._job, _RECORDS[rec], kind, len(idx), block_idx, self._next_packet_num(), flags)
        if len(idx):  # byte offsets, big-endian: the channel copies them into the header as they are
            np.left_shift(idx, TARGET_PAGE_BITS, out=self._job_offsets[rec][: len(idx)])

    def _send_job(self, ch: int, used: int) -> None:
        """The job's first ``used`` records into channel ``ch``'s pipe (the rest marked unused)."""
        job = self._job
        for rec in _RECORDS[used:]:
            job[rec] = 0
        try:
            os.write(self._jobs[ch], job)
        except OSError as exc:  # the channel process is gone: say why, if it told us
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                self._check()
                time.sleep(0.01)
            raise ChannelError(f"multifd channel {ch} (source): its process stopped taking work ({exc})") from exc

    def _check(self) -> None:
        for msg in self.group.wait_events(0):
            self._unexpected(msg)

    def _unexpected(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "trace":
            self.traces.append((msg[2], msg[3], msg[4]))
            return
        raise ChannelError(f"multifd channel {msg[1]} (source): unexpected message {msg[0]!r}")

    def send_pages(self, block_idx: int, idx: npt.NDArray[np.int64]) -> None:
        """Queue one packet (at most 128 page indices of one block). Packets go to the channels
        two to a job: the first waits in the job until the second comes, or until
        :meth:`flush` (which every sync round calls first)."""
        self.bytes_committed += PACKET_HEADER_SIZE + len(idx) * TARGET_PAGE_SIZE
        self._record(self._held, JOB_DATA, block_idx, 0, idx)
        self._held += 1
        if self._held == PACKETS_PER_JOB:
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
        t0 = time.perf_counter()
        self.bytes_committed += self.n * PACKET_HEADER_SIZE
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
            for msg in self.group.wait_events(min(left, 0.2)):
                if msg[0] == "synced":
                    synced.add(msg[1])
                else:
                    self._unexpected(msg)
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
            for msg in self.group.wait_events(0.05):  # raises on an error or a non-zero exit
                self._unexpected(msg)
        for msg in self.group.wait_events(0):
            self._unexpected(msg)

    # -- statistics and lifetime

    def bytes_sent(self) -> int:
        return int(self._counters[:, C_BYTES].sum())

    def stats(self) -> list[ChannelStats]:
        pids = self.group.pids
        return [ChannelStats.from_counters(i, pids[i], c) for i, c in enumerate(self._counters)]

    def close(self, *, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self.group.close(graceful=graceful)
        for fd in self._jobs:
            os.close(fd)
