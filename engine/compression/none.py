"""``none``: raw pages, sent straight from views of the segment (one iovec per run of pages);
received into the channel's buffer and written into the segment (see destination/channels.py)."""

from __future__ import annotations

from typing import Sequence

from ..wire.packet import MULTIFD_FLAG_NOCOMP
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext
from .registry import register_method


class NoneSend(SendContext):
    # Views of the mapping, one iovec per run of pages: the page bytes go from guest RAM to
    # the socket without a copy in the process. The source's channels take the same views (or
    # the iovec array of runtime/iov.py) themselves; this serves the method's contract for the
    # snapshot channels and the tests.
    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        return batch.views()


class NoneRecv(RecvContext):
    def recv_pages(self, packet: PacketSink) -> None:
        packet.recv_into_pages()


register_method(MultiFDMethod("none", MULTIFD_FLAG_NOCOMP, lambda level: NoneSend(), NoneRecv))
