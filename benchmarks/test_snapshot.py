"""Snapshot files: save and restore throughput vs channels, against ``cp`` of a raw RAM image.

Run: ./scripts/bench -k snapshot           (BENCH_GUEST=1G by default)
The baseline is measured in the same run: ``cp`` of a raw image of the same guest (the image is
in the page cache, as guest RAM is in memory). Saves run without fsync, like cp; one fsync'd
save shows what durability costs. Each save round writes a new file (the previous one is
deleted first, so its dirty pages are dropped, not written back); each restore round restores
into fresh shared memory. ``extra_info`` carries MiB/s (guest size / median) and the ratio to cp.
File sizes vs content: ``test_snapshot_file_size`` records file size and disk usage.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.params import MigrationParams
from engine.memory.ram import GuestRam
from engine.snapshot.jobs import restore, save

CHANNELS = [1, 2, 4]
pytestmark = pytest.mark.timeout(900)  # 1 GiB rounds with fsync on a shared disk
_baseline: dict[str, float] = {}


def _rate(benchmark: Any, size: int, key: str | None = None) -> None:
    median = benchmark.stats.stats.median
    benchmark.extra_info["MiB/s (median)"] = round(size / median / 2**20, 1)
    if key is not None:
        _baseline[key] = median
    elif "cp" in _baseline:
        benchmark.extra_info["x cp (median time ratio)"] = round(_baseline["cp"] / median, 2)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("snapshot-bench")


def test_snapshot_cp_baseline(benchmark, make_guest, image_dir: Path) -> None:
    ram = make_guest("mixed")
    img, out = image_dir / "ram.img", image_dir / "copy.img"
    with open(img, "wb") as f:
        f.write(ram.blocks[0].buf)

    def setup():
        _unlink(out)
        return (), {}

    benchmark.pedantic(lambda: subprocess.run(["cp", str(img), str(out)], check=True), setup=setup, rounds=5,
                       iterations=1)
    _unlink(out)
    _unlink(img)
    _rate(benchmark, ram.total_size, "cp")


@pytest.mark.parametrize("fsync", [False, True], ids=["nofsync", "fsync"])
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}")
def test_snapshot_save(benchmark, make_guest, image_dir: Path, channels: int, fsync: bool) -> None:
    if fsync and channels != 2:
        pytest.skip("fsync cost: measured with 2 channels only")
    ram = make_guest("mixed")
    path = image_dir / "save.snap"
    params = MigrationParams(channels=channels)

    def setup():
        _unlink(path)
        return (), {}

    stats = benchmark.pedantic(lambda: save(path, ram, params, fsync=fsync), setup=setup, rounds=5, iterations=1)
    benchmark.extra_info["file-size"] = stats.extra["file-size"]
    benchmark.extra_info["disk-usage"] = stats.extra["disk-usage"]
    _unlink(path)
    _rate(benchmark, ram.total_size)


@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}")
def test_snapshot_restore(benchmark, make_guest, image_dir: Path, channels: int) -> None:
    ram = make_guest("mixed")
    path = image_dir / "restore.snap"
    save(path, ram, MigrationParams(channels=2), fsync=False)
    restored: list[GuestRam] = []

    def setup():
        while restored:
            restored.pop().close()  # outside the timed part: freeing 1 GiB of shared memory
        return (), {}

    def run() -> None:
        restored.append(restore(path, channels=channels))

    try:
        benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
    finally:
        while restored:
            restored.pop().close()
        _unlink(path)
    _rate(benchmark, ram.total_size)


@pytest.mark.parametrize("method", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("fill", ["zero", "mixed", "random"])
def test_snapshot_file_size(benchmark, make_guest, image_dir: Path, fill: str, method: str) -> None:
    ram = make_guest(fill)
    path = image_dir / f"size-{fill}-{method}.snap"
    stats = benchmark.pedantic(lambda: save(path, ram, MigrationParams(channels=2, compression=method), fsync=False),
                               setup=lambda: (_unlink(path), ((), {}))[1], rounds=1, iterations=1)
    st = os.stat(path)
    benchmark.extra_info.update({"guest": ram.total_size, "file-size": st.st_size, "disk-usage": st.st_blocks * 512,
                                 "disk/guest": round(st.st_blocks * 512 / ram.total_size, 3),
                                 "stored-bytes": stats.ram.multifd_bytes})
    _unlink(path)
    _rate(benchmark, ram.total_size)
