"""Negative interop: a real QEMU 7.2 source that does not match the engine destination.

Each case must end the engine with exit status 1 and one precise line (asserted in full,
with only the parts QEMU picks at random, such as which channel connects first, left open),
within its deadline, leaving no process or shared memory behind. Unlike a QEMU 7.2
destination, which freezes on a connection that never sends its handshake (wire doc 1.3),
the engine times out.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from qemu_support import (
    CaptureProxy,
    assert_error,
    host_port,
    incoming,
    qemu_peer,
    Image,
    ram_image,  # noqa: F401 - fixture
    needs_qemu,
    shm_of,
)

UUID_SRC = "11111111-2222-3333-4444-555555555555"
UUID_DST = "66666666-7777-8888-9999-aaaaaaaaaaaa"
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


def _fails(src: qemu_peer.QemuPeer, engine_args: list[str], pattern: str, *, via_silent: int | None = None) -> str:
    """Migrate ``src`` into an engine destination with ``engine_args``; the engine must fail with ``pattern``."""
    with incoming(*engine_args) as dst:
        if via_silent is None:
            src.migrate(dst.uri)
            rc = dst.wait(60)
        else:
            with CaptureProxy(host_port(dst.uri), silent={via_silent}) as proxy:
                src.migrate(proxy.uri)
                rc = dst.wait(60)
        assert rc == 1, (rc, dst.stderr)
        line = assert_error(dst.stderr, pattern)
        assert shm_of(dst.proc.pid) == []
    return line


@pytest.mark.parametrize("src_uuid,dst_uuid", [(UUID_SRC, UUID_DST), (None, UUID_DST), (UUID_SRC, None)],
                         ids=["different", "source-unset", "destination-unset"])
@needs_qemu
def test_wrong_uuid(tmp_path: Path, ram_image: Image, src_uuid: str | None, dst_uuid: str | None) -> None:
    image, _ = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=2, uuid=src_uuid) as src:
        args = ["--channels", "2"] + (["--uuid", dst_uuid] if dst_uuid else [])
        _fails(src, args, rf"multifd handshake: received uuid '{src_uuid or ZERO_UUID}' and expected uuid"
                          rf" '{dst_uuid or ZERO_UUID}' for channel [01]")
        # the source notices: its channels were closed without a reply
        assert src.wait_migration(["failed", "cancelled"], timeout=30)["status"] == "failed"


@pytest.mark.parametrize("src_method,dst_method,got,want", [
    ("zlib", "none", "0x2", "0x0"), ("none", "zstd", "0x0", "0x4"), ("zstd", "zlib", "0x4", "0x2"),
])
@needs_qemu
def test_compression_mismatch(tmp_path: Path, ram_image: Image, src_method: str, dst_method: str, got: str,
                              want: str) -> None:
    image, _ = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=2, compression=src_method) as src:
        src.set_parameters(max_bandwidth=10 << 30)
        _fails(src, ["--channels", "2", "--compression", dst_method],
               rf"multifd channel (\d) \(destination\): multifd channel \1, packet_num \d+: received compression"
               rf" flags {got}, expected {want} \({dst_method}\)")


@needs_qemu
def test_too_few_channels(tmp_path: Path, ram_image: Image) -> None:
    image, _ = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=2) as src:
        t0 = time.monotonic()
        _fails(src, ["--channels", "4", "--handshake-timeout", "2"],
               r"received the main channel and 2 of 4 multifd channels within 2s \(missing channel ids \[2, 3\]\)")
        assert time.monotonic() - t0 < 30


@needs_qemu
def test_too_many_channels(tmp_path: Path, ram_image: Image) -> None:
    image, _ = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=4) as src:
        _fails(src, ["--channels", "2", "--handshake-timeout", "5"],
               r"multifd handshake: received channel id [23], expected < 2 \(multifd-channels\)")


@needs_qemu
def test_channel_never_sends_handshake(tmp_path: Path, ram_image: Image) -> None:
    """The second multifd connection of a QEMU source reaches the engine but never sends its
    64 bytes (a proxy holds it): the engine gives up after --handshake-timeout."""
    image, _ = ram_image
    with qemu_peer.source(tmp_path, ram_image=image, channels=2) as src:
        t0 = time.monotonic()
        # accept order at the proxy: 0 = main (QEMU 7.2 connects it first), 1 and 2 = channels
        _fails(src, ["--channels", "2", "--handshake-timeout", "2"],
               r"received the main channel and 1 of 2 multifd channels within 2s \(missing channel ids \[[01]\];"
               r" 1 connection sent no handshake within 2s\)", via_silent=2)
        assert time.monotonic() - t0 < 30


@pytest.mark.slow  # waits out a 1 s handshake timeout and a 3 s listen timeout
def test_lone_silent_connection(tmp_path: Path) -> None:
    """Nothing but a connection that sends nothing: dropped after the handshake deadline, and
    the engine reports it when its listen deadline passes."""
    with incoming("--handshake-timeout", "1", listen_timeout=3) as dst:
        with socket.create_connection(host_port(dst.uri), timeout=10):
            rc = dst.wait(30)
    assert rc == 1
    assert_error(dst.stderr, r"no migration arrived within 3s; 1 connection sent no handshake within 1s")
