"""``zlib``: one deflate stream per channel, never finished; each packet ends with a sync flush.

Matches QEMU 7.2 (``multifd-zlib.c``): zlib-wrapped format, ``multifd-zlib-level`` (0..9,
default 1), ``Z_SYNC_FLUSH`` after the last page of a packet so every packet ends on a byte
boundary (``00 00 ff ff``). The receiver keeps one inflate stream per channel and bounds its
output to ``normal_pages * 4096`` bytes, so a hostile payload cannot make it allocate more.
"""

from __future__ import annotations

import zlib
from typing import Sequence

from ..errors import CompressionError
from ..wire.packet import MULTIFD_FLAG_ZLIB, TARGET_PAGE_SIZE
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext, expect_size
from .registry import register_method


class ZlibSend(SendContext):
    def __init__(self, level: int) -> None:
        self._c = zlib.compressobj(level)

    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        # straight from the runs of guest pages: the stream does not care where its input breaks
        c = self._c
        out = [c.compress(view) for view in batch.views()]
        out.append(c.flush(zlib.Z_SYNC_FLUSH))
        return [part for part in out if part]


class ZlibRecv(RecvContext):
    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def recv_pages(self, packet: PacketSink) -> None:
        want = packet.normal_pages * TARGET_PAGE_SIZE
        payload = packet.read_payload()
        try:
            # One byte of room more than `want`: output that does not fit is an error even
            # when inflate holds it back as pending output of a match (with no input left).
            out = self._d.decompress(payload, want + 1)
            if len(out) > want:
                raise CompressionError(f"zlib: payload decompresses to more than {want} bytes ({packet.normal_pages} pages)")
        except zlib.error as exc:
            raise CompressionError(f"zlib: corrupt payload of {len(payload)} bytes: {exc}") from exc
        expect_size("zlib", len(out), packet.normal_pages, TARGET_PAGE_SIZE)
        packet.scatter(out)


register_method(
    MultiFDMethod(
        "zlib", MULTIFD_FLAG_ZLIB, ZlibSend, ZlibRecv,
        level_range=(0, 9), default_level=1, level_parameter="multifd-zlib-level",
    )
)
