"""Accept one migration: listen, tell connections apart by their first bytes, drop strays.

Connections are classified as QEMU 8.0+ does (``QEVM`` = main channel, ``0x11223344`` = a
multifd channel, mapped by the id in its handshake), so the order of connects does not matter
(a QEMU 7.2 source connects the main channel first and works either way). A connection that
sends neither within the handshake deadline, or sends something else, is dropped without
disturbing the migration (and counted in the error if the migration's own channels then fail
to arrive in time: a QEMU 7.2 destination would freeze on such a connection instead).
With ``tls-creds`` every connection first completes a TLS handshake, non-blocking, here (the
first bytes are inside the session); a connection that fails it, or whose certificate's DN is
not in ``tls-authz``, is refused the same way, logged with the reason.
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import MigrationCancelled, MigrationTimeout
from ..params import MigrationParams
from ..runtime.tls import TlsCreds, TlsRefused, TlsSocket, authorized, peer_dn, server_session
from ..runtime.transport import Deadline
from ..wire.packet import INIT_SIZE, MULTIFD_MAGIC, MultiFDInit, validate_init

QEVM = b"QEVM"
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")
TLS_HANDSHAKE = b"\x16\x03"  # a TLS record: handshake, version 3.x

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(f"engine: {msg}", file=sys.stderr, flush=True)


@dataclass
class Accepted:
    main: socket.socket
    channels: list[socket.socket]
    connect_time: float
    #: connections accepted but not yet identified when the migration's own were complete
    pending: dict[socket.socket, float] = field(default_factory=dict)
    tls: TlsCreds | None = None


def admit(listener: socket.socket, tls: TlsCreds | None, log: Log) -> socket.socket | None:
    """Accept a connection, non-blocking until it is identified (in a TLS session if ``tls``);
    None for one that is gone already (a connect scan resets it at once)."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return None
    conn.setblocking(False)
    if tls is None:
        return conn
    try:
        return server_session(conn, tls)
    except (OSError, ValueError) as exc:  # reset before the session could start
        log(f"refused a connection: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")
        conn.close()
        return None


def peer_name(conn: socket.socket) -> str:
    try:
        peer = conn.getpeername()
    except OSError:
        return "a connection"
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a connection"


def _first_bytes(conn: socket.socket, params: MigrationParams) -> bytes | None:
    """Up to INIT_SIZE first bytes, left to be read again; b"" at EOF, None if none yet. A TLS
    connection first completes its handshake and ``tls-authz`` (else :class:`TlsRefused`)."""
    if isinstance(conn, TlsSocket):
        if not conn.established:
            if not conn.handshake_step():
                return None
            if params.tls_authz:
                dn = peer_dn(conn.getpeercert() or {})
                if not authorized(dn, params.tls_authz):
                    raise TlsRefused(f"client certificate {dn!r} is not in tls-authz")
        head, eof = conn.peek_nowait(INIT_SIZE)
        return head if head or eof else None
    try:
        return conn.recv(INIT_SIZE, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def classify(conn: socket.socket, params: MigrationParams, chans: dict[int, socket.socket]) -> str | None:
    """'main', 'multifd', 'stray', 'tls' (a TLS client; this destination has no tls-creds) or
    None (need more bytes). Raises on a bad multifd handshake, :class:`TlsRefused` on a refused
    TLS session."""
    head = _first_bytes(conn, params)
    if head is None:
        return None
    if not head:
        return "stray"
    if not isinstance(conn, TlsSocket) and TLS_HANDSHAKE.startswith(head[:2]):
        return "tls" if len(head) >= 2 else None
    if len(head) < 4:
        return None if QEVM.startswith(head) or MULTIFD_MAGIC_BYTES.startswith(head) else "stray"
    if head[:4] == QEVM:
        return "main"
    if head[:4] == MULTIFD_MAGIC_BYTES:
        if len(head) < INIT_SIZE:
            return None
        init = MultiFDInit.unpack(conn.recv(INIT_SIZE))
        ch = validate_init(init, expected_uuid=params.uuid, channels=params.channels, connected=set(chans))
        chans[ch] = conn
        return "multifd"
    return "stray"


DROPPED = {
    "stray": "dropped a connection that is neither a main nor a multifd channel",
    "tls": "dropped a TLS connection: this destination has no tls-creds (plain text)",
    "main": "dropped a second main-channel connection",
}


def accept_migration(listener: socket.socket, params: MigrationParams, *, listen_timeout: float, log: Log,
                     cancel: threading.Event | None = None, tls: TlsCreds | None = None) -> Accepted:
    """Wait for one migration: its main channel and all N multifd channels."""
    pending: dict[socket.socket, float] = {}
    chans: dict[int, socket.socket] = {}
    main: socket.socket | None = None
    first: float | None = None
    wait_all: Deadline | None = None
    listen_deadline = Deadline(listen_timeout)
    silent = 0  # connections dropped because they sent no handshake in time
    refusals, last_refusal = 0, ""  # refused TLS sessions, and why the last one was
    ok = False

    def no_handshake() -> str:
        n = silent + len(pending)  # still-unidentified connections have been silent as long
        out = ""
        if n:
            out = f"; {n} connection{'s' if n > 1 else ''} sent no handshake within {params.handshake_timeout:g}s"
        if refusals:
            out += f"; {refusals} connection{'s' if refusals > 1 else ''} refused, the last: {last_refusal}"
        return out

    try:
        while main is None or len(chans) < params.channels:
            if cancel is not None and cancel.is_set():
                raise MigrationCancelled("incoming migration cancelled")
            now = time.monotonic()
            if wait_all is None and listen_deadline.expired():
                raise MigrationTimeout(f"no migration arrived within {listen_timeout:g}s{no_handshake()}")
            if wait_all is not None and wait_all.expired():
                have = "the main channel" if main is not None else "no main channel"
                raise MigrationTimeout(
                    f"received {have} and {len(chans)} of {params.channels} multifd channels within"
                    f" {params.handshake_timeout:g}s (missing channel ids"
                    f" {sorted(set(range(params.channels)) - set(chans))}{no_handshake()})"
                )
            for conn, dl in list(pending.items()):
                if now >= dl:
                    log(f"dropped a connection that sent no handshake within {params.handshake_timeout:g}s")
                    del pending[conn]
                    conn.close()
                    silent += 1
            ready = mpc.wait([listener, *pending], 0.2)
            for obj in ready:
                if obj is listener:
                    new = admit(listener, tls, log)
                    if new is None:
                        continue
                    pending[new] = time.monotonic() + params.handshake_timeout
                    if first is None:
                        first = time.monotonic()
                    continue
                conn = obj  # type: ignore[assignment]
                try:
                    kind = classify(conn, params, chans)
                except TlsRefused as exc:
                    refusals, last_refusal = refusals + 1, str(exc)
                    log(f"refused {peer_name(conn)}: {exc}")
                    kind = "refused"
                if kind is None:
                    continue
                del pending[conn]
                if kind == "main" and main is None:
                    main = conn
                elif kind == "multifd":
                    pass
                else:
                    if kind in DROPPED:  # a refusal is logged with its reason above
                        log(DROPPED[kind])
                    conn.close()
                    continue
                if wait_all is None:
                    wait_all = Deadline(params.handshake_timeout)
        ok = True
    finally:
        if not ok:
            for conn in pending:
                conn.close()
            for conn in chans.values():
                conn.close()
            if main is not None:
                main.close()
    assert main is not None and first is not None
    socks = [chans[i] for i in range(params.channels)]
    for s in [main, *socks]:
        s.setblocking(True)
    return Accepted(main, socks, first, pending, tls)
