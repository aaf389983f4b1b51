"""Interop with a real QEMU 7.2, both directions, byte-exact (wire doc sections 5.8 and 8).

QEMU source -> engine destination: a CPU-less ``-M none -m 64M -mem-path IMAGE`` source whose
RAM is a known image; the engine's dumped ``ram`` block must equal the image, and the device
sections after RAM must come out of devices.json. Engine source -> QEMU destination: QEMU's RAM,
read back with ``pmemsave``, must equal the image the engine sent.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.wire.packet import MultiFDInit, encode_packet_header, MULTIFD_FLAG_SYNC
from qemu_support import (
    engine_into_qemu,
    qemu_into_engine,
    NONE_RAM,
    QemuPeer,
    compare_pages,
    host_port,
    incoming,
    qemu_peer,
    read_line,
    Image,
    ram_image,  # noqa: F401 - fixture
    requires_qemu,
    run_py,
)
from support import ROOT, read_dump, run_engine

pytestmark = requires_qemu

MATRIX = [("none", 1), ("none", 2), ("zlib", 3), ("zstd", 4)]


def _zero_pages(raw: bytes) -> int:
    return int((~np.frombuffer(raw, np.uint64).reshape(-1, 512).any(axis=1)).sum())


def _runstate(devices: dict[str, Any]) -> str:
    glob = next(s for s in devices["sections"] if s["name"] == "globalstate")
    return bytes.fromhex(glob["fields"]["runstate"]).rstrip(b"\0").decode()


@pytest.mark.parametrize("method,channels", MATRIX, ids=[f"{m}-{c}" for m, c in MATRIX])
def test_qemu_source_to_engine(tmp_path: Path, ram_image: Image, method: str, channels: int) -> None:
    image, raw = ram_image
    dump = tmp_path / "dst"
    dst, state = qemu_into_engine(tmp_path, image, method, channels, dump)
    assert state == "postmigrate"
    compare_pages("ram", read_dump(dump)["ram"], raw)
    out = dst.json()
    assert out["status"] == "completed"
    assert out["ram"]["total"] == NONE_RAM
    assert len(out["channels"]) == channels
    assert out["ram"]["duplicate"] >= _zero_pages(raw)  # zero pages arrive as ZERO records on main
    assert out["ram"]["normal"] >= NONE_RAM // 4096 - _zero_pages(raw)
    assert out["ram"]["dirty-sync-count"] >= 3  # START, PART(s), END: one sync round each

    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["machine"] == "none"
    assert manifest["devices"] == "devices.json"
    devices = json.loads((dump / "devices.json").read_text())
    assert [s["name"] for s in devices["sections"]] == ["timer", "globalstate"]
    assert _runstate(devices) in ("prelaunch", "paused")
    timer = devices["sections"][0]
    assert timer["version_id"] == 2 and set(timer["fields"]) == {"cpu_ticks_offset", "unused", "cpu_clock_offset"}


@pytest.mark.parametrize("method,channels", MATRIX, ids=[f"{m}-{c}" for m, c in MATRIX])
def test_engine_source_to_qemu(tmp_path: Path, ram_image: Image, method: str, channels: int) -> None:
    image, raw = ram_image
    r, got = engine_into_qemu(tmp_path, image, method, channels, "--machine", "none", "--json")
    compare_pages("QEMU destination RAM", got, raw)
    out = json.loads(r.stdout)
    assert out["status"] == "completed" and len(out["channels"]) == channels


def test_engine_source_uuid_to_qemu(tmp_path: Path, ram_image: Image) -> None:
    """--uuid goes into every channel handshake; a QEMU destination with that -uuid accepts it."""
    image, raw = ram_image
    uuid = "12345678-9abc-def0-1234-56789abcdef0"
    peer, uri = qemu_peer.destination(tmp_path, channels=2, uuid=uuid)
    with peer:
        r = run_engine("migrate", uri, "--ram-image", f"ram={image}", "--channels", "2", "--uuid", uuid)
        assert r.returncode == 0, r.stderr
        assert peer.wait_migration(timeout=60)["status"] == "completed"
        compare_pages("QEMU destination RAM", peer.pmemsave(0, NONE_RAM, tmp_path / "pmem.bin"), raw)


def test_qemu_pc_machine_to_engine(tmp_path: Path) -> None:
    """``-M pc``: six RAM blocks and 30 device sections (decoded through the vmdesc), and the
    legacy holes: guest-physical 0xa0000-0x100000 is not pc.ram on a fresh (-S) PC."""
    dump = tmp_path / "dst"
    with QemuPeer(tmp_path, name="pc", machine="pc", memory="64M") as src:
        src.set_multifd(2, "none", max_bandwidth=10 << 30)
        with incoming("--channels", "2", "--json", "--dump", str(dump)) as dst:
            src.migrate(dst.uri)
            assert src.wait_migration(timeout=60)["status"] == "completed"
            assert dst.wait(60) == 0, dst.stderr
        low = src.pmemsave(0, 0xA0000, tmp_path / "low.bin")
        high = src.pmemsave(0x100000, (64 << 20) - 0x100000, tmp_path / "high.bin")
        bios = src.pmemsave(0x1_0000_0000 - (256 << 10), 256 << 10, tmp_path / "bios.bin")
        isa_bios = src.pmemsave(0xE0000, 0x20000, tmp_path / "isa-bios.bin")
    blocks = read_dump(dump)
    assert list(blocks) == ["pc.ram", "/rom@etc/acpi/tables", "pc.bios", "pc.rom", "/rom@etc/table-loader",
                            "/rom@etc/acpi/rsdp"]
    compare_pages("pc.ram below 640K", blocks["pc.ram"][:0xA0000], low)
    compare_pages("pc.ram above 1M", blocks["pc.ram"][0x100000:], high)
    compare_pages("pc.bios (mapped below 4G)", blocks["pc.bios"], bios)
    # the hole: at reset 0xe0000-0xfffff shows the BIOS's last 128K (PAM), not pc.ram
    compare_pages("0xe0000-0x100000 (isa-bios)", blocks["pc.bios"][-0x20000:], isa_bios)
    assert blocks["pc.ram"][0xE0000:0x100000] != isa_bios
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["machine"] == "pc-i440fx-7.2"
    devices = json.loads((dump / "devices.json").read_text())
    names = [s["name"] for s in devices["sections"]]
    assert len(names) == 30, names
    for name in ("timer", "cpu_common", "cpu", "apic", "fw_cfg", "0000:00:00.0/I440FX", "ioapic", "hpet",
                 "mc146818rtc", "fdc", "0000:00:01.1/ide", "0000:00:01.3/piix4_pm", "globalstate"):
        assert name in names
    assert names.count("dma") == names.count("i8259") == 2
    cpu = next(s for s in devices["sections"] if s["name"] == "cpu")
    assert len(cpu["fields"]["env.regs"]) == 16
    assert cpu["fields"]["env.eip"] == 0xFFF0  # the reset vector: the CPU never ran
    assert len(cpu["fields"]["env.segs"]) == 6
    fdc = next(s for s in devices["sections"] if s["name"] == "fdc")
    drives = fdc["fields"]["state"]["drives"]
    assert len(drives) == 2 and "fdrive/media_rate" in drives[0]["subsections"]
    assert _runstate(devices) == "prelaunch"
    assert sum(s["size"] for s in devices["sections"]) < devices["bytes"]


def test_page_records_on_main(tmp_path: Path, ram_image: Image) -> None:
    """PAGE records on the main channel, from real QEMU bytes: a non-multifd QEMU stream
    (every non-zero page is a PAGE record) replayed into an engine destination whose two
    channels carry nothing but one SYNC packet per EOS (a legal multifd migration)."""
    image, raw = ram_image
    capture = tmp_path / "main.bin"
    with QemuPeer(tmp_path, name="src", mem_path=image) as src:
        src.set_parameters(max_bandwidth=10 << 30)
        src.migrate(f"exec:cat > {capture}")
        assert src.wait_migration(timeout=60)["status"] == "completed"
    summary = json.loads(run_py("-m", "engine", "inspect", "--json", str(capture)).stdout)["files"][0]
    records = summary["ram_records"]
    assert records["page"] == NONE_RAM // 4096 - _zero_pages(raw) and records["zero_pages"] == _zero_pages(raw)
    stream = capture.read_bytes()
    dump = tmp_path / "dst"
    with incoming("--channels", "2", "--json", "--dump", str(dump)) as dst:
        addr = host_port(dst.uri)
        socks = [socket.create_connection(addr, timeout=10)]
        try:
            socks[0].sendall(stream[:8])  # the main channel first, as QEMU 7.2 does
            for ch in range(2):
                s = socket.create_connection(addr, timeout=10)
                socks.append(s)
                syncs = b"".join(encode_packet_header(flags=MULTIFD_FLAG_SYNC, packet_num=i * 2 + ch)
                                 for i in range(records["eos"]))
                s.sendall(MultiFDInit(ch).pack() + syncs)
            socks[0].sendall(stream[8:])
            for s in socks:
                s.shutdown(socket.SHUT_WR)
            assert dst.wait(60) == 0, dst.stderr
        finally:
            for s in socks:
                s.close()
    compare_pages("ram", read_dump(dump)["ram"], raw)
    out = dst.json()
    assert out["ram"]["normal"] == records["page"]
    assert all(c["normal_pages"] == 0 for c in out["channels"])


def test_qemu_peer_cli(tmp_path: Path, ram_image: Image) -> None:
    """scripts/qemu_peer.py from the command line, both roles, against the engine."""
    image, raw = ram_image
    dump = tmp_path / "dst"
    with incoming("--channels", "3", "--compression", "zstd", "--dump", str(dump)) as dst:
        r = run_py(str(ROOT / "scripts" / "qemu_peer.py"), "source", dst.uri, "--ram-image", str(image),
                   "--channels", "3", "--compression", "zstd", "--max-bandwidth", str(10 << 30),
                   "--workdir", str(tmp_path / "q1"), "--timeout", "60", timeout=90)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "completed"
        assert dst.wait(60) == 0, dst.stderr
    compare_pages("ram", read_dump(dump)["ram"], raw)

    out = tmp_path / "pmem.bin"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "qemu_peer.py"), "destination", "--channels", "2",
         "--compression", "zlib", "--pmemsave", str(out), "--workdir", str(tmp_path / "q2"), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = read_line(proc, "qemu_peer: listening on ", timeout=30)
        uri = line.split()[-1]
        r = run_engine("migrate", uri, "--ram-image", f"ram={image}", "--channels", "2", "--compression", "zlib")
        assert r.returncode == 0, r.stderr
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "completed"
    compare_pages("QEMU destination RAM", out.read_bytes(), raw)
