"""``zstd``: one never-ending zstd frame per channel; each packet ends with a block flush.

Matches QEMU 7.2 (``multifd-zstd.c``): ``multifd-zstd-level`` (0..20, default 1), every packet
flushed with ``ZSTD_e_flush`` (``COMPRESSOBJ_FLUSH_BLOCK``), the frame never ended, so the
receiver keeps one decompression stream per channel.
"""

from __future__ import annotations

from typing import Sequence

import zstandard

from ..errors import CompressionError
from ..wire import MULTIFD_FLAG_ZSTD, TARGET_PAGE_SIZE
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext, expect_size
from .registry import register_method


class ZstdSend(SendContext):
    def __init__(self, level: int) -> None:
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        c = self._c
        return [c.compress(batch.gather()) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]


class ZstdRecv(RecvContext):
    def __init__(self) -> None:
        # A QEMU sender at level <= 20 uses windows of at most 128 MiB; refuse larger ones.
        self._d = zstandard.ZstdDecompressor(max_window_size=1 << 27).decompressobj()

    def recv_pages(self, packet: PacketSink) -> None:
        payload = packet.read_payload()
        try:
            out = self._d.decompress(payload)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd: corrupt payload of {len(payload)} bytes: {exc}") from exc
        expect_size("zstd", len(out), packet.normal_pages, TARGET_PAGE_SIZE)
        packet.scatter(out)


register_method(
    MultiFDMethod(
        "zstd", MULTIFD_FLAG_ZSTD, ZstdSend, ZstdRecv,
        level_range=(0, 20), default_level=1, level_parameter="multifd-zstd-level",
    )
)
