"""Benchmark fixtures: a source guest built once per (size, fill), destinations as real processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from engine.params import parse_size  # noqa: E402
from engine.memory.ram import BlockSpec, GuestRam
from engine.memory.workload import fill_pages  # noqa: E402

GUEST = os.environ.get("BENCH_GUEST", "1G")

_guests: dict[tuple[str, str], GuestRam] = {}


@pytest.fixture(scope="session")
def guest_cache() -> Iterator[dict[tuple[str, str], GuestRam]]:
    yield _guests
    for ram in _guests.values():
        ram.close()
    _guests.clear()


@pytest.fixture
def make_guest(guest_cache):
    def make(fill: str, size: str = GUEST) -> GuestRam:
        key = (size, fill)
        if key not in guest_cache:
            ram = GuestRam.create([BlockSpec("pc.ram", parse_size(size))])
            fill_pages(ram.blocks[0], fill if fill in ("zero", "random", "mixed") else "mixed")
            guest_cache[key] = ram
        return guest_cache[key]

    return make
