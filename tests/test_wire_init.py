"""Pure tests of engine/wire.py's MultiFDInit_t (the 64-byte channel handshake) and of the
uuid text form, byte for byte: golden bytes from the wire doc (section 1.2, captured from a real
QEMU 7.2), Hypothesis round trips, and each invalid handshake's exact error text.
Packets: test_wire.py.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import LocalProtocolError, RemoteProtocolError
from engine.wire.packet import (
    INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    TARGET_PAGE_SIZE,
    MultiFDInit,
    format_uuid,
    parse_uuid,
    validate_init,
)

PAGE = TARGET_PAGE_SIZE
ZERO_UUID = bytes(16)
SOME_UUID_TEXT = "12345678-9abc-def0-1234-56789abcdef0"
SOME_UUID = bytes.fromhex("123456789abcdef0123456789abcdef0")



def h(text: str) -> bytes:
    """Hex with any whitespace, as written in the wire doc."""
    return bytes.fromhex("".join(text.split()))



# ------------------------------------------------------------------- MultiFDInit_t

# Doc 1.2 and 5.7: a real channel 1 handshake with no -uuid.
GOLDEN_INIT_CHANNEL_1 = h(
    "11223344 00000001 00000000000000000000000000000000 01 00000000000000" + "00" * 32
)


def test_init_golden_bytes_encode() -> None:
    assert MultiFDInit(channel_id=1).pack() == GOLDEN_INIT_CHANNEL_1


def test_init_golden_bytes_decode() -> None:
    init = MultiFDInit.unpack(GOLDEN_INIT_CHANNEL_1)
    assert init == MultiFDInit(channel_id=1, uuid=ZERO_UUID, magic=MULTIFD_MAGIC, version=MULTIFD_VERSION)
    assert validate_init(init, expected_uuid=ZERO_UUID, channels=2) == 1


def test_init_uuid_goes_in_canonical_byte_order() -> None:
    raw = MultiFDInit(channel_id=0, uuid=parse_uuid(SOME_UUID_TEXT)).pack()
    assert raw[8:24] == h("12345678 9abc def0 1234 56789abcdef0")
    assert raw[24] == 0


@given(channel_id=st.integers(0, 255), uuid=st.binary(min_size=16, max_size=16))
def test_init_round_trip(channel_id: int, uuid: bytes) -> None:
    raw = MultiFDInit(channel_id=channel_id, uuid=uuid).pack()
    assert len(raw) == INIT_SIZE
    assert raw[:8] == h("11223344 00000001")
    assert raw[25:] == bytes(39)  # unused1 + unused2 are zero
    assert MultiFDInit.unpack(raw) == MultiFDInit(channel_id=channel_id, uuid=uuid)
    assert MultiFDInit.unpack(memoryview(bytearray(raw))) == MultiFDInit(channel_id=channel_id, uuid=uuid)


@given(unused=st.binary(min_size=39, max_size=39))
def test_init_unused_fields_are_ignored(unused: bytes) -> None:
    raw = GOLDEN_INIT_CHANNEL_1[:25] + unused
    assert MultiFDInit.unpack(raw) == MultiFDInit(channel_id=1)


@pytest.mark.parametrize("size", [0, 63, 65], ids=lambda n: f"{n}-bytes")
def test_init_unpack_wrong_size(size: int) -> None:
    with pytest.raises(RemoteProtocolError, match=rf"^multifd handshake is {size} bytes, expected 64$"):
        MultiFDInit.unpack(bytes(size))


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (MultiFDInit(channel_id=256), "channel id 256 does not fit in a u8"),
        (MultiFDInit(channel_id=-1), "channel id -1 does not fit in a u8"),
        (MultiFDInit(channel_id=0, uuid=bytes(15)), "uuid is 15 bytes, expected 16"),
    ],
    ids=["id-256", "id-negative", "uuid-15-bytes"],
)
def test_init_pack_refuses_what_does_not_fit(init: MultiFDInit, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=f"^{re.escape(message)}$"):
        init.pack()


def _unpacked(raw: bytes) -> MultiFDInit:
    return MultiFDInit.unpack(raw)


@pytest.mark.parametrize(
    ("raw", "kwargs", "message"),
    [
        (
            h("5145564d 00000003") + GOLDEN_INIT_CHANNEL_1[8:],  # the main stream sent to a multifd slot
            {},
            "multifd handshake: received magic 0x5145564d, expected 0x11223344",
        ),
        (
            h("11223344 00000002") + GOLDEN_INIT_CHANNEL_1[8:],
            {},
            "multifd handshake: received version 2, expected 1",
        ),
        (
            MultiFDInit(channel_id=1, uuid=SOME_UUID).pack(),
            {},
            f"multifd handshake: received uuid '{SOME_UUID_TEXT}' and expected uuid "
            "'00000000-0000-0000-0000-000000000000' for channel 1",
        ),
        (
            MultiFDInit(channel_id=3).pack(),
            {"expected_uuid": SOME_UUID},
            "multifd handshake: received uuid '00000000-0000-0000-0000-000000000000' and expected uuid "
            f"'{SOME_UUID_TEXT}' for channel 3",
        ),
        (
            MultiFDInit(channel_id=2).pack(),  # QEMU 7.2 lets id == N through (off-by-one); we don't
            {"channels": 2},
            "multifd handshake: received channel id 2, expected < 2 (multifd-channels)",
        ),
        (
            MultiFDInit(channel_id=255).pack(),
            {"channels": 16},
            "multifd handshake: received channel id 255, expected < 16 (multifd-channels)",
        ),
        (
            MultiFDInit(channel_id=1).pack(),
            {"connected": {0, 1}},
            "multifd handshake: received channel id 1, which is already set up",
        ),
    ],
    ids=["magic", "version", "uuid-src-set", "uuid-dst-set", "id-equals-channels", "id-255", "duplicate-id"],
)
def test_validate_init_errors(raw: bytes, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"expected_uuid": ZERO_UUID, "channels": 2}
    args.update(kwargs)
    with pytest.raises(RemoteProtocolError, match=f"^{re.escape(message)}$"):
        validate_init(_unpacked(raw), **args)


def test_validate_init_accepts_every_id_below_channels_once() -> None:
    connected: set[int] = set()
    for channel_id in (3, 0, 2, 1):  # multifd connections finish in any order (doc 1.1)
        init = MultiFDInit.unpack(MultiFDInit(channel_id=channel_id, uuid=SOME_UUID).pack())
        connected.add(validate_init(init, expected_uuid=SOME_UUID, channels=4, connected=frozenset(connected)))
    assert connected == {0, 1, 2, 3}


# --------------------------------------------------------------------------- uuids


def test_parse_uuid_canonical_text() -> None:
    assert parse_uuid(SOME_UUID_TEXT) == SOME_UUID
    assert format_uuid(SOME_UUID) == SOME_UUID_TEXT
    assert format_uuid(ZERO_UUID) == "00000000-0000-0000-0000-000000000000"


@given(raw=st.binary(min_size=16, max_size=16))
def test_uuid_bytes_text_round_trip(raw: bytes) -> None:
    text = format_uuid(raw)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
    assert parse_uuid(text) == raw
    assert parse_uuid(text.upper()) == raw


@pytest.mark.parametrize("text", ["", "not-a-uuid", "12345678-9abc-def0-1234-56789abcdef", "g" * 32])
def test_parse_uuid_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid uuid .*: expected the form 12345678-9abc-def0-1234-56789abcdef0$"):
        parse_uuid(text)
