"""Setup latency: connect + channel handshakes + the START section's sync round, 16 channels.

Run: ./scripts/bench -k setup_latency            (target: under 200 ms; BENCH_GUEST=1G by default)

``test_setup_latency_api``: the Python API in this process, destination a real ``incoming``
process. The timed call is ``Migration.start()`` (main connection, 16 channel connections and
handshakes, 16 channel processes forked) up to the moment ``status`` becomes ``"active"``
(the START section is out and its SYNC sent on every channel): the same span as QEMU's
``setup-time``. The rest of the migration runs untimed before the next round.
``extra_info`` also carries the engine's own ``setup-time`` (median).

``test_setup_latency_cli``: both sides as CLI processes (channel processes forked by a small
``python -m engine migrate`` process rather than by pytest); the figure is the source JSON's
``setup-time``, in ``extra_info``. pytest-benchmark's columns there time whole rounds.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import engine_runs  # noqa: E402
from engine.source.migration import Migration  # noqa: E402
from engine.params import MigrationParams, parse_size  # noqa: E402
from support import Incoming  # noqa: E402

GUEST = os.environ.get("BENCH_GUEST", "1G")

CHANNELS = 16
TARGET_MS = 200
ACTIVE_DEADLINE = 30.0  # seconds
pytestmark = pytest.mark.timeout(900)


def _finish(pending: list[tuple[Migration, Incoming]]) -> None:
    """Let the previous round's migration complete (untimed) and reap its destination."""
    while pending:
        mig, dst = pending.pop()
        try:
            mig.wait(300)
        finally:
            mig.__exit__(None, None, None)
            assert dst.wait(120) == 0, dst.stderr


def test_setup_latency_api(benchmark: Any, make_guest: Any) -> None:
    ram = make_guest("mixed")
    params = MigrationParams(channels=CHANNELS)
    pending: list[tuple[Migration, Incoming]] = []
    setup_times: list[float] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        _finish(pending)
        dst = Incoming("tcp:127.0.0.1:0", "--channels", str(CHANNELS), "--json")
        return (dst,), {}

    def run(dst: Incoming) -> None:
        mig = Migration(dst.uri, ram, params)
        pending.append((mig, dst))
        mig.start()
        deadline = time.monotonic() + ACTIVE_DEADLINE
        while mig.status == "setup":
            if time.monotonic() > deadline:
                raise AssertionError(f"status still 'setup' after {ACTIVE_DEADLINE:g}s")
            time.sleep(0.0002)
        setup_times.append(mig.stats.setup_time)

    try:
        benchmark.pedantic(run, setup=setup, rounds=7, iterations=1)
    finally:
        _finish(pending)
    benchmark.extra_info.update({
        "channels": CHANNELS,
        "guest_bytes": ram.total_size,
        "setup-time ms (engine's own, median)": round(statistics.median(setup_times) * 1000, 1),
        "start()->active ms (median)": round(benchmark.stats.stats.median * 1000, 1),
        "target ms": TARGET_MS,
    })


@pytest.fixture(scope="module")
def image(tmp_path_factory: Any) -> Iterator[tuple[Path, int]]:
    size = parse_size(GUEST)
    path = tmp_path_factory.mktemp("setup-latency") / "ram.img"
    engine_runs.make_image(path, size)
    yield path, size
    path.unlink(missing_ok=True)


def test_setup_latency_cli(benchmark: Any, image: tuple[Path, int], tmp_path: Path) -> None:
    path, size = image
    runs: list[dict[str, Any]] = []

    def run() -> None:
        runs.append(engine_runs.run_engine(path, size, channels=CHANNELS, compression="none", level=None,
                                           prealloc=False, workdir=tmp_path, timeout=300.0))

    benchmark.pedantic(run, rounds=5, iterations=1)
    setup = [r["setup-time"] for r in runs]
    benchmark.extra_info.update({
        "channels": CHANNELS,
        "guest_bytes": size,
        "setup-time ms (source JSON, median)": statistics.median(setup),
        "setup-time ms (min, max)": [min(setup), max(setup)],
        "target ms": TARGET_MS,
        "load (median)": statistics.median(r["load"] for r in runs),
    })
