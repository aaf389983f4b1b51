"""Live precopy: a running guest, dirty tracking, convergence, limits, cancel. Real processes.

All slow (seconds of running guests each); the fast tier's live case is in test_api.py."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from engine import BlockSpec, GuestRam, MigrationParams
from engine.memory.dirty import ChecksumTracker, DirtyLog
from engine.errors import MigrationCancelled, MigrationError
from engine.source.migration import Migration
from engine.memory.ram import block_digest
from engine.memory.workload import fill_pages
from engine.memory.workload import Workload, WorkloadSpec
from support import ROOT, Incoming, _env, engine_cmd, start_source, wait_for, wait_receiving

pytestmark = pytest.mark.slow


def _guest(size: int = 16 << 20, blocks: int = 2) -> GuestRam:
    specs = [BlockSpec("pc.ram", size)] + [BlockSpec(f"extra{i}", 1 << 20) for i in range(blocks - 1)]
    ram = GuestRam.create(specs)
    for i, b in enumerate(ram):
        fill_pages(b, "mixed", seed=i)
    return ram


def _digests(ram: GuestRam) -> dict[str, str]:
    return {b.name: block_digest(b) for b in ram}


@pytest.mark.parametrize("seed", range(6))
def test_no_write_is_lost(seed: int) -> None:
    """Several writers at full speed; forced to iterate, then converged: dest == final source."""
    pattern = ["uniform", "hotset", "sequential"][seed % 3]
    with _guest() as ram, Incoming("tcp:127.0.0.1:0", "--channels", "3", "--json", "--digest") as dst:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=0, pattern=pattern, writers=3, seed=seed), log) as guest:
            wait_for(lambda: guest.pages_written() > 1000, 10, "the writers to start")
            params = MigrationParams(channels=3, downtime_limit=0, max_iterations=1000)
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                wait_for(lambda: mig.stats.ram.dirty_sync_count >= 5 or mig.status in ("completed", "failed", "cancelled"), 60, "5 iterations")
                mig.set_parameters(downtime_limit=60_000)
                stats = mig.wait(60)
            assert guest.paused and guest.pages_written() > 0
            assert stats.status == "completed"
            assert stats.ram.dirty_sync_count >= 5
            assert dst.wait() == 0, dst.stderr
            assert dst.json()["ram-digest"] == _digests(ram)


def test_checksum_tracker_finds_unreported_writes() -> None:
    with _guest(8 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0", "--json", "--digest") as dst:
        tracker = ChecksumTracker(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=32 << 20, writers=2), log=None) as guest:
            wait_for(lambda: guest.pages_written() > 100, 10, "the writers to start")
            params = MigrationParams(channels=2, downtime_limit=0, max_iterations=1000)
            with Migration(dst.uri, ram, params, tracker=tracker, guest=guest) as mig:
                wait_for(lambda: mig.stats.ram.dirty_sync_count >= 4 or mig.status in ("completed", "failed", "cancelled"), 60, "iterations")
                mig.set_parameters(downtime_limit=60_000)
                mig.wait(60)
            assert dst.wait() == 0, dst.stderr
            assert dst.json()["ram-digest"] == _digests(ram)


def test_converges_and_reports_stats() -> None:
    with _guest(32 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0", "--channels", "2", "--json") as dst:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=4 << 20, writers=1), log) as guest:
            with Migration(dst.uri, ram, MigrationParams(channels=2), tracker=log, guest=guest) as mig:
                mig.wait(60)
                q = mig.query()
        assert dst.wait() == 0
    assert q["status"] == "completed"
    for key in ["total-time", "setup-time", "downtime", "expected-downtime"]:
        assert isinstance(q[key], int)
    for key in ["transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate",
                "mbps", "dirty-sync-count", "pages-per-second", "multifd-bytes"]:
        assert key in q["ram"], key
    assert q["ram"]["remaining"] == 0
    assert q["iterations"][0]["pages"] == (32 << 20) // 4096
    assert q["ram"]["dirty-sync-count"] == len(q["iterations"]) + 2  # setup + one per iteration + stop-and-copy
    assert [c["id"] for c in q["channels"]] == [0, 1]


def test_fails_when_not_converging() -> None:
    with _guest(8 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0") as dst:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=0, writers=2), log) as guest:
            wait_for(lambda: guest.pages_written() > 1000, 10, "the writers to start")
            # max-bandwidth makes each iteration last long enough for the writers to dirty pages
            # even when a busy machine runs them late (else an iteration can end with none dirty)
            params = MigrationParams(downtime_limit=0, max_iterations=3, max_bandwidth=32 << 20)
            before = guest.pages_written()
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                with pytest.raises(MigrationError, match=r"migration did not converge after 3 iterations \(max-iterations\): \d+ bytes still dirty, expected downtime \d+ ms > downtime-limit 0 ms"):
                    mig.wait(60)
                assert mig.status == "failed"
            # the guest keeps running after a failed migration
            wait_for(lambda: guest.pages_written() > before + 100, 10, "the guest to keep writing")
            assert not guest.paused
        assert dst.wait() == 1
        assert "main channel" in dst.stderr


def test_auto_converge_throttles_the_guest() -> None:
    with _guest(8 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0") as dst:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=0, writers=1), log) as guest:
            wait_for(lambda: guest.pages_written() > 1000, 10, "the writers to start")
            # never converges without auto-converge (see test_fails_when_not_converging)
            params = MigrationParams(downtime_limit=0, max_iterations=40, auto_converge=True,
                                     cpu_throttle_initial=30, cpu_throttle_increment=20, max_bandwidth=16 << 20)
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                mig.wait(60)
                throttles = [it.throttle for it in mig.iterations]
                final = mig.query()["cpu-throttle-percentage"]
        assert dst.wait() == 0
    assert throttles == sorted(throttles), throttles
    assert final >= 30 and final in (30, 50, 70, 90, 99), (final, throttles)


def test_max_bandwidth_is_a_ceiling() -> None:
    rate = 16 << 20
    with _guest(8 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0") as dst:
        stats = Migration(dst.uri, ram, MigrationParams(max_bandwidth=rate)).start().wait(60)
        assert dst.wait() == 0
    # a token bucket: a burst of one 100 ms window, then the rate (plus the last packets in flight)
    assert stats.ram.transferred <= rate * (stats.total_time + 0.1) + 4 * (512 << 10)


def test_cancel_keeps_guest_running_and_ram_intact() -> None:
    with _guest(16 << 20, 1) as ram, Incoming("tcp:127.0.0.1:0", "--stall-timeout", "20") as dst:
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=1 << 20, writers=1), log) as guest:
            params = MigrationParams(max_bandwidth=4 << 20)
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                wait_for(lambda: mig.stats.status == "active", 10, "active")
                wait_receiving(dst, 1 << 20)
                mig.cancel()
                with pytest.raises(MigrationCancelled, match="migration cancelled"):
                    mig.wait(30)
                assert mig.status == "cancelled"
            n = guest.pages_written()
            wait_for(lambda: guest.pages_written() > n, 10, "the guest to keep writing")
        assert dst.wait() == 1
        assert "engine: error: main channel: connection closed by the source before the end of the migration" in dst.stderr


def test_static_cancel_leaves_source_ram_untouched() -> None:
    with _guest(16 << 20, 2) as ram, Incoming("tcp:127.0.0.1:0") as dst:
        before = _digests(ram)
        with Migration(dst.uri, ram, MigrationParams(max_bandwidth=4 << 20)) as mig:
            wait_receiving(dst, 1 << 20)
            mig.cancel()
            with pytest.raises(MigrationCancelled):
                mig.wait(30)
        assert dst.wait() == 1
        assert _digests(ram) == before


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_cli_signal_cancels(tmp_path: Path, sig: int, code: int, word: str) -> None:
    with Incoming("tcp:127.0.0.1:0", "--stall-timeout", "20") as dst:
        src = start_source(dst.uri, "--ram-size", "32M", "--max-bandwidth", "4M", "--dirty-rate", "1M")
        wait_receiving(dst)
        src.send_signal(sig)
        out, err = src.communicate(timeout=30)
        assert src.returncode == code, err
        assert err.strip().splitlines()[-1] == f"engine: error: migration cancelled by {word}"
        assert "Traceback" not in err
        assert dst.wait() == 1


def test_cli_live_dump_is_the_stop_and_copy_state(tmp_path: Path) -> None:
    from support import read_dump, assert_same_ram

    with Incoming("tcp:127.0.0.1:0", "--channels", "4", "--dump", str(tmp_path / "dst")) as dst:
        src = subprocess.run(
            engine_cmd("migrate", dst.uri, "--ram-size", "64M", "--channels", "4", "--dirty-rate", "16M",
                       "--writers", "2", "--dirty-pattern", "hotset", "--json", "--dump", str(tmp_path / "src")),
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120,
        )
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))


@pytest.mark.parametrize("mode", ["multifd", "legacy"])
def test_pages_that_become_zero_are_zeroed_on_the_destination(mode: str) -> None:
    """A page sent non-zero in one iteration and zeroed before the next must arrive as zero
    (the destination zero-fills written pages; untouched fresh ones it leaves alone), and a
    zero page that becomes non-zero must arrive whole."""
    with _guest(8 << 20, 2) as ram, Incoming("tcp:127.0.0.1:0", "--channels", "2", "--json", "--digest") as dst:
        log = DirtyLog(ram)
        spec = WorkloadSpec(dirty_rate=0, pattern="hotset", writers=1, seed=3)
        with Workload(ram, spec, log) as guest:
            wait_for(lambda: guest.pages_written() > 1000, 10, "the writer to start")
            params = MigrationParams(channels=2, downtime_limit=0, max_iterations=10**6, max_bandwidth=16 << 20,
                                     zero_page_detection=mode)
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                wait_for(lambda: mig.stats.ram.dirty_sync_count >= 3 or mig.status not in ("setup", "active"), 60, "the first iterations")
                assert mig.status == "active"
                extra = ram.blocks[1]  # the workload leaves this block alone
                extra.pages[: extra.npages // 2] = 0
                extra.pages[extra.npages // 2:] = 0x5A
                log.mark_range(1, 0, extra.npages)
                sync = mig.stats.ram.dirty_sync_count
                wait_for(lambda: mig.stats.ram.dirty_sync_count >= sync + 2, 60, "two more iterations")
                mig.set_parameters(downtime_limit=60_000)
                stats = mig.wait(60)
            assert stats.status == "completed"
            assert dst.wait() == 0, dst.stderr
            assert dst.json()["ram-digest"] == _digests(ram)
        if mode == "multifd":
            assert sum(c.zero_pages for c in stats.channels) == stats.ram.duplicate > 0
