"""Main-stream parser on bad input (engine/stream.py): every malformed record raises its own
RemoteProtocolError / TruncatedError with exact text, every cut names the record it falls in,
and arbitrary or mutated bytes never raise anything but an engine error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import MigrationError, RemoteProtocolError, TruncatedError
from engine.wire.stream import MainStreamParser, StreamReader
from support import damaged
from stream_support import (
    PAGE, MIB64, ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONT, h, be32, be64, short, word, flat, parse, drain,
    G_HEADER, G_CONFIG, G_START, G_PART, G_END, G_TAIL, page_data,
)


# ------------------------------------------------------------------ malformed

PRO = G_HEADER + G_CONFIG + G_START  # header, configuration, START with MEM_SIZE ram 64 MiB
PART = b"\x02" + be32(2)
FTR = b"\x7e" + be32(2)
NAMED0 = word(ZERO, 0) + short(b"ram") + b"\0"
AT = len(PRO) + len(PART)  # stream position of the first record in a PART after the prologue


def mem_stream(total: int, *blocks: tuple[bytes, int]) -> bytes:
    body = word(MEM_SIZE, total) + b"".join(short(n) + be64(length) for n, length in blocks)
    return G_HEADER + G_CONFIG + b"\x01" + be32(2) + short(b"ram") + be32(0) + be32(4) + body + word(EOS) + FTR


MALFORMED: dict[str, tuple[bytes, str]] = {
    "bad-magic": (b"QEVU" + be32(3), "received stream magic 0x51455655, expected 0x5145564d ('QEVM')"),
    "multifd-magic-on-main": (h("11223344 00000001"), "received stream magic 0x11223344, expected 0x5145564d ('QEVM')"),
    "version-2": (b"QEVM" + be32(2), "received stream version 2, expected 3"),
    "version-4": (b"QEVM" + be32(4), "received stream version 4, expected 3"),
    **{
        f"section-type-{t:#04x}": (
            PRO + bytes([t]) + bytes(16),
            f"received section type {t:#04x} at byte {len(PRO)}, expected one of START 0x01, PART 0x02, END 0x03,"
            " FULL 0x04, CONFIGURATION 0x07, COMMAND 0x08, EOF 0x00",
        )
        for t in (0x05, 0x06, 0x09, 0x7E, 0xFF)
    },
    # QEMU 10.0's SWITCHOVER_START (0x000b, no data) is the one command a stream may carry
    "command-postcopy-advise": (
        PRO + b"\x08" + bytes.fromhex("0002 0000"),
        f"received command 0x0002 with 0 bytes at byte {len(PRO)}, expected SWITCHOVER_START 0x000b with 0 bytes",
    ),
    "command-switchover-with-data": (
        PRO + b"\x08" + bytes.fromhex("000b 0001") + b"\0",
        f"received command 0x000b with 1 bytes at byte {len(PRO)}, expected SWITCHOVER_START 0x000b with 0 bytes",
    ),
    "footer-byte": (
        PRO[:-5] + b"\x00" + be32(2),
        "received 0x00 where the footer of section 2 belongs, expected 0x7e",
    ),
    "footer-section-id": (PRO[:-5] + b"\x7e" + be32(3), "received footer for section 3, expected 2"),
    "part-unknown-section-id": (
        PRO + b"\x02" + be32(5) + word(EOS) + b"\x7e" + be32(5),
        "received PART for section_id 5, expected one opened by START ([2])",
    ),
    "end-before-any-start": (
        G_HEADER + G_CONFIG + b"\x03" + be32(2) + word(EOS),
        "received END for section_id 2, expected one opened by START (none open)",
    ),
    "start-live-section-block": (
        PRO + b"\x01" + be32(3) + short(b"block") + be32(0) + be32(1),
        "received START for unsupported live section 'block', expected only 'ram'",
    ),
    "ram-version-3": (
        G_HEADER + G_CONFIG + b"\x01" + be32(2) + short(b"ram") + be32(0) + be32(3),
        "received section 'ram' instance 0 version 3, expected instance 0 version 4",
    ),
    "ram-instance-1": (
        G_HEADER + G_CONFIG + b"\x04" + be32(2) + short(b"ram") + be32(1) + be32(4),
        "received section 'ram' instance 1 version 4, expected instance 0 version 4",
    ),
    "unknown-block": (
        PRO + PART + word(ZERO, 0) + short(b"pc.ram") + b"\0",
        "received unknown RAM block 'pc.ram', expected one of ['ram']",
    ),
    "unknown-block-page": (
        PRO + PART + word(PAGE_FLAG, 0) + short(b"rom") + bytes(PAGE),
        "received unknown RAM block 'rom', expected one of ['ram']",
    ),
    "continue-before-named-block": (
        PRO + PART + word(ZERO | CONT, 0x3000) + b"\0",
        f"received a CONTINUE record at byte {AT} before any RAM block was named",
    ),
    "continue-page-before-named-block": (
        PRO + PART + word(PAGE_FLAG | CONT, 0) + bytes(PAGE),
        f"received a CONTINUE record at byte {AT} before any RAM block was named",
    ),
    "offset-beyond-block-named": (
        PRO + PART + word(ZERO, MIB64) + short(b"ram") + b"\0",
        "received offset 0x4000000 in RAM block 'ram', expected below 0x4000000",
    ),
    "offset-beyond-block-page": (
        PRO + PART + NAMED0 + word(PAGE_FLAG | CONT, MIB64) + bytes(PAGE),
        "received offset 0x4000000 in RAM block 'ram', expected below 0x4000000",
    ),
    "offset-beyond-block-in-zero-run": (
        PRO + PART + NAMED0 + word(ZERO | CONT, PAGE) + b"\0" + word(ZERO | CONT, MIB64) + b"\0" + word(EOS) + FTR,
        "received offset 0x4000000 in RAM block 'ram', expected below 0x4000000",
    ),
    "offset-2**63-in-zero-run": (
        PRO + PART + NAMED0 + word(ZERO | CONT, 1 << 63) + b"\0" + word(EOS) + FTR,
        "received offset 0x8000000000000000 in RAM block 'ram', expected below 0x4000000",
    ),
    "offset-top-page-in-zero-run": (
        PRO + PART + NAMED0 + word(ZERO | CONT, 2**64 - PAGE) + b"\0" + word(EOS) + FTR,
        "received offset 0xfffffffffffff000 in RAM block 'ram', expected below 0x4000000",
    ),
    "offset-2**63-named": (
        PRO + PART + word(ZERO, 1 << 63) + short(b"ram") + b"\0",
        "received offset 0x8000000000000000 in RAM block 'ram', expected below 0x4000000",
    ),
    **{
        f"flags-{name}": (
            PRO + PART + NAMED0 + word(flags, PAGE) + bytes(16),
            f"received ram record flags {flags:#x} at byte {AT + len(NAMED0)}, expected MEM_SIZE 0x4, ZERO 0x2,"
            " PAGE 0x8, MULTIFD_FLUSH 0x200 or EOS 0x10 (with CONTINUE 0x20)",
        )
        for name, flags in [
            ("xbzrle-0x40", 0x40), ("xbzrle-continue-0x60", 0x60), ("hook-0x80", 0x80),
            ("compress-page-0x100", 0x100), ("obsolete-full-0x01", 0x01), ("none-0x00", 0x00),
            ("continue-only-0x20", 0x20), ("zero-and-page-0x0a", 0x0A), ("eos-and-zero-0x12", 0x12),
            ("multifd-flush-with-continue-0x220", 0x220), ("multifd-flush-and-zero-0x202", 0x202),
        ]
    },
    "mem-size-block-exceeds-total": (
        mem_stream(MIB64, (b"ram", 2 * MIB64)),
        "received RAM block 'ram' of 134217728 bytes, expected a non-zero multiple of 4096 within the MEM_SIZE"
        " total of 67108864 (remaining 67108864)",
    ),
    "mem-size-blocks-exceed-total": (
        mem_stream(3 * PAGE, (b"a", 2 * PAGE), (b"b", 2 * PAGE)),
        "received RAM block 'b' of 8192 bytes, expected a non-zero multiple of 4096 within the MEM_SIZE"
        " total of 12288 (remaining 4096)",
    ),
    "mem-size-blocks-fall-short": (  # the EOS word is then read as a block entry
        mem_stream(3 * PAGE, (b"a", 2 * PAGE)),
        "received an empty RAM block name in MEM_SIZE",
    ),
    "mem-size-zero-length-block": (
        mem_stream(PAGE, (b"a", 0), (b"b", PAGE)),
        "received RAM block 'a' of 0 bytes, expected a non-zero multiple of 4096 within the MEM_SIZE"
        " total of 4096 (remaining 4096)",
    ),
    "mem-size-not-page-multiple": (
        mem_stream(2 * PAGE, (b"a", PAGE + 1)),
        "received RAM block 'a' of 4097 bytes, expected a non-zero multiple of 4096 within the MEM_SIZE"
        " total of 8192 (remaining 8192)",
    ),
    "mem-size-duplicated-name": (
        mem_stream(2 * PAGE, (b"ram", PAGE), (b"ram", PAGE)),
        "received RAM block 'ram' twice in MEM_SIZE",
    ),
    "mem-size-empty-name": (mem_stream(PAGE, (b"", PAGE)), "received an empty RAM block name in MEM_SIZE"),
    "mem-size-total-zero": (mem_stream(0), "received MEM_SIZE with a total of 0 bytes, expected RAM blocks"),
    "mem-size-total-2**63-or-more": (
        mem_stream(2**64 - PAGE, (b"ram", 2**64 - PAGE)),
        "received MEM_SIZE total 0xfffffffffffff000, expected at most 0x8000000000000000",
    ),
}


@pytest.mark.parametrize(("data", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_stream(data: bytes, message: str) -> None:
    for chunk in (1, 9, 1 << 16):
        with pytest.raises(RemoteProtocolError, match=f"^{re.escape('main channel: ' + message)}$"):
            for _ in flat(MainStreamParser(StreamReader.from_bytes(data, chunk)).events()):
                pass


# ------------------------------------------------------------------ truncation


@dataclass(frozen=True)
class Piece:
    what: str  # what the parser is reading when the stream ends inside this piece
    data: bytes


def pieces() -> list[Piece]:
    ram_start = [
        # the parser peeks for another configuration subsection before it reads this byte
        Piece("the configuration section", b"\x01"), Piece("a section header", be32(2)),
        Piece("a section idstr", short(b"ram")), Piece("a section header", be32(0) + be32(4)),
        Piece("a ram record", word(MEM_SIZE, 2 * MIB64)),
        Piece("the MEM_SIZE block list", short(b"ram") + be64(MIB64)),
        Piece("the MEM_SIZE block list", short(b"rom") + be64(MIB64)),
        Piece("a ram record", word(EOS)), Piece("a section footer", FTR),
    ]
    part = [
        Piece("a section type", b"\x02"), Piece("a section header", be32(2)),
        Piece("a ram record", word(ZERO, 0)), Piece("a ram record's block name", short(b"ram")),
        Piece("a ZERO record", b"\0"),
        Piece("a ram record", word(ZERO | CONT, PAGE)), Piece("a ZERO record", b"\0"),
        Piece("a ram record", word(ZERO | CONT, 2 * PAGE)), Piece("a ZERO record", b"\0"),
        Piece("a ram record", word(PAGE_FLAG | CONT, 3 * PAGE)), Piece("a PAGE record", page_data(9)),
        Piece("a ram record", word(PAGE_FLAG, 0)), Piece("a ram record's block name", short(b"rom")),
        Piece("a PAGE record", page_data(10)),
        Piece("a ram record", word(EOS)), Piece("a section footer", FTR),
    ]
    end = [Piece("a section type", b"\x03"), Piece("a section header", be32(2)),
           Piece("a ram record", word(EOS)), Piece("a section footer", FTR)]
    return [
        Piece("the stream header", G_HEADER),
        Piece("a section type", b"\x07"), Piece("the configuration section", be32(4) + b"none"),
        Piece("the configuration section", b"\x05"),
        Piece("a configuration subsection", short(b"configuration/uuid")),
        Piece("a configuration subsection version", be32(1)),
        Piece("configuration/uuid", bytes(16)),
        *ram_start, *part, *end,
        Piece("a section type", b"\x00"),
    ]


def test_truncation_pieces_form_a_valid_stream() -> None:
    data = b"".join(p.data for p in pieces())
    events = parse(data + h("06 00000002") + b"{}")
    assert events[-1] == ("tail", b"\x00" + h("06 00000002") + b"{}")
    assert ("page", "rom", 0, page_data(10)) in events


TRUNCATED = re.compile(r"^main channel: end of stream inside (.+) at byte (\d+) \(received (\d+) of (\d+) bytes\)$")


def test_every_prefix_before_eof_is_truncated() -> None:
    data = b"".join(p.data for p in pieces())
    for cut in range(len(data)):  # the final EOF byte is the first complete ending
        with pytest.raises(TruncatedError) as info:
            drain(data[:cut])
        m = TRUNCATED.match(str(info.value))
        assert m, str(info.value)
        assert int(m[2]) == cut
        assert int(m[3]) < int(m[4])


def _cuts() -> Iterator[tuple[str, int, str]]:
    pos = 0
    for i, p in enumerate(pieces()):
        inner = pos + len(p.data) // 2 if len(p.data) > 1 else pos
        yield (f"{i:02d}-{p.what.replace(' ', '-')}", inner, p.what)
        pos += len(p.data)


@pytest.mark.parametrize(("cut", "what"), [c[1:] for c in _cuts()], ids=[c[0] for c in _cuts()])
def test_truncation_names_the_record(cut: int, what: str) -> None:
    data = b"".join(p.data for p in pieces())
    with pytest.raises(TruncatedError, match=f"^main channel: end of stream inside {re.escape(what)} at byte {cut} "):
        drain(data[:cut])


def test_empty_stream_is_truncated_in_the_header() -> None:
    with pytest.raises(TruncatedError, match=r"^main channel: end of stream inside the stream header at byte 0 \(received 0 of 4 bytes\)$"):
        drain(b"")


# ---------------------------------------------------------- arbitrary bytes


def _valid_stream() -> bytes:
    return b"".join(p.data for p in pieces()) + h("06 00000002") + b"{}"


VALID = _valid_stream()


def mutated_streams() -> st.SearchStrategy[bytes]:
    return damaged(st.sampled_from([VALID, G_HEADER + G_CONFIG + G_START + G_PART + G_END + G_TAIL]), min_ops=1)


_prefixes = st.sampled_from([b"", G_HEADER, G_HEADER + G_CONFIG, PRO, PRO + PART, PRO + PART + NAMED0])


@given(data=st.one_of(
    mutated_streams(),
    st.tuples(_prefixes, st.binary(max_size=300)).map(b"".join),
    st.binary(max_size=64),
))
def test_arbitrary_bytes_raise_only_engine_errors(data: bytes) -> None:
    for chunk in (len(data) or 1, 3):
        try:
            for _ in flat(MainStreamParser(StreamReader.from_bytes(data, chunk), max_tail=1 << 16).events()):
                pass
        except MigrationError:
            pass


@given(
    flags=st.integers(0, 0xFFF),
    offset=st.integers(0, 2**52 - 1).map(lambda o: o * PAGE),
    rest=st.binary(max_size=40),
)
def test_arbitrary_ram_records_raise_only_engine_errors(flags: int, offset: int, rest: bytes) -> None:
    data = PRO + PART + NAMED0 + word(flags, offset) + rest
    try:
        events = parse(data)
    except MigrationError:
        return
    lengths: dict[str, int] = {}
    for ev in events:
        if ev[0] == "mem":
            lengths = dict(ev[1])
        elif ev[0] in ("zero", "page"):
            assert 0 <= ev[2] <= lengths[ev[1]] - PAGE


# ------------------------------------------------------------------ huge blocks


def test_offsets_of_2_63_and_more_cannot_pass_a_huge_block() -> None:
    """A MEM_SIZE over 2**63 bytes would let such offsets through the bound checks, where
    int64 conversion overflowed (named record) or wrapped negative (vectorised run)."""
    huge = (1 << 63) + 2 * PAGE
    for record in (word(ZERO, 1 << 63) + short(b"ram") + b"\0",
                   NAMED0 + word(ZERO | CONT, 1 << 63) + b"\0"):
        data = mem_stream(huge, (b"ram", huge)) + PART + record + word(EOS) + FTR + b"\x00"
        with pytest.raises(RemoteProtocolError, match=r"^main channel: received MEM_SIZE total 0x8000000000002000,"):
            drain(data)
