"""Compression methods on bad and on QEMU-made streams, pure (no sockets, no processes):
every corrupt, truncated or wrong-length payload raises a CompressionError (conformance tests,
parametrised over every registered method), and the QEMU-format facts of the wire doc, section
3 (zlib and zstd are QEMU 7.2's methods; their receiver is a plain per-channel decompress
object).
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import CompressionError, TruncatedError

from compression_support import PAGE, CODECS, QEMU_CODECS, sender, receiver, make_pages, mixed_packets


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
@pytest.mark.parametrize("damage", ["truncated", "wrong-length"])
def test_conformance_bad_later_packet_raises(name: str, damage: str) -> None:
    """A bad second packet on a persistent context: its payload cut in half, or decoding to
    one page more than its normal_pages (15 announced, 16 sent)."""
    (p0, pages0), (p1, _), _ = _payloads(name)
    rx = receiver(name)
    assert np.array_equal(rx.recv(p0, 16), pages0)
    payload, pages = (p1[: len(p1) // 2], 16) if damage == "truncated" else (p1, 15)
    with pytest.raises(CompressionError, match=f"^{name}: "):
        rx.recv(payload, pages)


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
