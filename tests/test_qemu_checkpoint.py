"""VM checkpoints with real QEMUs (issue 19): a QEMU source -> ``incoming --save FILE`` ->
``migrate --snapshot FILE`` -> a fresh QEMU destination, which must complete with the source's
RAM and take the device state as the source sent it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.snapshot.format import describe_snapshot
from qemu_support import (  # noqa: F401 - ram_image and guest_files are fixtures
    NONE_RAM, Image, compare_pages, guest_files, incoming, linux_guest, qemu_binary, qemu_peer, ram_image,
    requires_qemu,
)
from support import run_engine

pytestmark = requires_qemu


CASES = [("7.2", "none", 2, "zstd"), ("7.2", "zstd", 4, "none"), ("10.0", "none", 4, "zstd")]


@pytest.mark.parametrize("version,method,channels,save_compression", CASES,
                         ids=[f"{v}-{m}-{c}-file-{f}" for v, m, c, f in CASES])
def test_qemu_none_machine_through_a_file(tmp_path: Path, ram_image: Image, version: str, method: str,
                                          channels: int, save_compression: str) -> None:
    image, raw = ram_image
    binary = qemu_binary(version)
    snap = tmp_path / "vm.snap"
    with qemu_peer.source(tmp_path, ram_image=image, channels=channels, compression=method, binary=binary) as src:
        src.set_parameters(max_bandwidth=10 << 30)
        with incoming("--channels", str(channels), "--compression", method, "--save", str(snap),
                      "--save-compression", save_compression, "--json") as dst:
            src.migrate(dst.uri)
            assert src.wait_migration(timeout=60)["status"] == "completed"
            assert dst.wait(60) == 0, dst.stderr
    desc = describe_snapshot(snap)
    assert desc["machine"]["name"] == "none" and desc["compression"] == save_compression
    assert "globalstate" in desc["machine"]["device-sections"]
    shown = run_engine("inspect", str(snap))
    assert shown.returncode == 0 and "  machine 'none', " in shown.stdout and "globalstate" in shown.stdout
    dumped = run_engine("restore", str(snap), "--dump", str(tmp_path / "dump"))
    assert dumped.returncode == 0, dumped.stderr
    devices = json.loads((tmp_path / "dump" / "devices.json").read_text())
    assert "globalstate" in [d["name"] for d in devices["sections"]]
    assert json.loads((tmp_path / "dump" / "manifest.json").read_text())["machine"] == "none"
    # resume with other channel counts and compression than the save's
    peer, uri = qemu_peer.destination(tmp_path, memory="64M", channels=3, compression="zlib", binary=binary)
    with peer:  # no --compat: machine "none" names no version, so it speaks the saved dialect
        r = run_engine("migrate", uri, "--snapshot", str(snap), "--channels", "3", "--compression", "zlib")
        assert r.returncode == 0, r.stderr
        info = peer.wait_migration(timeout=60)
        assert info["status"] == "completed", (info, peer.log())
        compare_pages("ram", peer.pmemsave(0, NONE_RAM, tmp_path / "pmem.bin"), raw)


# ------------------------------------------------------------- a real Linux guest

#: (QEMU, wire compression and channels of the checkpoint, file compression, then the same of
#: the second hop: resumed from the first file, checkpointed again into a second one, resumed)
CHAINS = [
    ("7.2", ("none", 2, "zstd"), ("zstd", 4, "none")),
    ("7.2", ("zstd", 4, "none"), ("none", 2, "zstd")),
    ("10.0", ("none", 4, "zstd"), ("zstd", 2, "zstd")),
]


def _checkpoint(vm: qemu_peer.QemuPeer, snap: Path, hop: tuple[str, int, str]) -> None:
    """Live: the guest runs until the migration stops it (no pause before it starts)."""
    method, channels, file_compression = hop
    vm.set_multifd(channels, method, max_bandwidth=10 << 30)
    with incoming("--channels", str(channels), "--compression", method, "--save", str(snap),
                  "--save-compression", file_compression, "--json") as dst:
        assert vm.status() == "running"
        vm.migrate(dst.uri)
        assert vm.wait_migration(timeout=120)["status"] == "completed"
        assert dst.wait(60) == 0, dst.stderr
    assert dst.json()["snapshot"]["machine"].startswith("pc-i440fx-")


def _resume(peer: qemu_peer.QemuPeer, snap: Path, hop: tuple[str, int, str], compat: list[str]) -> None:
    method, channels, _ = hop
    peer.set_multifd(channels, method)
    uri = peer.migrate_incoming("tcp:127.0.0.1:0")
    r = run_engine("migrate", uri, "--snapshot", str(snap), "--channels", str(channels), "--compression", method,
                   *compat, timeout=120)
    assert r.returncode == 0, r.stderr
    assert peer.wait_migration(timeout=120)["status"] == "completed", peer.log()
    peer.execute("cont")


def _continues(serial: Path, after: int, peer: qemu_peer.QemuPeer) -> int:
    """The resumed guest's ticks go on from ``after`` (no reboot, its RAM check still ok);
    returns the last tick seen."""
    text = linux_guest.wait_serial(serial, lambda t: len(linux_guest.ticks(t)) >= 5, 60,
                                   what="5 ticks after the resume", alive=peer.alive)
    got = linux_guest.ticks(text)
    assert linux_guest.boots(text) == 0, text[-2000:]  # the kernel did not start again
    assert not linux_guest.bad_ticks(text), text[-2000:]
    assert after < got[0] <= after + 2, (after, got[:5])  # at most the line the stop cut short is lost
    assert got == list(range(got[0], got[0] + len(got))), got
    return got[-1]


@pytest.mark.slow
@pytest.mark.parametrize("version,first,second", CHAINS, ids=[f"{v}-{a[0]}{a[1]}-{b[0]}{b[1]}" for v, a, b in CHAINS])
def test_live_linux_guest_checkpointed_twice_and_resumed(tmp_path: Path, guest_files: linux_guest.GuestFiles,
                                                         version: str, first: tuple[str, int, str],
                                                         second: tuple[str, int, str]) -> None:
    """A running Linux guest -> file 1 -> a fresh QEMU, which runs on -> file 2 -> another fresh
    QEMU: at each resume the counter on the serial console continues, no second boot, and the
    guest's own check of a 32 MiB pattern in its RAM still passes."""
    binary = qemu_binary(version)
    compat = ["--compat", "10.0"] if version == "10.0" else []
    vm, serial = linux_guest.peer(tmp_path, guest_files, "vm", binary=binary)
    with vm:
        linux_guest.run_until_ticks(vm, serial)
        _checkpoint(vm, tmp_path / "one.snap", first)
        last = max(linux_guest.ticks(linux_guest.read_serial(serial)))
    # resumed from file one, it runs on and is checkpointed into file two; then resumed from that
    for name, snap, hop, then in (("second", "one.snap", second, "two.snap"), ("third", "two.snap", first, None)):
        peer, log = linux_guest.peer(tmp_path, guest_files, name, binary=binary, incoming=True)
        with peer:
            _resume(peer, tmp_path / snap, hop, compat)
            _continues(log, last, peer)
            if then is not None:
                _checkpoint(peer, tmp_path / then, hop)
                last = max(linux_guest.ticks(linux_guest.read_serial(log)))
