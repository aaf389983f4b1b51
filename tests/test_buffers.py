"""Page-aligned channel buffers (engine.buffers): a buffer just below a 4 KiB boundary makes the
kernel's copies between it and page-cache pages stall on 4K aliasing (see the module)."""

from __future__ import annotations

import os
import socket

import numpy as np

from engine.runtime.buffers import aligned_bytes, aligned_pages
from engine.destination.channels import _Sink
from engine.source.batch import Batch
from engine.wire.packet import MAX_PACKET_PAYLOAD, PAGES_PER_PACKET

PAGE = 4096


def address(buf: object) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]


def test_aligned_bytes_is_page_aligned_writable_and_zeroed() -> None:
    for n in (1, 1344, PAGE, 3 * PAGE + 5):
        buf = aligned_bytes(n)
        assert len(buf) == n and not buf.readonly
        assert address(buf) % PAGE == 0
        assert bytes(buf) == bytes(n)
        buf[-1] = 7
        assert buf[-1] == 7


def test_aligned_pages_shape_and_alignment() -> None:
    pages = aligned_pages(128)
    assert pages.shape == (128, PAGE) and pages.dtype == np.uint8 and pages.flags.writeable
    assert pages.ctypes.data % PAGE == 0
    pages[127, -1] = 1
    assert int(pages.sum()) == 1


def test_aligned_buffers_are_private_to_a_process() -> None:
    """MAP_PRIVATE: a child forked after the buffer was made writes its own copy."""
    buf = aligned_bytes(PAGE)
    pid = os.fork()
    if pid == 0:
        buf[0] = 1
        os._exit(0)
    os.waitpid(pid, 0)
    assert buf[0] == 0


def test_channel_packet_buffers_are_page_aligned() -> None:
    """The destination's buffer for a compressed payload and the source's gather buffer (preadv
    target) start on a page boundary however the heap looks."""
    with socket.socket() as s:
        sink = _Sink(s, "multifd channel 0")
    assert len(sink.payload_view) == MAX_PACKET_PAYLOAD
    assert address(sink.payload_view) % PAGE == 0
    assert Batch(PAGES_PER_PACKET).scratch.ctypes.data % PAGE == 0
