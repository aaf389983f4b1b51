"""Snapshots to files: byte-exact round trips, sparse files, live saves with a running guest.

Real processes, real files, real shared memory; no mocks.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from engine import BlockSpec, GuestRam, MigrationParams
from engine.compression import method_names
from engine.memory.dirty import ChecksumTracker, DirtyLog
from engine.errors import ChannelError, MigrationCancelled, MigrationError
from engine.memory.ram import block_digest
from engine.memory.workload import fill_pages
from engine.snapshot.jobs import SnapshotRestore, SnapshotSave, restore, save
from engine.snapshot.format import HEADER_SIZE, MAGIC, describe_snapshot, open_snapshot, read_snapshot
from engine.memory.workload import Workload, WorkloadSpec
from support import wait_for

PAGE = 4096
# Rounds of ~0.5 s on a 2 MiB guest: a writer running flat out certainly dirties pages during each
# one, however busy the machine, so a downtime-limit of 0 is never met (the tests need that).
SLOW = 4 << 20
# a block that is not a whole number of 1 MiB regions, names with '/', an all-zero block
BLOCKS = [("pc.ram", (3 << 20) + 3 * PAGE), ("/rom@etc/acpi/tables", 128 << 10), ("vga/vram", 1 << 20),
          ("zero/block", 256 << 10)]


def make_guest(blocks: list[tuple[str, int]] = BLOCKS, fill: str = "mixed") -> GuestRam:
    ram = GuestRam.create([BlockSpec(n, s) for n, s in blocks])
    try:
        for i, b in enumerate(ram):
            if not b.name.startswith("zero"):
                fill_pages(b, fill, seed=i)
    except BaseException:
        ram.close()
        raise
    return ram


@contextmanager
def running_guest(size: int = 2 << 20) -> Iterator[tuple[GuestRam, DirtyLog, Workload]]:
    """A one-block guest with a writer running flat out (and already writing), and its dirty log."""
    with make_guest([("pc.ram", size)]) as ram:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=0, writers=1), log) as guest:
            wait_for(lambda: guest.pages_written() > 100, 10, "the writer to start")
            yield ram, log, guest


def digests(ram: GuestRam) -> dict[str, str]:
    return {b.name: block_digest(b) for b in ram}


def assert_same(a: GuestRam, b: GuestRam) -> None:
    assert [x.spec for x in a] == [x.spec for x in b]
    for x, y in zip(a, b):
        bad = np.flatnonzero((x.pages != y.pages).any(axis=1))
        assert not len(bad), f"block {x.name!r}: {len(bad)} pages differ, first at page {bad[0]}"


@pytest.mark.parametrize("channels", [1, 2, 4], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("method", method_names())
def test_round_trip_byte_exact(tmp_path: Path, method: str, channels: int) -> None:
    path = tmp_path / "guest.snap"
    with make_guest() as ram:
        stats = save(path, ram, MigrationParams(channels=channels, compression=method), fsync=False, timeout=60)
        assert stats.status == "completed"
        total = ram.total_size // PAGE
        assert stats.ram.normal + stats.ram.duplicate == total
        assert stats.ram.duplicate >= (256 << 10) // PAGE  # the zero block at least
        assert len(stats.channels) == channels
        job = SnapshotRestore(path, channels=channels)
        with job.run() as back:
            assert_same(ram, back)
        assert job.stats.status == "completed"
        assert job.stats.ram.normal == stats.ram.normal
    desc = describe_snapshot(path)
    assert desc["status"] == "complete" and desc["compression"] == method
    assert [b["name"] for b in desc["blocks"]] == [n for n, _ in BLOCKS]
    assert desc["blocks"][3]["present-pages"] == 0


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_mostly_zero_guest_gives_a_small_file(tmp_path: Path, method: str) -> None:
    path = tmp_path / "zero.snap"
    with GuestRam.create([BlockSpec("pc.ram", 64 << 20)]) as ram:
        pages = ram["pc.ram"].pages
        pages[[5, 700, 16000]] = 0xAB
        stats = save(path, ram, MigrationParams(channels=2, compression=method), fsync=False)
        assert stats.ram.normal == 3 and stats.ram.duplicate == 16384 - 3
        st = os.stat(path)
        assert st.st_blocks * 512 < 256 << 10, f"{st.st_blocks * 512} bytes on disk"
        if method == "none":  # holes: the apparent size is the guest's (fixed places) ...
            assert st.st_size > 64 << 20
        else:  # ... a compressed file is small either way
            assert st.st_size < 256 << 10
        assert stats.extra["disk-usage"] == st.st_blocks * 512
        with restore(path, channels=2) as back:
            assert_same(ram, back)


def test_file_size_follows_content(tmp_path: Path) -> None:
    sizes = {}
    for fill in ("zero", "mixed", "random"):
        with GuestRam.create([BlockSpec("pc.ram", 8 << 20)]) as ram:
            fill_pages(ram.blocks[0], fill)
            for method in ("none", "zstd"):
                path = tmp_path / f"{fill}-{method}.snap"
                save(path, ram, MigrationParams(compression=method), fsync=False)
                sizes[fill, method] = os.stat(path).st_blocks * 512
    assert sizes["zero", "none"] < sizes["mixed", "none"] < sizes["random", "none"]
    assert sizes["mixed", "zstd"] < sizes["mixed", "none"] * 0.7
    assert sizes["random", "zstd"] <= sizes["random", "none"] * 1.01


def test_restore_into_existing_ram_zeroes_absent_pages(tmp_path: Path) -> None:
    path = tmp_path / "g.snap"
    with make_guest() as ram, make_guest(fill="random") as target:
        for b in target:
            b.pages[:] = 0x5A  # the zero block too
        save(path, ram, MigrationParams(channels=2, compression="lz4"), fsync=True)
        assert restore(path, channels=3, into=target) is target
        assert_same(ram, target)


@pytest.mark.slow
@pytest.mark.parametrize("method", method_names())
def test_live_save_matches_ram_at_stop_and_copy(tmp_path: Path, method: str) -> None:
    """Writers dirtying a hot set; iterations forced, then converged: file == RAM when paused."""
    path = tmp_path / "live.snap"
    with make_guest([("pc.ram", 16 << 20), ("vga/vram", 1 << 20)]) as ram:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=8 << 20, pattern="hotset", writers=2, seed=3), log) as guest:
            wait_for(lambda: guest.pages_written() > 200, 10, "the writers to start")
            params = MigrationParams(channels=3, compression=method, downtime_limit=0, max_iterations=1000,
                                     max_bandwidth=32 << 20)
            with SnapshotSave(path, ram, params, tracker=log, guest=guest, fsync=False) as sv:
                wait_for(lambda: sv.stats.ram.dirty_sync_count >= 4 or sv.done, 60, "4 iterations")
                assert sv.query()["status"] in ("active", "device", "completed")
                sv.set_parameters(downtime_limit=60_000)
                stats = sv.wait(60)
            assert guest.paused  # the guest stays paused after stop-and-copy, as after migrate
            frozen = digests(ram)
            q = sv.query()
            assert stats.status == "completed" and stats.ram.dirty_sync_count >= 4
            assert len(q["iterations"]) >= 3 and q["iterations"][1]["pages"] < q["iterations"][0]["pages"]
            assert stats.ram.normal + stats.ram.duplicate > ram.total_size // PAGE  # pages rewritten in place
            with restore(path, channels=2) as back:
                _explain_difference(ram, back)  # names the first differing page and word, if any
                assert digests(back) == frozen
    # the header counts the precopy iterations, plus the stop-and-copy round when it had pages
    # to write: the writers may dirty none between the last sync and the pause
    assert describe_snapshot(path)["iterations"] - len(q["iterations"]) in (0, 1)


def _explain_difference(ram: GuestRam, back: GuestRam) -> None:
    """Fail with the first page that differs between RAM and what was restored, its words and
    both values: a writer stamp ((writer + 1) << 48 | n) in RAM means the save missed a write,
    anything else means something outside the test wrote into one of them (seen once, not
    reproduced in about 2,200 runs under load)."""
    for x, y in zip(ram, back):
        bad = np.flatnonzero((x.pages != y.pages).any(axis=1))
        if len(bad):
            p = int(bad[0])
            w = np.flatnonzero(x.words[p] != y.words[p])
            pytest.fail(f"{x.name}: {len(bad)} pages differ, first {p} (region {p // 256}), words {w.tolist()}:"
                        f" RAM {[hex(int(v)) for v in x.words[p][w]]} file {[hex(int(v)) for v in y.words[p][w]]}")


@pytest.mark.slow
def test_live_save_with_checksum_tracker(tmp_path: Path) -> None:
    path = tmp_path / "ck.snap"
    with make_guest([("pc.ram", 8 << 20)]) as ram:
        tracker = ChecksumTracker(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=16 << 20, writers=1), log=None) as guest:
            wait_for(lambda: guest.pages_written() > 100, 10, "the writer to start")
            params = MigrationParams(channels=2, downtime_limit=0, max_iterations=1000, max_bandwidth=16 << 20)
            with SnapshotSave(path, ram, params, tracker=tracker, guest=guest) as sv:
                wait_for(lambda: sv.stats.ram.dirty_sync_count >= 3 or sv.done, 60, "3 iterations")
                sv.set_parameters(downtime_limit=60_000)
                sv.wait(60)
            frozen = digests(ram)
            with restore(path) as back:
                assert digests(back) == frozen


@pytest.mark.slow
def test_not_converging_fails_removes_the_file_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "nc.snap"
    with running_guest() as (ram, log, guest):
        params = MigrationParams(channels=2, downtime_limit=0, max_iterations=3, max_bandwidth=SLOW)
        with SnapshotSave(path, ram, params, tracker=log, guest=guest) as sv:
            with pytest.raises(MigrationError) as err:
                sv.wait(60)
        assert str(err.value).startswith("snapshot save did not converge after 3 iterations (max-iterations): ")
        assert "downtime-limit 0 ms" in str(err.value)
        assert sv.status == "failed" and not guest.paused
        assert not path.exists()


@pytest.mark.slow
def test_cancel_removes_the_file_and_the_guest_keeps_running(tmp_path: Path) -> None:
    path = tmp_path / "cancel.snap"
    with running_guest() as (ram, log, guest):
        params = MigrationParams(channels=2, downtime_limit=0, max_iterations=100_000, max_bandwidth=SLOW)
        sv = SnapshotSave(path, ram, params, tracker=log, guest=guest).start()
        wait_for(lambda: sv.stats.ram.dirty_sync_count >= 2, 30, "2 iterations")
        assert path.exists()
        sv.cancel()
        with pytest.raises(MigrationCancelled, match="^snapshot save cancelled$"):
            sv.wait(30)
        assert sv.status == "cancelled" and not guest.paused and not path.exists()
        before = guest.pages_written()
        wait_for(lambda: guest.pages_written() > before, 10, "the guest to keep running")


@pytest.mark.slow
def test_a_killed_channel_fails_the_save(tmp_path: Path) -> None:
    path = tmp_path / "killed.snap"
    with running_guest() as (ram, log, guest):
        params = MigrationParams(channels=2, downtime_limit=0, max_iterations=100_000, max_bandwidth=SLOW)
        with SnapshotSave(path, ram, params, tracker=log, guest=guest) as sv:
            wait_for(lambda: sv.stats.ram.dirty_sync_count >= 2, 30, "2 iterations")
            assert sv._channels is not None
            pid = sv._channels.group.pids[1]
            os.kill(pid, 9)
            with pytest.raises(ChannelError) as err:
                sv.wait(30)
        assert str(err.value) == f"snapshot channel 1 (save): process {pid} was killed by signal 9"
        assert not path.exists() and not guest.paused


def test_save_overwrites_and_reports_the_file(tmp_path: Path) -> None:
    path = tmp_path / "over.snap"
    path.write_bytes(b"x" * 100_000)
    with make_guest([("pc.ram", 1 << 20)]) as ram:
        with SnapshotSave(path, ram, MigrationParams(channels=1)) as sv:
            sv.wait(30)
        q = sv.query()
    assert q["status"] == "completed" and q["file"] == str(path) and q["format-version"] == 2
    assert q["file-size"] == os.stat(path).st_size
    assert path.read_bytes()[:8] == MAGIC
    fd = open_snapshot(path)
    try:
        snap = read_snapshot(path, fd)
    finally:
        os.close(fd)
    assert snap.header.committed and snap.header.meta_offset == HEADER_SIZE + (1 << 20)


def test_save_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "x.snap"
    with make_guest([("pc.ram", 1 << 20)]) as ram:
        with pytest.raises(MigrationError) as err:
            save(path, ram)
    assert str(err.value) == f"snapshot {path}: cannot create: No such file or directory"


@pytest.mark.slow
def test_max_bandwidth_limits_the_rounds_before_stop_and_copy(tmp_path: Path) -> None:
    with make_guest([("pc.ram", 8 << 20)], fill="random") as ram:
        t0 = time.monotonic()
        stats = save(tmp_path / "bw.snap", ram, MigrationParams(channels=2, max_bandwidth=16 << 20), fsync=False)
        took = time.monotonic() - t0
    assert stats.ram.multifd_bytes == 8 << 20
    assert took >= 0.35, f"8 MiB at 16 MiB/s took {took:.2f}s"  # 0.5 s minus one 100 ms burst per channel
