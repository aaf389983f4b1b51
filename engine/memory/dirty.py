"""Dirty tracking: which guest pages changed since the last sync.

Two trackers, one interface (:class:`DirtyTracker`): ``sync()`` returns, per RAM block index, the
sorted page indices dirtied since the previous ``sync()`` (the first call returns every page,
as QEMU's first pass sends all of RAM).

:class:`DirtyLog` is a log that writers fill themselves: one byte per page in a shared
anonymous mapping (so forked writer processes share it; one byte, not one bit, so concurrent
writers never read-modify-write each other's marks). A writer **writes the page first, then
marks it** (``mark_pages`` / ``mark_range``; whole arrays, no per-page Python call). ``sync()``
takes the set pages and clears exactly those bytes. A mark that lands between the scan and the
clear is lost, but its data write came before it, and every page sent in the coming section is
read from guest RAM *after* the clear, so the newest data still goes out. This is the order
KVM's dirty log relies on too.

:class:`ChecksumTracker` is for writers that cannot report: it keeps a 64-bit checksum per
page and calls a page dirty when its checksum changed since the last sync. Cost: every sync
reads all of guest RAM, and it keeps 8 bytes per 4 KiB page. The checksum is a sum of the
page's 64-bit words times fixed odd multipliers (mod 2**64): any change confined to one word
is always detected; a change of several words goes unnoticed with probability about 2**-64.
"""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from .ram import GuestRam

PageSets = dict[int, npt.NDArray[np.int64]]


class DirtyTracker(ABC):
    @abstractmethod
    def sync(self) -> PageSets:
        """Pages dirtied since the last sync, per block index (sorted, unique)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


class DirtyLog(DirtyTracker):
    """A shared, writer-filled dirty log (one byte per page), inherited by forked writers."""

    def __init__(self, ram: GuestRam) -> None:
        self.npages = [b.npages for b in ram]
        self._offsets = np.concatenate(([0], np.cumsum(self.npages))).astype(np.int64)
        self._mm = mmap.mmap(-1, max(1, int(self._offsets[-1])))
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._mm, dtype=np.uint8)
        self.maps = [self.bytes[self._offsets[i]:self._offsets[i + 1]] for i in range(len(self.npages))]
        self._first = True

    # -- writer side (any process that inherited the log)

    def mark_pages(self, block: int, pages: npt.NDArray[np.integer] | Sequence[int]) -> None:
        """Mark page indices of block ``block`` dirty (after writing them)."""
        self.maps[block][pages] = 1

    def mark_range(self, block: int, start: int, stop: int) -> None:
        """Mark pages ``[start, stop)`` of block ``block`` dirty."""
        self.maps[block][start:stop] = 1

    def mark_bytes(self, block: int, offset: int, length: int) -> None:
        """Mark the pages covering bytes ``[offset, offset + length)``."""
        if length > 0:
            self.maps[block][offset >> 12:((offset + length - 1) >> 12) + 1] = 1

    # -- engine side

    def sync(self) -> PageSets:
        if self._first:
            self._first = False
            self.bytes[:] = 0
            return {i: np.arange(n, dtype=np.int64) for i, n in enumerate(self.npages)}
        hit = np.flatnonzero(self.bytes.copy())  # a snapshot: writers keep marking meanwhile
        self.bytes[hit] = 0
        out: PageSets = {}
        if len(hit):
            cuts = np.searchsorted(hit, self._offsets[1:-1])
            for i, part in enumerate(np.split(hit, cuts)):
                if len(part):
                    out[i] = part - self._offsets[i]
        return out

    def pending(self) -> int:
        """Pages marked since the last sync (a snapshot)."""
        return int(np.count_nonzero(self.bytes))


class ChecksumTracker(DirtyTracker):
    """Finds changed pages itself by comparing per-page checksums between syncs."""

    CHUNK = 8192  # pages per numpy pass (32 MiB)

    def __init__(self, ram: GuestRam, seed: int = 0x6D756C7469666400) -> None:
        self.ram = ram
        rng = np.random.default_rng(seed & 0xFFFFFFFF)
        self._mult = rng.integers(0, 2**63, size=512, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._sums: list[npt.NDArray[np.uint64] | None] = [None] * len(ram)

    def _checksums(self, words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        out = np.empty(len(words), dtype=np.uint64)
        for a in range(0, len(words), self.CHUNK):
            chunk = words[a:a + self.CHUNK]
            with np.errstate(over="ignore"):
                out[a:a + len(chunk)] = (chunk * self._mult).sum(axis=1, dtype=np.uint64)
        return out

    def sync(self) -> PageSets:
        out: PageSets = {}
        for i, block in enumerate(self.ram):
            sums = self._checksums(block.words)
            old = self._sums[i]
            self._sums[i] = sums
            changed = np.arange(block.npages, dtype=np.int64) if old is None else np.flatnonzero(sums != old)
            if len(changed):
                out[i] = changed
        return out


DIRTY_MODES = ("log", "checksum")


def make_tracker(mode: str, ram: GuestRam) -> DirtyTracker:
    if mode == "log":
        return DirtyLog(ram)
    if mode == "checksum":
        return ChecksumTracker(ram)
    raise ConfigError(f"unknown dirty tracking mode {mode!r}, expected one of {', '.join(DIRTY_MODES)}")


def count_pages(sets: PageSets) -> int:
    return sum(len(v) for v in sets.values())


def merge(a: PageSets, b: PageSets) -> PageSets:
    out = dict(a)
    for k, v in b.items():
        out[k] = np.union1d(out[k], v) if k in out else v
    return out


