"""The multifd compression contract, mirroring QEMU's ``MultiFDMethods``.

A method is a :class:`MultiFDMethod`: a name, the packet flag bits it owns, a level range and
two factories, ``send_setup(level)`` and ``recv_setup()``, that each channel calls once. The
contexts they return live as long as the channel (QEMU 7.2 keeps one deflate/zstd stream per
channel for the whole migration), so they hold per-channel state and are never shared.

    send side:  ctx = method.send_setup(level)   per channel, at setup
                ctx.send_prepare(batch) -> iovecs   per packet: the payload buffers to send
                ctx.send_cleanup()                  at channel end
    recv side:  ctx = method.recv_setup()
                ctx.recv_pages(packet)              per packet with normal_pages > 0
                ctx.recv_cleanup()

``batch`` and ``packet`` are the channel's views of guest RAM (:class:`PageBatch`,
:class:`PacketSink`): a method reads pages through ``batch.views()`` (zero-copy) or
``batch.gather()`` (one contiguous copy, safe against concurrent guest writes), and delivers
pages with ``packet.recv_into_pages()`` (straight from the socket) or ``packet.scatter(data)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import CompressionError

Buffer = bytes | bytearray | memoryview | npt.NDArray[np.uint8]


class PageBatch(Protocol):
    """The pages of one outgoing packet."""

    @property
    def normal_pages(self) -> int: ...

    def views(self) -> Sequence[memoryview]:
        """The pages as views of guest RAM, contiguous runs coalesced (no copy)."""
        ...

    def gather(self) -> npt.NDArray[np.uint8]:
        """The pages copied into one contiguous ``(n, 4096)`` array (reused per channel)."""
        ...


class PacketSink(Protocol):
    """Where the pages of one incoming packet go."""

    @property
    def normal_pages(self) -> int: ...

    @property
    def next_packet_size(self) -> int: ...

    def read_payload(self) -> memoryview:
        """Read exactly ``next_packet_size`` bytes from the channel (a reused buffer)."""
        ...

    def recv_into_pages(self) -> None:
        """Receive ``normal_pages`` raw pages from the channel straight into guest RAM."""
        ...

    def scatter(self, data: Buffer) -> None:
        """Write ``normal_pages * 4096`` contiguous bytes to the packet's pages."""
        ...


class SendContext(ABC):
    """Per-channel sending state (``MultiFDSendParams.data`` in QEMU)."""

    @abstractmethod
    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        """The payload buffers for ``batch``, in order; their total length is next_packet_size."""

    def send_cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release per-channel resources."""


class RecvContext(ABC):
    """Per-channel receiving state."""

    @abstractmethod
    def recv_pages(self, packet: PacketSink) -> None:
        """Deliver the packet's pages; raise :class:`CompressionError` on bad payload."""

    def recv_cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release per-channel resources."""


@dataclass(frozen=True)
class MultiFDMethod:
    """One registered compression method."""

    name: str
    flag: int  # MULTIFD_FLAG_* value (already shifted)
    send_setup: Callable[[int], SendContext]
    recv_setup: Callable[[], RecvContext]
    level_range: tuple[int, int] = (0, 0)
    default_level: int = 0
    level_parameter: str | None = None  # QEMU's parameter name, e.g. "multifd-zlib-level"
    qemu_compatible: bool = True  # a QEMU 7.2 peer understands it

    def check_level(self, level: int) -> int:
        lo, hi = self.level_range
        if not lo <= level <= hi:
            what = self.level_parameter or f"{self.name} level"
            raise CompressionError(f"{what} {level} is out of range, expected {lo}..{hi}")
        return level


def expect_size(method: str, got: int, normal_pages: int, page_size: int) -> None:
    want = normal_pages * page_size
    if got != want:
        raise CompressionError(
            f"{method}: payload decompressed to {got} bytes, expected {want} ({normal_pages} pages)"
        )
