"""Pure tests of engine/wire.py's MultiFDPacket_t, byte for byte (the handshake, MultiFDInit_t:
test_wire_init.py).

Golden bytes come from the wire doc (sections 1.2 and 5.7, captured from a real QEMU 7.2);
Hypothesis checks encode -> decode round trips; every malformed field has its own test with
the exact error text (received X, expected Y, naming the channel and the packet_num).
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, MigrationError, RemoteProtocolError
from engine.wire.packet import (
    INIT_SIZE,
    MAX_PACKET_PAYLOAD,
    MAX_RAMBLOCK_NAME,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_LZ4,
    MULTIFD_FLAG_NOCOMP,
    MULTIFD_FLAG_SYNC,
    MULTIFD_FLAG_ZLIB,
    MULTIFD_FLAG_ZSTD,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PACKET_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    MultiFDInit,
    PacketEncoder,
    PacketHeader,
    decode_packet_header,
    encode_packet_header,
)
from engine.compression.registry import method_name_for_flag

PAGE = TARGET_PAGE_SIZE
MIB64 = 64 * 1024 * 1024
SOME_UUID = bytes.fromhex("123456789abcdef0123456789abcdef0")

COMPRESSIONS = [MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MULTIFD_FLAG_LZ4]


def h(text: str) -> bytes:
    """Hex with any whitespace, as written in the wire doc."""
    return bytes.fromhex("".join(text.split()))


# ---------------------------------------------------------------------------- sizes


def test_init_is_64_bytes() -> None:
    assert INIT_SIZE == 64
    assert len(MultiFDInit(0).pack()) == 64


def test_packet_header_is_1344_bytes() -> None:
    assert PACKET_FIXED_SIZE == 320
    assert PAGES_PER_PACKET == 128
    assert PACKET_HEADER_SIZE == 1344 == 320 + 8 * 128
    assert len(encode_packet_header(flags=MULTIFD_FLAG_SYNC, packet_num=0)) == 1344


def test_max_packet_payload_is_qemu_receive_buffer() -> None:
    assert MAX_PACKET_PAYLOAD == 1 << 20  # 2 x MULTIFD_PACKET_SIZE (doc 2.3)


# ----------------------------------------------------------------- packet: golden

# Doc 5.7, zlib, channel 1: the setup SYNC packet (flags=SYNC, pages_alloc=128, normal=0,
# size=0, packet_num=1), then 32 zero bytes, 256 zero bytes and 1024 bytes of offsets.
GOLDEN_SETUP_SYNC = (
    h("11223344 00000001 00000001 00000080 00000000 00000000 0000000000000001")
    + bytes(32) + bytes(256) + bytes(1024)
)

# Doc 5.7, the first zlib data packet's fixed part: flags=ZLIB, 128 pages, 91801 bytes, packet_num=4.
GOLDEN_ZLIB_FIXED = h("11223344 00000001 00000002 00000080 00000080 00016699 0000000000000004")
ZLIB_OFFSETS = np.arange(0xAC000, 0xAC000 + 128 * PAGE, PAGE, dtype=np.int64)


def test_setup_sync_packet_golden_encode() -> None:
    assert encode_packet_header(flags=MULTIFD_FLAG_SYNC, packet_num=1) == GOLDEN_SETUP_SYNC
    assert bytes(PacketEncoder().encode(flags=MULTIFD_FLAG_SYNC, packet_num=1)) == GOLDEN_SETUP_SYNC


def test_setup_sync_packet_golden_decode() -> None:
    hdr = decode_packet_header(GOLDEN_SETUP_SYNC, channel=1, expected_compression=MULTIFD_FLAG_ZLIB, blocks={"ram": MIB64})
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.next_packet_size, hdr.packet_num) == (1, 128, 0, 0, 1)
    assert hdr.sync and hdr.compression == 0
    assert hdr.ramblock == ""
    assert hdr.offsets.dtype == np.int64 and len(hdr.offsets) == 0


def test_first_zlib_data_packet_golden_encode() -> None:
    raw = encode_packet_header(
        flags=MULTIFD_FLAG_ZLIB, packet_num=4, ramblock=b"ram", offsets=ZLIB_OFFSETS, next_packet_size=91801
    )
    assert raw[:32] == GOLDEN_ZLIB_FIXED
    assert raw[32:64] == bytes(32)
    assert raw[64:320] == b"ram" + bytes(253)
    assert raw[320:336] == h("00000000000ac000 00000000000ad000")  # "offsets 000ac000 000ad000 ..."
    assert raw[320:] == ZLIB_OFFSETS.astype(">u8").tobytes()


def test_first_zlib_data_packet_golden_decode() -> None:
    raw = GOLDEN_ZLIB_FIXED + bytes(32) + b"ram" + bytes(253) + ZLIB_OFFSETS.astype(">u8").tobytes()
    hdr = decode_packet_header(raw, channel=1, expected_compression=MULTIFD_FLAG_ZLIB, blocks={"ram": MIB64})
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.next_packet_size, hdr.packet_num) == (
        MULTIFD_FLAG_ZLIB, 128, 128, 91801, 4,
    )
    assert not hdr.sync and hdr.compression == MULTIFD_FLAG_ZLIB
    assert hdr.ramblock == "ram"
    assert hdr.offsets.dtype == np.int64
    assert hdr.offsets.tolist() == ZLIB_OFFSETS.tolist()


@pytest.mark.parametrize(
    ("flags", "sync", "compression"),
    [(0x3, True, MULTIFD_FLAG_ZLIB), (0x5, True, MULTIFD_FLAG_ZSTD), (0x1, True, 0), (0x0, False, 0)],
    ids=["zlib+sync", "zstd+sync", "sync", "empty-no-flags"],
)
def test_merged_sync_flags(flags: int, sync: bool, compression: int) -> None:
    """The merged-SYNC race (doc 2.4): data plus SYNC in one packet, then an empty flags-0 packet."""
    offsets = np.array([0, PAGE], dtype=np.int64) if compression else None
    raw = encode_packet_header(
        flags=flags, packet_num=9, ramblock=b"ram" if compression else b"", offsets=offsets,
        next_packet_size=100 if compression else 0,
    )
    hdr = decode_packet_header(raw, channel=0, expected_compression=compression, blocks={"ram": MIB64})
    assert hdr.sync is sync and hdr.compression == compression


# ------------------------------------------------------------- packet: round trips

_name_chars = st.characters(min_codepoint=1, max_codepoint=0x2FF)  # no NUL, no surrogates


@st.composite
def packets(draw: st.DrawFn) -> dict[str, Any]:
    compression = draw(st.sampled_from(COMPRESSIONS))
    name = draw(
        st.text(_name_chars, min_size=1, max_size=MAX_RAMBLOCK_NAME).filter(
            lambda s: len(s.encode()) <= MAX_RAMBLOCK_NAME
        )
    )
    block_pages = draw(st.integers(1, 1 << 40))
    normal_pages = draw(st.integers(0, PAGES_PER_PACKET))
    pages = draw(
        st.lists(st.integers(0, block_pages - 1), min_size=normal_pages, max_size=normal_pages)
    )
    if compression == MULTIFD_FLAG_NOCOMP:
        size = draw(st.sampled_from([normal_pages * PAGE, 0]))
    else:
        size = draw(st.integers(0, MAX_PACKET_PAYLOAD))
    flags = compression | draw(st.sampled_from([0, MULTIFD_FLAG_SYNC]))
    return {
        "flags": flags,
        "packet_num": draw(st.integers(0, 2**64 - 1)),
        "ramblock": name,
        "block_length": block_pages * PAGE,
        "offsets": np.array(pages, dtype=np.int64) * PAGE,
        "next_packet_size": size,
        "pages_alloc": draw(st.integers(normal_pages, PAGES_PER_PACKET)),
        "channel": draw(st.integers(0, 254)),
    }


@given(p=packets())
def test_packet_round_trip(p: dict[str, Any]) -> None:
    name: str = p["ramblock"]
    raw = encode_packet_header(
        flags=p["flags"], packet_num=p["packet_num"], ramblock=name.encode(), offsets=p["offsets"],
        next_packet_size=p["next_packet_size"], pages_alloc=p["pages_alloc"],
    )
    assert len(raw) == PACKET_HEADER_SIZE
    hdr = decode_packet_header(
        raw, channel=p["channel"], expected_compression=p["flags"] & MULTIFD_FLAG_COMPRESSION_MASK,
        blocks={name: p["block_length"], "other": PAGE},
    )
    n = len(p["offsets"])
    assert isinstance(hdr, PacketHeader)
    assert hdr.flags == p["flags"]
    assert hdr.sync == bool(p["flags"] & MULTIFD_FLAG_SYNC)
    assert hdr.pages_alloc == p["pages_alloc"]
    assert hdr.normal_pages == n
    assert hdr.packet_num == p["packet_num"]
    assert hdr.offsets.dtype == np.int64
    assert hdr.offsets.tolist() == p["offsets"].tolist()
    if n:
        assert hdr.compression == p["flags"] & MULTIFD_FLAG_COMPRESSION_MASK
        assert hdr.next_packet_size == p["next_packet_size"]
        assert hdr.ramblock == name
    else:  # ramblock and next_packet_size of empty packets are stale: not reported
        assert hdr.next_packet_size == 0
        assert hdr.ramblock == ""


@given(seq=st.lists(packets(), min_size=1, max_size=6))
def test_packet_encoder_reuse_is_deterministic(seq: list[dict[str, Any]]) -> None:
    """One encoder per channel: a header never carries slots left over from an earlier packet."""
    enc = PacketEncoder()
    for p in seq:
        kwargs = dict(
            flags=p["flags"], packet_num=p["packet_num"], ramblock=p["ramblock"].encode(), offsets=p["offsets"],
            next_packet_size=p["next_packet_size"], pages_alloc=p["pages_alloc"],
        )
        reused = bytes(enc.encode(**kwargs))
        assert reused == encode_packet_header(**kwargs)
        n = len(p["offsets"])
        assert reused[PACKET_FIXED_SIZE + 8 * n:] == bytes(8 * (PAGES_PER_PACKET - n))


def test_packet_encoder_returns_its_reused_buffer() -> None:
    enc = PacketEncoder()
    first = enc.encode(flags=MULTIFD_FLAG_SYNC, packet_num=0)
    second = enc.encode(flags=MULTIFD_FLAG_SYNC, packet_num=1)
    assert first is second is enc.buf


def test_decode_accepts_any_buffer_type() -> None:
    raw = encode_packet_header(
        flags=MULTIFD_FLAG_ZSTD, packet_num=5, ramblock=b"pc.ram", offsets=np.array([0x1000]), next_packet_size=17
    )
    for data in (raw, bytearray(raw), memoryview(raw)):
        hdr = decode_packet_header(data, channel=0, expected_compression=MULTIFD_FLAG_ZSTD, blocks={"pc.ram": 2 * PAGE})
        assert hdr.offsets.tolist() == [0x1000]


# -------------------------------------------------------- packet: stale fields (2.2)


def _poke(raw: bytes, fmt: str, offset: int, *values: Any) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


def test_empty_packet_with_stale_fields_seen_on_the_wire() -> None:
    """[WIRE] an empty packet carrying next_packet_size=69632 and ramblock="ram"."""
    raw = encode_packet_header(flags=0, packet_num=12, ramblock=b"ram", next_packet_size=69632)
    raw = raw[:PACKET_FIXED_SIZE] + np.arange(1, 129, dtype=">u8").tobytes()  # leftover slots
    hdr = decode_packet_header(raw, channel=2, expected_compression=MULTIFD_FLAG_ZLIB, blocks={"ram": MIB64})
    assert (hdr.normal_pages, hdr.next_packet_size, hdr.ramblock, hdr.packet_num) == (0, 0, "", 12)
    assert len(hdr.offsets) == 0


@given(
    flags=st.integers(0, 2**32 - 1),
    pages_alloc=st.integers(0, PAGES_PER_PACKET),
    next_size=st.integers(0, 2**32 - 1),
    packet_num=st.integers(0, 2**64 - 1),
    unused=st.binary(min_size=28, max_size=28),
    ramblock=st.binary(min_size=256, max_size=256),
    slots=st.binary(min_size=1024, max_size=1024),
    expected=st.sampled_from(COMPRESSIONS),
)
def test_empty_packet_ignores_every_stale_field(
    flags: int, pages_alloc: int, next_size: int, packet_num: int, unused: bytes, ramblock: bytes,
    slots: bytes, expected: int,
) -> None:
    raw = struct.pack(">IIIIIIQ", MULTIFD_MAGIC, MULTIFD_VERSION, flags, pages_alloc, 0, next_size, packet_num)
    raw += bytes(4) + unused + ramblock + slots  # zero_pages (QEMU 9.0) is 0: QEMU 7.2 never writes it
    hdr = decode_packet_header(raw, channel=0, expected_compression=expected, blocks={})
    assert (hdr.flags, hdr.pages_alloc, hdr.normal_pages, hdr.packet_num) == (flags, pages_alloc, 0, packet_num)
    assert hdr.next_packet_size == 0 and hdr.ramblock == "" and len(hdr.offsets) == 0


def test_offset_slots_beyond_normal_pages_are_ignored() -> None:
    raw = encode_packet_header(
        flags=MULTIFD_FLAG_NOCOMP, packet_num=3, ramblock=b"ram", offsets=np.array([0, PAGE]), next_packet_size=2 * PAGE
    )
    raw = raw[:PACKET_FIXED_SIZE + 16] + b"\xff" * (1344 - PACKET_FIXED_SIZE - 16)  # leftovers: huge, unaligned
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks={"ram": 2 * PAGE})
    assert hdr.offsets.tolist() == [0, PAGE]


# ------------------------------------------- packet: zero_pages (zero-page-detection=multifd)

def test_zero_pages_round_trip() -> None:
    """QEMU 9.0 layout: zero_pages is the u32 after packet_num; normal offsets, then zero ones."""
    offsets = np.array([3, 1, 7, 2], dtype=np.int64) * PAGE
    raw = encode_packet_header(flags=MULTIFD_FLAG_ZSTD, packet_num=9, ramblock=b"ram", offsets=offsets,
                               next_packet_size=100, zero_pages=2)
    assert struct.unpack_from(">IIQI", raw, 16) == (2, 100, 9, 2)  # normal_pages, next size, packet_num, zero_pages
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_ZSTD, blocks={"ram": MIB64})
    assert (hdr.normal_pages, hdr.zero_pages) == (2, 2)
    assert hdr.offsets.tolist() == [3 * PAGE, PAGE] and hdr.zero_offsets.tolist() == [7 * PAGE, 2 * PAGE]


def test_packet_of_only_zero_pages_has_no_payload() -> None:
    raw = encode_packet_header(flags=MULTIFD_FLAG_NOCOMP, packet_num=1, ramblock=b"ram",
                               offsets=np.array([0, PAGE]), zero_pages=2)
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks={"ram": MIB64})
    assert (hdr.normal_pages, hdr.zero_pages, hdr.next_packet_size, hdr.ramblock) == (0, 2, 0, "ram")


def test_zero_pages_beyond_pages_alloc() -> None:
    raw = _poke(_valid(offsets=[0] * 100), ">I", 32, 29)  # 100 normal + 29 zero > 128
    with pytest.raises(RemoteProtocolError, match=re.escape(
            WHERE + "received zero_pages 29, expected <= pages_alloc - normal_pages 28")):
        _decode(raw)


def test_bad_zero_page_offset_is_reported_like_a_normal_one() -> None:
    raw = encode_packet_header(flags=MULTIFD_FLAG_ZLIB, packet_num=7, ramblock=b"ram",
                               offsets=np.array([0, PAGE, 0x100001]), next_packet_size=10, zero_pages=1)
    with pytest.raises(RemoteProtocolError, match=re.escape(
            WHERE + "received offset[2] 0x100001 in RAM block 'ram', expected a multiple of 0x1000 below 0x100000")):
        _decode(raw)


def test_encoder_refuses_more_zero_pages_than_offsets() -> None:
    with pytest.raises(LocalProtocolError, match="packet with 3 zero pages among 2 offsets"):
        encode_packet_header(flags=0, packet_num=0, ramblock=b"ram", offsets=np.array([0, PAGE]), zero_pages=3)


def test_ramblock_byte_255_is_forced_to_nul() -> None:
    """QEMU forces ramblock[255] to NUL: a 256-byte unterminated field names a 255-byte block."""
    name = b"b" * 255
    raw = encode_packet_header(
        flags=MULTIFD_FLAG_ZLIB, packet_num=0, ramblock=name, offsets=np.array([0]), next_packet_size=10
    )
    raw = raw[:64 + 255] + b"X" + raw[320:]
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_ZLIB, blocks={name.decode(): PAGE})
    assert hdr.ramblock == name.decode()


# ----------------------------------------------------------- packet: malformed fields

BLOCKS = {"ram": 0x100000, "pc.bios": 0x40000}


def _valid(
    *, flags: int = MULTIFD_FLAG_ZLIB, offsets: list[int] | None = None, size: int = 1000, name: bytes = b"ram"
) -> bytes:
    return encode_packet_header(
        flags=flags, packet_num=7, ramblock=name,
        offsets=np.array([0, PAGE, 2 * PAGE] if offsets is None else offsets, dtype=np.int64),
        next_packet_size=size,
    )


def _decode(raw: bytes, expected: int = MULTIFD_FLAG_ZLIB) -> PacketHeader:
    return decode_packet_header(raw, channel=3, expected_compression=expected, blocks=BLOCKS,
                                expected_name=method_name_for_flag(expected))


WHERE = "multifd channel 3, packet_num 7: "

MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("magic", _poke(_valid(), ">I", 0, 0x5145564D), MULTIFD_FLAG_ZLIB,
     "received packet magic 0x5145564d, expected 0x11223344"),
    ("version", _poke(_valid(), ">I", 4, 2), MULTIFD_FLAG_ZLIB, "received packet version 2, expected 1"),
    ("pages_alloc-129", _poke(_valid(), ">I", 12, 129), MULTIFD_FLAG_ZLIB,
     "received pages_alloc 129, expected <= 128 (an engine source with packet-pages? set the same on both sides)"),
    ("pages_alloc-huge-empty", _poke(_valid(), ">II", 12, 0xFFFFFFFF, 0), MULTIFD_FLAG_ZLIB,
     "received pages_alloc 4294967295, expected <= 128"),
    ("normal_pages-above-pages_alloc", _poke(_valid(), ">II", 12, 64, 65), MULTIFD_FLAG_ZLIB,
     "received normal_pages 65, expected <= pages_alloc 64"),
    ("normal_pages-129", _poke(_valid(), ">I", 16, 129), MULTIFD_FLAG_ZLIB,
     "received normal_pages 129, expected <= pages_alloc 128"),
    ("unknown-ramblock", _valid(name=b"pc.ram"), MULTIFD_FLAG_ZLIB,
     "received unknown RAM block 'pc.ram', expected one of ['pc.bios', 'ram']"),
    ("empty-ramblock", _valid(name=b""), MULTIFD_FLAG_ZLIB,
     "received unknown RAM block '', expected one of ['pc.bios', 'ram']"),
    ("unaligned-offset", _valid(offsets=[0, PAGE, 0x2001]), MULTIFD_FLAG_ZLIB,
     "received offset[2] 0x2001 in RAM block 'ram', expected a multiple of 0x1000 below 0x100000"),
    ("offset-at-block-end", _valid(offsets=[0x100000]), MULTIFD_FLAG_ZLIB,
     "received offset[0] 0x100000 in RAM block 'ram', expected a multiple of 0x1000 below 0x100000"),
    ("offset-beyond-other-block", _valid(name=b"pc.bios", offsets=[0, 0x40000]), MULTIFD_FLAG_ZLIB,
     "received offset[1] 0x40000 in RAM block 'pc.bios', expected a multiple of 0x1000 below 0x40000"),
    ("offset-2**63", _poke(_valid(offsets=[0]), ">Q", PACKET_FIXED_SIZE, 1 << 63), MULTIFD_FLAG_ZLIB,
     "received offset[0] 0x8000000000000000 in RAM block 'ram', expected a multiple of 0x1000 below 0x100000"),
    ("offset-all-ones-page", _poke(_valid(offsets=[0]), ">Q", PACKET_FIXED_SIZE, 2**64 - PAGE), MULTIFD_FLAG_ZLIB,
     "received offset[0] 0xfffffffffffff000 in RAM block 'ram', expected a multiple of 0x1000 below 0x100000"),
    ("compression-zstd-for-zlib", _valid(flags=MULTIFD_FLAG_ZSTD), MULTIFD_FLAG_ZLIB,
     "received compression flags 0x4, expected 0x2 (zlib)"),
    ("compression-none-for-zstd", _valid(flags=MULTIFD_FLAG_NOCOMP, size=3 * PAGE), MULTIFD_FLAG_ZSTD,
     "received compression flags 0x0, expected 0x4 (zstd)"),
    ("compression-zlib-for-none", _valid(flags=MULTIFD_FLAG_ZLIB | MULTIFD_FLAG_SYNC), MULTIFD_FLAG_NOCOMP,
     "received compression flags 0x2, expected 0x0 (none)"),
    ("compression-unknown-bits", _valid(flags=0xE), MULTIFD_FLAG_ZLIB,
     "received compression flags 0xe, expected 0x2 (zlib)"),
    ("next_packet_size-above-1MiB", _poke(_valid(), ">I", 20, MAX_PACKET_PAYLOAD + 1), MULTIFD_FLAG_ZLIB,
     "received next_packet_size 1048577, expected <= 1048576"),
    ("next_packet_size-huge-zstd", _poke(_valid(flags=MULTIFD_FLAG_ZSTD), ">I", 20, 0xFFFFFFFF), MULTIFD_FLAG_ZSTD,
     "received next_packet_size 4294967295, expected <= 1048576"),
    ("next_packet_size-wrong-for-none", _valid(flags=MULTIFD_FLAG_NOCOMP, size=3 * PAGE + 1), MULTIFD_FLAG_NOCOMP,
     "received next_packet_size 12289, expected 12288 (3 pages)"),
]


@pytest.mark.parametrize(("raw", "expected", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_packet_field(raw: bytes, expected: int, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"^{re.escape(WHERE + message)}$"):
        _decode(raw, expected)


@pytest.mark.parametrize("size", [0, 1343, 1345, 64], ids=lambda n: f"{n}-bytes")
def test_header_of_wrong_length(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"^multifd channel 3: packet header is {size} bytes, expected 1344$"):
        _decode(GOLDEN_SETUP_SYNC.ljust(size, b"\0")[:size])


def test_first_bad_offset_is_the_one_reported() -> None:
    raw = _valid(offsets=[0, 0x200000, 0x1001])
    with pytest.raises(RemoteProtocolError, match=r"offset\[1\] 0x200000 "):
        _decode(raw)


@pytest.mark.parametrize(
    ("expected", "flags", "size"),
    [
        (MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZLIB, MAX_PACKET_PAYLOAD),
        (MULTIFD_FLAG_ZSTD, MULTIFD_FLAG_ZSTD, 1),
        (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_NOCOMP, 3 * PAGE),
        (MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_NOCOMP, 0),  # QEMU 7.2 ignores it for 'none'
    ],
    ids=["zlib-1MiB", "zstd-1-byte", "none-exact", "none-zero"],
)
def test_boundary_values_are_accepted(expected: int, flags: int, size: int) -> None:
    raw = _valid(flags=flags, offsets=[0, 0x100000 - PAGE, 0x40000], size=size)
    hdr = _decode(raw, expected)
    assert hdr.next_packet_size == size
    assert hdr.offsets.tolist() == [0, 0x100000 - PAGE, 0x40000]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offsets": np.zeros(129, dtype=np.int64)}, "packet with 129 pages, at most 128 fit"),
        ({"ramblock": b"r" * 256}, "RAM block name of 256 bytes, at most 255"),
        ({"next_packet_size": MAX_PACKET_PAYLOAD + 1}, "payload of 1048577 bytes, at most 1048576"),
    ],
    ids=["129-pages", "name-256", "payload-above-1MiB"],
)
def test_encoder_refuses_what_a_qemu_receiver_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        PacketEncoder().encode(flags=MULTIFD_FLAG_ZLIB, packet_num=0, **kwargs)


@given(raw=st.binary(min_size=PACKET_HEADER_SIZE, max_size=PACKET_HEADER_SIZE), expected=st.sampled_from(COMPRESSIONS))
def test_arbitrary_header_bytes_only_raise_protocol_errors(raw: bytes, expected: int) -> None:
    for data in (raw, h("11223344 00000001") + raw[8:]):
        try:
            hdr = decode_packet_header(data, channel=0, expected_compression=expected, blocks=BLOCKS)
        except RemoteProtocolError:
            continue
        assert 0 <= hdr.normal_pages <= hdr.pages_alloc <= PAGES_PER_PACKET
        assert len(hdr.offsets) == hdr.normal_pages
        assert ((hdr.offsets >= 0) & (hdr.offsets % PAGE == 0)).all()


def test_errors_are_migration_errors() -> None:
    assert issubclass(RemoteProtocolError, MigrationError)
    assert issubclass(LocalProtocolError, MigrationError)


@pytest.mark.parametrize(
    ("flag", "name"),
    [(0, "none"), (2, "zlib"), (4, "zstd"), (6, "lz4"), (8, "unknown method 0x8")],
    ids=["none", "zlib", "zstd", "lz4", "unknown"],
)
def test_method_name_for_flag(flag: int, name: str) -> None:
    assert method_name_for_flag(flag) == name


@given(seq=st.lists(st.tuples(st.lists(st.integers(0, 2**40), max_size=PAGES_PER_PACKET),
                              st.integers(0, PAGES_PER_PACKET)), min_size=1, max_size=5))
def test_encode_pages_is_encode_for_their_byte_offsets(seq: list[tuple[list[int], int]]) -> None:
    """A source channel holds page indices; encoding from those gives the same header as
    encoding their byte offsets, also when one encoder is reused (stale slots)."""
    pages_enc, array_enc = PacketEncoder(), PacketEncoder()
    for k, (pages, zero) in enumerate(seq):
        idx = np.array(pages, dtype=np.int64)
        zero = min(zero, len(pages))
        size = (len(pages) - zero) * PAGE
        got = pages_enc.encode_pages(flags=0, packet_num=k, ramblock=b"pc.ram", pages=idx, next_packet_size=size,
                                     zero_pages=zero)
        want = array_enc.encode(flags=0, packet_num=k, ramblock=b"pc.ram", offsets=idx * PAGE, next_packet_size=size,
                                zero_pages=zero)
        assert bytes(got) == bytes(want)


def test_encode_pages_checks_as_encode_does() -> None:
    with pytest.raises(LocalProtocolError, match=r"^packet with 129 pages, at most 128 fit$"):
        PacketEncoder().encode_pages(flags=0, packet_num=0, ramblock=b"x", pages=np.arange(129), next_packet_size=0)
    with pytest.raises(LocalProtocolError, match=r"^packet with 3 zero pages among 2 offsets$"):
        PacketEncoder().encode_pages(flags=0, packet_num=0, ramblock=b"x", pages=np.arange(2), next_packet_size=0,
                                     zero_pages=3)


@pytest.mark.parametrize(
    ("flags", "message"),
    [(4 << 1, "received compression flags 0x8 (qpl, QEMU 10.0), expected 0x2 (zlib): this engine has no qpl"),
     (8 << 1, "received compression flags 0x10 (uadk, QEMU 10.0), expected 0x2 (zlib): this engine has no uadk"),
     (16 << 1, "received compression flags 0x20 (qatzip, QEMU 10.0), expected 0x2 (zlib): this engine has no qatzip"),
     (32 << 1, "received a DEVICE_STATE packet (flags 0x40: VFIO device state, QEMU 10.0), expected RAM pages:"
               " this engine migrates no VFIO device")],
    ids=["qpl", "uadk", "qatzip", "device-state"],
)
def test_qemu_10_packets_the_engine_lacks_are_named(flags: int, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        _decode(_valid(flags=flags))
    assert str(exc.value) == WHERE + message


# ----------------------------------------------------- packet-pages between engines


def test_bigger_packets_round_trip_with_their_own_header_size() -> None:
    from engine.wire.packet import header_size, plain_packet

    enc = PacketEncoder(512)
    pages = np.arange(10, 522, dtype=np.int64)
    blocks = {"ram": 1024 * PAGE}
    raw = bytes(enc.encode_pages(flags=0, packet_num=9, ramblock=b"ram", pages=pages, next_packet_size=512 * PAGE))
    assert len(raw) == header_size(512) == PACKET_FIXED_SIZE + 8 * 512
    hdr = decode_packet_header(raw, channel=0, expected_compression=MULTIFD_FLAG_NOCOMP, blocks=blocks,
                               packet_pages=512)
    assert (hdr.pages_alloc, hdr.normal_pages) == (512, 512)
    assert hdr.offsets.tolist() == (pages * PAGE).tolist()
    plain = plain_packet(raw, blocks, 512)
    assert plain is not None and plain.offsets.tolist() == (pages * PAGE).tolist()
    with pytest.raises(LocalProtocolError, match=r"^packet with 513 pages, at most 512 fit$"):
        enc.encode_pages(flags=0, packet_num=0, ramblock=b"ram", pages=np.arange(513), next_packet_size=0)


def test_a_packet_size_the_sides_do_not_share_is_named() -> None:
    """A QEMU (128-page) header read by a 512-page destination, read whole so that only
    pages_alloc tells; and the other way round the header is simply too short."""
    qemu = _valid() + bytes(8 * (512 - PAGES_PER_PACKET))
    with pytest.raises(RemoteProtocolError, match=re.escape(
            WHERE + "received pages_alloc 128, expected 512 (packet-pages: the source must set the same;"
            " a QEMU source sends 128)")):
        decode_packet_header(qemu, channel=3, expected_compression=MULTIFD_FLAG_ZLIB, blocks=BLOCKS, packet_pages=512)
    from engine.wire.packet import plain_packet

    assert plain_packet(qemu, BLOCKS, 512) is None  # so it goes to the decoder, which names it
    with pytest.raises(RemoteProtocolError, match=r"^multifd channel 0: packet header is 1344 bytes, expected 4416$"):
        decode_packet_header(_valid(), channel=0, expected_compression=MULTIFD_FLAG_ZLIB, blocks=BLOCKS,
                             packet_pages=512)


@pytest.mark.parametrize("pages", [127, 1025, 0])
def test_packet_pages_out_of_range(pages: int) -> None:
    from engine.errors import ConfigError
    from engine.params import MigrationParams

    with pytest.raises(ConfigError, match=re.escape(
            f"packet-pages {pages} is out of range, expected 128..1024 (128 for a QEMU peer)")):
        MigrationParams(packet_pages=pages)
