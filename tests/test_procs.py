"""procs.Forked: the bare-fork child the channel sets are made of (exit status, signals,
its pidfd sentinel, reaping), with real processes."""

from __future__ import annotations

import multiprocessing.connection as mpc
import os
import signal
import time

from engine.runtime.procs import Forked


def test_exit_status_is_reaped_by_join_and_the_sentinel_wakes_a_waiter() -> None:
    child = Forked(lambda: os._exit(3))
    try:
        assert mpc.wait([child.sentinel], timeout=10.0) == [child.sentinel]
        child.join(10.0)
        assert child.exitcode == 3
        assert not os.path.exists(f"/proc/{child.pid}")  # reaped: no zombie left
    finally:
        child.close()
        child.close()  # idempotent


def test_join_with_a_timeout_leaves_a_running_child_alone_then_terminate_and_kill() -> None:
    r, w = os.pipe()

    def wait_forever() -> None:
        os.close(w)
        os.read(r, 1)  # blocks: the parent never writes
        os._exit(0)

    child = Forked(wait_forever)
    os.close(r)
    try:
        t0 = time.monotonic()
        child.join(0.2)
        assert child.exitcode is None and time.monotonic() - t0 >= 0.15
        child.terminate()
        child.join(10.0)
        assert child.exitcode == -signal.SIGTERM
        child.kill()  # already reaped: nothing to signal
    finally:
        os.close(w)
        child.close()


def test_a_child_whose_run_raises_exits_1() -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    child = Forked(fail)
    try:
        child.join(10.0)
        assert child.exitcode == 1
    finally:
        child.close()
