"""Shared fixtures: every test must leave no shared-memory segment and no child process."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from support import children

# Examples per property test: ci (CI=true), dev (default), fast (./scripts/test --fast), deep.
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fast", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# A shell starts background commands with SIGINT ignored, and an ignored signal stays ignored
# across exec: every engine process a test starts would then ignore the SIGINT the signal
# tests send it (and rightly exit 0). Take SIGINT back for this session and its children.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHM = Path("/dev/shm")
# Every engine process started by this session (they inherit the environment) tags its
# segments, so a concurrent run on the same machine cannot make a test fail or pass.
os.environ.setdefault("MFD_SHM_TAG", f"t{os.getpid()}")
_TAG = os.environ["MFD_SHM_TAG"]


def shm_segments() -> set[str]:
    """This session's engine segments, plus anything else new that is not an engine segment."""
    out = set()
    for p in SHM.iterdir():
        name = p.name
        if name.startswith("sem."):  # multiprocessing semaphores, unlinked right after creation
            continue
        if name.startswith("mfd_") and not name.startswith(f"mfd_{_TAG}_"):
            continue  # another run's engine segment
        out.add(name)
    return out


def _tracker_pid() -> int | None:
    try:
        from multiprocessing import resource_tracker

        return resource_tracker._resource_tracker._pid  # type: ignore[attr-defined]
    except Exception:
        return None


def child_pids() -> set[int]:
    """This session's child processes, zombies included (an unreaped child is a leak too),
    other than multiprocessing's resource tracker."""
    return set(children(os.getpid(), zombies=True)) - {_tracker_pid() or -1}


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a /dev/shm segment, a child process or a thread behind (a
    thread still running after its test could write into the next test's guest RAM)."""
    before_shm = shm_segments()
    before_kids = child_pids()
    before_threads = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_shm = shm_segments() - before_shm
        leaked_kids = child_pids() - before_kids
        leaked_threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        if not leaked_shm and not leaked_kids and not leaked_threads:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if leaked_threads and not leaked_shm and not leaked_kids:
        pytest.fail(f"test left threads running: {sorted(t.name for t in leaked_threads)}")
    for pid in leaked_kids:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except OSError:
            pass
    for name in leaked_shm:
        try:
            (SHM / name).unlink()
        except OSError:
            pass
    pytest.fail(f"test leaked shared-memory segments {sorted(leaked_shm)} and/or child processes {sorted(leaked_kids)}")
