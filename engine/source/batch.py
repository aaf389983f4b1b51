"""The pages of the packet a source channel is sending, and the ways a method takes them."""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from ..errors import ChannelError
from ..memory.ram import RamBlock, zero_pages
from ..memory.runs import page_runs
from ..runtime.buffers import aligned_pages
from ..wire.packet import TARGET_PAGE_SIZE

NO_PAGES: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)  # (never written)


class Batch:
    """The pages of the packet being sent (implements ``compression.PageBatch``): page indices
    of a block, and views of them in guest RAM where a method wants buffers (zlib and zstd
    compress from them; ``none`` sends them on a TLS or zero-copy socket). Pages mapped that way
    stay mapped in the channel; they are the guest's memory, shared, not the channel's own (its
    private memory is a few buffers). lz4 reads them with preadv into one reused buffer."""

    def __init__(self, packet_pages: int) -> None:
        self.scratch = aligned_pages(packet_pages)  # preadv's copies from the page cache at full speed
        self.block: RamBlock | None = None
        self.idx: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

    def start(self, block: RamBlock, idx: npt.NDArray[np.int64]) -> None:
        self.block, self.idx = block, idx

    def drop_zero_pages(self) -> npt.NDArray[np.int64]:
        """``zero-page-detection=multifd``: find the zero pages where they are in guest RAM
        (no copy but of the candidates), keep the others as this batch (in order) and return
        the zero pages' indices."""
        assert self.block is not None
        idx = self.idx
        zero = zero_pages(self.block.words, idx)
        if not zero.any():
            return NO_PAGES
        zeros: npt.NDArray[np.int64] = idx[zero]
        self.idx = idx[~zero]
        return zeros

    @property
    def normal_pages(self) -> int:
        return len(self.idx)

    def views(self) -> list[memoryview]:
        """Views of the pages in guest RAM, one per run: what zlib and zstd compress from, and
        what ``none`` sends on a TLS or zero-copy socket."""
        assert self.block is not None
        if not len(self.idx):
            return []
        buf, page = self.block.buf, TARGET_PAGE_SIZE
        return [buf[a * page:b * page] for a, b in page_runs(self.idx)]

    def gather(self) -> npt.NDArray[np.uint8]:
        """Copy the pages into the scratch buffer, for a method that needs them contiguous
        (lz4's block format): positioned reads of the segment, one per run; a numpy gather
        from the mapping for segments without a file descriptor."""
        block = self.block
        assert block is not None
        out = self.scratch[: len(self.idx)]
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
