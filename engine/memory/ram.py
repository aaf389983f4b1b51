"""Guest RAM: named RAM blocks in POSIX shared memory, seen as numpy page arrays.

Ownership (``multiprocessing.shared_memory``'s rule): one :class:`GuestRam` *owns* its segments,
creates them and unlinks them in :meth:`GuestRam.close` on every exit path. Channel processes
are forked from the owner and use the inherited mappings, never attaching by name, so no other
resource tracker learns the names (Python 3.11); the owner's own tracker, started before the
first segment exists, unlinks them if the owner is SIGKILLed: the backstop, not the plan.
Non-owners (a user's writer processes) map segments with :func:`attach`, untracked.

Concurrent writers: ``pwrite`` into one segment takes the kernel's per-file lock, which spins
while its holder runs on the other CPU; so each block has a sleeping cross-process lock
(:attr:`RamBlock.write_lock`, made before the channels fork), held by
:meth:`RamBlock.pwrite_pages` for a whole packet (measured: docs/performance.md).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import ChannelError, ConfigError
from ..runtime.libc import madvise
from ..runtime.procs import FORK
from ..wire.packet import MAX_RAMBLOCK_NAME, TARGET_PAGE_SIZE
from .hugepages import HUGE_PAGE, collapse, map_aligned
from .runs import page_runs

SEGMENT_PREFIX = "mfd"
_ZERO_CHUNK = memoryview(bytes(128 * TARGET_PAGE_SIZE))  # source of zero-fills (read only)
#: A writer holds a block's write lock for one packet (well under a second); waiting longer
#: means the holder died with it held, and the parent is already tearing the migration down.
WRITE_LOCK_TIMEOUT = 30.0
PAGE_U64 = TARGET_PAGE_SIZE // 8


@dataclass(frozen=True)
class BlockSpec:
    """A RAM block's identity: QEMU RAMBlock id string and used_length in bytes."""

    name: str
    size: int

    def __post_init__(self) -> None:
        check_block(self.name, self.size)


def check_block(name: str, size: int) -> None:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_RAMBLOCK_NAME:
        raise ConfigError(f"RAM block name {name!r} is {len(raw)} bytes, expected 1..{MAX_RAMBLOCK_NAME}")
    if size <= 0 or size % TARGET_PAGE_SIZE:
        raise ConfigError(
            f"RAM block {name!r} is {size} bytes, expected a positive multiple of the {TARGET_PAGE_SIZE}-byte page"
        )


class RamBlock:
    """One RAM block. ``pages`` is a ``(npages, 4096)`` uint8 view; ``words`` the same as uint64."""

    def __init__(self, spec: BlockSpec, buf: memoryview, segment: str, closer: object) -> None:
        self.name = spec.name
        self.size = spec.size
        self.segment = segment  # shared-memory name (without the leading '/')
        self.npages = spec.size // TARGET_PAGE_SIZE
        self._closer = closer
        self.buf = buf
        self.pages: npt.NDArray[np.uint8] = np.frombuffer(buf, dtype=np.uint8).reshape(self.npages, TARGET_PAGE_SIZE)
        self.words: npt.NDArray[np.uint64] = self.pages.view(np.uint64)
        # A fork-context semaphore is unlinked at creation: nothing in /dev/shm, no tracker entry.
        self.write_lock = FORK.Lock()

    @property
    def spec(self) -> BlockSpec:
        return BlockSpec(self.name, self.size)

    @property
    def fd(self) -> int:
        """The segment's file descriptor (-1 if unknown): ``pwrite`` into it fills pages through
        the page cache, faster than a first write through the mapping on fresh shared memory
        (no page fault, and tmpfs does not zero a page that is written whole)."""
        return int(getattr(self._closer, "_fd", -1))

    def pwrite_pages(self, idx: npt.NDArray[np.int64], data: memoryview) -> None:
        """Write ``len(idx)`` pages of ``data`` (contiguous) to pages ``idx`` (in any order), one
        positioned write per run of consecutive pages, holding the block's write lock (see the
        module docstring)."""
        fd, page = self.fd, TARGET_PAGE_SIZE
        self._acquire()  # not a context manager: this runs for every packet
        try:
            pos = 0
            for a, b in page_runs(idx):
                n = (b - a) * page
                pwrite_all(fd, data[pos:pos + n], a * page)
                pos += n
        finally:
            self.write_lock.release()

    def holds_data(self, start: int = 0, stop: int | None = None) -> bool:
        """Whether any page in bytes ``[start, stop)`` of the segment (default: all) holds data.
        A tmpfs page never written (or only reserved by ``posix_fallocate``) is a hole: it reads
        as zero, takes no memory, and ``SEEK_DATA`` skips it without reading. True when the
        segment cannot be asked (no file descriptor, or an unexpected error)."""
        fd = self.fd
        if fd < 0:
            return True
        try:
            return os.lseek(fd, start, os.SEEK_DATA) < (self.size if stop is None else stop)
        except OSError as exc:
            return exc.errno != errno.ENXIO  # ENXIO: no data at or after start

    def zero_runs(self, runs: Iterable[tuple[int, int]]) -> int:
        """Make the pages of each run ``[start, stop)`` read as zero, writing zeros only over
        pages the segment holds (``SEEK_DATA`` / ``SEEK_HOLE``); returns the pages written.
        A hole seen once stays one: nobody else writes these pages in the same section (a ZERO
        record and a packet never carry the same page), so a run inside it needs no question."""
        fd, page = self.fd, TARGET_PAGE_SIZE
        if fd < 0:
            count = 0
            for a, b in runs:
                self.pages[a:b] = 0
                count += b - a
            return count
        written = 0
        hole_from = hole_to = 0  # the last hole found, in bytes
        for a, b in runs:
            pos, end = a * page, b * page
            while pos < end:
                if hole_from <= pos and end <= hole_to:
                    break
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = self.size  # no data at or after pos
                hole_from, hole_to = pos, data
                if data >= end:
                    break
                stop = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                self._acquire()
                try:
                    for off in range(data, stop, len(_ZERO_CHUNK)):
                        pwrite_all(fd, _ZERO_CHUNK[: min(len(_ZERO_CHUNK), stop - off)], off)
                finally:
                    self.write_lock.release()
                written += (stop - data) // page
                pos = stop
        return written

    def _acquire(self) -> None:
        """Take the block's write lock (the caller releases it)."""
        if not self.write_lock.acquire(timeout=WRITE_LOCK_TIMEOUT):
            raise ChannelError(
                f"RAM block {self.name!r}: another writer held the write lock for {WRITE_LOCK_TIMEOUT:g}s"
            )

    def populate_mapping(self) -> None:
        """Map every page of the block into this process now (``MADV_POPULATE_WRITE``): writes
        through the mapping then take no page fault. Allocates (and zeroes) pages not yet
        allocated; a no-op where the kernel lacks it (Linux < 5.14: pages fault in on first use).
        It maps ``buf``, the mapping the block's views use (after :meth:`GuestRam.use_huge_pages`
        not the segment object's own)."""
        madvise(self.buf, MADV_POPULATE_WRITE)

    def rebind(self, buf: memoryview) -> None:
        """Use ``buf``, another mapping of the same segment, from now on (views taken before
        keep the old one)."""
        self.buf = buf
        self.pages = np.frombuffer(buf, dtype=np.uint8).reshape(self.npages, TARGET_PAGE_SIZE)
        self.words = self.pages.view(np.uint64)

    def release_views(self) -> None:
        """Drop this object's numpy/memoryview exports (so the mapping can be closed)."""
        self.pages = self.words = None  # type: ignore[assignment]
        try:
            self.buf.release()
        except (BufferError, ValueError):
            pass

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, {self.size}, segment={self.segment!r})"


class GuestRam:
    """An ordered set of RAM blocks; the owner of their shared-memory segments."""

    def __init__(self, blocks: Sequence[RamBlock], shms: Sequence[shared_memory.SharedMemory], owner: bool) -> None:
        self.blocks = list(blocks)
        self._by_name = {b.name: b for b in self.blocks}
        self._shms = list(shms)
        self.owner = owner
        self._closed = False

    # -- construction

    @classmethod
    def create(cls, specs: Iterable[BlockSpec]) -> GuestRam:
        specs = list(specs)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"RAM block {dup!r} given twice; block names must be unique")
        check_shm_space(sum(s.size for s in specs))
        cls.prepare()
        ram = cls([], [], owner=True)
        try:
            for spec in specs:
                shm = shared_memory.SharedMemory(create=True, size=spec.size, name=_segment_name())
                ram._shms.append(shm)
                assert shm.buf is not None
                block = RamBlock(spec, shm.buf, shm.name, shm)
                ram.blocks.append(block)
                ram._by_name[spec.name] = block
        except BaseException:
            ram.close()
            raise
        return ram

    @staticmethod
    def prepare() -> None:
        """Start this process's resource tracker now, if it is not running. ``SharedMemory``
        would start it on first use, after the segment is already in /dev/shm, where a SIGKILL
        while the tracker starts (a new interpreter, ~0.1 s of CPU) would leak the segment;
        and a destination that learns its RAM from the stream calls it before listening, so
        that start-up is not paid during the migration."""
        resource_tracker.ensure_running()

    # -- access

    def __getitem__(self, name: str) -> RamBlock:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def specs(self) -> list[BlockSpec]:
        return [b.spec for b in self.blocks]

    @property
    def total_size(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def lengths(self) -> dict[str, int]:
        return {b.name: b.size for b in self.blocks}

    def index_of(self, name: str) -> int:
        return self.blocks.index(self._by_name[name])

    def use_huge_pages(self) -> int:
        """Back the blocks with 2 MiB pages (:mod:`engine.memory.hugepages`): each block of at
        least one such page is mapped again on a 2 MiB boundary and collapsed. Call it once the
        blocks hold the guest, before forking channels or writers. Returns the bytes collapsed:
        0 where the kernel cannot (before Linux 6.1, or no free 2 MiB blocks)."""
        done = 0
        for block in self.blocks:
            if block.size < HUGE_PAGE or block.fd < 0:
                continue
            buf = map_aligned(block.fd, block.size)
            if buf is None:
                continue
            block.rebind(buf)
            if collapse(buf):
                done += block.size
        return done

    # -- lifetime

    def close(self) -> None:
        """Release views, close mappings and (owner only) unlink the segments. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for block in self.blocks:
            block.release_views()
        for shm in self._shms:
            if self.owner:
                try:
                    shm.unlink()
                except FileNotFoundError:
                    pass
            try:
                shm.close()
            except BufferError:
                # Someone still holds a numpy view. Drop our references instead: the mapping is
                # unmapped when the last view is collected (the segment is already unlinked).
                shm._buf = None  # type: ignore[attr-defined]
                shm._mmap = None  # type: ignore[attr-defined]
                if getattr(shm, "_fd", -1) >= 0:
                    os.close(shm._fd)  # type: ignore[attr-defined]
                    shm._fd = -1  # type: ignore[attr-defined]
        self._shms.clear()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+


def prefault(block: RamBlock, start: int = 0, stop: int | None = None, *, populate: bool = True) -> bool:
    """Allocate pages ``[start, stop)`` of a block now, instead of one fault per page later.

    ``posix_fallocate`` on the segment allocates its pages, then ``MADV_POPULATE_WRITE`` maps
    them: faster than first-touch writes (docs/performance.md).
    """
    stop = block.npages if stop is None else stop
    off, length = start * TARGET_PAGE_SIZE, (stop - start) * TARGET_PAGE_SIZE
    if length <= 0:
        return True
    if block.fd < 0:
        return False
    try:
        os.posix_fallocate(block.fd, off, length)
    except OSError:
        return False
    if populate:
        madvise(block.buf[off:off + length], MADV_POPULATE_WRITE)
    return True


def _segment_name() -> str:
    # MFD_SHM_TAG (optional, inherited by child processes) lets a test session or a job tell
    # its own segments from those of other runs on the same machine.
    tag = os.environ.get("MFD_SHM_TAG", "")
    return f"{SEGMENT_PREFIX}_{tag + '_' if tag else ''}{os.getpid()}_{os.urandom(6).hex()}"


def check_shm_space(total: int) -> None:
    """Refuse a guest larger than the free space of /dev/shm, up front."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if total > free:
        raise ConfigError(
            f"guest RAM of {total} bytes does not fit in /dev/shm ({free} bytes free); free space or use a smaller guest"
        )


class AttachedSegment:
    """A non-owning mapping of an existing segment, invisible to resource trackers."""

    def __init__(self, name: str, size: int) -> None:
        fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise ConfigError(f"shared-memory segment {name!r} is {actual} bytes, expected at least {size}")
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def attach(specs_and_segments: Sequence[tuple[BlockSpec, str]]) -> GuestRam:
    """Map blocks that another process owns (never unlinks them)."""
    ram = GuestRam([], [], owner=False)
    for spec, segment in specs_and_segments:
        seg = AttachedSegment(segment, spec.size)
        ram.blocks.append(RamBlock(spec, seg.buf, segment, seg))
        ram._by_name[spec.name] = ram.blocks[-1]
    return ram


def block_digest(block: RamBlock) -> str:
    """BLAKE2b-128 of a block's bytes, for comparing two sides without writing dumps."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    step = 64 << 20
    for off in range(0, block.size, step):
        h.update(block.buf[off:off + step])
    return h.hexdigest()


def safe_file_name(index: int, name: str) -> str:
    """A dump file name for a block: unique by index, readable, no path separators."""
    cleaned = re.sub(r"[^A-Za-z0-9._@-]+", "_", name).strip("._") or "block"
    return f"{index:02d}-{cleaned[:100]}.ram"


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def zero_pages(words: npt.NDArray[np.uint64], idx: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.bool_]:
    """Which rows (pages, as 512 uint64 words) are all zero: every row of ``words``, or rows
    ``idx`` of it. Only pages whose first word is zero are read whole (most non-zero pages are
    ruled out by one word), so scattered rows cost no copy of the others. An OR of the words is
    cheaper than their max."""
    zero = (words[:, 0] if idx is None else words[idx, 0]) == 0
    cand = np.flatnonzero(zero)
    if len(cand):
        zero[cand] = np.bitwise_or.reduce(words[cand if idx is None else idx[cand]], axis=1) == 0
    return zero  # type: ignore[no-any-return]
