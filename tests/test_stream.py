"""Pure tests of engine/stream.py: the main migration stream, encoder and pull parser.

* golden bytes from the wire doc (5.4, 5.7), both directions;
* a Hypothesis round trip against an independent per-record reference encoder (the CONTINUE
  state persists across sections, as in QEMU);
* any chunking and any reader capacity give the same meaning, and with the whole stream
  buffered every vectorised zero run is maximal;
* every malformed input raises its own RemoteProtocolError / TruncatedError (exact text);
* arbitrary or mutated bytes never raise anything but an engine error.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Union

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, MigrationError, MigrationTimeout, RemoteProtocolError, TruncatedError
from engine.stream import (
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    Configuration,
    Event,
    MainStreamParser,
    RamEOS,
    RamMemSize,
    RamPage,
    RamZeroPages,
    SectionBegin,
    SectionFooter,
    StreamEncoder,
    StreamHeader,
    StreamReader,
    StreamTail,
    block_lengths,
)

PAGE = 4096
MIB64 = 64 * 1024 * 1024

ZERO, MEM_SIZE, PAGE_FLAG, EOS, CONT = 0x02, 0x04, 0x08, 0x10, 0x20


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def short(name: bytes) -> bytes:
    return bytes([len(name)]) + name


def word(flags: int, offset: int = 0) -> bytes:
    return be64(offset | flags)


# ------------------------------------------------------------------ normalisation

Flat = tuple[Any, ...]


def flat(events: Iterable[Event]) -> Iterator[Flat]:
    """Events as plain tuples, one per page; PAGE data copied at once (views are transient)."""
    for ev in events:
        match ev:
            case StreamHeader():
                yield ("header", ev.version)
            case Configuration():
                yield ("config", ev.machine, ev.subsections)
            case SectionBegin():
                yield ("begin", ev.kind, ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
            case RamMemSize():
                yield ("mem", ev.blocks)
            case RamZeroPages():
                assert ev.offsets.dtype == np.int64
                assert len(ev.offsets) >= 1
                for off in ev.offsets.tolist():
                    yield ("zero", ev.block, off, ev.fill)
            case RamPage():
                yield ("page", ev.block, ev.offset, bytes(ev.data))
            case RamEOS():
                yield ("eos", ev.section_id, ev.kind)
            case SectionFooter():
                yield ("footer", ev.section_id)
            case StreamTail():
                yield ("tail", ev.data)
            case _:
                raise AssertionError(f"unexpected event {ev!r}")


def zero_runs(events: Iterable[Event]) -> Iterator[tuple[str, list[int], int]]:
    for ev in events:
        if isinstance(ev, RamZeroPages):
            yield (ev.block, ev.offsets.tolist(), ev.fill)


def reader_over(data: bytes, chunk: int, capacity: int = 1 << 20) -> StreamReader:
    return StreamReader.from_bytes(data, chunk, capacity)


def parse(data: bytes, chunk: int = 1 << 16, **kwargs: Any) -> list[Flat]:
    return list(flat(MainStreamParser(StreamReader.from_bytes(data, chunk), **kwargs).events()))


def drain(data: bytes, **kwargs: Any) -> None:
    for _ in flat(MainStreamParser(StreamReader.from_bytes(data), **kwargs).events()):
        pass


# ---------------------------------------------------------- golden bytes (5.4, 5.7)

G_HEADER = h("51 45 56 4d 00 00 00 03")
G_CONFIG = h("07 00 00 00 04 6e 6f 6e 65")
G_START = h(
    """01 00000002 03 72616d 00000000 00000004
       0000000004000004
       03 72616d 0000000004000000
       0000000000000010
       7e 00000002"""
)
G_PART = h(
    """02 00000002
       0000000000000002 03 72616d 00
       0000000000003022 00
       0000000000000010 7e 00000002"""
)
G_END = h("03 00000002 0000000000000010 7e 00000002")
G_TIMER = h("04 00000000 05") + b"timer" + h("00000000 00000002") + bytes(24) + h("7e 00000000")
G_GLOBALSTATE = (
    h("04 00000004 0b") + b"globalstate" + h("00000000 00000001")
    + h("0000000a") + b"prelaunch".ljust(100, b"\0") + h("7e 00000004")
)
_VMDESC_HEAD = b'{"page_size": 4096, "devices": []'
G_VMDESC = _VMDESC_HEAD + b" " * (486 - len(_VMDESC_HEAD) - 1) + b"}"
G_TAIL = G_TIMER + G_GLOBALSTATE + b"\x00" + h("06 000001e6") + G_VMDESC

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


@lru_cache(maxsize=256)
def page_data(seed: int) -> bytes:
    return ((np.arange(PAGE, dtype=np.uint32) * 7 + seed * 13) & 0xFF).astype(np.uint8).tobytes()


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


def uuid_subsection(raw: bytes) -> bytes:
    return b"\x05" + short(b"configuration/uuid") + be32(1) + raw


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


# ------------------------------------------------------------- configuration


def config_stream(*subsections: bytes, machine: bytes = b"none") -> bytes:
    return G_HEADER + b"\x07" + be32(len(machine)) + machine + b"".join(subsections) + b"\x00"


def sub(name: bytes, payload: bytes) -> bytes:
    return b"\x05" + short(name) + be32(1) + payload


def test_configuration_with_every_known_subsection() -> None:
    uuid = bytes(range(16))
    data = config_stream(
        sub(b"configuration/target-page-bits", be32(12)),
        sub(b"configuration/capabilities", be32(0)),
        sub(b"configuration/uuid", uuid),
        machine=b"pc-i440fx-7.2",
    )
    events = parse(data)
    assert events == [
        ("header", 3),
        ("config", "pc-i440fx-7.2", (
            ("configuration/target-page-bits", be32(12)),
            ("configuration/capabilities", b""),
            ("configuration/uuid", uuid),
        )),
        ("tail", b"\x00"),
    ]


def test_configuration_uuid_golden() -> None:
    """[WIRE] ``05 12 "configuration/uuid" 00000001 <16 bytes>``."""
    raw = h("05 12") + b"configuration/uuid" + h("00000001") + bytes(range(16))
    assert raw == uuid_subsection(bytes(range(16)))
    assert parse(config_stream(raw))[1] == ("config", "none", (("configuration/uuid", bytes(range(16))),))


CONFIG_ERRORS: dict[str, tuple[bytes, str]] = {
    "capabilities-x-ignore-shared": (  # [WIRE] bytes from doc 5.2
        config_stream(h("05 1a") + b"configuration/capabilities" + h("00000001 00000001 0f") + b"x-ignore-shared"),
        "main channel: received validated capabilities ['x-ignore-shared'], expected none"
        " (x-ignore-shared is not supported)",
    ),
    "capabilities-too-many": (
        config_stream(sub(b"configuration/capabilities", be32(65))),
        "main channel: received 65 capabilities, expected <= 64",
    ),
    "target-page-bits-13": (
        config_stream(sub(b"configuration/target-page-bits", be32(13))),
        "main channel: received target-page-bits 13, expected 12",
    ),
    "unknown-subsection": (
        config_stream(sub(b"configuration/foo", b"")),
        "main channel: received unknown configuration subsection 'configuration/foo'",
    ),
    "machine-name-256": (
        G_HEADER + b"\x07" + be32(256) + b"m" * 256 + b"\x00",
        "main channel: received machine name length 256, expected <= 255",
    ),
}


@pytest.mark.parametrize(("data", "message"), CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_configuration_errors(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=f"^{re.escape(message)}$"):
        drain(data)


# ---------------------------------------------------------------------- tail


def test_full_device_section_yields_the_rest_of_the_stream() -> None:
    data = G_HEADER + G_CONFIG + G_START + G_END + G_TAIL
    parser = MainStreamParser(StreamReader.from_bytes(data, 7))
    events = list(flat(parser.events()))
    assert events[-1] == ("tail", G_TAIL)
    assert parser.ram_ended
    assert parser.r.consumed == len(data)


def test_eof_yields_tail_with_vmdesc() -> None:
    tail = b"\x00" + h("06 000001e6") + G_VMDESC
    assert parse(G_HEADER + G_CONFIG + G_START + G_END + tail)[-1] == ("tail", tail)


def test_eof_without_vmdesc_or_devices() -> None:
    """[INTEROP E8] RAM + EOF only."""
    assert parse(G_HEADER + G_CONFIG + G_START + G_END + b"\x00")[-1] == ("tail", b"\x00")


def test_device_section_before_ram_end_still_ends_parsing() -> None:
    parser = MainStreamParser(StreamReader.from_bytes(G_HEADER + G_CONFIG + G_START + G_TAIL))
    assert list(flat(parser.events()))[-1] == ("tail", G_TAIL)
    assert not parser.ram_ended


def test_tail_with_non_utf8_idstr_is_byte_exact() -> None:
    """The tail is handed over as received, even when the idstr is not valid UTF-8."""
    for idstr in (b"\xff\xfe", b"\xff" * 255):
        tail = b"\x04" + be32(9) + short(idstr) + be32(0) + be32(1) + b"state" + b"\x00"
        assert parse(G_HEADER + G_CONFIG + G_START + G_END + tail)[-1] == ("tail", tail)


def test_tail_larger_than_max_tail() -> None:
    data = G_HEADER + G_CONFIG + G_START + G_END + b"\x00" + bytes(100)
    assert parse(data, max_tail=100)[-1] == ("tail", b"\x00" + bytes(100))
    with pytest.raises(RemoteProtocolError, match=r"^main channel: the stream tail is larger than 99 bytes$"):
        drain(data, max_tail=99)
    device = G_HEADER + G_CONFIG + G_START + G_END + G_TIMER + bytes(100)
    with pytest.raises(RemoteProtocolError, match=r"^main channel: the device state after RAM is larger than 10 bytes$"):
        drain(device, max_tail=10)


def test_tail_larger_than_the_reader_buffer_while_a_page_view_is_held() -> None:
    """The reader grows its buffer for a big tail; a PAGE view still held must not block that
    (bytearray.extend() with a live export raised BufferError, not an engine error)."""
    enc = StreamEncoder()
    enc.header()
    enc.configuration("none")
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size([("ram", MIB64)])
    enc.ram_page("ram", 0, page_data(5))
    enc.ram_eos()
    enc.footer(2)
    enc.eof()
    big = b"{" + b" " * (3 << 20) + b"}"
    enc.vmdesc(big)
    events = list(MainStreamParser(StreamReader.from_bytes(enc.take())).events())  # keeps RamPage alive
    assert isinstance(events[-1], StreamTail)
    assert events[-1].data == b"\x00\x06" + be32(len(big)) + big
    assert sum(isinstance(e, RamPage) for e in events) == 1  # its view is stale by now (documented)


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
            " FULL 0x04, CONFIGURATION 0x07, EOF 0x00",
        )
        for t in (0x05, 0x06, 0x08, 0x09, 0x7E, 0xFF)
    },
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
            " PAGE 0x8 or EOS 0x10 (with CONTINUE 0x20)",
        )
        for name, flags in [
            ("xbzrle-0x40", 0x40), ("xbzrle-continue-0x60", 0x60), ("hook-0x80", 0x80),
            ("compress-page-0x100", 0x100), ("obsolete-full-0x01", 0x01), ("none-0x00", 0x00),
            ("continue-only-0x20", 0x20), ("zero-and-page-0x0a", 0x0A), ("eos-and-zero-0x12", 0x12),
            ("multifd-flush-0x200", 0x200),
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


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([VALID, G_HEADER + G_CONFIG + G_START + G_PART + G_END + G_TAIL]))
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "delete", "insert", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i:]
    return bytes(data)


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


def test_offsets_of_2_63_and_more_cannot_pass_a_huge_block() -> None:
    """A MEM_SIZE over 2**63 bytes would let such offsets through the bound checks, where
    int64 conversion overflowed (named record) or wrapped negative (vectorised run)."""
    huge = (1 << 63) + 2 * PAGE
    for record in (word(ZERO, 1 << 63) + short(b"ram") + b"\0",
                   NAMED0 + word(ZERO | CONT, 1 << 63) + b"\0"):
        data = mem_stream(huge, (b"ram", huge)) + PART + record + word(EOS) + FTR + b"\x00"
        with pytest.raises(RemoteProtocolError, match=r"^main channel: received MEM_SIZE total 0x8000000000002000,"):
            drain(data)
