"""Guest RAM helpers: page runs, and positioned writes from several processes into one block."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.memory.ram as ram_mod
from engine.errors import ChannelError
from engine.memory.ram import BlockSpec, GuestRam
from engine.memory.runs import NUMPY_RUNS_FROM, consecutive_runs, page_runs
from engine.wire.packet import TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE


def _expand(runs: list[tuple[int, int]]) -> list[int]:
    return [p for a, b in runs for p in range(a, b)]


def test_page_runs_examples() -> None:
    assert page_runs(np.array([], dtype=np.int64)) == []
    assert page_runs(np.array([7], dtype=np.int64)) == [(7, 8)]
    assert page_runs(np.arange(10, 138, dtype=np.int64)) == [(10, 138)]
    assert page_runs(np.array([1, 2, 3, 7, 9, 10], dtype=np.int64)) == [(1, 4), (7, 8), (9, 11)]
    # Offsets from the wire need not be sorted: runs follow the given order.
    assert page_runs(np.array([5, 6, 7, 1, 2, 9, 9], dtype=np.int64)) == [(5, 8), (1, 3), (9, 10), (9, 10)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=128))
def test_page_runs_cover_the_indices_in_order(pages: list[int]) -> None:
    runs = page_runs(np.array(pages, dtype=np.int64))
    assert _expand(runs) == pages
    assert all(a < b for a, b in runs)
    # maximal: no run ends where the next one starts
    assert all(runs[i][1] != runs[i + 1][0] for i in range(len(runs) - 1))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=NUMPY_RUNS_FROM, max_size=1100), st.booleans())
def test_page_runs_of_big_packets_are_the_loops(pages: list[int], sort: bool) -> None:
    """From NUMPY_RUNS_FROM pages on numpy finds the runs: the same runs as the loop, in any
    order and with repeats (indices from the wire)."""
    idx = np.array(sorted(pages) if sort else pages, dtype=np.int64)
    assert page_runs(idx) == consecutive_runs(idx.tolist())


def _writer(block_name: str, ram: GuestRam, packets: list[np.ndarray]) -> None:
    block = ram[block_name]
    for idx in packets:
        data = np.empty((len(idx), PAGE), dtype=np.uint8)
        data[:] = (idx % 251 + 1)[:, None].astype(np.uint8)
        block.pwrite_pages(idx, memoryview(data).cast("B"))


def test_concurrent_pwrite_pages_byte_exact() -> None:
    """Four processes write interleaved packets of scattered pages into one fresh block, each
    packet under the block's write lock: every page ends up with its own content."""
    npages = 4096
    rng = np.random.default_rng(1)
    wanted = np.flatnonzero(rng.random(npages) < 0.75).astype(np.int64)
    packets = [wanted[i:i + 128] for i in range(0, len(wanted), 128)]
    ctx = multiprocessing.get_context("fork")
    with GuestRam.create([BlockSpec("pc.ram", npages * PAGE)]) as ram:
        procs = [ctx.Process(target=_writer, args=("pc.ram", ram, packets[k::4])) for k in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        pages = ram["pc.ram"].pages
        expect = np.zeros((npages, PAGE), dtype=np.uint8)
        expect[wanted] = (wanted % 251 + 1)[:, None].astype(np.uint8)
        assert np.array_equal(pages, expect)


def test_write_lock_held_too_long_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ram_mod, "WRITE_LOCK_TIMEOUT", 0.2)
    with GuestRam.create([BlockSpec("pc.ram", 16 * PAGE)]) as ram:
        block = ram["pc.ram"]
        assert block.write_lock.acquire(timeout=1)
        try:
            with pytest.raises(ChannelError) as exc:
                block.pwrite_pages(np.array([3], dtype=np.int64), memoryview(bytes(PAGE)))
        finally:
            block.write_lock.release()
        assert str(exc.value) == "RAM block 'pc.ram': another writer held the write lock for 0.2s"
        block.pwrite_pages(np.array([3], dtype=np.int64), memoryview(b"\x07" * PAGE))
        assert int(block.pages[3].min()) == 7 and int(block.pages[2].max()) == 0


def test_the_resource_tracker_runs_before_the_first_segment_exists() -> None:
    """The tracker is the backstop that unlinks an owner's segments after a SIGKILL; if it were
    started only when the first segment registers, a kill in that window leaked the segment
    (seen once in the soak)."""
    code = """
import sys
from multiprocessing import resource_tracker, shared_memory
from engine.memory.ram import BlockSpec, GuestRam
seen = []
real = shared_memory.SharedMemory.__init__
def spy(self, *a, **k):
    seen.append(resource_tracker._resource_tracker._fd is not None)
    real(self, *a, **k)
shared_memory.SharedMemory.__init__ = spy
with GuestRam.create([BlockSpec("a", 4096), BlockSpec("b", 4096)]):
    pass
print(seen)
"""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True]"


def _allocated_pages(block: ram_mod.RamBlock) -> int:
    return os.fstat(block.fd).st_blocks * 512 // PAGE


def _write(block: ram_mod.RamBlock, pages: list[int], value: int) -> None:
    data = np.full((len(pages), PAGE), value, dtype=np.uint8)
    block.pwrite_pages(np.array(pages, dtype=np.int64), memoryview(data).cast("B"))


def test_holds_data_tells_fresh_and_reserved_blocks_from_written_ones() -> None:
    with GuestRam.create([BlockSpec("fresh", 64 * PAGE), BlockSpec("reserved", 64 * PAGE)]) as ram:
        fresh, reserved = ram.blocks
        assert ram_mod.prefault(reserved, populate=False)
        assert _allocated_pages(reserved) == 64  # allocated, yet nothing written
        assert not fresh.holds_data() and not reserved.holds_data()
        _write(fresh, [40], 7)
        _write(reserved, [0], 7)
        assert fresh.holds_data() and reserved.holds_data()


def test_zero_runs_writes_only_over_data_and_leaves_holes_unallocated() -> None:
    with GuestRam.create([BlockSpec("pc.ram", 256 * PAGE)]) as ram:
        block = ram.blocks[0]
        data_pages = [3, 4, 5, 20, 100, 101, 200]
        _write(block, data_pages, 0x5A)
        before = _allocated_pages(block)
        assert before == len(data_pages)
        # runs cover some data pages and many holes, out of order, one inside a hole seen before
        runs = [(100, 150), (0, 10), (11, 19), (21, 40), (150, 256), (30, 35)]
        written = block.zero_runs(runs)
        assert written == 6  # 3, 4, 5, 100, 101, 200; page 20 is outside every run
        assert _allocated_pages(block) == before  # no hole was filled
        expect = np.zeros((256, PAGE), dtype=np.uint8)
        expect[20] = 0x5A
        assert np.array_equal(block.pages, expect)


def test_zero_runs_on_a_block_without_a_file_descriptor_zeroes_through_the_mapping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with GuestRam.create([BlockSpec("pc.ram", 16 * PAGE)]) as ram:
        block = ram.blocks[0]
        block.pages[:] = 9
        monkeypatch.setattr(ram_mod.RamBlock, "fd", property(lambda self: -1))
        assert block.holds_data()
        assert block.zero_runs([(2, 5), (10, 11)]) == 4
        assert not block.pages[2:5].any() and not block.pages[10].any()
        assert (block.pages[[0, 1, 5, 9, 11, 15]] == 9).all()


def test_pwrite_pages_writes_runs_in_any_order_byte_exact() -> None:
    """One pass finds the runs while writing them: offsets out of order, runs of one page and
    of many, a run that ends the list."""
    pages = [7, 8, 9, 2, 40, 41, 3, 100, 101, 102, 103, 0]
    with GuestRam.create([BlockSpec("pc.ram", 128 * PAGE)]) as ram:
        block = ram.blocks[0]
        data = np.repeat(np.arange(1, len(pages) + 1, dtype=np.uint8), PAGE)
        block.pwrite_pages(np.array(pages, dtype=np.int64), memoryview(data))
        expect = np.zeros((128, PAGE), dtype=np.uint8)
        for k, p in enumerate(pages):
            expect[p] = k + 1
        assert np.array_equal(block.pages, expect)

