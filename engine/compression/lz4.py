"""``lz4``: the engine's own method (flag ``3 << 1``); QEMU 7.2 does not know it.

Each packet is one LZ4 block of the whole batch, with no stored size: the receiver knows the
size from ``normal_pages`` and never allocates more. The level is LZ4's acceleration
(1 = default; larger is faster and compresses less).
"""

from __future__ import annotations

from typing import Sequence

import lz4.block

from ..errors import CompressionError
from ..wire.packet import MULTIFD_FLAG_LZ4, TARGET_PAGE_SIZE
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext, expect_size
from .registry import register_method


class Lz4Send(SendContext):
    def __init__(self, level: int) -> None:
        self._acceleration = max(1, level)

    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        return [lz4.block.compress(batch.gather(), mode="fast", acceleration=self._acceleration, store_size=False)]


class Lz4Recv(RecvContext):
    def recv_pages(self, packet: PacketSink) -> None:
        want = packet.normal_pages * TARGET_PAGE_SIZE
        payload = packet.read_payload()
        try:
            out = lz4.block.decompress(payload, uncompressed_size=want)
        except lz4.block.LZ4BlockError as exc:
            raise CompressionError(f"lz4: corrupt payload of {len(payload)} bytes: {exc}") from exc
        expect_size("lz4", len(out), packet.normal_pages, TARGET_PAGE_SIZE)
        packet.scatter(out)


register_method(
    MultiFDMethod(
        "lz4", MULTIFD_FLAG_LZ4, Lz4Send, Lz4Recv,
        level_range=(1, 65537), default_level=1, level_parameter="multifd-lz4-level",
        qemu_compatible=False,
    )
)
