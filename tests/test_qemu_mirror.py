"""QEMU 7.2's own multifd tests (tests/qtest/migration-test.c, wire doc section 7), mirrored.

``/migration/multifd/tcp/plain/{none,zlib,zstd}``: 16 channels on both sides, the same
compression, a complete byte-exact migration, in both directions (the live-guest variant of
QEMU -> engine is in test_qemu_live.py). ``/migration/multifd/tcp/plain/cancel``: the source
cancels mid-way; the destination must fail (the engine: a non-zero exit with one clear line,
no shared memory or child process left); a second migration to a fresh destination completes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qemu_support import (
    NONE_RAM,
    assert_error,
    compare_pages,
    descendants,
    incoming,
    qemu_peer,
    Image,
    ram_image,  # noqa: F401 - fixture
    requires_qemu,
    shm_of,
    wait_gone,
)
from support import read_dump, run_engine

pytestmark = requires_qemu

CHANNELS = 16
METHODS = ["none", "zlib", "zstd"]


@pytest.mark.parametrize("method", METHODS)
def test_plain_qemu_to_engine(tmp_path: Path, ram_image: Image, method: str) -> None:
    image, raw = ram_image
    dump = tmp_path / "dst"
    with qemu_peer.source(tmp_path, ram_image=image, channels=CHANNELS, compression=method) as src:
        src.set_parameters(max_bandwidth=10 << 30)
        with incoming("--channels", str(CHANNELS), "--compression", method, "--json", "--dump", str(dump)) as dst:
            src.migrate(dst.uri)
            assert src.wait_migration(timeout=90)["status"] == "completed"
            assert dst.wait(90) == 0, dst.stderr
    compare_pages("ram", read_dump(dump)["ram"], raw)
    assert len(dst.json()["channels"]) == CHANNELS


@pytest.mark.parametrize("method", METHODS)
def test_plain_engine_to_qemu(tmp_path: Path, ram_image: Image, method: str) -> None:
    image, raw = ram_image
    peer, uri = qemu_peer.destination(tmp_path, channels=CHANNELS, compression=method)
    with peer:
        r = run_engine("migrate", uri, "--ram-image", f"ram={image}", "--channels", str(CHANNELS),
                       "--compression", method, timeout=90)
        assert r.returncode == 0, r.stderr
        assert peer.wait_migration(timeout=90)["status"] == "completed", peer.log()
        compare_pages("QEMU destination RAM", peer.pmemsave(0, NONE_RAM, tmp_path / "pmem.bin"), raw)


def test_plain_cancel(tmp_path: Path, ram_image: Image) -> None:
    image, raw = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=CHANNELS) as src:
        # not converging: ~43 MB of non-zero pages at 10 MB/s
        src.set_parameters(max_bandwidth=10_000_000, downtime_limit=1)
        with incoming("--channels", str(CHANNELS), "--json", "--dump", str(tmp_path / "dst1")) as dst:
            src.migrate(dst.uri)
            engine_pid = dst.proc.pid
            deadline = time.monotonic() + 30
            while True:  # mid-way: the engine has its 16 channel processes, some RAM has gone over
                kids = descendants(engine_pid)
                info = src.query_migrate()
                if len(kids) >= CHANNELS and info["ram"]["transferred"] > 4_000_000:
                    break
                assert time.monotonic() < deadline, (kids, info)
                time.sleep(0.05)
            assert info["status"] == "active", info
            src.execute("migrate_cancel")
            rc = dst.wait(30)
            assert rc == 1, (rc, dst.stderr)
            assert_error(
                dst.stderr,
                r"main channel: connection closed by the source before the end of the migration,"
                r" in ram section \d+ \((START|PART)\): end of stream inside .* at byte \d+"
                r" \(received \d+ of \d+ bytes\)"
                r"|multifd channel \d+ \(destination\): .*connection closed.*",
            )
            assert src.wait_migration(["cancelled"], timeout=30)["status"] == "cancelled"
        assert wait_gone(kids) == set(), "the cancelled engine left channel processes behind"
        assert shm_of(engine_pid) == [], "the cancelled engine left shared memory behind"
        assert not (tmp_path / "dst1" / "manifest.json").exists()

        # a second migration, to a fresh destination, converging
        src.set_parameters(max_bandwidth=10 << 30, downtime_limit=300)
        with incoming("--channels", str(CHANNELS), "--json", "--dump", str(tmp_path / "dst2")) as dst2:
            src.migrate(dst2.uri)
            assert src.wait_migration(["completed"], timeout=90)["status"] == "completed"
            assert dst2.wait(90) == 0, dst2.stderr
    compare_pages("ram", read_dump(tmp_path / "dst2")["ram"], raw)
    assert json.loads(dst2.stdout)["status"] == "completed"
