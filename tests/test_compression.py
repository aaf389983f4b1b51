"""Conformance suite for the multifd compression methods, pure (no sockets, no processes).

Every test marked "conformance" is parametrised over ``method_names()``, so a newly registered
method is covered without touching this file. The channel is replaced by two small doubles:
:class:`ArrayBatch` (a ``PageBatch`` whose ``gather()`` reuses one scratch array, like the
send channel's) and :class:`BytesPacket` (a ``PacketSink`` whose ``read_payload()`` returns a
view of one reused per-channel buffer, like the receive channel's). Both buffers are scribbled
over after each packet, so a method that keeps a reference to them across packets fails.

QEMU-format facts come from the wire doc, section 3 (zlib and zstd are QEMU 7.2's methods;
their receiver is a plain per-channel decompress object).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from engine.compression import (
    MultiFDMethod,
    RecvContext,
    SendContext,
    UnknownMethodError,
    get_method,
    method_for_flag,
    method_names,
    register_method,
)
from engine.compression import registry
from engine.compression.base import Buffer, PacketSink, PageBatch
from engine.errors import CompressionError, ConfigError, MigrationError, TruncatedError
from engine.wire import (
    MAX_PACKET_PAYLOAD,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_NOCOMP,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
)

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


# ----------------------------------------------------------------- registry


def test_builtin_methods_are_registered() -> None:
    assert {"none", "zlib", "zstd", "lz4"} <= set(METHODS)
    assert len(set(METHODS)) == len(METHODS)


@pytest.mark.parametrize(
    ("name", "flag", "qemu"),
    [("none", 0, True), ("zlib", 2, True), ("zstd", 4, True), ("lz4", 6, False)],
    ids=["none", "zlib", "zstd", "lz4"],
)
def test_method_flags(name: str, flag: int, qemu: bool) -> None:
    method = get_method(name)
    assert method.name == name
    assert method.flag == flag
    assert method.qemu_compatible is qemu
    assert method_for_flag(flag) is method


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_method_metadata(name: str) -> None:
    method = get_method(name)
    assert method.name == name
    assert method.flag & ~MULTIFD_FLAG_COMPRESSION_MASK == 0, "compression bits are 1..3 of the packet flags"
    assert method_for_flag(method.flag) is method
    lo, hi = method.level_range
    assert lo <= method.default_level <= hi


def test_flags_are_unique() -> None:
    flags = [get_method(n).flag for n in METHODS]
    assert len(set(flags)) == len(flags)


@pytest.mark.parametrize("name", ["lzo", "", "ZLIB", "zlib "], ids=["lzo", "empty", "upper", "space"])
def test_unknown_method_lists_valid_names(name: str) -> None:
    with pytest.raises(UnknownMethodError) as info:
        get_method(name)
    assert str(info.value) == f"unknown multifd-compression {name!r}, expected one of {', '.join(METHODS)}"
    for valid in ("none", "zlib", "zstd", "lz4"):
        assert valid in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, MigrationError)


def test_unknown_flag() -> None:
    with pytest.raises(UnknownMethodError, match=r"^unknown multifd compression flags 0x8$"):
        method_for_flag(0x8)


def test_register_refuses_a_taken_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_FLAG", dict(registry._BY_FLAG))
    zlib_method = get_method("zlib")
    clash = MultiFDMethod("clash", zlib_method.flag, zlib_method.send_setup, zlib_method.recv_setup)
    with pytest.raises(ValueError, match=r"^flag 0x2 of 'clash' is taken by 'zlib'$"):
        register_method(clash)
    assert "clash" not in method_names()


class _IdentitySend(SendContext):
    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        return [batch.gather()]


class _IdentityRecv(RecvContext):
    def recv_pages(self, packet: PacketSink) -> None:
        packet.scatter(packet.read_payload())


def test_register_a_new_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_FLAG", dict(registry._BY_FLAG))
    method = register_method(MultiFDMethod("identity", 7 << 1, lambda level: _IdentitySend(), _IdentityRecv))
    assert get_method("identity") is method is method_for_flag(0xE)
    assert "identity" in method_names()
    pages = make_pages(3, ["random"], 0)
    assert np.array_equal(receiver("identity").recv(sender("identity").send(pages), 3), pages)


# -------------------------------------------------------------------- levels


def test_qemu_level_ranges_are_pinned() -> None:
    zl, zs = get_method("zlib"), get_method("zstd")
    assert (zl.level_range, zl.default_level, zl.level_parameter) == ((0, 9), 1, "multifd-zlib-level")
    assert (zs.level_range, zs.default_level, zs.level_parameter) == ((0, 20), 1, "multifd-zstd-level")


@pytest.mark.parametrize(
    ("name", "level", "message"),
    [
        ("zlib", 10, "multifd-zlib-level 10 is out of range, expected 0..9"),
        ("zlib", -1, "multifd-zlib-level -1 is out of range, expected 0..9"),
        ("zstd", 21, "multifd-zstd-level 21 is out of range, expected 0..20"),
        ("zstd", -1, "multifd-zstd-level -1 is out of range, expected 0..20"),
    ],
    ids=["zlib-10", "zlib-negative", "zstd-21", "zstd-negative"],
)
def test_level_out_of_range(name: str, level: int, message: str) -> None:
    with pytest.raises(CompressionError) as info:
        get_method(name).check_level(level)
    assert str(info.value) == message


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_check_level_bounds(name: str) -> None:
    method = get_method(name)
    lo, hi = method.level_range
    for level in (lo, method.default_level, hi):
        assert method.check_level(level) == level
    what = method.level_parameter or f"{name} level"
    for level in (lo - 1, hi + 1):
        with pytest.raises(CompressionError, match=f"^{what} {level} is out of range, expected {lo}..{hi}$"):
            method.check_level(level)


def _levels(name: str) -> list[int]:
    method = get_method(name)
    return sorted({method.level_range[0], method.default_level, method.level_range[1]})


LEVEL_CASES = [(name, level) for name in METHODS for level in _levels(name)]


@pytest.mark.parametrize(("name", "level"), LEVEL_CASES, ids=[f"{n}-{lv}" for n, lv in LEVEL_CASES])
def test_conformance_round_trip_at_level_bounds(name: str, level: int) -> None:
    tx, rx = sender(name, level), receiver(name)
    for pages in mixed_packets(4, seed=level % 97):
        assert np.array_equal(rx.recv(tx.send(pages), len(pages)), pages)


@pytest.mark.parametrize(("name", "level"), LEVEL_CASES, ids=[f"{n}-{lv}" for n, lv in LEVEL_CASES])
def test_conformance_worst_case_payload_fits_a_qemu_receiver(name: str, level: int) -> None:
    """128 incompressible pages must stay within the receiver's 1 MiB buffer (doc 2.3)."""
    tx, rx = sender(name, level), receiver(name)
    for seed, kinds in enumerate([["text"], ["random"], ["zero"], ["random"]]):
        pages = make_pages(PAGES_PER_PACKET, kinds, seed)
        payload = tx.send(pages)
        assert 0 < len(payload) <= MAX_PACKET_PAYLOAD
        assert np.array_equal(rx.recv(payload, PAGES_PER_PACKET), pages)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_many_packets_through_persistent_contexts(name: str) -> None:
    """One context per channel for the whole migration: 40 packets, 1..128 pages each."""
    tx, rx = sender(name), receiver(name)
    sizes = []
    for pages in mixed_packets(40, seed=7):
        payload = tx.send(pages)
        sizes.append(len(pages))
        assert np.array_equal(rx.recv(payload, len(pages)), pages)
    assert min(sizes) == 1 and max(sizes) == PAGES_PER_PACKET


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_channels_are_independent(name: str) -> None:
    """Two channels interleaved: each receiver only sees its own sender's packets."""
    txs, rxs = [sender(name), sender(name)], [receiver(name), receiver(name)]
    for k, pages in enumerate(mixed_packets(12, seed=3)):
        ch = k % 2 if k < 6 else (k // 3) % 2
        assert np.array_equal(rxs[ch].recv(txs[ch].send(pages), len(pages)), pages)


_packet_specs = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 8), st.integers(1, PAGES_PER_PACKET)),
        st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.parametrize("name", METHODS, ids=str)
@given(specs=_packet_specs)
def test_conformance_round_trip_property(name: str, specs: list[tuple[int, list[str], int]]) -> None:
    tx, rx = sender(name), receiver(name)
    for n, kinds, seed in specs:
        pages = make_pages(n, kinds, seed)
        payload = tx.send(pages)
        if get_method(name).flag == MULTIFD_FLAG_NOCOMP:
            assert payload == pages.tobytes()  # raw pages in offset order (doc 2.3)
        assert len(payload) <= MAX_PACKET_PAYLOAD
        assert np.array_equal(rx.recv(payload, n), pages)


# ---------------------------------------------------------------- corruption


def _payloads(name: str, count: int = 3, seed: int = 11) -> list[tuple[bytes, npt.NDArray[np.uint8]]]:
    tx = sender(name)
    out = []
    for k in range(count):
        pages = make_pages(16, ["random", "text", "zero", "sparse"], seed + k)
        out.append((tx.send(pages), pages))
    return out


@pytest.mark.parametrize("name", CODECS, ids=str)
@pytest.mark.parametrize("cut", ["empty", "one-byte", "half"], ids=str)
def test_conformance_truncated_payload_raises(name: str, cut: str) -> None:
    (payload, _), = _payloads(name, 1)
    short = {"empty": b"", "one-byte": payload[:1], "half": payload[: len(payload) // 2]}[cut]
    with pytest.raises(CompressionError, match=f"^{name}: "):
        receiver(name).recv(short, 16)


@pytest.mark.parametrize("name", CODECS, ids=str)
def test_conformance_truncated_later_packet_raises(name: str) -> None:
    (p0, pages0), (p1, _), _ = _payloads(name)
    rx = receiver(name)
    assert np.array_equal(rx.recv(p0, 16), pages0)
    with pytest.raises(CompressionError, match=f"^{name}: "):
        rx.recv(p1[: len(p1) // 2], 16)


@pytest.mark.parametrize("name", CODECS, ids=str)
@pytest.mark.parametrize("garbage", [b"\xff" * 100, bytes(range(256)) * 4], ids=["ff", "counter"])
def test_conformance_garbage_payload_raises(name: str, garbage: bytes) -> None:
    with pytest.raises(CompressionError, match=f"^{name}: "):
        receiver(name).recv(garbage, 4)


@pytest.mark.parametrize("name", CODECS, ids=str)
@pytest.mark.parametrize("delta", [-1, +1, -15], ids=["one-page-more", "one-page-fewer", "fifteen-more"])
def test_conformance_wrong_length_output_raises(name: str, delta: int) -> None:
    """The size check: a payload that decodes to more or fewer pages than normal_pages."""
    (payload, _), = _payloads(name, 1)
    with pytest.raises(CompressionError, match=f"^{name}: "):
        receiver(name).recv(payload, 16 + delta)


@pytest.mark.parametrize("name", CODECS, ids=str)
def test_conformance_wrong_length_in_later_packet_raises(name: str) -> None:
    (p0, pages0), (p1, _), _ = _payloads(name)
    rx = receiver(name)
    assert np.array_equal(rx.recv(p0, 16), pages0)
    with pytest.raises(CompressionError, match=f"^{name}: "):
        rx.recv(p1, 15)


@st.composite
def corruptions(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    op = draw(st.sampled_from(["truncate", "flip", "garbage", "append", "delete"]))
    i = draw(st.integers(0, max(len(data) - 1, 0)))
    if op == "truncate":
        del data[i:]
    elif op == "flip":
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "garbage":
        data[i:i + 16] = draw(st.binary(min_size=1, max_size=16))
    elif op == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        del data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.mark.parametrize("name", CODECS, ids=str)
@given(data=st.data())
def test_conformance_corrupt_packet_raises_compression_error_or_right_size(name: str, data: st.DataObject) -> None:
    """Corruption may go undetected (no checksum mid-stream), but it may never surface as a
    library exception, and never deliver the wrong number of bytes (BytesPacket.scatter asserts
    the size). Once a packet fails the channel is dead; until then the stream goes on."""
    payloads = _payloads(name, 3, seed=data.draw(st.integers(0, 3), label="seed"))
    bad = data.draw(st.integers(0, 2), label="corrupt packet")
    rx = receiver(name)
    for k, (payload, pages) in enumerate(payloads):
        if k == bad:
            payload = data.draw(corruptions(payload), label="payload")
        try:
            got = rx.recv(payload, len(pages))
        except CompressionError as exc:
            assert str(exc).startswith(f"{name}: ")
            assert k >= bad
            return
        if k < bad:
            assert np.array_equal(got, pages)


@pytest.mark.parametrize("name", QEMU_CODECS, ids=str)
@given(data=st.data())
def test_conformance_accepts_exactly_what_a_plain_decompressor_accepts(name: str, data: st.DataObject) -> None:
    """QEMU's receiver is one plain decompress stream per channel that must yield exactly
    normal_pages x 4096 bytes per packet: ours accepts a packet iff that reference does."""
    payloads = _payloads(name, 2, seed=data.draw(st.integers(0, 3), label="seed"))
    ref = zlib.decompressobj() if name == "zlib" else zstandard.ZstdDecompressor().decompressobj()
    rx = receiver(name)
    bad = data.draw(st.integers(0, 1), label="corrupt packet")
    for k, (payload, pages) in enumerate(payloads):
        if k == bad:
            payload = data.draw(corruptions(payload), label="payload")
        try:
            expected: bytes | None = ref.decompress(payload)
        except (zlib.error, zstandard.ZstdError):
            expected = None
        if expected is None or len(expected) != len(pages) * PAGE:
            with pytest.raises(CompressionError, match=f"^{name}: "):
                rx.recv(payload, len(pages))
            return
        if getattr(ref, "eof", False):  # the corruption ended the frame/stream: ours may refuse now
            try:
                assert rx.recv(payload, len(pages)).tobytes() == expected
            except CompressionError as exc:
                assert str(exc).startswith(f"{name}: ")
            return
        assert rx.recv(payload, len(pages)).tobytes() == expected


def test_zlib_output_held_back_by_inflate_is_not_lost() -> None:
    """Regression: a payload whose last match runs past normal_pages x 4096 with no input left
    over (here: a sync-flushed payload with its flush marker cut off) was accepted, and the
    held-back bytes would have been delivered as the start of the next packet."""
    rng = np.random.default_rng(0)
    data = np.zeros(2 * PAGE, dtype=np.uint8)
    data[:3000] = rng.integers(0, 256, 3000, dtype=np.uint8)  # then one long run of zeros
    c = zlib.compressobj(1)
    full = c.compress(data.tobytes()) + c.flush(zlib.Z_SYNC_FLUSH)
    rejected = 0
    for end in range(len(full) - 40, len(full) + 1):
        payload = full[:end]
        decodable = len(zlib.decompressobj().decompress(payload))
        if decodable > PAGE:
            with pytest.raises(CompressionError, match=r"^zlib: payload decompresses to more than 4096 bytes \(1 pages\)$"):
                receiver("zlib").recv(payload, 1)
            rejected += 1
        elif decodable == PAGE:
            assert receiver("zlib").recv(payload, 1).tobytes() == data[:PAGE].tobytes()
    assert rejected > 0


def test_none_delivers_the_payload_as_is() -> None:
    """'none' has nothing to check: the channel receives normal_pages x 4096 raw bytes."""
    payload = bytes(range(256)) * 32
    assert receiver("none").recv(payload, 2).tobytes() == payload
    with pytest.raises(TruncatedError):
        receiver("none").recv(payload[:-1], 2)


# ----------------------------------------------------------- QEMU format facts


@pytest.mark.parametrize(
    ("level", "header"),
    [(0, "7801"), (1, "7801"), (2, "785e"), (5, "785e"), (6, "789c"), (9, "78da")],
    ids=lambda v: str(v),
)
def test_zlib_first_packet_starts_with_the_zlib_header(level: int, header: str) -> None:
    payload = sender("zlib", level).send(make_pages(3, ["text"], 0))
    assert payload[:2].hex() == header


def test_zlib_packets_end_with_the_sync_flush_marker() -> None:
    """Doc 3.1: "78 01" at level 1 on the first packet only; every packet ends 00 00 ff ff."""
    tx = sender("zlib", 1)
    payloads = [tx.send(pages) for pages in mixed_packets(10, seed=5)]
    assert payloads[0][:2] == b"\x78\x01"
    for p in payloads:
        assert p[-4:] == b"\x00\x00\xff\xff"


def test_zlib_stream_is_never_finished() -> None:
    tx = sender("zlib")
    stream = b"".join(tx.send(pages) for pages in mixed_packets(5, seed=9))
    d = zlib.decompressobj()
    d.decompress(stream)
    assert not d.eof  # no Z_FINISH, no adler32 trailer


def test_zstd_first_packet_starts_a_frame_that_never_ends() -> None:
    """Doc 3.2: 28 b5 2f fd, then FHD 0x00 and window 0x48 at level 1; no frame epilogue."""
    tx = sender("zstd", 1)
    payloads = [tx.send(pages) for pages in mixed_packets(8, seed=4)]
    assert payloads[0][:4] == bytes.fromhex("28b52ffd")
    assert payloads[0][4:6] == bytes.fromhex("0048")
    for p in payloads[1:]:
        assert p[:4] != bytes.fromhex("28b52ffd")
    d = zstandard.ZstdDecompressor().decompressobj()
    d.decompress(b"".join(payloads))
    assert not d.eof


@pytest.mark.parametrize("name", QEMU_CODECS, ids=str)
def test_plain_decompressor_reads_the_concatenated_payloads(name: str) -> None:
    """What QEMU's receiver does: one decompress stream per channel over all the packets."""
    tx = sender(name)
    packets = list(mixed_packets(12, seed=6))
    payloads = [tx.send(pages) for pages in packets]
    expected = b"".join(p.tobytes() for p in packets)

    def plain() -> Any:
        return zlib.decompressobj() if name == "zlib" else zstandard.ZstdDecompressor().decompressobj()

    assert plain().decompress(b"".join(payloads)) == expected
    per_packet = plain()
    for payload, pages in zip(payloads, packets):
        assert per_packet.decompress(payload) == pages.tobytes()  # each packet ends on a flush


def _qemu_style_zlib(pages_seq: list[npt.NDArray[np.uint8]], level: int) -> Iterator[bytes]:
    """QEMU 7.2's sender: deflate page by page, Z_NO_FLUSH, Z_SYNC_FLUSH on the last page."""
    c = zlib.compressobj(level)
    for pages in pages_seq:
        out = [c.compress(page.tobytes()) for page in pages[:-1]]
        out.append(c.compress(pages[-1].tobytes()) + c.flush(zlib.Z_SYNC_FLUSH))
        yield b"".join(out)


def _qemu_style_zstd(pages_seq: list[npt.NDArray[np.uint8]], level: int) -> Iterator[bytes]:
    """QEMU 7.2's sender: ZSTD_e_continue per page, ZSTD_e_flush on the last page, never e_end."""
    c = zstandard.ZstdCompressor(level=level).compressobj()
    for pages in pages_seq:
        out = [c.compress(page.tobytes()) for page in pages]
        out.append(c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        yield b"".join(out)


@pytest.mark.parametrize("name", ["zlib", "zstd"], ids=str)
@pytest.mark.parametrize("level", [1, 9], ids=lambda v: f"level{v}")
def test_receiver_accepts_a_qemu_style_sender(name: str, level: int) -> None:
    packets = list(mixed_packets(10, seed=8))
    gen = _qemu_style_zlib if name == "zlib" else _qemu_style_zstd
    rx = receiver(name)
    for payload, pages in zip(gen(packets, level), packets):
        assert np.array_equal(rx.recv(payload, len(pages)), pages)


def test_zstd_payload_ending_the_frame_is_a_compression_error() -> None:
    """Regression: a payload that ends the frame (QEMU never does) surfaced as the library's
    EOFError ("Already at the end of a Zstandard frame"), not as CompressionError."""
    pages = make_pages(2, ["text"], 0)
    ended = zstandard.ZstdCompressor(level=1).compress(pages.tobytes())  # a complete frame
    rx = receiver("zstd")
    try:
        assert np.array_equal(rx.recv(ended, 2), pages)
    except CompressionError as exc:
        assert str(exc).startswith("zstd: corrupt payload of ")
        return
    with pytest.raises(CompressionError, match=r"^zstd: corrupt payload of \d+ bytes: "):
        rx.recv(sender("zstd").send(pages), 2)
