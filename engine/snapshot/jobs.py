"""Snapshot save and restore jobs: guest RAM to a file, live, and back; the Python API.

Theory of operation
-------------------
:class:`SnapshotSave` is a precopy job (:class:`~engine.precopy.BackgroundJob`) whose
destination is a file: it writes a header without the COMMITTED flag, then runs rounds of the
regions holding dirty pages on the snapshot channels (:mod:`engine.snapshot.channels`), each
page at its fixed place, until the rest fits in ``downtime-limit``; stop-and-copy writes the
last round, the index, ``fsync``, and only then the COMMITTED header. A failed or cancelled
save removes the partial file, so no half-written file ever looks valid.
:class:`SnapshotRestore` validates header and index in the caller's process, then one round
reads, checks (CRC-32) and writes every present region; the first bad region fails it with
one line naming file, block and offset. The file layout is in docs/snapshot-format.md.
"""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, SnapshotError
from ..memory.dirty import DirtyTracker, PageSets, count_pages
from ..memory.ram import BlockSpec, GuestRam, pwrite_all
from ..params import DEFAULT_CHANNELS, DEFAULT_STALL_TIMEOUT, MigrationParams
from ..precopy import BackgroundJob, Guest
from ..stats import Counters, MigrationStats, MigrationStatus
from ..wire.machine import MachineState
from ..wire.packet import MAX_CHANNELS, TARGET_PAGE_SIZE
from .channels import (
    N_HEAP,
    Geometry,
    RestoreSetup,
    SaveSetup,
    SharedState,
    SnapshotChannels,
    SnapshotCounters,
    require_known,
    restore_channel,
    save_channel,
)
from .format import (
    FLAG_COMMITTED,
    HEADER_SIZE,
    INDEX_DTYPE,
    REGION_PAGES,
    VERSION,
    BlockIndex,
    Header,
    encode_index,
    open_snapshot,
    raw_layout,
    read_snapshot,
)

__all__ = ["SnapshotSave", "SnapshotRestore", "save", "restore", "SnapshotError"]


class SnapshotSave(BackgroundJob):
    """One save of guest RAM to a snapshot file. Use as a context manager, or ``start()`` /
    ``wait()``. ``tracker`` and ``guest`` as for :class:`~engine.source.migration.Migration`; without
    a tracker the guest is taken as static (one iteration). ``fsync=False`` skips the two
    ``fsync`` calls of the commit (the file is then safe against a crash of this process, not
    of the machine). ``machine_state``: the rest of a VM's stream, kept in the index."""

    what = "snapshot save"

    def __init__(self, path: str | Path, ram: GuestRam, params: MigrationParams | None = None, *,
                 tracker: DirtyTracker | None = None, guest: Guest | None = None, fsync: bool = True,
                 machine_state: MachineState | None = None) -> None:
        super().__init__(ram, params or MigrationParams(), tracker, guest)
        self.path = str(path)
        self.machine_state = machine_state
        self.fsync = fsync
        self._channels: SnapshotChannels | None = None
        self._fd = -1
        self._created = False
        self.geo = Geometry([b.npages for b in ram])
        self.method = self.params.compression
        self.compressed = self.method != "none"
        sizes = [b.size for b in ram]
        self._data_offsets, self._data_end = raw_layout(sizes) if not self.compressed else ([0] * len(sizes), HEADER_SIZE)

    # ------------------------------------------------------------------ public API

    # ------------------------------------------------------------------- internals

    def _setup(self) -> None:
        """Create the file and start the channels."""
        p = self.params
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SnapshotError(f"snapshot {self.path}: cannot create: {exc.strerror}") from None
        self._created = True
        pwrite_all(self._fd, Header(len(self.ram), self.method, p.effective_level).pack(), 0)
        state = self._state = SharedState(self.geo)
        state.ctl[N_HEAP] = HEADER_SIZE
        self._channels = SnapshotChannels("save", p.channels, save_channel, SaveSetup(
            fd=self._fd, ram=self.ram, geo=self.geo, state=state, method_name=self.method,
            data_offsets=self._data_offsets, timeout=p.stall_timeout, level=p.effective_level))

    def _refresh(self, st: MigrationStats) -> None:
        ch = self._channels
        if ch is None:
            return
        st.channels = ch.stats()
        st.ram.normal = ch.total(Counters.PAGES)
        st.ram.duplicate = ch.total(Counters.ZERO)
        st.ram.multifd_bytes = ch.total(Counters.BYTES)

    def _round(self, dirty: PageSets | None, final: bool) -> tuple[int, int, int, float]:
        """Write the regions holding ``dirty`` pages (None: all); (pages, zero pages, bytes, seconds)."""
        assert self._channels is not None
        st, geo = self._state, self.geo
        if dirty is None:
            st.todo[:] = 1
            n, pages = geo.total_regions, geo.total_pages
            st.items[:n] = np.arange(n)
        else:
            regions = []
            for b, idx in dirty.items():
                st.todo[geo.page_base[b] + idx] = 1
                regions.append(geo.regions_of_pages(b, idx))
            items = np.concatenate(regions) if regions else np.zeros(0, dtype=np.int64)
            n, pages = len(items), count_pages(dirty)
            st.items[:n] = items
        self._remaining_pages = pages
        ch = self._channels
        t0, z0, b0 = time.monotonic(), ch.total(Counters.ZERO), ch.total(Counters.BYTES)
        if n:  # (an empty stop-and-copy round writes nothing)
            p = self.params
            rate = 0 if final else p.max_bandwidth // p.channels
            ch.run_round(n, rate=rate, check=self._check, stall_timeout=p.stall_timeout)
        st.todo[:] = 0
        return pages, ch.total(Counters.ZERO) - z0, ch.total(Counters.BYTES) - b0, max(time.monotonic() - t0, 1e-6)

    def _work(self) -> None:
        self._sync_dirty()  # starts the dirty epoch; the first round writes every page whatever it says

        def one_round(dirty: PageSets | None) -> tuple[int, int, int, float, int]:
            pages, zero, written, dt = self._round(dirty, final=False)
            return pages, zero, written, dt, pages * TARGET_PAGE_SIZE

        dirty = self._precopy(None, one_round)
        down = time.monotonic()
        dirty = self._stop_guest(dirty)
        pages = self._round(dirty, final=True)[0]
        self._commit(len(self.iterations) + (pages > 0))
        self._complete(down)
        self._remaining_pages = 0
        assert self._channels is not None
        self._channels.quit(timeout=self.params.stall_timeout)

    def _commit(self, iterations: int) -> None:
        st, geo, fd = self._state, self.geo, self._fd
        blocks = []
        for i, block in enumerate(self.ram):
            pa, pb = geo.page_base[i], geo.page_base[i + 1]
            ra, rb = geo.region_base[i], geo.region_base[i + 1]
            groups = None
            if self.compressed:
                groups = np.zeros(rb - ra, dtype=INDEX_DTYPE)
                groups["offset"], groups["length"], groups["capacity"] = st.goff[ra:rb], st.glen[ra:rb], st.gcap[ra:rb]
            blocks.append(BlockIndex(block.name, block.size, self._data_offsets[i],
                                     np.packbits(st.present[pa:pb], bitorder="little"), st.crc[ra:rb].copy(), groups))
        end = int(st.ctl[N_HEAP]) if self.compressed else self._data_end
        meta_offset = -(-end // TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE
        meta = encode_index(blocks, self.compressed, self.machine_state)
        pwrite_all(fd, meta, meta_offset)
        if self.fsync:
            os.fsync(fd)
        header = Header(len(self.ram), self.method, self.params.effective_level, FLAG_COMMITTED, iterations,
                        meta_offset, len(meta), zlib.crc32(meta), time.time_ns())
        pwrite_all(fd, header.pack(), 0)
        if self.fsync:
            os.fsync(fd)
        self.stats.ram.main_bytes = HEADER_SIZE + len(meta)

    def _finish(self, error: BaseException | None) -> None:
        st = self.stats
        ok = error is None
        if self._channels is not None:
            self._refresh(st)
            st.extra["garbage-bytes"] = self._channels.total(SnapshotCounters.GARBAGE)
            self._channels.close(graceful=ok)
        st.extra.update({"file": self.path, "compression": self.method, "format-version": VERSION})
        if self._fd >= 0:
            if ok:
                fs = os.fstat(self._fd)
                st.extra.update({"file-size": fs.st_size, "disk-usage": fs.st_blocks * 512})
            os.close(self._fd)
            self._fd = -1
        if not ok and self._created:
            try:
                os.unlink(self.path)  # a failed save leaves nothing behind
            except OSError:
                pass
        self._conclude(error)


def save(path: str | Path, ram: GuestRam, params: MigrationParams | None = None, *,
         tracker: DirtyTracker | None = None, guest: Guest | None = None, fsync: bool = True,
         timeout: float | None = None, machine_state: MachineState | None = None) -> MigrationStats:
    """Save ``ram`` (with a VM's ``machine_state``, if given) to a snapshot file and wait
    (blocking). Raises :class:`MigrationError` (:class:`SnapshotError` for file problems) on
    failure; the partial file is removed."""
    with SnapshotSave(path, ram, params, tracker=tracker, guest=guest, fsync=fsync, machine_state=machine_state) as s:
        return s.wait(timeout)


class SnapshotRestore:
    """One restore of a snapshot file into guest RAM (blocking ``run()``; stats in ``stats``).

    ``into``: restore into this existing RAM (same block names and sizes, in order) instead of
    new RAM; its absent pages are zeroed. On failure it holds partially restored contents."""

    def __init__(self, path: str | Path, params: MigrationParams | None = None, *, channels: int | None = None,
                 into: GuestRam | None = None) -> None:
        self.path = str(path)
        self.channels = channels if channels is not None else (params.channels if params else DEFAULT_CHANNELS)
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"multifd-channels {self.channels} is out of range, expected 1..{MAX_CHANNELS}")
        self.stall_timeout = params.stall_timeout if params else DEFAULT_STALL_TIMEOUT
        self.into = into
        self.stats = MigrationStats(status=MigrationStatus.SETUP)
        self.machine_state: MachineState | None = None  # the VM's state besides RAM, if the file has one

    def run(self) -> GuestRam:
        st = self.stats
        fd = open_snapshot(self.path)
        ram: GuestRam | None = None
        chans: SnapshotChannels | None = None
        ok = False
        try:
            snap = read_snapshot(self.path, fd)
            self.machine_state = snap.machine
            if snap.compressed:
                require_known(snap.header.method, self.path)
            specs = [BlockSpec(b.name, b.size) for b in snap.blocks]
            if self.into is not None:
                if self.into.specs != specs:
                    raise ConfigError(f"snapshot {self.path}: its blocks {[(s.name, s.size) for s in specs]} do not"
                                      f" match the target RAM's {[(s.name, s.size) for s in self.into.specs]}")
                ram = self.into
            else:
                ram = GuestRam.create(specs)
            st.ram.total = ram.total_size
            geo = Geometry([b.npages for b in snap.blocks])
            state = SharedState(geo)
            for i, b in enumerate(snap.blocks):
                state.present[geo.page_base[i]:geo.page_base[i + 1]] = b.present()
                ra, rb = geo.region_base[i], geo.region_base[i + 1]
                state.crc[ra:rb] = b.crcs
                if b.groups is not None:
                    state.goff[ra:rb], state.glen[ra:rb] = b.groups["offset"], b.groups["length"]
            fresh = self.into is None
            if fresh:  # regions with something to read (or a checksum that says so)
                starts = np.concatenate([geo.page_base[i] + np.arange(0, n, REGION_PAGES)
                                         for i, n in enumerate(geo.npages)])
                busy = np.add.reduceat(state.present[:geo.total_pages], starts) > 0
                items = np.flatnonzero(busy | (state.crc[:geo.total_regions] != 0))
            else:
                items = np.arange(geo.total_regions)
            state.items[:len(items)] = items
            offs = [b.data_offset for b in snap.blocks]
            st.status = MigrationStatus.ACTIVE
            st.setup_time = time.monotonic() - st.start
            chans = SnapshotChannels("restore", self.channels, restore_channel, RestoreSetup(
                fd=fd, ram=ram, geo=geo, state=state, method_name=snap.header.method, data_offsets=offs,
                timeout=self.stall_timeout, path=self.path, fresh=fresh))
            chans.run_round(len(items), check=lambda: None, stall_timeout=self.stall_timeout)
            chans.quit(self.stall_timeout)
            st.ram.main_bytes = HEADER_SIZE + snap.header.meta_size
            st.ram.duplicate = geo.total_pages - int(np.count_nonzero(state.present[:geo.total_pages]))
            st.extra.update({"file": self.path, "compression": snap.header.method, "format-version": snap.header.version,
                             "file-size": snap.file_size, "iterations-saved": snap.header.iterations})
            ok = True
        finally:
            if chans is not None:
                st.channels = chans.stats()
                st.ram.normal = chans.total(Counters.PAGES)
                st.ram.multifd_bytes = chans.total(Counters.BYTES)
                chans.close(graceful=ok)
            os.close(fd)
            if not ok and ram is not None and ram is not self.into:
                ram.close()
            st.status = MigrationStatus.COMPLETED if ok else MigrationStatus.FAILED
            st.end = time.monotonic()
        assert ram is not None
        return ram


def restore(path: str | Path, params: MigrationParams | None = None, *, channels: int | None = None,
            into: GuestRam | None = None) -> GuestRam:
    """Restore a snapshot file into new guest RAM (or ``into``) and return it; the caller owns it
    and must close it. Raises :class:`SnapshotError` (one line: file, block, offset) for a file
    that is not a complete, intact snapshot of this format version."""
    return SnapshotRestore(path, params, channels=channels, into=into).run()
