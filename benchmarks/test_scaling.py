"""Scaling: time, memory and CPU as the guest grows (256 MiB .. 4 GiB) and as channels go 1..16.

Run: ./scripts/bench -k scaling --benchmark-json scaling.json     (extra_info lands in the JSON)

Every round is one engine -> engine migration through the CLI, both sides real processes
(``python -m engine incoming`` / ``migrate --ram-image``), compression none, TCP loopback,
fresh destination, measured exactly as ``scripts/compare-qemu`` measures the engine
(``engine_runs.run_engine``): time is the source's ``total-time``; CPU is every process of both
sides (main processes and channel processes) from the start of the migration to its end; RSS is
each channel process's ``peak-rss-kib`` / ``private-rss-kib`` from the JSON and the main
processes' ``VmHWM`` / ``RssAnon`` sampled from ``/proc``.

pytest-benchmark's own columns time a whole round, from starting the destination to both
processes' exit (Python start-up and reading the image included); the migration's figures are
in ``extra_info`` (medians over the rounds; RSS: the maximum over channels and rounds). A main
process's peak RSS includes the guest pages it maps (the source reads the image into guest RAM;
``RssShmem``), so only its private figure (``RssAnon``) says what the process itself costs.

Guest sizes run with both destination modes: ``fresh`` (the default) and ``prealloc``
(``incoming --ram pc.ram=SIZE --prealloc``, faulted in before listening). On a VM whose host
backs guest memory lazily, first-touching memory the VM has not used recently costs several
times more than re-using it (measured here: ~0.6 s/GiB, then ~5 s/GiB beyond ~6 GiB of fresh
writes), so large fresh cases can measure the hypervisor; ``prealloc`` takes that out.

The 4 GiB case runs only when ``/dev/shm`` and memory have room for both sides' guest RAM.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import engine_runs  # noqa: E402
from engine.params import parse_size  # noqa: E402

GUEST = os.environ.get("BENCH_GUEST", "1G")
SIZES = ["256M", "1G", "2G", "4G"]
CHANNELS = [1, 2, 4, 8, 16]
pytestmark = pytest.mark.timeout(1800)


def room_for(size: int) -> str | None:
    """Why both sides' guest RAM (plus the image in the page cache) would not fit, or None."""
    st = os.statvfs("/dev/shm")
    shm_free = st.f_bavail * st.f_frsize
    if shm_free < 2 * size + (512 << 20):
        return f"/dev/shm has {shm_free >> 20} MiB free, both sides need {2 * size >> 20} MiB"
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    if avail < 2 * size + (1 << 30):
        return f"{avail >> 20} MiB of memory available, both sides need {2 * size >> 20} MiB plus headroom"
    return None


@pytest.fixture(scope="module")
def images(tmp_path_factory: Any) -> Iterator[dict[int, Path]]:
    """RAM images (the engine's mixed fill) by size, made on first use, deleted at the end."""
    made: dict[int, Path] = {}
    yield made
    for path in made.values():
        path.unlink(missing_ok=True)


def _image(images: dict[int, Path], tmp_path_factory: Any, size: int) -> Path:
    if size not in images:
        path = tmp_path_factory.mktemp("scaling") / f"ram-{size >> 20}M.img"
        engine_runs.make_image(path, size)
        images[size] = path
    return images[size]


def _record(benchmark: Any, runs: list[dict[str, Any]], size: int) -> None:
    med = statistics.median
    gib = size / engine_runs.GiB
    rss = [r["rss"] for r in runs]

    def ch(side: str, key: str) -> int:
        return max(c[key] or 0 for x in rss for c in x[f"{side}-channels"])

    def main(side: str, key: str) -> int:
        return max(int(x[f"{side}-main"].get(key, 0)) for x in rss)

    benchmark.extra_info.update({
        "guest_bytes": size,
        "total-time ms (median)": med(r["total-time"] for r in runs),
        "MiB/s (median)": round(size / engine_runs.MiB / (med(r["total-time"] for r in runs) / 1000), 1),
        "setup-time ms (median)": med(r["setup-time"] for r in runs),
        "CPU s/GiB (median, both sides)": round(med(r["cpu-s"] for r in runs) / gib, 3),
        "CPU s/GiB source main / channels": [round(med(r["cpu"]["source-main"] for r in runs) / gib, 3),
                                             round(med(r["cpu"]["source-channels"] for r in runs) / gib, 3)],
        "CPU s/GiB destination main / channels": [round(med(r["cpu"]["destination-main"] for r in runs) / gib, 3),
                                                  round(med(r["cpu"]["destination-channels"] for r in runs) / gib, 3)],
        "channel peak-rss-kib max (source, destination)": [ch("source", "peak-rss-kib"),
                                                           ch("destination", "peak-rss-kib")],
        "channel private-rss-kib max (source, destination)": [ch("source", "private-rss-kib"),
                                                              ch("destination", "private-rss-kib")],
        "main VmHWM kib (source, destination)": [main("source", "VmHWM"), main("destination", "VmHWM")],
        "main RssAnon kib max (source, destination)": [main("source", "RssAnon"), main("destination", "RssAnon")],
        "transferred (median)": med(r["transferred"] for r in runs),
        "others-cpu-s (median)": med(r["others-cpu-s"] for r in runs),
        "load (median)": med(r["load"] for r in runs),
    })


def _bench(benchmark: Any, image: Path, size: int, channels: int, workdir: Path, rounds: int,
           prealloc: bool = False) -> None:
    runs: list[dict[str, Any]] = []

    def run() -> None:
        runs.append(engine_runs.run_engine(image, size, channels=channels, compression="none", level=None,
                                           prealloc=prealloc, workdir=workdir, timeout=600.0))

    benchmark.pedantic(run, rounds=rounds, iterations=1)
    _record(benchmark, runs, size)


@pytest.mark.parametrize("dest", ["fresh", "prealloc"])
@pytest.mark.parametrize("guest", SIZES)
def test_scaling_guest_size(benchmark: Any, images: dict[int, Path], tmp_path_factory: Any, tmp_path: Path,
                            guest: str, dest: str) -> None:
    size = parse_size(guest)
    why = room_for(size)
    if why:
        pytest.skip(why)
    image = _image(images, tmp_path_factory, size)
    _bench(benchmark, image, size, 4, tmp_path, rounds=3 if size <= (1 << 30) else 2, prealloc=dest == "prealloc")


@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}")
def test_scaling_channels(benchmark: Any, images: dict[int, Path], tmp_path_factory: Any, tmp_path: Path,
                          channels: int) -> None:
    size = parse_size(GUEST)
    why = room_for(size)
    if why:
        pytest.skip(why)
    image = _image(images, tmp_path_factory, size)
    _bench(benchmark, image, size, channels, tmp_path, rounds=3)
