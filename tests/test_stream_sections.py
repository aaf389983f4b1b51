"""Main-stream parser (engine/stream.py): the configuration section with its subsections and
errors, and the stream's tail (device sections, EOF, vmdesc) handed over byte-exact.
"""

from __future__ import annotations

import re

import pytest

from engine.errors import RemoteProtocolError
from engine.wire.encoder import StreamEncoder
from engine.wire.stream import MainStreamParser, RamPage, StreamReader, StreamTail
from stream_support import (
    MIB64, h, be32, short, flat, parse, drain, G_HEADER, G_CONFIG, G_START, G_END, G_TIMER, G_VMDESC,
    G_TAIL, page_data, uuid_subsection,
)


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
    # kept as received, for a checkpoint's replay
    from engine.wire.reader import StreamReader
    from engine.wire.stream import Configuration, MainStreamParser

    config = next(e for e in MainStreamParser(StreamReader.from_bytes(data)).events() if isinstance(e, Configuration))
    assert config.raw == data[len(G_HEADER):-1]


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


