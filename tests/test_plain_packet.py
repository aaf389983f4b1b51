"""Pure tests of ``wire.plain_packet``, the destination's loop-free reading of a plain packet.

It may only say "plain" (and give the same block, offsets and runs) where the general
``decode_packet_header`` accepts the header as a data packet of ``none``; everything else,
valid or not, must come back as None so that the general path handles it (and names what is
wrong). Checked three ways: round trips of valid packets, every malformed header of
test_wire.py, and random mutations of valid headers.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import RemoteProtocolError
from engine.memory.runs import consecutive_runs, page_runs
from engine.wire.packet import (
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZLIB,
    PACKET_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE as PAGE,
    decode_packet_header,
    encode_packet_header,
    PlainPacket,
    plain_packet,
)
from test_wire import MALFORMED

BLOCKS = {"pc.ram": 64 * PAGE, "/rom@etc/acpi/tables": 4 * PAGE}


def _header(pages: list[int], *, name: bytes = b"pc.ram", size: int | None = None, **kwargs: Any) -> bytes:
    return encode_packet_header(
        ramblock=name, offsets=np.array(pages, dtype=np.int64) * PAGE,
        next_packet_size=len(pages) * PAGE if size is None else size, **{"flags": 0, "packet_num": 7, **kwargs},
    )


def _runs(plain: PlainPacket) -> list[tuple[int, int]]:
    """The runs of pages the destination receives ``plain``'s pages into."""
    return [(a >> 12, b >> 12) for a, b in consecutive_runs(plain.offsets.tolist(), PAGE)]


def _offsets(plain: PlainPacket) -> np.ndarray:
    return np.array(plain.offsets, dtype=np.uint64)


def test_runs_of_a_plain_packet() -> None:
    plain = plain_packet(_header([3, 4, 5, 9, 10, 2, 63]), BLOCKS)
    assert plain is not None
    assert plain.ramblock == "pc.ram"
    assert _runs(plain) == [(3, 6), (9, 11), (2, 3), (63, 64)]
    assert (_offsets(plain) >> 12).tolist() == [3, 4, 5, 9, 10, 2, 63]


def test_next_packet_size_zero_is_plain_too() -> None:
    """QEMU 7.2 ignores the field for ``none``; the general decoder accepts 0 as well."""
    plain = plain_packet(_header([1, 2], size=0), BLOCKS)
    assert plain is not None and _runs(plain) == [(1, 3)]


NOT_PLAIN = {
    "sync-with-data": _header([1], flags=MULTIFD_FLAG_SYNC),
    "sync-only": _header([], flags=MULTIFD_FLAG_SYNC),
    "no-pages": _header([]),
    "zlib": _header([1], flags=MULTIFD_FLAG_ZLIB, size=100),
    "zero-pages-listed": encode_packet_header(
        flags=0, packet_num=7, ramblock=b"pc.ram", offsets=np.array([PAGE, 2 * PAGE]), next_packet_size=PAGE,
        zero_pages=1,
    ),
    "unknown-block": _header([1], name=b"pc.rom"),
    "offset-at-block-end": _header([4], name=b"/rom@etc/acpi/tables"),
    "unaligned-offset": _header([1])[:PACKET_FIXED_SIZE] + struct.pack(">Q", PAGE + 8) + bytes(8 * 127),
    "wrong-size": _header([1, 2], size=PAGE),
}


@pytest.mark.parametrize("low", [1, 8, 0x80, 0x100, 0x400, 0x800, 0xFFF])
@pytest.mark.parametrize("where", [0, 5, 127])
def test_every_low_bit_of_every_offset_is_checked(low: int, where: int) -> None:
    """Alignment is read from two strided byte slices (an offset's last byte and the low half of
    the one before): any of the low 12 bits set, in any slot, makes the header not plain."""
    pages = list(range(1, 1 + PAGES_PER_PACKET))
    raw = bytearray(encode_packet_header(flags=0, packet_num=7, ramblock=b"pc.ram",
                                         offsets=np.array(pages, dtype=np.int64) * PAGE,
                                         next_packet_size=len(pages) * PAGE))
    blocks = {"pc.ram": 256 * PAGE}
    assert plain_packet(raw, blocks) is not None
    struct.pack_into(">Q", raw, PACKET_FIXED_SIZE + 8 * where, pages[where] * PAGE + low)
    assert plain_packet(raw, blocks) is None
    assert plain_packet(memoryview(raw), blocks) is None
    struct.pack_into(">Q", raw, PACKET_FIXED_SIZE + 8 * where, (pages[where] + 0x10) * PAGE)  # bit 12 and up: fine
    assert plain_packet(memoryview(raw), blocks) is not None


@pytest.mark.parametrize("raw", NOT_PLAIN.values(), ids=NOT_PLAIN.keys())
def test_anything_unusual_goes_to_the_general_path(raw: bytes) -> None:
    assert len(raw) == PACKET_HEADER_SIZE
    assert plain_packet(raw, BLOCKS) is None


@pytest.mark.parametrize(("raw", "expected"), [m[1:3] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_no_malformed_header_is_plain(raw: bytes, expected: int) -> None:
    """Every header test_wire.py shows to be rejected. The plain path runs only in ``none``
    channels, so a header whose one flaw is a method other than the channel's own (``none``
    sent to a zstd channel) is plain there and rejected in the zstd channel's general path."""
    from test_wire import BLOCKS as WIRE_BLOCKS

    plain = plain_packet(raw, WIRE_BLOCKS)
    if expected == MULTIFD_FLAG_NOCOMP:
        assert plain is None
    elif plain is not None:
        decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks=WIRE_BLOCKS)
    assert plain_packet(raw, BLOCKS) is None


@given(
    pages=st.lists(st.integers(0, 63), min_size=1, max_size=PAGES_PER_PACKET),
    pages_alloc=st.integers(0, PAGES_PER_PACKET),
)
def test_plain_packets_read_as_the_general_decoder_reads_them(pages: list[int], pages_alloc: int) -> None:
    raw = _header(pages, pages_alloc=max(pages_alloc, len(pages)))
    plain = plain_packet(raw, BLOCKS)
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks=BLOCKS)
    assert plain is not None
    assert plain.ramblock == hdr.ramblock
    assert _offsets(plain).tolist() == hdr.offsets.tolist()
    assert _runs(plain) == page_runs(hdr.offsets >> 12)


@given(
    pages=st.lists(st.integers(0, 63), min_size=1, max_size=8),
    pokes=st.lists(st.tuples(st.integers(0, PACKET_FIXED_SIZE + 8 * 8 - 1), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_a_mutated_header_is_plain_only_if_the_general_decoder_accepts_it(
    pages: list[int], pokes: list[tuple[int, int]]
) -> None:
    raw = bytearray(_header(pages))
    for pos, value in pokes:
        raw[pos] = value
    plain = plain_packet(raw, BLOCKS)
    if plain is None:
        return
    try:
        hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks=BLOCKS)
    except RemoteProtocolError as exc:  # pragma: no cover - the property under test
        raise AssertionError(f"plain_packet accepted a header the decoder rejects: {exc}") from None
    assert not hdr.sync and hdr.zero_pages == 0 and hdr.compression == MULTIFD_FLAG_NOCOMP
    assert plain.ramblock == hdr.ramblock
    assert _offsets(plain).tolist() == hdr.offsets.tolist()
    assert _runs(plain) == page_runs(hdr.offsets >> 12)
