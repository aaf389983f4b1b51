"""Transports: QEMU migration URIs (``tcp:HOST:PORT``, ``unix:PATH``), listen, connect,
vectored send and exact receives into caller memory.

Every blocking call here has a deadline: sockets carry a timeout, and a timeout becomes
:class:`MigrationTimeout` naming what we were waiting for.

A source's TCP sockets get their congestion control before they connect (``tcp-congestion``).
With ``auto``, a destination on this host gets :data:`LOCAL_CONGESTION`: the host's default may
be a pacing algorithm (BBR, as on this project's VM), which on loopback throttles the sender
with timers and costs CPU for nothing (there is no queue to protect), and the choice has to be
made before ``connect``, since BBR marks the socket as paced when it starts and switching away
later keeps the pacing. Towards another host the system's default stays. (Measured in
docs/performance.md, "The sender's congestion control".)
"""

from __future__ import annotations

# socket.getaddrinfo encodes host names with the idna codec: imported here, with the rest,
# rather than at a migration's first connect, inside its setup-time (docs/performance.md)
import encodings.idna  # noqa: F401
import errno
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import (
    ChannelClosed,
    ChannelError,
    ConfigError,
    MigrationTimeout,
    TruncatedError,
)

SOCKET_BUFFER = 4 << 20  # this host's wmem_max; smaller buffers cost more channel CPU (docs/experiments.md)
#: tcp-congestion=auto towards this host: the first one the kernel lets this user set
LOCAL_CONGESTION = ("cubic", "reno")


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"


Address = TcpAddress | UnixAddress


def parse_uri(uri: str) -> Address:
    """Parse a QEMU migration URI: ``tcp:HOST:PORT``, ``tcp:[IPV6]:PORT`` or ``unix:PATH``."""
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ConfigError(f"invalid migration URI {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    if scheme == "unix":
        return UnixAddress(rest)
    if scheme != "tcp":
        raise ConfigError(f"unsupported migration URI scheme {scheme!r} in {uri!r}: expected tcp or unix (multifd needs a socket)")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ConfigError(f"invalid migration URI {uri!r}: expected tcp:[IPV6]:PORT")
        port_text = port_text[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise ConfigError(f"invalid migration URI {uri!r}: expected tcp:HOST:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"invalid port {port_text!r} in migration URI {uri!r}: expected 0..65535")
    return TcpAddress(host or "0.0.0.0", int(port_text))


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listen(addr: Address, backlog: int) -> socket.socket:
    """A listening socket bound exactly to ``addr``."""
    try:
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(addr.path):
                    import stat

                    if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                        os.unlink(addr.path)
                sock.bind(addr.path)
            except BaseException:
                sock.close()
                raise
        else:
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
            except BaseException:
                sock.close()
                raise
        _tune(sock)
        sock.listen(backlog)
        return sock
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {addr.uri}: {exc.strerror}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot listen on {addr.uri}: {exc.strerror or exc}") from exc


def bound_uri(sock: socket.socket, addr: Address) -> str:
    """The URI a peer should use, with the real port when listening on port 0."""
    if isinstance(addr, UnixAddress):
        return addr.uri
    host, port = sock.getsockname()[:2]
    if addr.host not in ("0.0.0.0", "::", ""):
        host = addr.host
    return TcpAddress(host, port).uri


def connect(addr: Address, timeout: float, congestion: str | None = None) -> socket.socket:
    """Connect with a deadline; the socket keeps ``timeout`` for later blocking calls.
    ``congestion``: the TCP congestion control (``auto``: see the module docstring; None: the
    system's default); ignored for UNIX sockets."""
    try:
        if isinstance(addr, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(addr.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = _connect_tcp(addr, timeout, congestion)
        _tune(sock)
        return sock
    except socket.timeout as exc:
        raise MigrationTimeout(f"connecting to {addr.uri} timed out after {timeout:g}s") from exc
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {addr.uri}: {exc.strerror}") from exc
    except OSError as exc:
        raise ChannelError(f"cannot connect to {addr.uri}: {exc.strerror or exc}") from exc


def _connect_tcp(addr: TcpAddress, timeout: float, congestion: str | None) -> socket.socket:
    """``socket.create_connection``, with the congestion control set before each attempt."""
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if congestion is not None:
                set_congestion(sock, congestion, congestion == "auto" and on_this_host(family, sockaddr))
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:  # the next address, as create_connection does
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {addr.host!r}")


def on_this_host(family: int, sockaddr: tuple[Any, ...]) -> bool:
    """Whether a connection to ``sockaddr`` stays on this host: a loopback or unspecified
    address, or one the kernel routes locally (it then picks the address itself as the source;
    a UDP ``connect`` is only that route lookup and sends nothing)."""
    ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return bool(probe.getsockname()[0] == sockaddr[0])
    except OSError:  # no route: not here
        return False


def set_congestion(sock: socket.socket, congestion: str, local_peer: bool) -> None:
    """Set ``sock``'s TCP congestion control before it connects: ``auto`` takes the first of
    :data:`LOCAL_CONGESTION` the kernel allows when the peer is on this host and leaves the
    system's default otherwise; a name is that algorithm, or a :class:`ConfigError`."""
    if congestion == "auto":
        for name in LOCAL_CONGESTION if local_peer else ():
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
                return
            except OSError:
                continue
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    except OSError as exc:
        kind = "allowed" if exc.errno == errno.EPERM else "available"
        why = "not allowed for this user" if kind == "allowed" else "not available on this host"
        raise ConfigError(f"tcp-congestion {congestion!r}: {why} ({kind}: {congestion_setting(kind)})") from None


def congestion_setting(kind: str) -> str:
    """The kernel's TCP congestion control ``kind``: ``default`` (what a socket gets),
    ``available`` (loaded) or ``allowed`` (settable without privileges), as in
    ``/proc/sys/net/ipv4/tcp_{kind}_congestion_control``; "unknown" if it cannot be read."""
    name = "tcp_congestion_control" if kind == "default" else f"tcp_{kind}_congestion_control"
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return f.read().strip() or "none"
    except OSError:
        return "unknown"


def send_all(sock: socket.socket, buffers: Sequence[object], what: str, total: int | None = None) -> int:
    """Send every buffer with as few ``sendmsg`` calls as the kernel allows; returns the byte count.

    A caller that knows ``total`` (the buffers' byte count) saves wrapping each buffer in a
    byte view unless the kernel takes only part of them."""
    sent = 0
    try:
        if total is not None:
            sent = sock.sendmsg(buffers)  # type: ignore[arg-type]
            if sent == total:
                return total
        views = [memoryview(b).cast("B") for b in buffers]  # type: ignore[arg-type]
        if total is None:
            total = sum(len(v) for v in views)
        done = sent
        while True:
            while sent and sent >= len(views[0]):  # drop what the last call took
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]
            if done == total:
                break
            sent = sock.sendmsg(views)
            done += sent
    except socket.timeout as exc:
        raise MigrationTimeout(f"{what}: sending stalled for {sock.gettimeout():g}s (the peer is not reading)") from exc
    except OSError as exc:
        raise ChannelError(f"{what}: send failed: {exc.strerror or exc}") from exc
    return total


def recv_exact_into(sock: socket.socket, view: memoryview, what: str, *, eof_ok: bool = False,
                    start: int = 0) -> bool:
    """Fill ``view`` completely; its first ``start`` bytes are already there. Returns False on
    EOF before the first byte when ``eof_ok``."""
    n = len(view)
    return start >= n or recv_at_least_into(sock, view, n, what, start=start, eof_ok=eof_ok) > 0


def recv_at_least_into(sock: socket.socket, view: memoryview, need: int, what: str, *, start: int = 0,
                       eof_ok: bool = False) -> int:
    """Receive into ``view`` until at least ``need`` bytes are there, and at most ``len(view)``
    (its first ``start`` bytes are already there): whatever more is already in the socket, the
    start of the next packet, comes in the same call instead of the next. Never waits for more
    than ``need``. Returns the bytes in ``view``; 0 only on EOF before the first byte, when
    ``eof_ok``."""
    got = start
    try:
        while got < need:
            r = sock.recv_into(view[got:] if got else view)  # usually all of it: no sliced view to make
            if r == 0:
                if got == 0 and eof_ok:
                    return 0
                if got == 0:
                    raise ChannelClosed(f"{what}: connection closed by the peer")
                raise TruncatedError(f"{what}: connection closed after {got} of {need} bytes")
            got += r
    except socket.timeout as exc:
        raise MigrationTimeout(f"{what}: nothing received for {sock.gettimeout():g}s") from exc
    except (ConnectionError, OSError) as exc:
        if isinstance(exc, ChannelError):
            raise
        raise ChannelError(f"{what}: receive failed: {exc.strerror or exc}") from exc
    return got


def recv_at_least_into_many(sock: socket.socket, views: list[memoryview], need: int, what: str) -> int:
    """Receive into ``views`` in order until at least ``need`` bytes are there (the first views,
    e.g. runs of guest pages), taking whatever more is already in the socket into the views
    after them (e.g. the next packet's header): usually one ``recvmsg_into`` per packet.
    Never waits for more than ``need``. Returns the bytes received."""
    got = 0
    try:
        while True:
            r = sock.recvmsg_into(views)[0]
            got += r
            if got >= need:
                return got
            if r == 0:
                raise TruncatedError(f"{what}: connection closed after {got} of {need} bytes")
            while r >= len(views[0]):
                r -= len(views[0])
                views.pop(0)
            if r:
                views[0] = views[0][r:]
    except socket.timeout as exc:
        raise MigrationTimeout(f"{what}: nothing received for {sock.gettimeout():g}s") from exc
    except OSError as exc:
        raise ChannelError(f"{what}: receive failed: {exc.strerror or exc}") from exc


def recv_exact_into_many(sock: socket.socket, views: list[memoryview], what: str) -> None:
    """Fill several buffers in order (``recvmsg_into``), e.g. runs of guest pages."""
    recv_at_least_into_many(sock, views, sum(len(v) for v in views), what)


FDS_PER_CHANNEL = 6  # socket, job/control pipe, event pipe, sentinel, slack


def ensure_fd_budget(channels: int, role: str) -> None:
    """Check (and if possible raise) the open-file limit before opening any socket."""
    import resource

    need = 32 + FDS_PER_CHANNEL * channels
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ConfigError(
            f"{role}: multifd-channels {channels} needs about {need} open files, the limit is {soft}"
            f" (hard limit {hard}); raise it with ulimit -n or use fewer channels"
        )


class Deadline:
    """A point in time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at
