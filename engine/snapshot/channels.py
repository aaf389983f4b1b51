"""Snapshot channel processes: N processes move regions between a snapshot file and guest RAM.

Work is cut into *regions* of 256 pages (1 MiB) of one RAM block, numbered globally across the
blocks (:class:`Geometry`). The parent publishes one *round* at a time in :class:`SharedState`,
an anonymous shared mapping created before the fork: ``items`` (the round's region ids) and, for
a save, ``todo`` (one byte per page: write it); then it sends ``go`` on every channel's command
pipe. Channels claim a few items at a time from a shared cursor under one lock (a descheduled
channel on a busy machine does not hold the others back) and report :class:`Done`. The parent
touches ``todo`` and ``items`` only between rounds; during a round a region, its pages'
``todo``/``present`` bytes, its ``crc`` and its group slot belong to the channel that claimed
it, and only the heap end (compressed saves) is shared, under the lock. A bad region is
reported as data (:class:`Corrupt`) and becomes one ``SnapshotCorruptError`` in the parent.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import numpy.typing as npt

from ..compression import MultiFDMethod, get_method
from ..compression.base import Buffer
from ..errors import (
    ChannelError,
    CompressionError,
    MigrationError,
    MigrationTimeout,
    SnapshotCorruptError,
)
from ..memory.ram import GuestRam, pwrite_all, zero_pages
from ..memory.runs import page_runs
from ..precopy import RateLimiter
from ..runtime.buffers import aligned_bytes, aligned_pages
from ..runtime.channels import ChannelEnd, ChannelSet, Corrupt, Done
from ..runtime.procs import FORK
from ..stats import Column, Counters
from ..wire.packet import TARGET_PAGE_SIZE
from .format import REGION_PAGES, SLOT_ALIGN, crc_mismatch, region_where, stored_crc

PAGE = TARGET_PAGE_SIZE
CLAIM = 2  # regions per claim
N_NEXT, N_ITEMS, N_HEAP, N_RATE, N_CTL = range(5)
GO, QUIT = b"g", b"q"


class SnapshotCounters(Counters):
    """A snapshot channel's counters: ``PACKETS`` counts regions here."""

    GARBAGE: Column  # bytes of group slots left for a bigger one (compressed saves)


_PACKETS, _PAGES, _BYTES, _ZERO = Counters.PACKETS, Counters.PAGES, Counters.BYTES, Counters.ZERO


class Geometry:
    """Global page and region numbering over the blocks of a guest."""

    def __init__(self, npages: Sequence[int]) -> None:
        self.npages = [int(n) for n in npages]
        nreg = [-(-n // REGION_PAGES) for n in self.npages]
        self.page_base = np.concatenate(([0], np.cumsum(self.npages))).astype(np.int64)
        self.region_base = np.concatenate(([0], np.cumsum(nreg))).astype(np.int64)
        self.region_block = np.repeat(np.arange(len(nreg)), nreg)
        self.total_pages = int(self.page_base[-1])
        self.total_regions = int(self.region_base[-1])

    def locate(self, gid: int) -> tuple[int, int, int, int]:
        """Region id -> (block index, first page, stop page, first global page)."""
        b = int(self.region_block[gid])
        p0 = (gid - int(self.region_base[b])) * REGION_PAGES
        p1 = min(p0 + REGION_PAGES, self.npages[b])
        return b, p0, p1, int(self.page_base[b]) + p0

    def regions_of_pages(self, block: int, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        out: npt.NDArray[np.int64] = np.unique(pages // REGION_PAGES) + self.region_base[block]
        return out


class SharedState:
    """The arrays parent and channels share (one anonymous mapping, inherited by fork)."""

    def __init__(self, geo: Geometry) -> None:
        P, R = max(geo.total_pages, 1), max(geo.total_regions, 1)
        spec: list[tuple[str, Any, tuple[int, ...]]] = [
            ("todo", np.uint8, (P,)), ("present", np.uint8, (P,)), ("crc", np.uint32, (R,)),
            ("goff", np.uint64, (R,)), ("glen", np.uint32, (R,)), ("gcap", np.uint32, (R,)),
            ("items", np.int64, (R,)), ("ctl", np.int64, (N_CTL,)),
        ]
        size = sum(-(-int(np.prod(shape)) * np.dtype(dt).itemsize // 8) * 8 for _, dt, shape in spec)
        self._mm = mmap.mmap(-1, size)
        off = 0
        for name, dt, shape in spec:
            n = int(np.prod(shape))
            setattr(self, name, np.frombuffer(self._mm, dtype=dt, count=n, offset=off).reshape(shape))
            off += -(-n * np.dtype(dt).itemsize // 8) * 8
        self.lock = FORK.Lock()

    todo: npt.NDArray[np.uint8]
    present: npt.NDArray[np.uint8]
    crc: npt.NDArray[np.uint32]
    goff: npt.NDArray[np.uint64]
    glen: npt.NDArray[np.uint32]
    gcap: npt.NDArray[np.uint32]
    items: npt.NDArray[np.int64]
    ctl: npt.NDArray[np.int64]

    def _locked(self, timeout: float) -> None:
        if not self.lock.acquire(timeout=timeout):
            raise MigrationTimeout(f"snapshot channel lock not acquired within {timeout:g}s")

    def claim(self, timeout: float) -> tuple[int, int] | None:
        self._locked(timeout)
        try:
            i, n = int(self.ctl[N_NEXT]), int(self.ctl[N_ITEMS])
            j = min(i + CLAIM, n)
            self.ctl[N_NEXT] = j
        finally:
            self.lock.release()
        return (i, j) if i < j else None

    def alloc(self, size: int, timeout: float) -> int:
        self._locked(timeout)
        try:
            off = int(self.ctl[N_HEAP])
            self.ctl[N_HEAP] = off + size
        finally:
            self.lock.release()
        return off


class _Group:
    """The present pages of one region, packed (a ``compression.PageBatch``)."""

    def __init__(self, pages: npt.NDArray[np.uint8]) -> None:
        self.pages = pages

    @property
    def normal_pages(self) -> int:
        return len(self.pages)

    def views(self) -> Sequence[memoryview]:
        return [self.pages.data.cast("B")]

    def gather(self) -> npt.NDArray[np.uint8]:
        return self.pages


class _GroupSink:
    """One stored group being decoded (a ``compression.PacketSink``)."""

    def __init__(self, normal_pages: int, payload: memoryview) -> None:
        self.normal_pages = normal_pages
        self.next_packet_size = len(payload)
        self.payload = payload
        self.data: Buffer | None = None

    def read_payload(self) -> memoryview:
        return self.payload

    def recv_into_pages(self) -> None:
        raise CompressionError("a snapshot group cannot be received raw")

    def scatter(self, data: Buffer) -> None:
        self.data = data


def _read_exact(fd: int, view: memoryview, off: int, path: str, where: str) -> None:
    got = os.preadv(fd, [view], off)
    if got != len(view):
        raise SnapshotCorruptError(f"snapshot {path}: truncated: {where} ends at {off + len(view):#x},"
                                   f" the file ends at {off + got:#x}")


@dataclass(frozen=True)
class _Setup:
    """What a snapshot channel process works with (its command pipe is ``ChannelEnd.control``)."""

    fd: int  # the snapshot file
    ram: GuestRam
    geo: Geometry
    state: SharedState
    method_name: str
    data_offsets: Sequence[int]  # where each block's pages are in the file (``none``)
    timeout: float


@dataclass(frozen=True)
class SaveSetup(_Setup):
    level: int


@dataclass(frozen=True)
class RestoreSetup(_Setup):
    path: str
    fresh: bool  # restoring into new RAM: absent pages are zero already


def _method_and_buffer(setup: _Setup) -> tuple[MultiFDMethod | None, npt.NDArray[np.uint8], memoryview]:
    """A channel's method (None for ``none``) and its region buffer, page-aligned: full-speed
    copies to and from the page cache (and a flat byte view of it)."""
    method = None if setup.method_name == "none" else get_method(setup.method_name)
    buf = aligned_pages(REGION_PAGES)
    return method, buf, buf.data.cast("B")


def _run_rounds(me: ChannelEnd, state: SharedState, timeout: float, work: Callable[[int], None]) -> None:
    """The channel loop: wait for ``go``, claim and process items until none is left, :class:`Done`."""
    mine = me.counters
    try:
        while True:
            msg = me.control.recv_bytes()
            if msg[:1] != GO:
                break
            (round_no,) = struct.unpack_from("<I", msg, 1)
            limiter = RateLimiter(int(state.ctl[N_RATE]), lambda: None)
            limiter(mine[_BYTES])  # the bucket starts now
            while (claimed := state.claim(timeout)) is not None:
                for k in range(*claimed):
                    work(int(state.items[k]))
                limiter(mine[_BYTES])
            me.send(Done(me.index, round_no))
    except SnapshotCorruptError as exc:
        me.send(Corrupt(me.index, str(exc)))


def save_channel(me: ChannelEnd, setup: SaveSetup) -> None:
    """A save channel process. Saving a region: one ``preadv`` of the whole region from the
    guest's segment into the channel's buffer (the channel never faults guest pages in, and the
    bytes it checksums are the bytes it writes); numpy finds the zero pages among those to write
    and updates ``present``; then ``none`` writes each run of non-zero pages to its fixed place
    with ``pwrite``, and a compressed method encodes the region's present pages with a fresh
    context and writes them to the group's slot, or to a new slot at the end of the heap when
    they no longer fit. The CRC-32 of the region's stored bytes goes to ``crc``.

    Why a live save ends consistent: the region's checksum covers pages that were not rewritten
    in this round, read from RAM now. If one of them changed since it was last written, the
    guest marked it dirty after changing it, so a later round (at the latest the stop-and-copy
    round, after ``vm_stop``) rewrites it and recomputes the region. The last time a region is
    processed, every page in it holds its final value, in RAM and in the file."""
    fd, ram, geo, state, timeout, mine = setup.fd, setup.ram, setup.geo, setup.state, setup.timeout, me.counters
    method, buf, flat = _method_and_buffer(setup)

    def work(gid: int) -> None:
        b, p0, p1, g0 = geo.locate(gid)
        block, n = ram.blocks[b], p1 - p0
        pages = buf[:n]
        hole = False
        if block.fd >= 0:
            hole = not block.holds_data(p0 * PAGE, p1 * PAGE)  # untouched memory costs nothing to save
            got = n * PAGE if hole else os.preadv(block.fd, [flat[:n * PAGE]], p0 * PAGE)
            if got != n * PAGE:
                raise ChannelError(f"short read of RAM block {block.name!r}: {got} of {n * PAGE} bytes")
        else:
            np.copyto(pages, block.pages[p0:p1])
        present = state.present[g0:g0 + n]
        t = np.flatnonzero(state.todo[g0:g0 + n])
        words = pages.view(np.uint64)
        if hole or (not words[:, 0].any() and not np.count_nonzero(words)):  # all zero: no per-page scan
            zero = np.ones(len(t), dtype=np.bool_)
            if hole:
                pages[:] = 0  # for the checksum of pages present from an earlier round
        else:
            zero = zero_pages(words, None if len(t) == n else t)
        present[t] = ~zero
        nzero = int(np.count_nonzero(zero))
        mine[_ZERO] += nzero
        if method is None:
            base = setup.data_offsets[b] + p0 * PAGE
            for a, e in page_runs(t[~zero]):
                pwrite_all(fd, flat[a * PAGE:e * PAGE], base + a * PAGE)
            mine[_PAGES] += len(t) - nzero
            mine[_BYTES] += (len(t) - nzero) * PAGE
            state.crc[gid] = stored_crc(pages, present)
        else:
            idx = np.flatnonzero(present)
            if len(idx) == 0:
                state.glen[gid] = state.crc[gid] = 0
            else:
                packed = pages if len(idx) == n else pages[idx]
                parts = method.send_setup(setup.level).send_prepare(_Group(packed))
                payload = memoryview(parts[0] if len(parts) == 1 else b"".join(parts)).cast("B")  # type: ignore[arg-type]
                if len(payload) > int(state.gcap[gid]):
                    mine[SnapshotCounters.GARBAGE] += int(state.gcap[gid])
                    cap = -(-len(payload) // SLOT_ALIGN) * SLOT_ALIGN
                    state.goff[gid] = state.alloc(cap, timeout)
                    state.gcap[gid] = cap
                pwrite_all(fd, payload, int(state.goff[gid]))
                state.glen[gid] = len(payload)
                state.crc[gid] = zlib.crc32(payload)
                mine[_PAGES] += len(idx)
                mine[_BYTES] += len(payload)
        mine[_PACKETS] += 1

    _run_rounds(me, state, setup.timeout, work)


def restore_channel(me: ChannelEnd, setup: RestoreSetup) -> None:
    """A restore channel process. Restoring a region: read its stored bytes (``none``: each run
    of present pages, packed into the buffer; compressed: the slot), check the CRC-32 *before*
    anything reaches guest RAM, decode with a fresh context, and ``pwrite`` the pages into the
    new segment: tmpfs does not zero a page written whole, and absent (zero) pages are never
    touched, so never allocated."""
    fd, path, ram, geo, state, mine = setup.fd, setup.path, setup.ram, setup.geo, setup.state, me.counters
    method, buf, flat = _method_and_buffer(setup)
    comp = memoryview(b"")  # a region's stored bytes (compressed), page-aligned once allocated

    def work(gid: int) -> None:
        nonlocal comp
        b, p0, p1, g0 = geo.locate(gid)
        block = ram.blocks[b]
        present = state.present[g0:g0 + p1 - p0]
        idx = np.flatnonzero(present)
        where = region_where(block.name, p0 // REGION_PAGES)
        if not setup.fresh:  # restoring into used memory: absent pages must become zero
            absent = np.flatnonzero(present == 0)
            if len(absent):
                block.pages[p0 + absent] = 0
        expected = int(state.crc[gid])
        if len(idx) == 0:
            if expected:
                raise crc_mismatch(path, where, 0, expected)
            return
        if method is None:
            stored = flat[:len(idx) * PAGE]
            pos, base = 0, setup.data_offsets[b] + p0 * PAGE
            for a, e in page_runs(idx):
                _read_exact(fd, stored[pos:pos + (e - a) * PAGE], base + a * PAGE, path, where)
                pos += (e - a) * PAGE
        else:
            length = int(state.glen[gid])
            if len(comp) < length:
                comp = aligned_bytes(length)
            stored = comp[:length]
            _read_exact(fd, stored, int(state.goff[gid]), path, where)
        got = zlib.crc32(stored)
        if got != expected:
            raise crc_mismatch(path, where, got, expected)
        data: Any = stored
        if method is not None:
            sink = _GroupSink(len(idx), stored)
            try:
                method.recv_setup().recv_pages(sink)
            except CompressionError as exc:
                raise SnapshotCorruptError(f"snapshot {path}: {where}: {exc}") from None
            data = memoryview(sink.data).cast("B")  # type: ignore[arg-type]
            mine[_BYTES] += length
        else:
            mine[_BYTES] += len(stored)
        if len(data) != len(idx) * PAGE:
            raise SnapshotCorruptError(f"snapshot {path}: {where}: decoded {len(data)} bytes,"
                                       f" expected {len(idx) * PAGE} ({len(idx)} pages)")
        if block.fd >= 0:
            block.pwrite_pages(p0 + idx, data)
        else:
            block.pages[p0 + idx] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
        mine[_PAGES] += len(idx)
        mine[_PACKETS] += 1

    _run_rounds(me, state, setup.timeout, work)


class SnapshotChannels(ChannelSet):
    """The parent's handle on N snapshot channel processes."""

    def __init__(self, role: str, n: int, loop: Callable[[ChannelEnd, Any], None],
                 setup: SaveSetup | RestoreSetup) -> None:
        super().__init__(n, role, noun="snapshot channel", columns=SnapshotCounters)
        self.state = setup.state
        self._round = 0
        try:
            for _ in range(n):
                self.start(loop, setup, FORK.Pipe(duplex=False))
        except BaseException:
            self.close(graceful=False)
            raise

    def run_round(self, nitems: int, *, rate: int = 0, check: Callable[[], None], stall_timeout: float) -> None:
        """Process ``state.items[:nitems]`` on all channels; returns when every channel is done."""
        st = self.state
        st.ctl[N_NEXT], st.ctl[N_ITEMS], st.ctl[N_RATE] = 0, nitems, rate
        self._round += 1
        for i, c in enumerate(self.control):
            try:
                c.send_bytes(GO + struct.pack("<I", self._round))
            except OSError:  # the channel is gone: report how it ended
                self.events(1.0)
                raise ChannelError(f"snapshot channel {i} ({self.group.role}): its command pipe is closed") from None
        done: set[int] = set()
        last, progress = time.monotonic(), -1
        while len(done) < self.n:
            for ev in self.events(0.05):
                if isinstance(ev, Done) and ev.round == self._round:
                    done.add(ev.channel)
                elif isinstance(ev, Corrupt):
                    raise SnapshotCorruptError(ev.message)
            check()
            now_progress = self.total(_PACKETS)
            if now_progress != progress:
                last, progress = time.monotonic(), now_progress
            elif time.monotonic() - last > stall_timeout:
                missing = sorted(set(range(self.n)) - done)
                raise MigrationTimeout(f"snapshot channels {missing} made no progress for {stall_timeout:g}s")

    def quit(self, timeout: float) -> None:
        """Let every channel finish (records its resource usage) and exit."""
        for c in self.control:
            try:
                c.send_bytes(QUIT)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.group.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self.events(0)  # a failure while quitting still surfaces


def require_known(method_name: str, path: str) -> None:
    try:
        get_method(method_name)
    except MigrationError:
        raise SnapshotCorruptError(f"snapshot {path}: compressed with {method_name!r}, which this engine does not know")\
            from None
