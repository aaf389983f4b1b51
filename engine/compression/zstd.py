"""``zstd``: one never-ending zstd frame per channel; each packet ends with a block flush.

Matches QEMU 7.2 (``multifd-zstd.c``): ``multifd-zstd-level`` (0..20, default 1), every packet
flushed with ``ZSTD_e_flush`` (``COMPRESSOBJ_FLUSH_BLOCK``), the frame never ended, so the
receiver keeps one decompression stream per channel.
"""

from __future__ import annotations

import sys
from typing import Sequence

import zstandard

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdDecompressor
    from compression.zstd import ZstdError as _BoundedZstdError
else:  # the backport of Python 3.14's compression.zstd: decompress() takes max_length
    from backports.zstd import ZstdDecompressor
    from backports.zstd import ZstdError as _BoundedZstdError

from ..errors import CompressionError
from ..wire.packet import MULTIFD_FLAG_ZSTD, TARGET_PAGE_SIZE
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext, expect_size
from .registry import register_method


class ZstdSend(SendContext):
    def __init__(self, level: int) -> None:
        self._c = zstandard.ZstdCompressor(level=level).compressobj()

    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        # straight from the runs of guest pages: the stream does not care where its input breaks
        c = self._c
        out = [c.compress(view) for view in batch.views()]
        out.append(c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return [part for part in out if part]


class ZstdRecv(RecvContext):
    """One decompression stream per channel, its output bounded by ``normal_pages * 4096``:
    a hostile payload (zstd can expand 1 MiB into gigabytes) never makes it allocate more.
    python-zstandard's streaming decompressor has no output bound, so the receive side uses
    the standard library's ``compression.zstd`` API (its backport before Python 3.14)."""

    def __init__(self) -> None:
        self._d = ZstdDecompressor()

    def recv_pages(self, packet: PacketSink) -> None:
        want = packet.normal_pages * TARGET_PAGE_SIZE
        payload = packet.read_payload()
        try:
            out = self._d.decompress(payload, want)
            if not self._d.needs_input and self._d.decompress(b"", 1):
                raise CompressionError(f"zstd: payload decompresses to more than {want} bytes ({packet.normal_pages} pages)")
        except (_BoundedZstdError, EOFError) as exc:
            # EOFError ("Already at the end of a Zstandard frame"): a corrupt payload ended the
            # frame, which QEMU never does, and more data followed.
            raise CompressionError(f"zstd: corrupt payload of {len(payload)} bytes: {exc}") from exc
        expect_size("zstd", len(out), packet.normal_pages, TARGET_PAGE_SIZE)
        packet.scatter(out)


register_method(
    MultiFDMethod(
        "zstd", MULTIFD_FLAG_ZSTD, ZstdSend, ZstdRecv,
        level_range=(0, 20), default_level=1, level_parameter="multifd-zstd-level",
    )
)
