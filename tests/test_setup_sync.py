"""The setup section's sync round: the migration thread writes each channel's SYNC packet
before forking it, and the first ``SendChannels.sync`` returns at once (real processes and
socket pairs; the peers read what the source channels wrote)."""

from __future__ import annotations

import socket

import numpy as np

from engine.compression.registry import get_method
from engine.memory.ram import BlockSpec, GuestRam
from engine.runtime.transport import recv_exact_into
from engine.source.channels import SendChannels
from engine.wire.packet import (
    MULTIFD_FLAG_NOCOMP,
    PacketHeader,
    decode_packet_header,
    header_size,
)

PAGE = 4096


def _read_header(peer: socket.socket, ram: GuestRam, channel: int) -> PacketHeader:
    buf = bytearray(header_size())
    recv_exact_into(peer, memoryview(buf), "test header")
    return decode_packet_header(buf, channel=channel, expected_compression=MULTIFD_FLAG_NOCOMP,
                                blocks={b.name: b.size for b in ram})


def test_setup_sync_packets_are_on_the_wire_before_the_first_sync() -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    for ours, peer in pairs:
        ours.settimeout(10.0)
        peer.settimeout(10.0)
    with GuestRam.create([BlockSpec("pc.ram", 64 * PAGE)]) as ram:
        ram.blocks[0].pages[:8] = 7
        channels = SendChannels([ours for ours, _ in pairs], ram, get_method("none"), 0, stall_timeout=10.0)
        try:
            firsts = [_read_header(peer, ram, i) for i, (_, peer) in enumerate(pairs)]
            assert [(h.sync, h.packet_num, h.normal_pages) for h in firsts] == [(True, 0, 0), (True, 1, 0)]
            channels.sync()  # the setup round: already written, nothing to wait for
            assert channels.sync_wait == 0.0
            assert [c.packets for c in channels.stats()] == [1, 1]
            assert channels.bytes_sent() == 2 * header_size()

            channels.send_pages(0, np.arange(4, dtype=np.int64))
            channels.sync()  # a real round: the data packet, then a SYNC packet on every channel
            data = _read_header(pairs[0][1], ram, 0)
            assert (data.sync, data.packet_num, data.normal_pages) == (False, 2, 4)
            page_bytes = bytearray(4 * PAGE)
            recv_exact_into(pairs[0][1], memoryview(page_bytes), "test pages")
            assert bytes(page_bytes) == bytes(ram.blocks[0].buf[: 4 * PAGE])
            syncs = [_read_header(peer, ram, i) for i, (_, peer) in enumerate(pairs)]
            assert [(h.sync, h.packet_num) for h in syncs] == [(True, 3), (True, 4)]
            channels.quit()
        finally:
            channels.close(graceful=False)
            for ours, peer in pairs:
                ours.close()
                peer.close()
