"""A guest that runs: writer ("vCPU") processes that dirty guest RAM and log what they dirty.

Theory of operation
-------------------
:class:`Workload` forks K writer processes that inherit the guest RAM mappings and the
:class:`~engine.memory.dirty.DirtyLog`. Every tick (10 ms) a writer picks pages by its pattern
(``uniform``; ``hotset``: 90% of writes into a hot 10% of RAM; ``sequential``: a sweep),
writes a fresh 64-bit stamp into one word of each page, and *then* marks those pages in the
dirty log (write first, mark second; see dirty.py for why). It sleeps to hold its share
of ``dirty-rate`` (bytes/s, counted as whole pages; 0 = as fast as it can).

Control goes through a small shared mapping, written only by the parent: ``state`` (run, pause,
quit) and ``throttle`` (percent of each tick spent sleeping: QEMU's CPU throttle for
auto-converge). Each writer acknowledges a pause in its own ``paused`` slot after finishing
the write-and-mark of its current tick, so when :meth:`Workload.pause` returns (QEMU's
``vm_stop``) no write is in flight and the dirty log is complete. :meth:`resume` is
``vm_start``. Writers exit on quit, on error (reported as data) or with their parent.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, MigrationTimeout
from ..runtime.procs import ChildGroup, Connection
from ..wire.packet import TARGET_PAGE_SIZE
from .dirty import DirtyLog
from .ram import PAGE_U64, GuestRam, RamBlock, prefault

DIRTY_PATTERNS = ("uniform", "hotset", "sequential")
RUN, PAUSE, QUIT = 0, 1, 2
TICK = 0.01
HOT_FRACTION = 0.1
HOT_SHARE = 0.9

# control words: [state, throttle, generation]; then per writer: paused ack, pages written
_C_STATE, _C_THROTTLE, _C_HEADER = 0, 1, 4


@dataclass(frozen=True)
class WorkloadSpec:
    dirty_rate: float = 64 << 20  # bytes/s over all writers; 0 = unbounded
    pattern: str = "uniform"
    writers: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in DIRTY_PATTERNS:
            raise ConfigError(f"unknown dirty pattern {self.pattern!r}, expected one of {', '.join(DIRTY_PATTERNS)}")
        if not 1 <= self.writers <= 64:
            raise ConfigError(f"--writers {self.writers} is out of range, expected 1..64")
        if self.dirty_rate < 0:
            raise ConfigError(f"--dirty-rate {self.dirty_rate} must be >= 0")


def _writer_loop(
    events: Connection, k: int, ram: GuestRam, log: DirtyLog | None, spec: WorkloadSpec, ctl: npt.NDArray[np.int64]
) -> None:
    rng = np.random.default_rng(spec.seed * 1000 + k)
    sizes = np.array([b.npages for b in ram], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    total = int(offsets[-1])
    per_tick = max(1, int(spec.dirty_rate / TARGET_PAGE_SIZE / spec.writers * TICK)) if spec.dirty_rate else 256
    hot_len = max(1, int(total * HOT_FRACTION))
    hot_start = int(rng.integers(0, total - hot_len + 1))
    sweep = (total // spec.writers) * k
    stamp = (k + 1) << 48
    ack = _C_HEADER + 2 * k
    count = ack + 1
    blocks = ram.blocks
    next_tick = time.monotonic()
    while True:
        state = ctl[_C_STATE]
        if state == QUIT:
            return
        if state == PAUSE:
            ctl[ack] = 1
            while ctl[_C_STATE] == PAUSE:
                time.sleep(0.0005)
            ctl[ack] = 0
            next_tick = time.monotonic()
            continue
        t0 = time.monotonic()
        if spec.pattern == "uniform":
            g = rng.integers(0, total, per_tick)
        elif spec.pattern == "hotset":
            hot = rng.random(per_tick) < HOT_SHARE
            g = np.where(hot, hot_start + rng.integers(0, hot_len, per_tick), rng.integers(0, total, per_tick))
        else:
            g = (sweep + np.arange(per_tick)) % total
            sweep = (sweep + per_tick) % total
        g = np.unique(g)
        which = np.searchsorted(offsets, g, side="right") - 1
        for b in np.unique(which):
            idx = g[which == b] - offsets[b]
            words = blocks[b].words
            stamps = stamp + np.arange(len(idx), dtype=np.int64)
            stamp += len(idx)
            words[idx, rng.integers(0, 512, len(idx))] = stamps.astype(np.uint64)  # write ...
            if log is not None:
                log.mark_pages(int(b), idx)  # ... then mark
        ctl[count] += len(g)
        throttle = int(ctl[_C_THROTTLE])
        if throttle:
            busy = time.monotonic() - t0
            time.sleep(max(busy, TICK) * throttle / max(1, 100 - throttle))
        if spec.dirty_rate:
            next_tick += TICK
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_tick = time.monotonic()


class Workload:
    """K writer processes dirtying ``ram``; pausable (``vm_stop``) and throttleable."""

    def __init__(self, ram: GuestRam, spec: WorkloadSpec, log: DirtyLog | None = None) -> None:
        self.ram = ram
        self.spec = spec
        self.log = log
        self._mm = mmap.mmap(-1, 8 * (_C_HEADER + 2 * spec.writers))
        self.ctl: npt.NDArray[np.int64] = np.frombuffer(self._mm, dtype=np.int64)
        self.group = ChildGroup("guest", noun="writer")
        self._started = False
        self._closed = False

    def start(self) -> Workload:
        if self._started:
            return self
        self._started = True
        try:
            for k in range(self.spec.writers):
                self.group.start(k, _writer_loop, (k, self.ram, self.log, self.spec, self.ctl))
        except BaseException:
            self.close()
            raise
        return self

    @property
    def paused(self) -> bool:
        return bool(self.ctl[_C_STATE] == PAUSE)

    def pause(self, timeout: float = 10.0) -> None:
        """``vm_stop``: returns once every writer has finished its current write and stopped."""
        self.ctl[_C_STATE] = PAUSE
        deadline = time.monotonic() + timeout
        acks = self.ctl[_C_HEADER::2]
        while not acks.all():
            self.group.wait_events(0)  # a dead writer raises
            if time.monotonic() > deadline:
                raise MigrationTimeout(f"guest writers did not pause within {timeout:g}s")
            time.sleep(0.0005)

    def resume(self) -> None:
        """``vm_start``."""
        if self.ctl[_C_STATE] == PAUSE:
            self.ctl[_C_STATE] = RUN

    def set_throttle(self, percent: int) -> None:
        self.ctl[_C_THROTTLE] = max(0, min(99, int(percent)))

    @property
    def throttle(self) -> int:
        return int(self.ctl[_C_THROTTLE])

    def pages_written(self) -> int:
        return int(self.ctl[_C_HEADER + 1::2].sum())

    def check(self) -> None:
        """Raise if a writer failed or died."""
        self.group.wait_events(0)

    def close(self) -> None:
        """Stop and reap the writers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.ctl[_C_STATE] = QUIT
        self.group.close(graceful=True, timeout=2.0)

    def __enter__(self) -> Workload:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- filling a guest

FILLS = ("zero", "random", "mixed")


def fill_pages(block: RamBlock, fill: str, seed: int = 0) -> None:
    """Fill a block: ``zero``, ``random``, or ``mixed`` (25% zero, 25% random, 50% text-like)."""
    if fill not in FILLS:
        raise ConfigError(f"unknown fill {fill!r}, expected one of {', '.join(FILLS)}")
    if fill == "zero":
        return
    prefault(block)  # a real guest's zero pages are allocated memory too
    rng = np.random.default_rng(seed)
    step = 8192  # pages per chunk (32 MiB), to bound temporaries
    text = _text_pages(rng, 256)
    for start in range(0, block.npages, step):
        stop = min(start + step, block.npages)
        n = stop - start
        view = block.words[start:stop]
        if fill == "random":
            view[:] = rng.integers(0, 2**64, size=view.shape, dtype=np.uint64)
            continue
        kind = rng.integers(0, 4, size=n)  # 0 zero, 1 random, 2-3 text
        rnd = np.flatnonzero(kind == 1)
        txt = np.flatnonzero(kind >= 2)
        if len(rnd):
            view[rnd] = rng.integers(0, 2**64, size=(len(rnd), PAGE_U64), dtype=np.uint64)
        if len(txt):
            view[txt] = text[rng.integers(0, len(text), size=len(txt))]
            # stamp the page number so no two text pages are identical
            view[txt, 0] = (start + txt).astype(np.uint64)


_WORDS = (
    b"the quick brown fox jumps over a lazy dog migration page dirty bitmap channel socket "
    b"packet sync offset block memory guest host qemu multifd zero normal stream section "
).split()


def _text_pages(rng: np.random.Generator, count: int) -> npt.NDArray[np.uint64]:
    """``count`` distinct pages of compressible, text-like bytes."""
    words = np.array(_WORDS, dtype=object)
    out = np.empty((count, TARGET_PAGE_SIZE), dtype=np.uint8)
    for i in range(count):
        chunk = b" ".join(words[rng.integers(0, len(words), size=900)])
        out[i] = np.frombuffer((chunk * 2)[:TARGET_PAGE_SIZE], dtype=np.uint8)
    return out.view(np.uint64)
