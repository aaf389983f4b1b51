"""Migration states and statistics, reported with QEMU ``query-migrate`` names.

:class:`MigrationStatus` is the one list of states every job uses (source, destination,
snapshot save and restore). Counters are plain fields updated by the one thread that owns
them (the main process of each side); per-channel figures come from the channel processes'
shared counters at snapshot time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .wire.packet import TARGET_PAGE_SIZE


class MigrationStatus(StrEnum):
    """QEMU's ``MigrationStatus`` values that the engine goes through (a ``str``: JSON as is)."""

    NONE = "none"  # created, not started
    SETUP = "setup"  # connecting, handshakes, MEM_SIZE
    ACTIVE = "active"  # pages moving (precopy iterations, a restore's regions)
    DEVICE = "device"  # the guest is stopped: the stop-and-copy pass
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


#: The annotation that declares a counter column in a :class:`Counters` class.
Column = int


class Counters:
    """The per-channel counters: one uint64 column each, in a mapping the channel processes write
    and the parent reads (resource usage is written when a channel ends). A column is declared
    by name (``NAME: Column``); each name becomes a class attribute holding its index, numbered in
    declaration order after the base class's columns, so a channel set that counts more
    subclasses this with only its own."""

    PACKETS: Column
    PAGES: Column  # normal pages
    BYTES: Column  # headers included
    CPU_US: Column
    PEAK_RSS: Column  # KiB (VmHWM)
    ANON_RSS: Column  # KiB (RssAnon at the end)
    ZERO: Column  # zero pages listed in packets (zero-page-detection=multifd)
    ZERO_COPY_MISSED: Column  # SYNCs before which the kernel had copied zero-copy sends (zero-copy-send)
    COLUMNS: ClassVar[tuple[str, ...]] = ()  # every column's name, in index order

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._number()

    @classmethod
    def _number(cls) -> None:
        names = [name for klass in reversed(cls.__mro__)
                 for name, kind in vars(klass).get("__annotations__", {}).items() if kind in ("Column", Column)]
        for i, name in enumerate(names):
            setattr(cls, name, i)
        cls.COLUMNS = tuple(names)


Counters._number()


@dataclass
class ChannelStats:
    id: int
    pid: int
    packets: int
    normal_pages: int
    bytes: int
    cpu_seconds: float = 0.0  # known once the channel ended
    peak_rss_kib: int = 0  # VmHWM, including guest pages touched through the mapping
    private_rss_kib: int = 0  # RssAnon at the end
    zero_pages: int = 0  # listed in packets (zero-page-detection=multifd)
    zero_copy_missed: int = 0  # dirty-sync-missed-zero-copy of this channel

    @classmethod
    def from_counters(cls, i: int, pid: int, c: npt.NDArray[np.uint64]) -> ChannelStats:
        """Channel ``i``'s figures from its row of counters (:class:`Counters` columns)."""
        C = Counters
        return cls(i, pid, int(c[C.PACKETS]), int(c[C.PAGES]), int(c[C.BYTES]), int(c[C.CPU_US]) / 1e6,
                   int(c[C.PEAK_RSS]), int(c[C.ANON_RSS]), int(c[C.ZERO]), int(c[C.ZERO_COPY_MISSED]))


@dataclass
class RamCounters:
    total: int = 0  # bytes of guest RAM (all blocks)
    duplicate: int = 0  # zero pages (ZERO records, or zero_pages in packets with zero-page-detection=multifd)
    normal: int = 0  # pages sent whole (multifd packets + PAGE records)
    main_bytes: int = 0  # bytes on the main channel
    multifd_bytes: int = 0  # bytes on all multifd channels, headers included
    dirty_sync_count: int = 0  # dirty-bitmap syncs (source) / sync barriers passed (destination)
    remaining: int = 0

    @property
    def transferred(self) -> int:
        return self.main_bytes + self.multifd_bytes


@dataclass
class MigrationStats:
    status: MigrationStatus = MigrationStatus.SETUP
    start: float = field(default_factory=time.monotonic)
    end: float | None = None
    setup_time: float = 0.0  # seconds
    downtime: float = 0.0  # seconds
    ram: RamCounters = field(default_factory=RamCounters)
    channels: list[ChannelStats] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_time(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start

    def to_json(self) -> dict[str, Any]:
        """A ``query-migrate``-shaped dict (times in ms, mbps in megabits/s)."""
        t = max(self.total_time, 1e-9)
        ram = self.ram
        out: dict[str, Any] = {
            "status": self.status,
            "total-time": round(self.total_time * 1000),
            "setup-time": round(self.setup_time * 1000),
            "downtime": round(self.downtime * 1000),
            "ram": {
                "transferred": ram.transferred,
                "remaining": ram.remaining,
                "total": ram.total,
                "duplicate": ram.duplicate,
                "normal": ram.normal,
                "normal-bytes": ram.normal * TARGET_PAGE_SIZE,
                "mbps": round(ram.transferred * 8 / t / 1e6, 3),
                "multifd-bytes": ram.multifd_bytes,
                "pages-per-second": round((ram.normal + ram.duplicate) / t),
                "dirty-sync-count": ram.dirty_sync_count,
                "dirty-sync-missed-zero-copy": sum(c.zero_copy_missed for c in self.channels),
                "page-size": TARGET_PAGE_SIZE,
            },
            "throughput-mib-s": round(ram.total / t / (1 << 20), 1),
            "channels": [
                {"id": c.id, "pid": c.pid, "packets": c.packets, "normal_pages": c.normal_pages,
                 "zero_pages": c.zero_pages, "bytes": c.bytes,
                 "cpu-seconds": round(c.cpu_seconds, 3), "peak-rss-kib": c.peak_rss_kib,
                 "private-rss-kib": c.private_rss_kib}
                for c in self.channels
            ],
        }
        if self.error:
            out["error-desc"] = self.error
        out.update(self.extra)
        return out


def human_summary(stats: dict[str, Any], role: str) -> str:
    ram = stats["ram"]
    lines = [
        f"{role}: {stats['status']}",
        f"  total-time       {stats['total-time']} ms (setup {stats['setup-time']} ms, downtime {stats['downtime']} ms)",
        f"  guest RAM        {ram['total'] / (1 << 20):.1f} MiB at {stats['throughput-mib-s']} MiB/s",
        f"  transferred      {ram['transferred'] / (1 << 20):.1f} MiB ({ram['mbps']:.0f} Mbit/s),"
        f" multifd {ram['multifd-bytes'] / (1 << 20):.1f} MiB",
        f"  pages            normal {ram['normal']}, duplicate (zero) {ram['duplicate']},"
        f" dirty-sync-count {ram['dirty-sync-count']}",
    ]
    for c in stats["channels"]:
        lines.append(
            f"  channel {c['id']:<3} pid {c['pid']:<7} packets {c['packets']:<7} normal_pages {c['normal_pages']:<8}"
            f" bytes {c['bytes']}"
        )
    if "dialect" in stats:
        d = stats["dialect"]
        lines.append(f"  dialect          QEMU {d['compat']}: zero-page-detection {d['zero-page-detection']},"
                     f" flush-after-each-section {'on' if d['multifd-flush-after-each-section'] else 'off'},"
                     f" switchover-start {'on' if d['send-switchover-start'] else 'off'}")
    if "error-desc" in stats:
        lines.append(f"  error            {stats['error-desc']}")
    return "\n".join(lines)
