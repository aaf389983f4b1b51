"""VM checkpoints with real QEMUs (issue 19): a QEMU source -> ``incoming --save FILE`` ->
``migrate --snapshot FILE`` -> a fresh QEMU destination, which must complete with the source's
RAM and take the device state as the source sent it."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.snapshot.format import describe_snapshot
from qemu_support import (  # noqa: F401 - ram_image is a fixture
    NONE_RAM, Image, compare_pages, incoming, qemu_peer, ram_image, requires_qemu,
)
from support import ROOT, run_engine

QEMU10 = ROOT / ".qemu" / "10.0" / "qemu-system-x86_64"
pytestmark = requires_qemu


def _binary(version: str) -> str | None:
    if version == "7.2":
        return None
    if not QEMU10.exists():
        pytest.skip("QEMU 10.0 is not installed (scripts/install-qemu10)")
    return str(QEMU10)


CASES = [("7.2", "none", 2, "zstd"), ("7.2", "zstd", 4, "none"), ("10.0", "none", 4, "zstd")]


@pytest.mark.parametrize("version,method,channels,save_compression", CASES,
                         ids=[f"{v}-{m}-{c}-file-{f}" for v, m, c, f in CASES])
def test_qemu_none_machine_through_a_file(tmp_path: Path, ram_image: Image, version: str, method: str,
                                          channels: int, save_compression: str) -> None:
    image, raw = ram_image
    binary = _binary(version)
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
    # resume with other channel counts and compression than the save's
    peer, uri = qemu_peer.destination(tmp_path, memory="64M", channels=3, compression="zlib", binary=binary)
    with peer:
        compat = ["--compat", "10.0"] if version == "10.0" else []
        r = run_engine("migrate", uri, "--snapshot", str(snap), "--channels", "3", "--compression", "zlib", *compat)
        assert r.returncode == 0, r.stderr
        info = peer.wait_migration(timeout=60)
        assert info["status"] == "completed", (info, peer.log())
        compare_pages("ram", peer.pmemsave(0, NONE_RAM, tmp_path / "pmem.bin"), raw)
