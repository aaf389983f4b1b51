"""tcp-congestion: the source's sockets get their congestion control before they connect; auto
picks cubic (else reno) towards this host and leaves the system's default towards others."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.params import MigrationParams
from engine.runtime.transport import (
    LOCAL_CONGESTION, TcpAddress, congestion_setting, connect, on_this_host, set_congestion,
)
from support import SLOW, Incoming, run_main, start_source, wait_for

PROC = Path("/proc/sys/net/ipv4")


def _congestion(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


def _system_default() -> str:
    """What the kernel gives a new socket."""
    with socket.socket() as sock:
        return _congestion(sock)


def _local_choice() -> str:
    """What auto should pick here: the first of LOCAL_CONGESTION this process may set."""
    kind = "available" if os.geteuid() == 0 else "allowed"
    usable = (PROC / f"tcp_{kind}_congestion_control").read_text().split()
    return next(name for name in LOCAL_CONGESTION if name in usable)


def _connected(congestion: str | None) -> str:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with connect(TcpAddress("127.0.0.1", server.getsockname()[1]), 5.0, congestion) as sock:
            return _congestion(sock)


def test_auto_picks_a_non_pacing_algorithm_towards_this_host() -> None:
    assert _connected("auto") == _local_choice()
    assert _connected(None) == _system_default()  # no setting: the system's default


def test_a_named_algorithm_is_used_whatever_the_peer() -> None:
    assert _connected("reno") == "reno"
    assert _connected(_system_default()) == _system_default()


def test_auto_leaves_the_system_default_towards_another_host() -> None:
    with socket.socket() as sock:
        set_congestion(sock, "auto", local_peer=False)
        assert _congestion(sock) == _system_default()
        set_congestion(sock, "auto", local_peer=True)
        assert _congestion(sock) == _local_choice()


def test_congestion_setting_reads_the_kernel_settings() -> None:
    assert congestion_setting("default") == _system_default()
    assert _system_default() in congestion_setting("available").split()
    assert congestion_setting("allowed") == (PROC / "tcp_allowed_congestion_control").read_text().strip()
    assert congestion_setting("no_such") == "unknown"


def test_which_addresses_are_on_this_host() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "0.0.0.0"):
        assert on_this_host(socket.AF_INET, (host, 4444)), host
    for host in ("::1", "::ffff:127.0.0.1", "::"):
        assert on_this_host(socket.AF_INET6, (host, 4444, 0, 0)), host
    assert not on_this_host(socket.AF_INET, ("198.51.100.1", 4444))  # TEST-NET-2: routed away or unroutable
    try:  # this host's own outward address (the source the kernel picks for a remote peer)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("198.51.100.1", 9))
            own = probe.getsockname()[0]
    except OSError:  # no route out of this host: nothing more to check
        return
    assert on_this_host(socket.AF_INET, (own, 4444)), own


def test_an_unknown_algorithm_is_a_config_error_listing_what_exists() -> None:
    available = (PROC / "tcp_available_congestion_control").read_text().strip()
    with pytest.raises(ConfigError, match=re.escape(
        f"tcp-congestion 'nosuchcc': not available on this host (available: {available})"
    )):
        _connected("nosuchcc")


def test_an_algorithm_the_user_may_not_set_names_the_allowed_ones() -> None:
    class Refusing(socket.socket):
        def setsockopt(self, *args: object) -> None:  # what the kernel answers an unprivileged user
            raise PermissionError(errno.EPERM, "Operation not permitted")

    allowed = (PROC / "tcp_allowed_congestion_control").read_text().strip()
    with Refusing() as sock, pytest.raises(ConfigError, match=re.escape(
        f"tcp-congestion 'bbr': not allowed for this user (allowed: {allowed})"
    )):
        set_congestion(sock, "bbr", local_peer=True)
    with Refusing() as sock:
        set_congestion(sock, "auto", local_peer=True)  # auto never fails: the system's default stays


def test_the_parameter_is_validated() -> None:
    with pytest.raises(ConfigError, match=re.escape(
        "tcp-congestion 'no such' is not a congestion control name: expected auto or an algorithm such as"
        " cubic, reno or bbr"
    )):
        MigrationParams(tcp_congestion="no such")


def test_cli_unknown_algorithm_is_one_line_before_any_connection(capsys) -> None:
    with Incoming("tcp:127.0.0.1:0", "--listen-timeout", "5") as dst:
        p = run_main(capsys, "migrate", dst.uri, "--ram-size", "1M", "--tcp-congestion", "nosuchcc")
        assert dst.proc.poll() is None  # still waiting: the source never connected
    available = (PROC / "tcp_available_congestion_control").read_text().strip()
    assert p.returncode == 1, p.stderr
    assert p.stderr == f"engine: error: tcp-congestion 'nosuchcc': not available on this host (available: {available})\n"


def _source_congestion(port: int) -> list[str]:
    """The congestion control of every established socket towards ``port`` (``ss``)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(("\t", " "))]


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["auto", "reno"])
def test_every_socket_of_a_real_migration_uses_it(setting: str) -> None:
    """Main channel and every multifd channel, read from the kernel during the migration."""
    with Incoming("tcp:127.0.0.1:0", "--channels", "3") as dst:
        port = int(dst.uri.rsplit(":", 1)[1])
        src = start_source(dst.uri, *SLOW, "--channels", "3", "--tcp-congestion", setting)
        try:
            seen: list[str] = []

            def all_four() -> bool:
                seen[:] = _source_congestion(port)
                return len(seen) == 4

            wait_for(all_four, 20, "the main channel and 3 multifd channels")
            assert seen == [_local_choice() if setting == "auto" else setting] * 4
        finally:
            _, err = src.communicate(timeout=60)
        assert src.returncode == 0, err
        assert dst.wait(60) == 0, dst.stderr
