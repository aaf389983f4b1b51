"""Page-aligned I/O buffers for the channel processes.

The kernel copies a channel's long-lived packet buffer to or from page-cache pages on every
packet (``pwrite``, ``preadv``). A heap buffer that starts just below a 4 KiB boundary makes
those copies stall on 4K aliasing, and where the heap puts it depends on everything allocated
before it, down to the order of the command-line arguments. So these buffers come from
anonymous ``mmap``: page-aligned whatever the heap looks like, allocated once per channel (never
per packet; see ``procs._keep_packet_buffers`` for those), owned by the one process that made
it. The measurements: docs/performance.md, "Where the packet buffer lands".
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
