"""Pure tests of engine/stream.py: the main migration stream, encoder and pull parser.

* golden bytes from the wire doc (5.4, 5.7), both directions;
* a Hypothesis round trip against an independent per-record reference encoder (the CONTINUE
  state persists across sections, as in QEMU);
* any chunking and any reader capacity give the same meaning, and with the whole stream
  buffered every vectorised zero run is maximal;
* the reader's primitives and the encoder's refusals.

Malformed, truncated and arbitrary input: test_stream_errors.py; the configuration section and
the stream's tail: test_stream_sections.py; shared helpers: stream_support.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Union

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, MigrationTimeout, RemoteProtocolError, TruncatedError
from engine.wire.encoder import StreamEncoder
from engine.wire.stream import (
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    MainStreamParser,
    RamMemSize,
    RamZeroPages,
    SectionBegin,
    StreamReader,
    block_lengths,
)
from stream_support import (
    PAGE, MIB64, ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONT, h, be32, be64, short, word, Flat, flat, zero_runs,
    reader_over, parse, drain, G_HEADER, G_CONFIG, G_START, G_PART, G_END, G_TIMER, G_GLOBALSTATE,
    G_VMDESC, G_TAIL, page_data, uuid_subsection,
)

# ---------------------------------------------------------- golden bytes (5.4, 5.7)


G_EVENTS_START: list[Flat] = [
    ("header", 3),
    ("config", "none", ()),
    ("begin", QEMU_VM_SECTION_START, 2, "ram", 0, 4),
    ("mem", (("ram", MIB64),)),
    ("eos", 2, QEMU_VM_SECTION_START),
    ("footer", 2),
]
G_EVENTS_PART: list[Flat] = [
    ("begin", QEMU_VM_SECTION_PART, 2, "ram", 0, 4),
    ("zero", "ram", 0, 0),
    ("zero", "ram", 0x3000, 0),
    ("eos", 2, QEMU_VM_SECTION_PART),
    ("footer", 2),
]
G_EVENTS_END: list[Flat] = [
    ("begin", QEMU_VM_SECTION_END, 2, "ram", 0, 4),
    ("eos", 2, QEMU_VM_SECTION_END),
    ("footer", 2),
]


def test_golden_vmdesc_is_486_bytes() -> None:
    assert len(G_VMDESC) == 0x1E6 == 486


def test_encoder_produces_golden_start_section() -> None:
    enc = StreamEncoder()
    enc.header()
    enc.configuration("none")
    assert enc.take() == G_HEADER + G_CONFIG
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size([("ram", MIB64)])
    enc.ram_eos()
    enc.footer(2)
    assert enc.take() == G_START
    assert enc.out == b""


def test_encoder_produces_golden_first_part_section() -> None:
    enc = StreamEncoder()
    enc.ram_mem_size([("ram", MIB64)])
    enc.take()
    enc.section_part(2)
    enc.ram_zero_pages("ram", np.array([0, 0x3000], dtype=np.int64))
    enc.ram_eos()
    enc.footer(2)
    assert enc.take() == G_PART


def test_encoder_produces_golden_end_and_tail() -> None:
    enc = StreamEncoder()
    enc.section_part(2, end=True)
    enc.ram_eos()
    enc.footer(2)
    assert enc.take() == G_END
    enc.section_start(0, "timer", 0, 2, full=True)
    enc.out += bytes(24)
    enc.footer(0)
    assert enc.take() == G_TIMER
    enc.eof()
    enc.vmdesc(G_VMDESC)
    assert enc.take() == b"\x00" + h("06 000001e6") + G_VMDESC


def test_parser_decodes_golden_stream() -> None:
    data = G_HEADER + G_CONFIG + G_START + G_PART + G_END + G_TAIL
    assert parse(data) == G_EVENTS_START + G_EVENTS_PART + G_EVENTS_END + [("tail", G_TAIL)]


def test_parser_golden_part_is_one_zero_run() -> None:
    data = G_HEADER + G_CONFIG + G_START + G_PART + G_END + b"\x00"
    parser = MainStreamParser(StreamReader.from_bytes(data))
    assert list(zero_runs(parser.events())) == [("ram", [0, 0x3000], 0)]
    assert parser.ram_ended


def test_continue_state_persists_across_sections() -> None:
    """[WIRE] the first record of the second PART section used CONTINUE (doc 5.4)."""
    enc = StreamEncoder()
    enc.ram_mem_size([("ram", MIB64)])
    enc.take()
    enc.section_part(2)
    enc.ram_zero_pages("ram", np.array([0]))
    enc.ram_eos()
    enc.footer(2)
    enc.take()
    enc.section_part(2)
    enc.ram_zero_pages("ram", np.array([0x5000]))
    enc.ram_page("ram", 0x6000, bytes(range(256)) * 16)
    assert enc.take() == h("02 00000002 0000000000005022 00 0000000000006028") + bytes(range(256)) * 16

    data = G_HEADER + G_CONFIG + G_START + G_PART + h("02 00000002 0000000000005022 00") + word(EOS) + h("7e 00000002")
    assert parse(data + b"\x00")[-4:-1] == [("zero", "ram", 0x5000, 0), ("eos", 2, QEMU_VM_SECTION_PART), ("footer", 2)]


def test_mem_size_resets_continue_state() -> None:
    enc = StreamEncoder()
    enc.ram_mem_size([("ram", MIB64)])
    enc.ram_zero_pages("ram", np.array([0]))
    enc.ram_mem_size([("ram", MIB64)])
    enc.ram_zero_pages("ram", np.array([PAGE]))
    named = word(ZERO, PAGE) + short(b"ram") + b"\0"
    assert enc.take().endswith(named)

    again = word(MEM_SIZE, MIB64) + short(b"ram") + be64(MIB64)
    data = G_HEADER + G_CONFIG + G_START + h("02 00000002") + word(ZERO, 0) + short(b"ram") + b"\0" + again
    start = len(data)
    data += word(ZERO | CONT, PAGE) + b"\0"
    with pytest.raises(RemoteProtocolError, match=rf"CONTINUE record at byte {start} before any RAM block"):
        drain(data)


# ---------------------------------------------------- reference encoder and model


class RefEncoder:
    """Independent per-record encoder: one struct.pack per record, nothing vectorised."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.last: str | None = None
        # every ram record in order: ("zero", block, offset, fill, continued) / ("page", ...) / ("break",)
        self.records: list[tuple[Any, ...]] = []

    def mem_size(self, blocks: list[tuple[str, int]]) -> None:
        self.out += word(MEM_SIZE, sum(n for _, n in blocks))
        for name, length in blocks:
            self.out += short(name.encode()) + be64(length)
        self.last = None
        self.records.append(("break",))

    def _prefix(self, flag: int, block: str, offset: int, named: bool) -> bool:
        if block == self.last and not named:
            self.out += word(flag | CONT, offset)
            return True
        self.out += word(flag, offset) + short(block.encode())
        self.last = block
        return False

    def zero(self, block: str, offset: int, fill: int, named: bool = False) -> RefEncoder:
        cont = self._prefix(ZERO, block, offset, named)
        self.out += bytes([fill])
        self.records.append(("zero", block, offset, fill, cont))
        return self

    def page(self, block: str, offset: int, data: bytes, named: bool = False) -> RefEncoder:
        self._prefix(PAGE_FLAG, block, offset, named)
        self.out += data
        self.records.append(("page",))
        return self

    def eos(self) -> None:
        self.out += word(EOS)
        self.records.append(("break",))

    def expected_runs(self) -> list[tuple[str, list[int], int]]:
        """Maximal runs: a ZERO record, then every following ZERO|CONTINUE record with its fill."""
        runs: list[tuple[str, list[int], int]] = []
        prev_zero = False
        for rec in self.records:
            if rec[0] != "zero":
                prev_zero = False
                continue
            _, block, offset, fill, cont = rec
            if prev_zero and cont and runs[-1][2] == fill:
                runs[-1][1].append(offset)
            else:
                runs.append((block, [offset], fill))
            prev_zero = True
        return runs




@dataclass(frozen=True)
class ZeroGroup:
    block: int
    pages: tuple[int, ...]
    fill: int


@dataclass(frozen=True)
class PageGroup:
    block: int
    page: int
    seed: int


Group = Union[ZeroGroup, PageGroup]


@dataclass(frozen=True)
class StreamModel:
    machine: str
    uuid: bytes | None
    section_id: int
    blocks: tuple[tuple[str, int], ...]  # name, pages
    sections: tuple[tuple[Group, ...], ...]  # PART..., END
    tail: str


_block_names = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789./@_-"), min_size=1, max_size=24
)


@st.composite
def stream_models(draw: st.DrawFn, max_page_records: int = 6) -> StreamModel:
    names = draw(st.lists(_block_names, min_size=1, max_size=4, unique=True))
    blocks = tuple((n, draw(st.integers(1, 40))) for n in names)

    def group(remaining_pages: int) -> st.SearchStrategy[Group]:
        def zero(b: int) -> st.SearchStrategy[Group]:
            return st.builds(
                ZeroGroup, st.just(b),
                st.lists(st.integers(0, blocks[b][1] - 1), min_size=1, max_size=12).map(tuple),
                st.sampled_from([0, 0, 0, 1, 0xFF]),
            )

        def page(b: int) -> st.SearchStrategy[Group]:
            return st.builds(PageGroup, st.just(b), st.integers(0, blocks[b][1] - 1), st.integers(0, 255))

        idx = st.integers(0, len(blocks) - 1)
        if remaining_pages <= 0:
            return idx.flatmap(zero)
        return st.one_of(idx.flatmap(zero), idx.flatmap(zero), idx.flatmap(page))

    sections = []
    budget = max_page_records
    for _ in range(draw(st.integers(0, 4)) + 1):
        groups = []
        for _ in range(draw(st.integers(0, 5))):
            g = draw(group(budget))
            budget -= isinstance(g, PageGroup)
            groups.append(g)
        sections.append(tuple(groups))
    return StreamModel(
        machine=draw(st.sampled_from(["none", "pc-i440fx-7.2", "q35"])),
        uuid=draw(st.none() | st.binary(min_size=16, max_size=16)),
        section_id=draw(st.integers(0, 2**32 - 1)),
        blocks=blocks,
        sections=tuple(sections),
        tail=draw(st.sampled_from(["eof", "eof+vmdesc", "devices"])),
    )


def build(model: StreamModel) -> tuple[bytes, bytes, list[Flat], RefEncoder]:
    """(StreamEncoder bytes, reference bytes, expected flat events, reference encoder)."""
    sid = model.section_id
    blocks = [(name, pages * PAGE) for name, pages in model.blocks]
    enc, ref = StreamEncoder(), RefEncoder()
    enc.header()
    enc.configuration(model.machine)
    ref.out += G_HEADER + b"\x07" + be32(len(model.machine)) + model.machine.encode()
    subs: tuple[tuple[str, bytes], ...] = ()
    if model.uuid is not None:
        enc.out += uuid_subsection(model.uuid)
        ref.out += uuid_subsection(model.uuid)
        subs = (("configuration/uuid", model.uuid),)
    expected: list[Flat] = [("header", 3), ("config", model.machine, subs)]

    enc.section_start(sid, "ram", 0, 4)
    ref.out += b"\x01" + be32(sid) + short(b"ram") + be32(0) + be32(4)
    enc.ram_mem_size(blocks)
    ref.mem_size(blocks)
    enc.ram_eos()
    ref.eos()
    enc.footer(sid)
    ref.out += b"\x7e" + be32(sid)
    expected += [
        ("begin", QEMU_VM_SECTION_START, sid, "ram", 0, 4), ("mem", tuple(blocks)),
        ("eos", sid, QEMU_VM_SECTION_START), ("footer", sid),
    ]
    for i, groups in enumerate(model.sections):
        kind = QEMU_VM_SECTION_END if i == len(model.sections) - 1 else QEMU_VM_SECTION_PART
        enc.section_part(sid, end=kind == QEMU_VM_SECTION_END)
        ref.out += bytes([kind]) + be32(sid)
        expected.append(("begin", kind, sid, "ram", 0, 4))
        for g in groups:
            name = model.blocks[g.block][0]
            if isinstance(g, ZeroGroup):
                enc.ram_zero_pages(name, np.array(g.pages, dtype=np.int64) * PAGE, g.fill)
                for p in g.pages:
                    ref.zero(name, p * PAGE, g.fill)
                    expected.append(("zero", name, p * PAGE, g.fill))
            else:
                enc.ram_page(name, g.page * PAGE, page_data(g.seed))
                ref.page(name, g.page * PAGE, page_data(g.seed))
                expected.append(("page", name, g.page * PAGE, page_data(g.seed)))
        enc.ram_eos()
        ref.eos()
        enc.footer(sid)
        ref.out += b"\x7e" + be32(sid)
        expected += [("eos", sid, kind), ("footer", sid)]

    tail = b""
    if model.tail == "devices":
        tail += G_TIMER + G_GLOBALSTATE
    tail += b"\x00"
    if model.tail != "eof":
        tail += h("06 000001e6") + G_VMDESC
    enc.out += tail
    ref.out += tail
    expected.append(("tail", tail))
    return enc.take(), bytes(ref.out), expected, ref


@given(model=stream_models())
def test_round_trip(model: StreamModel) -> None:
    data, ref_bytes, expected, ref = build(model)
    assert data == ref_bytes
    parser = MainStreamParser(StreamReader.from_bytes(data, chunk=len(data)))
    assert list(flat(parser.events())) == expected
    assert parser.ram_ended


@given(model=stream_models())
def test_zero_runs_are_maximal_when_the_stream_is_buffered(model: StreamModel) -> None:
    data, _, _, ref = build(model)
    parser = MainStreamParser(StreamReader.from_bytes(data, chunk=len(data)))
    assert list(zero_runs(parser.events())) == ref.expected_runs()


@given(
    model=stream_models(max_page_records=2),
    chunk=st.one_of(st.integers(1, 16), st.integers(17, 5000)),
    capacity=st.sampled_from([PAGE, PAGE + 9, 3 * PAGE + 1, 1 << 20]),
)
def test_any_chunking_gives_the_same_events(model: StreamModel, chunk: int, capacity: int) -> None:
    data, _, expected, _ = build(model)
    got = list(flat(MainStreamParser(reader_over(data, chunk, capacity)).events()))
    assert got == expected


def _reference_stream() -> tuple[bytes, list[Flat]]:
    model = StreamModel(
        machine="pc-i440fx-7.2", uuid=bytes(range(16)), section_id=2,
        blocks=(("pc.ram", 40), ("/rom@etc/acpi/tables", 8)),
        sections=(
            (ZeroGroup(0, (0, 3, 4, 5), 0), PageGroup(0, 6, 1), ZeroGroup(0, (7, 8), 0), ZeroGroup(1, (0,), 0)),
            (ZeroGroup(1, (1, 2), 0), ZeroGroup(1, (3,), 0xFF), PageGroup(1, 4, 2), PageGroup(0, 9, 3)),
            (ZeroGroup(0, tuple(range(10, 40)), 0),),
        ),
        tail="devices",
    )
    data, _, expected, _ = build(model)
    return data, expected


@pytest.mark.parametrize("chunk", [*range(1, 24), 4095, 4096, 4097, 1 << 20], ids=lambda c: f"chunk{c}")
def test_reference_stream_any_chunk_size(chunk: int) -> None:
    data, expected = _reference_stream()
    assert parse(data, chunk) == expected


# --------------------------------------------------------- vectorised zero runs


def _ram_stream(body: Callable[[RefEncoder], object]) -> tuple[bytes, RefEncoder]:
    ref = RefEncoder()
    ref.out += G_HEADER + G_CONFIG + b"\x01" + be32(2) + short(b"ram") + be32(0) + be32(4)
    ref.mem_size([("ram", 64 * PAGE), ("rom", 8 * PAGE)])
    ref.eos()
    ref.out += b"\x7e" + be32(2) + b"\x02" + be32(2)
    body(ref)
    ref.eos()
    ref.out += b"\x7e" + be32(2) + b"\x00"
    return bytes(ref.out), ref


RUN_CASES: dict[str, tuple[Callable[[RefEncoder], object], list[tuple[str, list[int], int]]]] = {
    "one-run": (
        lambda r: [r.zero("ram", o * PAGE, 0) for o in (0, 1, 2, 9)],
        [("ram", [0, PAGE, 2 * PAGE, 9 * PAGE], 0)],
    ),
    "named-record-same-block": (
        lambda r: [r.zero("ram", 0, 0), r.zero("ram", PAGE, 0), r.zero("ram", 2 * PAGE, 0, named=True),
                   r.zero("ram", 3 * PAGE, 0)],
        [("ram", [0, PAGE], 0), ("ram", [2 * PAGE, 3 * PAGE], 0)],
    ),
    "named-record-other-block": (
        lambda r: [r.zero("ram", 0, 0), r.zero("ram", PAGE, 0), r.zero("rom", 0, 0), r.zero("rom", PAGE, 0),
                   r.zero("ram", 5 * PAGE, 0)],
        [("ram", [0, PAGE], 0), ("rom", [0, PAGE], 0), ("ram", [5 * PAGE], 0)],
    ),
    "page-record": (
        lambda r: [r.zero("ram", 0, 0), r.zero("ram", PAGE, 0), r.page("ram", 2 * PAGE, page_data(1)),
                   r.zero("ram", 3 * PAGE, 0), r.zero("ram", 4 * PAGE, 0)],
        [("ram", [0, PAGE], 0), ("ram", [3 * PAGE, 4 * PAGE], 0)],
    ),
    "different-fill": (
        lambda r: [r.zero("ram", 0, 0), r.zero("ram", PAGE, 0), r.zero("ram", 2 * PAGE, 7),
                   r.zero("ram", 3 * PAGE, 7), r.zero("ram", 4 * PAGE, 0)],
        [("ram", [0, PAGE], 0), ("ram", [2 * PAGE, 3 * PAGE], 7), ("ram", [4 * PAGE], 0)],
    ),
    "single-records": (
        lambda r: [r.zero("rom", 7 * PAGE, 1), r.zero("ram", 0, 1)],
        [("rom", [7 * PAGE], 1), ("ram", [0], 1)],
    ),
    "run-starting-with-continue": (
        lambda r: [r.page("ram", 0, page_data(0)), r.zero("ram", PAGE, 0), r.zero("ram", 2 * PAGE, 0)],
        [("ram", [PAGE, 2 * PAGE], 0)],
    ),
}


@pytest.mark.parametrize(("body", "runs"), RUN_CASES.values(), ids=RUN_CASES.keys())
def test_vectorised_zero_runs_match_per_record_meaning(
    body: Callable[[RefEncoder], object], runs: list[tuple[str, list[int], int]]
) -> None:
    data, ref = _ram_stream(body)
    assert ref.expected_runs() == runs
    assert list(zero_runs(MainStreamParser(StreamReader.from_bytes(data, len(data))).events())) == runs
    per_record = [("zero", b, o, f) for b, offs, f in runs for o in offs]
    for chunk in (1, 5, 9, 10, 4096):
        assert [e for e in parse(data, chunk) if e[0] == "zero"] == per_record


def test_zero_run_events_offsets_are_int64_byte_offsets() -> None:
    data, _ = _ram_stream(lambda r: [r.zero("ram", 63 * PAGE, 0), r.zero("ram", 62 * PAGE, 0)])
    events = [e for e in MainStreamParser(StreamReader.from_bytes(data)).events() if isinstance(e, RamZeroPages)]
    assert len(events) == 1
    assert events[0].offsets.dtype == np.int64
    assert events[0].offsets.tolist() == [63 * PAGE, 62 * PAGE]


# ------------------------------------------------------------------ reader


def test_reader_primitives() -> None:
    data = b"\x07" + be32(0xDEADBEEF) + be64(2**64 - 1) + b"abc" + b"tail"
    r = StreamReader.from_bytes(data, chunk=2)
    assert r.peek_u8("x") == 7
    assert r.u8("x") == 7
    assert r.be32("x") == 0xDEADBEEF
    assert r.be64("x") == 2**64 - 1
    assert r.read(3, "x") == b"abc"
    assert r.consumed == 16
    assert r.read_to_eof(100, "the tail") == b"tail"
    assert r.eof and r.consumed == len(data)
    with pytest.raises(TruncatedError, match=r"^main channel: end of stream inside x at byte 20 \(received 0 of 1 bytes\)$"):
        r.u8("x")


def test_reader_small_capacity_compacts() -> None:
    values = list(range(1000))
    data = b"".join(be32(v) for v in values)
    r = reader_over(data, chunk=7, capacity=10)
    assert [r.be32("x") for _ in values] == values


def test_reader_never_swallows_fill_errors() -> None:
    def fill(into: memoryview) -> int:
        raise MigrationTimeout("main channel: no data for 5 s")

    r = StreamReader(fill)
    with pytest.raises(MigrationTimeout, match="no data for 5 s"):
        r.u8("x")


# ------------------------------------------------------------------ encoder


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.section_start(0, "x" * 256, 0, 1), "section idstr of 256 bytes, at most 255"),
        (lambda e: e.ram_mem_size([("", PAGE)]), "RAM block name of 0 bytes, expected 1..255"),
        (lambda e: e.ram_zero_pages("b" * 256, np.array([0])), "RAM block name of 256 bytes, expected 1..255"),
        (lambda e: e.ram_page("ram", 0, bytes(PAGE - 1)), "PAGE record of 4095 bytes, expected 4096"),
    ],
    ids=["idstr-256", "empty-block-name", "block-name-256", "short-page"],
)
def test_encoder_refuses_what_qemu_would_reject(call: Callable[[StreamEncoder], None], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        call(StreamEncoder())


def test_encoder_zero_pages_with_no_offsets_writes_nothing() -> None:
    enc = StreamEncoder()
    enc.ram_zero_pages("ram", np.zeros(0, dtype=np.int64))
    assert enc.take() == b""


def test_block_lengths() -> None:
    assert block_lengths(RamMemSize((("a", PAGE), ("b", 2 * PAGE)))) == {"a": PAGE, "b": 2 * PAGE}


def test_section_begin_kind_names() -> None:
    names = [SectionBegin(k, 2, "ram", 0, 4).kind_name for k in (1, 2, 3, 4, 9)]
    assert names == ["START", "PART", "END", "FULL", "0x9"]


def test_full_ram_section_is_parsed_as_ram() -> None:
    enc = StreamEncoder()
    enc.header()
    enc.configuration("none")
    enc.section_start(7, "ram", 0, 4, full=True)
    enc.ram_mem_size([("ram", PAGE)])
    enc.ram_zero_pages("ram", np.array([0]), fill=3)
    enc.ram_eos()
    enc.footer(7)
    enc.eof()
    parser = MainStreamParser(StreamReader.from_bytes(enc.take()))
    assert list(flat(parser.events()))[2:] == [
        ("begin", QEMU_VM_SECTION_FULL, 7, "ram", 0, 4), ("mem", (("ram", PAGE),)), ("zero", "ram", 0, 3),
        ("eos", 7, QEMU_VM_SECTION_FULL), ("footer", 7), ("tail", b"\x00"),
    ]
    assert parser.ram_ended


def test_parser_decodes_qemu_10_records() -> None:
    """QEMU 10.0's dialect: a MULTIFD_FLUSH (0x200) before each EOS, and SWITCHOVER_START
    (QEMU_VM_COMMAND 0x000b, no data) before the END section (observed from QEMU 10.0.2)."""
    start = G_START[:-13] + word(0x200) + G_START[-13:]  # START = MEM_SIZE, MULTIFD_FLUSH, EOS, footer
    end = b"\x08" + h("000b 0000") + G_END[:5] + word(0x200) + G_END[5:]
    events = parse(G_HEADER + G_CONFIG + start + end + b"\x00")
    kinds = [e[0] for e in events]
    assert kinds == ["header", "config", "begin", "mem", "flush", "eos", "footer", "switchover-start", "begin",
                     "flush", "eos", "footer", "tail"]
    assert events[4] == ("flush", 2) and events[9] == ("flush", 2)
