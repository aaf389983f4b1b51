"""Shared helpers of the main-stream tests (test_stream*.py): byte builders, the golden
stream pieces of the wire doc (5.4, 5.7), and events flattened into plain tuples."""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any, Iterable, Iterator

import numpy as np

from engine.wire.stream import (
    Configuration,
    Event,
    MainStreamParser,
    RamEOS,
    RamFlush,
    RamMemSize,
    RamPage,
    RamZeroPages,
    SectionBegin,
    SectionFooter,
    StreamHeader,
    StreamReader,
    StreamTail,
    SwitchoverStart,
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
            case RamFlush():
                yield ("flush", ev.section_id)
            case SwitchoverStart():
                yield ("switchover-start",)
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


@lru_cache(maxsize=256)
def page_data(seed: int) -> bytes:
    return ((np.arange(PAGE, dtype=np.uint32) * 7 + seed * 13) & 0xFF).astype(np.uint8).tobytes()


def uuid_subsection(raw: bytes) -> bytes:
    return b"\x05" + short(b"configuration/uuid") + be32(1) + raw
