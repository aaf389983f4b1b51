"""Grammar-based fuzzing of everything a destination parses: the main stream, the multifd
handshake and the packet header. Inputs are built from the real wire structures, then damaged
at the structure level (lengths, counts, flags, offsets, names, truncation, byte flips).

Whatever arrives, the outcome must be one of the engine's own errors (``MigrationError``) or a
clean parse, never another exception, never a hang, never a write outside a RAM block (events
are applied to bounds-checked numpy arrays), and never an allocation sized by an untrusted
field (the tail is bounded; block sizes only become shared memory after the /dev/shm check).

Each test runs FUZZ_CASES cases (default 400; 100 with HYPOTHESIS_PROFILE=fast, the fast tier
of ./scripts/test --fast); the coverage-guided counterpart is scripts/fuzz_atheris.py with the
corpus in tests/fuzz_corpus/.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from hypothesis import given, settings, strategies as st, HealthCheck

from engine.errors import MigrationError
from engine.wire.encoder import StreamEncoder
from engine.wire.stream import (
    MainStreamParser,
    RamMemSize,
    RamPage,
    RamZeroPages,
    StreamReader,
)
from engine.wire.packet import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    MultiFDInit,
    decode_packet_header,
    encode_packet_header,
    validate_init,
)
from support import damaged

FUZZ_CASES = int(os.environ.get("FUZZ_CASES", "100" if os.environ.get("HYPOTHESIS_PROFILE") == "fast" else "400"))
fuzz = settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))

BLOCK_NAMES = ["pc.ram", "ram", "/rom@etc/acpi/tables", "x" * 255]


@st.composite
def ram_streams(draw: st.DrawFn) -> bytes:
    """A plausible main stream: header, configuration, ram START/PART/END with records, tail."""
    enc = StreamEncoder()
    enc.header()
    enc.configuration(draw(st.sampled_from(["none", "pc-i440fx-7.2", "q35"])))
    names = draw(st.lists(st.sampled_from(BLOCK_NAMES), min_size=1, max_size=3, unique=True))
    sizes = [draw(st.integers(1, 8)) * 4096 for _ in names]
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size(list(zip(names, sizes)))
    enc.ram_eos()
    enc.footer(2)
    for end in [False] * draw(st.integers(0, 3)) + [True]:
        enc.section_part(2, end=end)
        for _ in range(draw(st.integers(0, 6))):
            i = draw(st.integers(0, len(names) - 1))
            pages = sizes[i] // 4096
            offs = np.array(sorted(set(draw(st.lists(st.integers(0, pages - 1), min_size=1, max_size=4))))) * 4096
            if draw(st.booleans()):
                enc.ram_zero_pages(names[i], offs, draw(st.sampled_from([0, 0, 7])))
            else:
                enc.ram_page(names[i], int(offs[0]), bytes([draw(st.integers(0, 255))]) * 4096)
        enc.ram_eos()
        enc.footer(2)
    if draw(st.booleans()):
        enc.section_start(4, "globalstate", 0, 1, full=True)
        enc.out += b"\x00\x00\x00\x08running\x00" + bytes(92)
        enc.footer(4)
    enc.eof()
    return bytes(enc.out)


def apply_stream(data: bytes, chunk: int) -> None:
    """Parse like a destination does and apply every event to bounds-checked arrays."""
    ram: dict[str, np.ndarray] = {}
    parser = MainStreamParser(StreamReader.from_bytes(data, chunk), max_tail=1 << 16)
    for ev in parser.events():
        if isinstance(ev, RamMemSize):
            total = sum(size for _, size in ev.blocks)
            assert total <= 8 * 4096 * 3 * 2 ** 20  # sizes only ever come from MEM_SIZE
            ram = {name: np.zeros((min(size, 1 << 20) // 4096, 4096), dtype=np.uint8) for name, size in ev.blocks}
        elif isinstance(ev, RamZeroPages):
            pages = ram[ev.block]
            idx = ev.offsets // 4096
            assert (ev.offsets % 4096 == 0).all() and idx.min() >= 0 and idx.max() < len(pages)
            pages[idx] = ev.fill
        elif isinstance(ev, RamPage):
            pages = ram[ev.block]
            assert ev.offset % 4096 == 0 and 0 <= ev.offset // 4096 < len(pages)
            pages[ev.offset // 4096] = np.frombuffer(ev.data, dtype=np.uint8)


@fuzz
@given(damaged(ram_streams()), st.sampled_from([1, 7, 64, 4096, 1 << 16]))
def test_main_stream_parser_survives_damaged_streams(data: bytes, chunk: int) -> None:
    try:
        apply_stream(data, chunk)
    except MigrationError:
        pass


@fuzz
@given(st.binary(max_size=512))
def test_main_stream_parser_survives_noise(noise: bytes) -> None:
    for prefix in (b"", b"QEVM\x00\x00\x00\x03"):
        try:
            apply_stream(prefix + noise, 13)
        except MigrationError:
            pass


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    raw = bytearray(MultiFDInit(draw(st.integers(0, 255)), draw(st.binary(min_size=16, max_size=16))).pack())
    for _ in range(draw(st.integers(0, 3))):
        raw[draw(st.integers(0, INIT_SIZE - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@fuzz
@given(handshakes(), st.integers(1, 255))
def test_handshake_validation(raw: bytes, channels: int) -> None:
    try:
        ch = validate_init(MultiFDInit.unpack(raw), expected_uuid=bytes(16), channels=channels)
        assert 0 <= ch < channels
    except MigrationError:
        pass


@st.composite
def packet_headers(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 128))
    offs = np.array(draw(st.lists(st.integers(0, 16), min_size=n, max_size=n)), dtype=np.int64) * 4096
    raw = bytearray(encode_packet_header(
        flags=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 14, 255])), packet_num=draw(st.integers(0, 2**64 - 1)),
        ramblock=draw(st.sampled_from([b"pc.ram", b"ram", b"nope", b""])), offsets=offs,
        next_packet_size=draw(st.integers(0, 1 << 20)), zero_pages=draw(st.integers(0, n)),
    ))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, PACKET_HEADER_SIZE - 4))
        raw[pos:pos + 4] = struct.pack(">I", draw(st.sampled_from([0, 129, 2**31, 2**32 - 1, 0x11223344])))
    return bytes(raw)


@fuzz
@given(packet_headers(), st.sampled_from([0, 2, 4, 6]))
def test_packet_header_validation(raw: bytes, method: int) -> None:
    blocks = {"pc.ram": 16 * 4096, "ram": 4096}
    try:
        hdr = decode_packet_header(raw, channel=0, expected_compression=method, blocks=blocks)
    except MigrationError:
        return
    assert hdr.normal_pages + hdr.zero_pages <= hdr.pages_alloc <= 128
    if hdr.zero_pages:  # zero-page-detection=multifd: the zero pages' offsets are as valid
        assert hdr.ramblock in blocks and len(hdr.zero_offsets) == hdr.zero_pages
        assert ((hdr.zero_offsets % 4096) == 0).all() and (hdr.zero_offsets >= 0).all()
        assert (hdr.zero_offsets <= blocks[hdr.ramblock] - 4096).all()
    if not hdr.normal_pages:
        assert hdr.next_packet_size == 0
    if hdr.normal_pages:
        assert hdr.ramblock in blocks and hdr.compression == method
        assert ((hdr.offsets % 4096) == 0).all() and (hdr.offsets <= blocks[hdr.ramblock] - 4096).all()
        assert (hdr.offsets >= 0).all()
        if method != 0:
            assert hdr.next_packet_size <= 1 << 20
