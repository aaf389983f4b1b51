"""Page-aligned I/O buffers for the channel processes.

Theory of operation
-------------------
A channel's long-lived packet buffer is copied to or from page-aligned memory by the kernel on
every packet: ``pwrite`` copies it into page-cache pages, ``preadv`` fills it from them. When
the buffer starts just below a 4 KiB boundary (16-32 bytes), each load of that copy has the
same low 12 address bits as a store the CPU has not finished yet ("4K aliasing"), and the load
waits for it: ``pwrite`` from a buffer at 4080 mod 4096 into fresh tmpfs pages took 2.3x as
long as from one at 0 (256 MiB: 295 vs 128 ms). Where a buffer from the heap lands depends on
everything allocated before it, down to the order of the command-line arguments: one
destination started with ``--compression none`` before ``--json`` spent 1.5 instead of 1.0 CPU
s in its channels per GiB, 3.2x the samples in the kernel's copy into the page cache.

So these buffers come from anonymous ``mmap``: page-aligned whatever the heap looks like, and
allocated once per channel (never per packet; see ``procs._keep_packet_buffers`` for those).
No concurrency: each buffer belongs to the one process that made it.
"""

from __future__ import annotations

import mmap

import numpy as np
import numpy.typing as npt

from ..wire.packet import TARGET_PAGE_SIZE


def aligned_bytes(nbytes: int) -> memoryview:
    """A writable, zero-filled, page-aligned byte buffer of ``nbytes`` > 0 (the view keeps its
    mapping alive; the mapping goes when the last view does)."""
    private = mmap.MAP_PRIVATE  # plain anonymous memory: not shared with processes forked later
    return memoryview(mmap.mmap(-1, nbytes, flags=private))


def aligned_pages(npages: int) -> npt.NDArray[np.uint8]:
    """``aligned_bytes`` as an ``(npages, 4096)`` uint8 array (a buffer of whole pages)."""
    return np.frombuffer(aligned_bytes(npages * TARGET_PAGE_SIZE), dtype=np.uint8).reshape(npages, TARGET_PAGE_SIZE)
