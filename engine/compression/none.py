"""``none``: raw pages. Sent as views of guest RAM and received straight into it (no copy)."""

from __future__ import annotations

from typing import Sequence

from ..wire import MULTIFD_FLAG_NOCOMP
from .base import Buffer, MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext
from .registry import register_method


class NoneSend(SendContext):
    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        return batch.views()


class NoneRecv(RecvContext):
    def recv_pages(self, packet: PacketSink) -> None:
        packet.recv_into_pages()


register_method(MultiFDMethod("none", MULTIFD_FLAG_NOCOMP, lambda level: NoneSend(), NoneRecv))
