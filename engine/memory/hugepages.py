"""Guest RAM on 2 MiB pages: a block's segment mapped at a 2 MiB boundary, then collapsed.

POSIX shared memory gets 4 KiB pages here (tmpfs without ``huge=``), so every process that
maps guest RAM pays a page-table entry, a fault and a GUP walk per 4 KiB page it touches;
the source's channels do, for every page they pass to the socket by reference. QEMU's guest
RAM, anonymous memory, gets transparent huge pages instead. ``MADV_COLLAPSE`` (Linux 6.1)
replaces a range's pages with 2 MiB ones whatever ``shmem_enabled`` says, and a mapping that
starts on a 2 MiB boundary maps each of them with one entry, in this process and in every
channel forked from it. The collapse copies the pages into 2 MiB blocks the kernel has to
find free, so it costs time before a migration (docs/performance.md), never during one.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref

from ..runtime.libc import libc, madvise

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # Linux 6.1

_mmap = libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_PROT_NONE = 0


def map_aligned(fd: int, size: int) -> memoryview | None:
    """A shared, writable mapping of ``size`` bytes of ``fd`` that starts on a 2 MiB boundary,
    as a byte memoryview; unmapped once the last view of it is gone (like an ``mmap``
    object). None where the mapping cannot be made."""
    span = size + HUGE_PAGE
    base = _mmap(None, span, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if base in (None, _FAILED):
        return None
    start = (base + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    got = _mmap(start, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != start:
        _munmap(base, span)
        return None
    if start > base:  # the reservation's slack on either side
        _munmap(base, start - base)
    if base + span > start + size:
        _munmap(start + size, base + span - start - size)
    memory = (ctypes.c_char * size).from_address(start)
    # not at interpreter exit, where a view still in use could outlive it (the exit unmaps all)
    weakref.finalize(memory, _munmap, start, size).atexit = False
    return memoryview(memory).cast("B")


def collapse(buf: memoryview) -> bool:
    """``MADV_COLLAPSE`` over ``buf``: True when every 2 MiB range of it now is one page."""
    return madvise(buf, MADV_COLLAPSE)
