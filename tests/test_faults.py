"""Faults end to end, with real processes: kill -9 anywhere, sockets closed mid-packet, stalls.

Every surviving side must end within a bounded time with a clear error naming what happened,
leave no process and no shared-memory segment behind, and a retry must then succeed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support import (
    ROOT, SLOW, Incoming, _env, channel_pids, engine_cmd, run_engine, run_main, start_source, wait_receiving,
)
from engine.wire.packet import MultiFDInit, encode_packet_header, MULTIFD_FLAG_SYNC
from engine.wire.encoder import StreamEncoder

def gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def retry_succeeds() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "4M", "--channels", "2")
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr


@pytest.mark.slow
def test_kill_source_channel_process() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10") as dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2")
        victim = channel_pids(src.pid, 2)[0]
        wait_receiving(dst)
        os.kill(victim, signal.SIGKILL)
        out, err = src.communicate(timeout=30)
        assert src.returncode == 1
        assert err.strip().splitlines()[-1].startswith("engine: error: multifd channel 0 (source): process ")
        assert f"process {victim} was killed by signal 9" in err
        assert dst.wait(30) == 1
        assert "engine: error:" in dst.stderr and "Traceback" not in dst.stderr
    retry_succeeds()


@pytest.mark.slow
def test_kill_destination_channel_process() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10") as dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2", "--stall-timeout", "10")
        victim = channel_pids(dst.proc.pid, 2)[1]
        wait_receiving(dst)
        os.kill(victim, signal.SIGKILL)
        assert dst.wait(30) == 1
        assert f"multifd channel 1 (destination): process {victim} was killed by signal 9" in dst.stderr
        out, err = src.communicate(timeout=30)
        assert src.returncode == 1, err
        assert "engine: error:" in err and "Traceback" not in err
    retry_succeeds()


@pytest.mark.slow
def test_kill_source_main_process() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10") as dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2")
        kids = channel_pids(src.pid, 2)
        wait_receiving(dst)
        src.kill()
        src.communicate(timeout=10)
        assert gone(kids), "source channel processes outlived their parent"
        assert dst.wait(30) == 1
        assert "connection closed" in dst.stderr or "end of stream" in dst.stderr, dst.stderr
    retry_succeeds()


@pytest.mark.slow
def test_kill_destination_main_process() -> None:
    dst = Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10")
    with dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2", "--stall-timeout", "10")
        kids = channel_pids(dst.proc.pid, 2)
        wait_receiving(dst)
        dst.proc.kill()
        dst.proc.wait(10)
        assert gone(kids), "destination channel processes outlived their parent"
        out, err = src.communicate(timeout=30)
        assert src.returncode == 1
        assert "engine: error:" in err and "Traceback" not in err
    retry_succeeds()


def _fake_source(uri_port: int, *, channels: int = 1):
    """A hand-driven source: main channel with header + START(MEM_SIZE), channels with handshakes."""
    main = socket.create_connection(("127.0.0.1", uri_port), timeout=10)
    enc = StreamEncoder()
    enc.header()
    enc.configuration("none")
    enc.section_start(2, "ram", 0, 4)
    enc.ram_mem_size([("pc.ram", 1 << 20)])
    main.sendall(enc.take())
    socks = []
    for i in range(channels):
        s = socket.create_connection(("127.0.0.1", uri_port), timeout=10)
        s.sendall(MultiFDInit(i).pack())
        socks.append(s)
    return main, socks


def test_socket_closed_mid_packet() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "1", "--stall-timeout", "10") as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        main, (ch,) = _fake_source(port)
        header = encode_packet_header(flags=0, packet_num=1, ramblock=b"pc.ram",
                                      offsets=__import__("numpy").array([0, 4096]), next_packet_size=8192)
        ch.sendall(header + b"\x01" * 5000)
        ch.close()
        assert dst.wait(30) == 1
        main.close()
    assert "multifd channel 0 payload: connection closed after 5000 of 8192 bytes" in dst.stderr


def test_socket_closed_inside_the_header_after_a_whole_packet() -> None:
    """The payload's receive also takes what follows it (the start of the next header): an
    EOF there is still an EOF inside a packet, reported as such."""
    with Incoming("tcp:127.0.0.1:0", "--channels", "1", "--stall-timeout", "10") as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        main, (ch,) = _fake_source(port)
        np = __import__("numpy")
        first = encode_packet_header(flags=0, packet_num=1, ramblock=b"pc.ram", offsets=np.array([0, 4096]),
                                     next_packet_size=8192)
        second = encode_packet_header(flags=0, packet_num=2, ramblock=b"pc.ram", offsets=np.array([8192]),
                                      next_packet_size=4096)
        ch.sendall(first + b"\x01" * 8192 + second[:100])
        ch.close()
        assert dst.wait(30) == 1
        main.close()
    assert "multifd channel 0 packet header: connection closed after 100 of 1344 bytes" in dst.stderr


@pytest.mark.slow
def test_stalled_source_mid_stream_times_out() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "1", "--stall-timeout", "2") as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        main, (ch,) = _fake_source(port)
        ch.sendall(encode_packet_header(flags=MULTIFD_FLAG_SYNC, packet_num=0))
        # ... and then nothing more: no EOS on the main channel
        t0 = time.monotonic()
        assert dst.wait(30) == 1
        assert time.monotonic() - t0 < 15
        main.close()
        ch.close()
    assert "main channel: nothing received for 2s" in dst.stderr


@pytest.mark.slow
def test_stalled_destination_source_times_out() -> None:
    """A destination that accepts but never reads: the source gives up after --stall-timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        t0 = time.monotonic()
        src = run_engine("migrate", f"tcp:127.0.0.1:{port}", "--ram-size", "64M", "--fill", "random",
                         "--stall-timeout", "2", "--handshake-timeout", "2", timeout=60)
        assert src.returncode == 1
        assert time.monotonic() - t0 < 30
        assert "Traceback" not in src.stderr
        assert "stalled for 2s" in src.stderr or "did not" in src.stderr or "no multifd channel became idle" in src.stderr, src.stderr
    finally:
        srv.close()


def test_port_scanner_does_not_break_an_incoming_migration() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--handshake-timeout", "1") as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))  # connects, sends nothing
        junk = socket.create_connection(("127.0.0.1", port))
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        src = run_engine("migrate", dst.uri, "--ram-size", "4M", "--channels", "2")
        assert src.returncode == 0, src.stderr
        assert dst.wait(30) == 0, dst.stderr
        idle.close()
        junk.close()
    assert "dropped a connection" in dst.stderr


@pytest.mark.slow
def test_255_channels() -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "255", "--json") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--channels", "255", "--json", timeout=120)
        assert src.returncode == 0, src.stderr
        assert dst.wait(120) == 0, dst.stderr
    import json

    assert len(json.loads(src.stdout)["channels"]) == 255


def test_guest_larger_than_dev_shm_is_refused_up_front(capsys) -> None:
    src = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-size", "64T")
    assert src.returncode == 1
    line = src.stderr.strip()
    assert line.startswith("engine: error: guest RAM of 70368744177664 bytes does not fit in /dev/shm (")
    assert line.endswith("bytes free); free space or use a smaller guest")


def test_fd_limit_is_checked_before_connecting() -> None:
    p = subprocess.run(
        ["bash", "-c", 'ulimit -n 64 && exec "$@"', "x", *engine_cmd("migrate", "tcp:127.0.0.1:1", "--ram-size", "1M",
                                                                   "--channels", "100")],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60,
    )
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "engine: error: source: multifd-channels 100 needs about 632 open files, the limit is 64"
        " (hard limit 64); raise it with ulimit -n or use fewer channels"
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_destination_signal_cancels_cleanly(sig: int, code: int, word: str) -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10") as dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2", "--stall-timeout", "10")
        kids = channel_pids(dst.proc.pid, 2)
        wait_receiving(dst)
        dst.proc.send_signal(sig)
        assert dst.wait(30) == code
        assert dst.stderr.strip().splitlines()[-1] == f"engine: error: migration cancelled by {word}"
        assert "Traceback" not in dst.stderr
        assert gone(kids)
        _, err = src.communicate(timeout=30)
        assert src.returncode == 1 and "Traceback" not in err
    retry_succeeds()
