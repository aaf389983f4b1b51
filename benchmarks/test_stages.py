"""Stage micro-benchmarks: the per-packet and per-page costs the data path is made of.

Run: ./scripts/bench -k stages
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.compression import get_method, method_names
from engine.memory.dirty import ChecksumTracker, DirtyLog
from engine.memory.ram import BlockSpec, GuestRam
from engine.memory.workload import fill_pages
from engine.source.batch import Batch
from engine.source.ram_saver import zero_pages
from engine.wire.encoder import StreamEncoder
from engine.wire.stream import MainStreamParser, StreamReader
from engine.wire.packet import PAGES_PER_PACKET, PacketEncoder, decode_packet_header

PAGES = 8192  # 32 MiB of mixed pages


@pytest.fixture(scope="module")
def ram():
    with GuestRam.create([BlockSpec("pc.ram", PAGES * 4096)]) as r:
        fill_pages(r.blocks[0], "mixed")
        yield r


def test_stages_zero_page_detection(benchmark, ram) -> None:
    words = ram.blocks[0].words
    benchmark(lambda: zero_pages(words))
    benchmark.extra_info["GiB/s"] = round(PAGES * 4096 / benchmark.stats.stats.median / 2**30, 2)


@pytest.mark.parametrize("method", method_names())
def test_stages_compress_packet(benchmark, ram, method) -> None:
    m = get_method(method)
    ctx = m.send_setup(m.default_level)
    batch = Batch(PAGES_PER_PACKET)
    batch.block = ram.blocks[0]
    batch.idx = np.arange(1000, 1000 + PAGES_PER_PACKET, dtype=np.int64)
    out = benchmark(lambda: ctx.send_prepare(batch))
    size = sum(memoryview(b).nbytes for b in out)
    benchmark.extra_info["MiB/s"] = round(512 / 1024 / benchmark.stats.stats.median, 1)
    benchmark.extra_info["ratio"] = round(size / (512 << 10), 3)


@pytest.mark.parametrize("method", [m for m in method_names() if m != "none"])
def test_stages_decompress_packet(benchmark, ram, method) -> None:
    m = get_method(method)
    send = m.send_setup(m.default_level)
    batch = Batch(PAGES_PER_PACKET)
    batch.block = ram.blocks[0]
    batch.idx = np.arange(2000, 2000 + PAGES_PER_PACKET, dtype=np.int64)
    payloads = [b"".join(bytes(memoryview(x).cast("B")) for x in send.send_prepare(batch)) for _ in range(200)]

    class Sink:
        normal_pages = PAGES_PER_PACKET

        def __init__(self) -> None:
            self.data = b""

        @property
        def next_packet_size(self) -> int:
            return len(self.data)

        def read_payload(self) -> memoryview:
            return memoryview(self.data)

        def scatter(self, data) -> None:
            pass

    def all_packets(recv) -> None:  # each packet continues the channel's stream: in order
        sink = Sink()
        for p in payloads:
            sink.data = p
            recv.recv_pages(sink)

    benchmark.pedantic(all_packets, setup=lambda: ((m.recv_setup(),), {}), rounds=5)
    per_packet = benchmark.stats.stats.median / len(payloads)
    benchmark.extra_info["us/packet"] = round(per_packet * 1e6, 1)
    benchmark.extra_info["MiB/s"] = round(0.5 / per_packet, 1)


def test_stages_header_pack(benchmark) -> None:
    enc = PacketEncoder()
    offs = np.arange(PAGES_PER_PACKET, dtype=np.int64) * 4096
    benchmark(lambda: enc.encode(flags=0, packet_num=7, ramblock=b"pc.ram", offsets=offs, next_packet_size=1 << 19))


def test_stages_header_parse(benchmark) -> None:
    raw = bytes(PacketEncoder().encode(flags=0, packet_num=7, ramblock=b"pc.ram",
                                       offsets=np.arange(PAGES_PER_PACKET, dtype=np.int64) * 4096,
                                       next_packet_size=1 << 19))
    blocks = {"pc.ram": 1 << 30}
    benchmark(lambda: decode_packet_header(raw, channel=0, expected_compression=0, blocks=blocks))


def test_stages_zero_records_encode_and_parse(benchmark) -> None:
    """The main channel's per-page cost: 64Ki ZERO records encoded, then parsed (vectorised)."""
    offsets = np.arange(0, 1 << 16, dtype=np.int64) * 4096

    def roundtrip() -> int:
        enc = StreamEncoder()
        enc.header()
        enc.section_start(2, "ram", 0, 4)
        enc.ram_mem_size([("pc.ram", 1 << 28)])
        enc.ram_zero_pages("pc.ram", offsets)
        enc.ram_eos()
        enc.footer(2)
        enc.eof()
        n = 0
        for ev in MainStreamParser(StreamReader.from_bytes(bytes(enc.out), 1 << 20)).events():
            n += 1
        return n

    benchmark(roundtrip)
    benchmark.extra_info["ns/page"] = round(benchmark.stats.stats.median / len(offsets) * 1e9, 1)


def test_stages_dirty_log_sync(benchmark, ram) -> None:
    log = DirtyLog(ram)
    log.sync()
    rng = np.random.default_rng(0)

    def setup():
        log.mark_pages(0, rng.integers(0, PAGES, PAGES // 10))
        return (), {}

    benchmark.pedantic(log.sync, setup=setup, rounds=50)
    benchmark.extra_info["pages"] = PAGES


def test_stages_checksum_tracker_sync(benchmark, ram) -> None:
    tr = ChecksumTracker(ram)
    tr.sync()
    benchmark(tr.sync)
    benchmark.extra_info["GiB/s"] = round(PAGES * 4096 / benchmark.stats.stats.median / 2**30, 2)


def test_stages_queue_cost_per_page(benchmark) -> None:
    """multifd_queue_page for arrays: cutting a pass into packets (channels stubbed by a counter)."""
    from engine.source.ram_saver import MultiFDQueue

    class Channels:
        n = 0

        def send_pages(self, block_idx, idx) -> None:
            self.n += 1

    idx = np.flatnonzero(np.random.default_rng(1).random(1 << 18) > 0.25).astype(np.int64)

    def run() -> None:
        q = MultiFDQueue(Channels())  # type: ignore[arg-type]
        for a in range(0, len(idx), 4096):
            q.queue(0, idx[a:a + 4096])
        q.flush()

    benchmark(run)
    benchmark.extra_info["ns/page"] = round(benchmark.stats.stats.median / len(idx) * 1e9, 1)
