"""The Python API end to end in one process: both sides as objects, live, byte-exact."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine import BlockSpec, GuestRam, IncomingMigration, Migration, MigrationParams
from engine.memory.dirty import DirtyLog
from engine.errors import MigrationCancelled, MigrationError
from engine.memory.workload import fill_pages
from engine.memory.workload import Workload, WorkloadSpec
from support import wait_for


def test_both_sides_as_objects_live_byte_exact() -> None:
    params = MigrationParams(channels=3, compression="lz4")
    with GuestRam.create([BlockSpec("pc.ram", 16 << 20), BlockSpec("vram", 1 << 20)]) as ram, \
            IncomingMigration("tcp:127.0.0.1:0", params) as dst:
        for b in ram:
            fill_pages(b, "mixed")
        assert dst.status == "setup" and dst.uri is not None
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=8 << 20, writers=2), log) as guest:
            with Migration(dst.uri, ram, params, tracker=log, guest=guest) as mig:
                q = mig.query()
                assert q["status"] in ("setup", "active", "device", "completed")
                mig.wait(60)
            result = dst.wait(60)
            assert dst.status == "completed" and dst.query()["status"] == "completed"
            assert result.ram is not None
            for a, b in zip(ram, result.ram):
                assert a.name == b.name and np.array_equal(a.pages, b.pages)


@pytest.mark.slow
def test_destination_cancel_fails_the_source() -> None:
    params = MigrationParams(channels=2, max_bandwidth=4 << 20, stall_timeout=10)
    with GuestRam.create([BlockSpec("pc.ram", 32 << 20)]) as ram:
        fill_pages(ram.blocks[0], "random")
        with IncomingMigration("tcp:127.0.0.1:0", params) as dst:
            with Migration(dst.uri, ram, params) as mig:
                wait_for(lambda: dst.status == "active", 20, "the destination to be active")
                dst.cancel()
                with pytest.raises(MigrationCancelled, match="incoming migration cancelled"):
                    dst.wait(30)
                assert dst.status == "cancelled"
                with pytest.raises(MigrationError):
                    mig.wait(30)


def test_cancel_while_listening() -> None:
    dst = IncomingMigration("tcp:127.0.0.1:0", MigrationParams()).start()
    dst.cancel()
    with pytest.raises(MigrationCancelled):
        dst.wait(10)


def test_bad_uri_raises_at_start() -> None:
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="unsupported migration URI scheme 'ftp'"):
        IncomingMigration("ftp:x:1", MigrationParams()).start()


@pytest.mark.slow
@pytest.mark.parametrize("teardown_fails", [False, True])
def test_total_time_ends_when_the_last_byte_is_written(monkeypatch: pytest.MonkeyPatch, teardown_fails: bool) -> None:
    """As in QEMU, ``total-time`` stops when the last byte is written: the channel processes
    finishing and being reaped afterwards (here made 0.5 s slower) are not in it, and
    ``downtime`` ends at the same moment. A teardown that fails still fails the migration,
    and then the clock runs to the end."""
    from engine.errors import ChannelError
    from engine.source.channels import SendChannels

    real_quit = SendChannels.quit

    def slow_quit(self: SendChannels, timeout: float = 10.0) -> None:
        real_quit(self, timeout)
        time.sleep(0.5)  # the delay under test: a teardown this much slower stays out of total-time
        if teardown_fails:
            raise ChannelError("multifd channel 0 (source): exited with status 1")

    monkeypatch.setattr(SendChannels, "quit", slow_quit)
    params = MigrationParams(channels=2)
    with GuestRam.create([BlockSpec("pc.ram", 8 << 20)]) as ram, \
            IncomingMigration("tcp:127.0.0.1:0", params) as dst:
        fill_pages(ram.blocks[0], "mixed")
        t0 = time.monotonic()
        with Migration(dst.uri, ram, params) as mig:
            if teardown_fails:
                with pytest.raises(MigrationError, match="exited with status 1"):
                    mig.wait(60)
            else:
                mig.wait(60)
            stats = mig.stats
        wall = time.monotonic() - t0
        assert dst.wait(60).ram is not None
    assert 0 < stats.downtime <= stats.total_time
    if teardown_fails:
        assert stats.status == "failed" and stats.total_time >= 0.5
    else:
        assert stats.status == "completed" and wall - stats.total_time >= 0.5


def test_compat_sets_the_dialect_as_qemu_machine_types_do() -> None:
    """--compat X.Y (or a versioned machine type) sets the three settings QEMU's hw_compat
    properties set; each setting given on its own wins."""
    def dialect(**kw: object) -> tuple[object, ...]:
        d = MigrationParams(**kw).dialect  # type: ignore[arg-type]
        return (d["compat"], d["zero-page-detection"], d["multifd-flush-after-each-section"], d["send-switchover-start"])

    assert dialect() == ("7.2", "legacy", True, False)
    assert dialect(compat="8.0") == ("8.0", "legacy", True, False)
    assert dialect(compat="8.1") == ("8.1", "legacy", False, False)
    assert dialect(compat="9.0") == ("9.0", "multifd", False, False)
    assert dialect(compat="10.0") == ("10.0", "multifd", False, True)
    assert dialect(machine="pc-i440fx-9.2") == ("9.2", "multifd", False, False)
    assert dialect(machine="pc-q35-10.0", compat="7.2") == ("7.2", "legacy", True, False)
    assert dialect(machine="pc") == ("7.2", "legacy", True, False)
    assert dialect(compat="10.0", zero_page_detection="legacy", send_switchover_start=False) == (
        "10.0", "legacy", False, False)
