"""The source's ``ram`` section writer and page batching (``multifd_queue_page``).

Theory of operation
-------------------
One thread (the "migration thread", this process's main thread) writes the main channel and
feeds the channel processes. The unit of work is :meth:`RamSaver.save_section`: "send these
pages of these blocks in one ram section". For every block it scans the given pages in chunks
with numpy: zero pages become ZERO records on the main channel (QEMU 7.2 behaviour), the others
go to :class:`MultiFDQueue`, which cuts them into packets of at most ``packet-pages`` pages
(128) of one block (``multifd_queue_page``: flush on block change or when full). Then the
section's sync round: ``SendChannels.sync`` returns once every channel has written its SYNC packet, and only then is
the EOS record written, so the destination's barrier sees every page of the section first.

The migration driver (engine/source/migration.py) calls ``save_setup`` once, ``save_section`` once per
precopy iteration, and ``save_section(..., end=True)`` for stop-and-copy.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import numpy.typing as npt

from ..memory.ram import GuestRam, zero_pages
from ..runtime.trace import SYNC_WAIT, ZERO_SCAN, Trace, now_ns
from ..stats import MigrationStats
from ..wire.encoder import StreamEncoder
from ..wire.packet import TARGET_PAGE_SIZE
from ..wire.stream import RAM_SECTION_ID, RAM_SECTION_IDSTR, RAM_SECTION_VERSION
from .channels import SendChannels

ZERO_SCAN_CHUNK = 1024  # pages per numpy zero scan (16 MiB)
MAIN_FLUSH = 256 * 1024


class MultiFDQueue:
    """``multifd_queue_page`` for whole arrays: batches of <= ``packet_pages`` pages of one block."""

    def __init__(self, channels: SendChannels) -> None:
        self.channels = channels
        self.size = size = channels.packet_pages  # pages per packet
        self._block = -1
        self._pending = np.empty(size, dtype=np.int64)
        self._count = 0
        self.pages = 0

    def queue(self, block_idx: int, idx: npt.NDArray[np.int64]) -> None:
        if len(idx) == 0:
            return
        self.pages += len(idx)
        if block_idx != self._block:
            self.flush()
            self._block = block_idx
        pos, size = 0, self.size
        if self._count:
            take = min(size - self._count, len(idx))
            self._pending[self._count:self._count + take] = idx[:take]
            self._count += take
            pos = take
            if self._count < size:
                return
            self.flush()
        full_end = pos + (len(idx) - pos) // size * size
        for start in range(pos, full_end, size):
            self.channels.send_pages(block_idx, idx[start:start + size])
        rest = len(idx) - full_end
        if rest:
            self._pending[:rest] = idx[full_end:]
            self._count = rest

    def flush(self) -> None:
        if self._count:
            self.channels.send_pages(self._block, self._pending[: self._count].copy())
            self._count = 0


class RamSaver:
    """Writes the ``ram`` section (main channel) and feeds the multifd channels."""

    def __init__(self, main_send: Callable[[bytes], None], enc: StreamEncoder, channels: SendChannels,
                 ram: GuestRam, stats: MigrationStats, *, after_chunk: Callable[[], None] = lambda: None,
                 chunk_pages: int = ZERO_SCAN_CHUNK, scan_zero: bool = True, flush_records: bool = False,
                 switchover_start: bool = False, section_id: int = RAM_SECTION_ID) -> None:
        self._send = main_send
        self.section_id = section_id  # a replayed VM keeps the id its source gave RAM
        self.enc = enc
        self.channels = channels
        self.queue = MultiFDQueue(channels)
        self.ram = ram
        self.stats = stats
        self.sections = 0
        self.pages_done = 0  # pages of the current section handled so far (progress)
        self.after_chunk = after_chunk  # rate limiting and cancellation, between chunks
        self.chunk_pages = chunk_pages
        self.scan_zero = scan_zero  # zero-page-detection=legacy; else every page goes to the channels
        self.flush_records = flush_records  # a MULTIFD_FLUSH record marks each sync (QEMU 8.0+ off-mode)
        self.switchover_start = switchover_start  # SWITCHOVER_START before the END section (QEMU 10.0)
        self.zero_records = 0  # zero pages sent as ZERO records (the channels count the rest)
        self.trace: Trace | None = None

    def _flush_main(self, force: bool = False) -> None:
        if self.enc.out and (force or len(self.enc.out) >= MAIN_FLUSH):
            data = self.enc.take()
            self._send(data)
            self.stats.ram.main_bytes += len(data)

    def _sync_and_eos(self) -> None:
        self.queue.flush()
        self._flush_main(force=True)
        t0 = now_ns()
        self.channels.sync()
        if self.trace is not None:
            self.trace.span(SYNC_WAIT, t0)
        if self.flush_records:  # the destination syncs here, not at the EOS
            self.enc.ram_multifd_flush()
        self.enc.ram_eos()
        self.enc.footer(self.section_id)
        self._flush_main(force=True)
        self.sections += 1

    def save_setup(self) -> None:
        """The START section: MEM_SIZE and the block list, then the first sync round."""
        self.enc.section_start(self.section_id, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION)
        self.enc.ram_mem_size([(b.name, b.size) for b in self.ram])
        self._sync_and_eos()

    def save_section(self, dirty: Mapping[int, npt.NDArray[np.int64]] | None, *, end: bool = False) -> None:
        """One PART (or END) section carrying the pages ``dirty`` maps per block index.

        ``None`` means every page of every block. Page indices must be sorted and unique.
        """
        if end and self.switchover_start:
            self.enc.switchover_start()
        self.enc.section_part(self.section_id, end=end)
        self.pages_done = 0
        for block_idx, block in enumerate(self.ram):
            if dirty is None:
                self._save_block_pages(block_idx, np.arange(block.npages, dtype=np.int64))
            elif block_idx in dirty and len(dirty[block_idx]):
                self._save_block_pages(block_idx, dirty[block_idx])
        self._sync_and_eos()

    def _save_block_pages(self, block_idx: int, idx: npt.NDArray[np.int64]) -> None:
        words = self.ram.blocks[block_idx].words
        for a in range(0, len(idx), self.chunk_pages):
            chunk = idx[a:a + self.chunk_pages]
            self._emit(block_idx, chunk, self._scan(words, chunk) if self.scan_zero else None)

    def _scan(self, words: npt.NDArray[np.uint64], chunk: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Which pages of ``chunk`` are zero (zero-page-detection=legacy)."""
        t0 = now_ns()
        zero = zero_pages(words, chunk)
        if self.trace is not None:
            self.trace.span(ZERO_SCAN, t0)
        return zero

    def _emit(self, block_idx: int, idx: npt.NDArray[np.int64], zero: npt.NDArray[np.bool_] | None) -> None:
        """ZERO records for ``zero`` pages, the rest to the channels (all of them when ``zero``
        is None: the channels find the zero pages)."""
        normal = idx
        if zero is not None:
            zeros = idx[zero]
            if len(zeros):
                self.enc.ram_zero_pages(self.ram.blocks[block_idx].name, zeros * TARGET_PAGE_SIZE)
                self.zero_records += len(zeros)
                self._flush_main()
            normal = idx[~zero]
        if len(normal):
            self.queue.queue(block_idx, normal)
        self.pages_done += len(idx)
        self.after_chunk()
