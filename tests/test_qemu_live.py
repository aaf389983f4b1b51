"""A live QEMU guest migrated into the engine with multifd while it dirties memory.

The guest is this project's boot sector (tests/qemu_guest/boot.S, assembled here with
binutils, or its hand-encoded copy where binutils is missing): under TCG on
``-M pc -m 150M`` it increments one byte in every 4 KiB page from 1 MiB to 100 MiB, forever.
As in QEMU's migration-test (``test_precopy_common`` with the multifd start hook, 16
channels): wait for the guest's first serial output, migrate with ``max-bandwidth`` 30 MB/s
and ``downtime-limit`` 1 ms so it cannot converge, wait for another dirty-sync pass, then
raise both (1 GB/s, 30 s) and wait for ``completed``.

Checks, after completion (the source is stopped in ``postmigrate``, its RAM frozen):

* the engine's ``pc.ram`` equals the source's whole RAMBlock. The source's RAM is a
  ``memory-backend-file`` (``share=on``) named ``pc.ram``, as QEMU's default backend is, so the
  file *is* the block, holes included;
* it equals QMP ``pmemsave`` of guest-physical memory outside the legacy hole
  ``0xa0000-0x100000`` (below 4 GiB pc.ram is identity-mapped, but in the hole guest-physical
  reads may hit VGA/SMRAM windows or the PAM-mapped BIOS instead of pc.ram);
* the guest's pattern is consistent, as migration-test checks it: the first byte of the pages
  of [1 MiB, 100 MiB) never increases from one page to the next except at most once, by one
  (the page where the vCPU was stopped).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support import read_dump
from qemu_support import (
    QemuPeer,
    boot_sector,
    compare_pages,
    incoming,
    requires_qemu,
    wait_serial,
)

pytestmark = [*requires_qemu, pytest.mark.slow, pytest.mark.timeout(240)]

GUEST_RAM = 150 << 20
LOW, HIGH = 1 << 20, 100 << 20  # the range the guest dirties
HOLE = (0xA0000, 0x100000)


def _check_pattern(ram: bytes) -> None:
    """migration-test's check_guests_ram: first bytes of the dirtied pages, at most one edge."""
    first = np.frombuffer(ram, np.uint8)[LOW:HIGH:4096].astype(np.int16)
    step = (first[:-1] - first[1:]) % 256  # 0: same pass; 1: the previous page is one pass ahead
    edges = np.flatnonzero(step != 0)
    assert len(edges) <= 1 and all(step[edges] == 1), f"inconsistent guest RAM: pass counters {first[edges]}"
    assert first.any(), "the guest never ran"


@pytest.mark.parametrize("method", ["none", "zlib", "zstd"])
def test_live_guest_to_engine(tmp_path: Path, method: str) -> None:
    channels = 16
    boot = boot_sector(tmp_path)
    serial = tmp_path / "serial.txt"
    backing = tmp_path / "pc.ram"
    dump = tmp_path / "dst"
    extra = [
        "-drive", f"file={boot},format=raw,if=ide",
        "-object", f"memory-backend-file,id=pc.ram,size=150M,mem-path={backing},share=on",
    ]
    with QemuPeer(tmp_path, name="guest", machine="pc,memory-backend=pc.ram", memory="150M", paused=False,
                  serial=serial, extra_args=extra) as src:
        wait_serial(serial, b"A", peer=src)
        src.set_multifd(channels, method, max_bandwidth=30_000_000, downtime_limit=1)
        with incoming("--channels", str(channels), "--compression", method, "--json", "--dump", str(dump)) as dst:
            src.migrate(dst.uri)
            first = src.wait_dirty_sync(2, timeout=90)
            assert first["status"] == "active"
            passes = src.wait_dirty_sync(first["ram"]["dirty-sync-count"] + 1, timeout=90)
            assert passes["status"] == "active", "converged while it should not have"
            src.set_parameters(max_bandwidth=1_000_000_000, downtime_limit=30_000)
            info = src.wait_migration(timeout=120)
            assert info["status"] == "completed", info
            assert dst.wait(120) == 0, dst.stderr
        assert src.status() == "postmigrate"
        low = src.pmemsave(0, HOLE[0], tmp_path / "low.bin")
        high = src.pmemsave(HOLE[1], GUEST_RAM - HOLE[1], tmp_path / "high.bin")
        whole = backing.read_bytes()
    assert b"B" in serial.read_bytes(), "the guest did not complete 64 passes"

    blocks = read_dump(dump)
    ram = blocks["pc.ram"]
    compare_pages("pc.ram vs the source's RAMBlock", ram, whole)
    compare_pages("pc.ram below 640K vs pmemsave", ram[:HOLE[0]], low)
    compare_pages("pc.ram above 1M vs pmemsave", ram[HOLE[1]:], high)
    _check_pattern(ram)

    out = dst.json()
    assert out["status"] == "completed" and len(out["channels"]) == channels
    # many ram sections went by while the guest ran: one sync barrier each
    assert out["ram"]["dirty-sync-count"] >= info["ram"]["dirty-sync-count"] + 2
    assert out["ram"]["normal"] > GUEST_RAM // 4096 // 2  # many pages arrived more than once
    devices = json.loads((dump / "devices.json").read_text())
    names = [s["name"] for s in devices["sections"]]
    assert "serial" in names and "cpu" in names and len(names) == 31
    glob = next(s for s in devices["sections"] if s["name"] == "globalstate")
    assert bytes.fromhex(glob["fields"]["runstate"]).rstrip(b"\0") == b"running"
    cpu = next(s for s in devices["sections"] if s["name"] == "cpu")
    assert 0x7C00 <= cpu["fields"]["env.eip"] < 0x7E00  # stopped inside the boot sector's loop
