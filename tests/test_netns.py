"""Across hosts: the destination runs as a separate "host" in its own network namespace,
reached over a veth pair, and receives a live guest over TCP (needs root and iproute2)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from engine import BlockSpec, GuestRam, MigrationParams
from engine.memory.dirty import DirtyLog
from engine.source.migration import Migration
from engine.memory.ram import block_digest
from engine.memory.workload import fill_pages
from engine.memory.workload import Workload, WorkloadSpec
from support import Incoming, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 for a network namespace"),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def dest_host():
    """A network namespace with one veth link to this host: 10.231.<n>.1 (here) <-> .2 (there)."""
    n = os.getpid() % 250
    ns, here, there = f"mfd-test-{os.getpid()}", f"mfd{os.getpid()}a"[:15], f"mfd{os.getpid()}b"[:15]
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"10.231.{n}.1/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"10.231.{n}.2/30", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, f"10.231.{n}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=20)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def test_live_migration_to_another_network_namespace(dest_host, monkeypatch) -> None:
    ns, addr = dest_host
    import support

    real = support.engine_cmd
    monkeypatch.setattr(support, "engine_cmd", lambda *a: ["ip", "netns", "exec", ns, *real(*a)])
    with GuestRam.create([BlockSpec("pc.ram", 32 << 20)]) as ram, \
            Incoming(f"tcp:{addr}:0", "--channels", "4", "--json", "--digest") as dst:
        assert dst.uri.startswith(f"tcp:{addr}:")
        fill_pages(ram.blocks[0], "mixed")
        log = DirtyLog(ram)
        with Workload(ram, WorkloadSpec(dirty_rate=8 << 20, writers=2), log) as guest:
            wait_for(lambda: guest.pages_written() > 100, 10, "the writers to start")
            with Migration(dst.uri, ram, MigrationParams(channels=4), tracker=log, guest=guest) as mig:
                stats = mig.wait(120)
            assert stats.status == "completed"
            assert dst.wait(60) == 0, dst.stderr
            assert dst.json()["ram-digest"] == {"pc.ram": block_digest(ram.blocks[0])}
