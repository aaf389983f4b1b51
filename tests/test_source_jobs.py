"""The source's packet batching and job layout for every packet-pages: pure parts, no sockets
(``MultiFDQueue`` against a recorder of its hand-offs; ``JobLayout``; a job read whole from a
real pipe when it is bigger than PIPE_BUF)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from engine.errors import ChannelError
from engine.source.channels import JobLayout, _Sender
from engine.source.ram_saver import MultiFDQueue


class _Recorder:
    """Stands in for SendChannels: the packets ``MultiFDQueue`` hands over."""

    def __init__(self, packet_pages: int) -> None:
        self.packet_pages = packet_pages
        self.packets: list[tuple[int, list[int]]] = []

    def send_pages(self, block_idx: int, idx: np.ndarray) -> None:
        self.packets.append((block_idx, idx.tolist()))


@pytest.mark.parametrize("packet_pages", [128, 512, 1024])
def test_packets_hold_at_most_packet_pages_of_one_block(packet_pages: int) -> None:
    rec = _Recorder(packet_pages)
    q = MultiFDQueue(rec)  # type: ignore[arg-type]
    first = np.arange(0, 3 * packet_pages + 5, dtype=np.int64)
    q.queue(0, first[:7])  # a partial packet, filled up by the next call
    q.queue(0, first[7:])
    q.queue(1, np.arange(10, 20, dtype=np.int64))  # another block: block 0's rest goes first
    q.flush()
    sizes = [(b, len(p)) for b, p in rec.packets]
    assert sizes == [(0, packet_pages)] * 3 + [(0, 5), (1, 10)]
    assert sum((p for b, p in rec.packets if b == 0), []) == first.tolist()
    assert q.pages == len(first) + 10


@pytest.mark.parametrize("packet_pages, records, size", [(128, 2, 2096), (256, 1, 2072), (512, 1, 4120),
                                                         (1024, 1, 8216)])
def test_job_layout(packet_pages: int, records: int, size: int) -> None:
    jobs = JobLayout(packet_pages)
    assert (len(jobs.records), jobs.size) == (records, size)
    assert jobs.records[-1] + jobs.size // records == jobs.size


def test_a_job_bigger_than_pipe_buf_is_read_whole() -> None:
    """A 1024-page job (8216 bytes) written while the reader is already reading can arrive in
    pieces; the channel reads on until it is whole."""
    r, w = os.pipe()
    sender = _Sender.__new__(_Sender)  # only what rest_of_job uses
    sender.jobs, sender.what = JobLayout(1024), "multifd channel 0"
    sender.me = type("Me", (), {"control": r})()
    job = bytes(range(256)) * (sender.jobs.size // 256) + bytes(sender.jobs.size % 256)
    read_first = threading.Event()

    def write_the_rest() -> None:
        assert read_first.wait(5)
        os.write(w, job[3000:])

    try:
        os.write(w, job[:3000])
        writer = threading.Thread(target=write_the_rest)
        writer.start()
        first = os.read(r, sender.jobs.size)
        assert len(first) == 3000
        read_first.set()
        assert sender.rest_of_job(first) == job
        writer.join(5)
        os.close(w)
        w = -1
        with pytest.raises(ChannelError, match=r"^multifd channel 0: a job of 100 bytes, expected 8216$"):
            sender.rest_of_job(bytes(100))  # the parent closed the pipe inside a job
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
