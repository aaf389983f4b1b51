"""End-to-end migration throughput: engine source (this process) -> engine destination (a process).

Run: ./scripts/bench -k "none and tcp and c4"     (BENCH_GUEST=1G by default)
The number that matters is the migration's own wall time (connect to last byte written);
each round starts a fresh destination process once the previous one has exited (its teardown,
freeing a whole guest, does not run during the next round), so destination memory is fresh,
as in QEMU's default case. extra_info carries MiB/s (guest size / time) for the report.
"""

from __future__ import annotations

import contextlib

import pytest

from engine.params import MigrationParams
from engine.source.migration import migrate
from engine.runtime.transport import congestion_setting
from support import Incoming

METHODS = ["none", "lz4", "zstd", "zlib"]
CHANNELS = [1, 2, 4, 8]


def _bench(benchmark, ram, params: MigrationParams, uri: str, *dst_args: str, rounds: int) -> None:
    """Time ``rounds`` migrations of ``ram``, each into a fresh destination process."""
    dests: list[Incoming] = []
    with contextlib.ExitStack() as cleanup:  # a failed round leaves no destination process behind

        def setup():
            if dests:  # the previous round's destination exits (frees its RAM) before this round starts
                assert dests[-1].wait(120) == 0, dests[-1].stderr
            dst = cleanup.enter_context(Incoming(
                uri, "--channels", str(params.channels), "--compression", params.compression, "--json",
                "--listen-timeout", "120", *dst_args,
            ))
            dests.append(dst)
            return (dst.uri,), {}

        stats = benchmark.pedantic(lambda dst_uri: migrate(dst_uri, ram, params), setup=setup, rounds=rounds,
                                   iterations=1)
        assert dests[-1].wait(120) == 0, dests[-1].stderr
    benchmark.extra_info["guest_bytes"] = ram.total_size
    benchmark.extra_info["MiB/s (median)"] = round(ram.total_size / benchmark.stats.stats.median / 2**20, 1)
    benchmark.extra_info["transferred"] = stats.ram.transferred


@pytest.mark.parametrize("fill", ["mixed", "random", "zero"])
@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: f"c{c}")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_migrate(benchmark, make_guest, tmp_path, transport: str, method: str, channels: int, fill: str) -> None:
    ram = make_guest(fill)
    uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/b.sock"
    _bench(benchmark, ram, MigrationParams(channels=channels, compression=method), uri, rounds=3)


@pytest.mark.parametrize("dest", ["fresh", "prealloc"])
@pytest.mark.parametrize("method", ["none", "lz4"])
@pytest.mark.parametrize("detection", ["legacy", "multifd", "none"])
def test_zero_page_detection(benchmark, make_guest, detection: str, method: str, dest: str) -> None:
    """zero-page-detection legacy (main thread scans) vs multifd (channels scan, QEMU 9.0) vs none,
    4 channels, TCP, mixed guest. Run: ./scripts/bench -k zero_page_detection"""
    ram = make_guest("mixed")
    params = MigrationParams(channels=4, compression=method, zero_page_detection=detection)
    extra = ["--ram", f"pc.ram={ram.total_size}", "--prealloc"] if dest == "prealloc" else []
    _bench(benchmark, ram, params, "tcp:127.0.0.1:0", *extra, rounds=5)


@pytest.mark.parametrize("congestion", ["auto", congestion_setting("default")])
def test_tcp_congestion(benchmark, make_guest, congestion: str) -> None:
    """tcp-congestion auto (cubic towards this host) vs the system's default on every socket
    (what QEMU uses), 4 channels, none, mixed guest, fresh destination.
    Run: ./scripts/bench -k tcp_congestion"""
    ram = make_guest("mixed")
    params = MigrationParams(channels=4, compression="none", tcp_congestion=congestion)
    _bench(benchmark, ram, params, "tcp:127.0.0.1:0", rounds=5)


@pytest.mark.parametrize("dest", ["fresh", "prealloc"])
@pytest.mark.parametrize("method", ["none", "zstd"])
@pytest.mark.parametrize("pages", [128, 512, 1024])
def test_packet_pages(benchmark, make_guest, pages: int, method: str, dest: str) -> None:
    """--packet-pages on both engines: QEMU's 128 against fewer, bigger packets, 4 channels, TCP,
    mixed guest. Run: ./scripts/bench -k packet_pages"""
    ram = make_guest("mixed")
    params = MigrationParams(channels=4, compression=method, packet_pages=pages)
    extra = ["--packet-pages", str(pages)]
    if dest == "prealloc":
        extra += ["--ram", f"pc.ram={ram.total_size}", "--prealloc"]
    _bench(benchmark, ram, params, "tcp:127.0.0.1:0", *extra, rounds=5)
