"""engine.vmstate on the device state of a real ``-M pc`` stream (captured here from QEMU with
``exec:cat``), and on that stream with its description or bytes broken on purpose."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from engine.wire.vmstate import parse_tail
from engine.errors import RemoteProtocolError
from engine.wire.stream import MainStreamParser, StreamReader, StreamTail
from engine.wire.vmstate import parse_device_state
from qemu_support import QemuPeer, needs_qemu


@pytest.fixture(scope="module")
def pc_tail(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    d = tmp_path_factory.mktemp("pc-capture")
    out = d / "pc.bin"
    with QemuPeer(d, name="pc", machine="pc", memory="32M") as src:
        src.set_parameters(max_bandwidth=10 << 30)
        src.migrate(f"exec:cat > {out}")
        assert src.wait_migration(timeout=60)["status"] == "completed"
    tail = next(ev.data for ev in MainStreamParser(StreamReader.from_bytes(out.read_bytes())).events()
                if isinstance(ev, StreamTail))
    state, desc = parse_tail(tail)
    assert desc is not None
    return state, desc


def _find(desc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in desc["devices"] if d["name"] == name)


@needs_qemu
def test_every_section_decodes(pc_tail: tuple[bytes, dict[str, Any]]) -> None:
    state, desc = pc_tail
    devices = parse_device_state(state, desc)
    assert devices["bytes"] == len(state) and devices["page_size"] == 4096
    secs = devices["sections"]
    assert [(s["name"], s["instance_id"]) for s in secs] == [(d["name"], d["instance_id"]) for d in desc["devices"]]
    # the sections, their 18-byte+ headers and footers account for every byte before EOF
    overhead = sum(1 + 4 + 1 + len(s["name"]) + 4 + 4 + 1 + 4 for s in secs)
    assert sum(s["size"] for s in secs) + overhead + 1 == len(state)
    json.dumps(devices)  # plain JSON data
    pckbd = next(s for s in secs if s["name"] == "pckbd")
    assert "pckbd/extended_state" in pckbd["fields"]["kbd"]["subsections"]
    fw = next(s for s in secs if s["name"] == "fw_cfg")
    assert set(fw["fields"]["subsections"]) == {"fw_cfg/dma", "fw_cfg/acpi_mr"}
    assert all(isinstance(v, int) for v in next(s for s in secs if s["name"] == "cpu")["fields"]["env.regs"])


@needs_qemu
def test_wrong_size_in_vmdesc(pc_tail: tuple[bytes, dict[str, Any]]) -> None:
    state, desc = pc_tail
    bad = copy.deepcopy(desc)
    segs = next(f for f in _find(bad, "cpu")["fields"] if f["name"] == "env.segs")
    segs["size"] = 24  # one segment is 20 bytes
    with pytest.raises(RemoteProtocolError, match=r"^device state: struct cpu\.env\.segs\[0\] took 20 bytes,"
                                                  r" expected 24 \(its vmdesc size\)$"):
        parse_device_state(state, bad)


@needs_qemu
def test_subsection_missing_from_vmdesc(pc_tail: tuple[bytes, dict[str, Any]]) -> None:
    state, desc = pc_tail
    bad = copy.deepcopy(desc)
    del _find(bad, "fw_cfg")["subsections"]
    with pytest.raises(RemoteProtocolError, match=r"^device state: received 0x05 after section 'fw_cfg' \(\d+ bytes\),"
                                                  r" expected its footer 0x7e$"):
        parse_device_state(state, bad)


@needs_qemu
def test_unknown_device(pc_tail: tuple[bytes, dict[str, Any]]) -> None:
    state, desc = pc_tail
    bad = copy.deepcopy(desc)
    bad["devices"] = [d for d in bad["devices"] if d["name"] != "hpet"]
    with pytest.raises(RemoteProtocolError, match=r"^device state: received section 'hpet' instance 0,"
                                                  r" expected one the vmdesc describes$"):
        parse_device_state(state, bad)


@needs_qemu
def test_cut_device_state(pc_tail: tuple[bytes, dict[str, Any]]) -> None:
    state, desc = pc_tail
    with pytest.raises(RemoteProtocolError,
                       match=r"^device state: received \d+ bytes at offset \d+ for .*, expected \d+$"):
        parse_device_state(state[:5000], desc)
    with pytest.raises(RemoteProtocolError, match=r"^device state: received 5000 bytes ending in 0x[0-9a-f]{2} and no"
                                                  r" vmdesc, expected EOF 0x00 \(the stream was cut\)$"):
        parse_device_state(state[:4999] + b"\x01", None)
    undecoded = parse_device_state(state, None)
    assert undecoded["sections"] is None and undecoded["bytes"] == len(state)


def test_no_device_state() -> None:
    assert parse_device_state(b"", None) is None
    assert parse_device_state(b"\x00", {"page_size": 4096, "devices": []}) is None
