"""Shared parts of the compression tests (test_compression*.py): the channel doubles
(:class:`ArrayBatch`, :class:`BytesPacket`, :class:`Sender`, :class:`Receiver`), page makers,
and the method lists every conformance test is parametrised over."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from engine.compression import RecvContext, SendContext, get_method, method_names
from engine.compression.base import Buffer, PacketSink, PageBatch
from engine.errors import TruncatedError
from engine.wire.packet import MAX_PACKET_PAYLOAD, MULTIFD_FLAG_NOCOMP, PAGES_PER_PACKET, TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE
METHODS = method_names()
#: Methods that transform the payload (and so can be handed a corrupt one).
CODECS = [name for name in METHODS if get_method(name).flag != MULTIFD_FLAG_NOCOMP]
QEMU_CODECS = [name for name in CODECS if get_method(name).qemu_compatible]


# ----------------------------------------------------------------- test doubles


def byte_view(buf: Any) -> memoryview:
    """A flat byte view of any payload buffer (bytes, memoryview, numpy array)."""
    return memoryview(buf).cast("B")


class ArrayBatch:
    """``PageBatch`` over numpy pages; ``gather()`` fills one reused scratch array."""

    def __init__(self) -> None:
        self.scratch = np.empty((PAGES_PER_PACKET, PAGE), dtype=np.uint8)
        self.pages = np.zeros((0, PAGE), dtype=np.uint8)

    @property
    def normal_pages(self) -> int:
        return len(self.pages)

    def views(self) -> Sequence[memoryview]:
        return [byte_view(self.pages)]  # one contiguous run

    def gather(self) -> npt.NDArray[np.uint8]:
        out = self.scratch[: len(self.pages)]
        out[:] = self.pages
        return out


class BytesPacket:
    """``PacketSink`` for one packet whose payload is ``payload``, read through ``buffer``."""

    def __init__(self, payload: bytes, normal_pages: int, buffer: bytearray) -> None:
        self._payload = payload
        self._normal_pages = normal_pages
        self._buffer = buffer
        self._reads = 0
        self.pages: npt.NDArray[np.uint8] | None = None

    @property
    def normal_pages(self) -> int:
        return self._normal_pages

    @property
    def next_packet_size(self) -> int:
        return len(self._payload)

    def read_payload(self) -> memoryview:
        self._reads += 1
        assert self._reads == 1, "read_payload() called twice for one packet"
        view = memoryview(self._buffer)[: len(self._payload)]
        view[:] = self._payload
        return view

    def recv_into_pages(self) -> None:
        self._reads += 1
        assert self._reads == 1, "payload received twice for one packet"
        want = self._normal_pages * PAGE
        if len(self._payload) < want:
            raise TruncatedError(f"test channel: payload of {len(self._payload)} bytes, expected {want}")
        self.pages = np.frombuffer(self._payload, dtype=np.uint8, count=want).reshape(-1, PAGE).copy()

    def scatter(self, data: Buffer) -> None:
        raw = byte_view(data)
        # The contract: a method checks the size before it delivers anything.
        assert len(raw) == self._normal_pages * PAGE, f"scatter of {len(raw)} bytes for {self._normal_pages} pages"
        assert self.pages is None, "scatter() called twice for one packet"
        self.pages = np.frombuffer(raw, dtype=np.uint8).reshape(-1, PAGE).copy()


def _check_protocols() -> None:
    """Not a test: mypy checks here that the doubles implement the engine's protocols."""
    batch: PageBatch = ArrayBatch()
    sink: PacketSink = BytesPacket(b"", 0, bytearray(1))
    del batch, sink


@dataclass
class Sender:
    """One send channel: a persistent context and the reused batch."""

    ctx: SendContext
    batch: ArrayBatch = field(default_factory=ArrayBatch)

    def send(self, pages: npt.NDArray[np.uint8]) -> bytes:
        self.batch.pages = pages
        bufs = self.ctx.send_prepare(self.batch)
        payload = b"".join(byte_view(b) for b in bufs)
        self.batch.scratch.fill(0xA5)  # the payload must not alias what the next packet reuses
        return payload


@dataclass
class Receiver:
    """One receive channel: a persistent context and the reused payload buffer."""

    ctx: RecvContext
    buffer: bytearray = field(default_factory=lambda: bytearray(MAX_PACKET_PAYLOAD))

    def recv(self, payload: bytes, normal_pages: int) -> npt.NDArray[np.uint8]:
        packet = BytesPacket(payload, normal_pages, self.buffer)
        self.ctx.recv_pages(packet)
        self.buffer[: len(payload)] = b"\x5a" * len(payload)  # reused for the next packet
        assert packet.pages is not None, "recv_pages() delivered nothing"
        return packet.pages


def sender(name: str, level: int | None = None) -> Sender:
    method = get_method(name)
    return Sender(method.send_setup(method.default_level if level is None else level))


def receiver(name: str) -> Receiver:
    return Receiver(get_method(name).recv_setup())


# ----------------------------------------------------------------------- pages

KINDS = ["random", "zero", "text", "sparse", "counter", "ones"]
_TEXT = np.frombuffer((b"multifd: received packet magic %x expected 11223344\n" * 100)[:PAGE], dtype=np.uint8)


def make_pages(n: int, kinds: Sequence[str], seed: int) -> npt.NDArray[np.uint8]:
    """``n`` pages cycling through ``kinds``, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    pages = np.zeros((n, PAGE), dtype=np.uint8)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "random":
            pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        elif kind == "text":
            pages[i] = np.roll(_TEXT, int(rng.integers(0, PAGE)))
        elif kind == "sparse":
            idx = rng.integers(0, PAGE, 8)
            pages[i, idx] = rng.integers(1, 256, 8, dtype=np.uint8)
        elif kind == "counter":
            pages[i] = (np.arange(PAGE) + i).astype(np.uint8)
        elif kind == "ones":
            pages[i] = 0xFF
    return pages


def mixed_packets(count: int, seed: int) -> Iterator[npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    for k in range(count):
        n = int(rng.choice([1, 2, 7, 64, 127, 128, int(rng.integers(1, 129))]))
        kinds = list(rng.choice(KINDS, size=int(rng.integers(1, 4))))
        yield make_pages(n, kinds, seed * 1000 + k)
