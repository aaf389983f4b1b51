"""Live precopy: a guest dirtying memory while it migrates (issue: 1 GiB, 64 MiB/s uniform, 4 channels).

Run: ./scripts/bench -k precopy      (BENCH_GUEST=1G by default)
extra_info: total-time, downtime, iterations, bytes sent / guest size (medians over the rounds).
"""

from __future__ import annotations

import statistics
import time

import pytest

from engine.memory.dirty import DirtyLog
from engine.source.migration import Migration
from engine.params import MigrationParams
from engine.memory.workload import Workload, WorkloadSpec
from support import Incoming


@pytest.mark.parametrize("pattern", ["uniform", "hotset"])
@pytest.mark.parametrize("dirty_rate", [64 << 20], ids=lambda r: f"{r >> 20}MiBps")
def test_precopy(benchmark, make_guest, pattern: str, dirty_rate: int) -> None:
    ram = make_guest("mixed")
    results: list[dict] = []

    def setup():
        dst = Incoming("tcp:127.0.0.1:0", "--channels", "4", "--json")
        log = DirtyLog(ram)
        guest = Workload(ram, WorkloadSpec(dirty_rate=dirty_rate, pattern=pattern, writers=2), log).start()
        time.sleep(0.2)
        return (dst, log, guest), {}

    def run(dst, log, guest):
        try:
            with Migration(dst.uri, ram, MigrationParams(channels=4), tracker=log, guest=guest) as mig:
                mig.wait(600)
                results.append(mig.query())
        finally:
            guest.close()
            assert dst.wait(120) == 0, dst.stderr

    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    med = lambda key: statistics.median(key(q) for q in results)  # noqa: E731
    benchmark.extra_info.update({
        "total-time ms": med(lambda q: q["total-time"]),
        "downtime ms": med(lambda q: q["downtime"]),
        "iterations": med(lambda q: len(q["iterations"])),
        "sent/guest": round(med(lambda q: q["ram"]["transferred"] / q["ram"]["total"]), 3),
        "downtime-limit ms": 300,
    })
