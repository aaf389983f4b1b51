"""TLS on the main and multifd channels, with QEMU's ``tls-creds-x509`` files and checks.

A creds directory holds ``ca-cert.pem`` (and optionally ``ca-crl.pem``) plus the endpoint's
``server-cert.pem``/``server-key.pem`` or ``client-cert.pem``/``client-key.pem``, as QEMU reads
it. The client verifies the server's certificate and name (``tls-hostname``); the server always
asks for and verifies the client's certificate (QEMU's ``verify-peer=on``) and, with
``tls-authz``, matches its distinguished name against exact names or globs. :class:`TlsSocket`
gives an SSL socket the two calls the data path uses, ``sendmsg`` and ``recvmsg_into`` (the
standard library refuses both on SSL sockets), so the channel loops run unchanged. Sessions are
set up by the parent process and used by the channel process forked after it: the OpenSSL state
lives in user memory and cannot be handed to another process (kernel TLS could, and this kernel
has none), and a destination must read a connection's first bytes to tell what it is. Neither
side uses session tickets, and a clean end sends ``close_notify`` (QEMU 10.0 checks for it).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError, MigrationTimeout, TlsError

CA_CERT, CA_CRL = "ca-cert.pem", "ca-crl.pem"
ENDPOINT_FILES = {"server": ("server-cert.pem", "server-key.pem"), "client": ("client-cert.pem", "client-key.pem")}

#: RFC 4514 names of the attributes Python's ``getpeercert`` spells out (as GnuTLS prints them)
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "localityName": "L",
          "stateOrProvinceName": "ST", "countryName": "C", "streetAddress": "STREET", "domainComponent": "DC",
          "userId": "UID", "emailAddress": "EMAIL"}


@dataclass(frozen=True)
class TlsCreds:
    """A loaded ``tls-creds-x509`` directory for one endpoint (``server`` or ``client``)."""

    context: ssl.SSLContext

    @classmethod
    def load(cls, directory: str | os.PathLike[str], endpoint: str) -> TlsCreds:
        """Read the directory as QEMU's ``tls-creds-x509,dir=DIRECTORY,endpoint=ENDPOINT`` does;
        a missing or unreadable file is a :class:`ConfigError` naming it and what is expected."""
        path = Path(directory)
        cert_name, key_name = ENDPOINT_FILES[endpoint]
        expect = f"{CA_CERT}, {cert_name} and {key_name}"
        if not path.is_dir():
            raise ConfigError(f"tls-creds {str(path)!r} is not a directory, expected one holding {expect}")
        ca, cert, key = path / CA_CERT, path / cert_name, path / key_name
        required = (ca, cert, key) if endpoint == "server" else (ca,)
        for f in required:
            if not f.is_file():
                raise ConfigError(f"tls-creds {str(path)!r} has no {f.name}, expected {expect}"
                                  f" (as QEMU's tls-creds-x509 endpoint={endpoint} reads them)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if endpoint == "server" else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.hostname_checks_common_name = True  # GnuTLS falls back to the CN when a certificate has no SAN
        # QEMU 7.2 ends its channels without close_notify; the streams are framed, so an end
        # inside a packet or section is still caught as a truncation
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        ctx.sslsocket_class = TlsSocket
        if endpoint == "server":
            ctx.num_tickets = 0  # a ticket the source never reads would turn its close into a reset
        try:
            ctx.load_verify_locations(cafile=str(ca))
            if (path / CA_CRL).is_file():
                ctx.load_verify_locations(cafile=str(path / CA_CRL))
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            if cert.is_file() and key.is_file():
                ctx.load_cert_chain(str(cert), str(key), password=_no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls-creds {str(path)!r}: cannot load {expect}: {_reason(exc)}") from None
        except _Encrypted:
            raise ConfigError(f"tls-creds {str(path)!r}: {key.name} is encrypted; it needs a key without a"
                              " passphrase (as QEMU's tls-creds-x509 without passwordid)") from None
        return cls(ctx)


class _Encrypted(Exception):
    pass


def _no_passphrase() -> str:
    raise _Encrypted  # instead of OpenSSL asking on the terminal


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason.lower().replace("_", " ") if exc.reason else str(exc.args[-1])
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def describe(exc: BaseException, *, handshake: bool = False) -> str:
    """One line for why a TLS session failed (or ``handshake`` failed), in the words of the side that reports it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the peer's certificate is not valid: {exc.verify_message}"
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        if handshake:
            return "the peer closed the connection during the TLS handshake (does it use TLS, with our CA?)"
        return "the peer closed the TLS session (did it refuse our certificate? its log says why)"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG",
                      "RECORD_LAYER_FAILURE", "UNSUPPORTED_PROTOCOL"):
            return "the peer does not speak TLS (a plain-text migration? both sides need tls-creds)"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the peer sent no certificate (the client's tls-creds need client-cert.pem and client-key.pem)"
        if "ALERT_" in reason:
            alert = reason.split("ALERT_", 1)[1].lower().replace("_", " ")
            return f"the peer refused the TLS session (alert: {alert})"
        return f"TLS error: {_reason(exc)}"
    return _reason(exc)


def peer_dn(cert: dict[str, Any]) -> str:
    """The subject of ``getpeercert()`` as an RFC 4514 string, as GnuTLS (and so QEMU's
    ``tls-authz``) prints it: last RDN first, e.g. ``CN=src.example.com,O=Example,C=GB``."""
    rdns = []
    for rdn in reversed(cert.get("subject", ())):
        rdns.append("+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def authorized(dn: str, patterns: Sequence[str]) -> bool:
    """``tls-authz``: the DN matches a pattern, exactly or as QEMU's authz-list globs do (GLib's
    ``g_pattern_match_simple``: ``*`` any run of characters, ``?`` one, nothing else special; a
    ``*`` also spans commas, so anchor what matters, e.g. ``CN=*.example.com,O=Example,*``)."""
    return any(_glob(p).fullmatch(dn) is not None for p in patterns)


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)


class TlsRefused(Exception):
    """A connection whose TLS session was refused (not an engine error: the destination logs it)."""


class TlsSocket(ssl.SSLSocket):
    """An SSL socket with the calls the data path makes: ``sendmsg`` writes each buffer in turn
    (TLS records, not one syscall), ``recvmsg_into`` waits for the first record and then takes
    every record already received. Bytes read ahead to tell a connection's kind are handed out
    first (:meth:`peek_nowait`)."""

    _early = b""
    established = False  # the handshake is done (server side, non-blocking)

    # -- the data path's calls

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:  # type: ignore[override]
        if ancdata or flags or address is not None:
            raise OSError(errno.EOPNOTSUPP, "TLS channels take plain sends only")
        total = 0
        cork = self.family != socket.AF_UNIX
        try:
            if cork:  # one write per TLS record: let TCP send them as full segments, not one each
                self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            for b in buffers:
                view = memoryview(b).cast("B")
                self.sendall(view)
                total += len(view)
            if cork:
                self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except ssl.SSLError as exc:
            raise OSError(errno.EPROTO, describe(exc)) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise OSError(exc.errno, self._alert_after(exc)) from None
        return total

    def recvmsg_into(  # type: ignore[override]
            self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> tuple[int, list[Any], int, Any]:
        """Wait (up to the timeout) for the first record, then decrypt every record already
        received into the buffers in order, without waiting again: one call per burst of
        records rather than per record, as ``recvmsg_into`` takes what the socket holds."""
        got = 0
        try:
            got = first = self.recv_into(buffers[0])  # the one wait: the socket's timeout, in ssl's own poll
            if self._early or not got:
                return got, [], 0, None
            read, timeout = self._sslobj.read, self.gettimeout()  # type: ignore[attr-defined]
            self.settimeout(0.0)  # from here on, only records already received
            try:
                for i, b in enumerate(buffers):
                    n, pos = memoryview(b).nbytes, first if i == 0 else 0
                    while pos < n:
                        r = read(n - pos, b[pos:] if pos else b)
                        if not r:  # the end of the session
                            return got, [], 0, None
                        pos += r
                        got += r
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass  # no more received yet
            finally:
                self.settimeout(timeout)
        except ssl.SSLError as exc:
            if exc.args[0] != ssl.SSL_ERROR_EOF:
                raise OSError(errno.EPROTO, describe(exc)) from None
        return got, [], 0, None

    def recv_nowait(self, buffer: Any) -> int | None:
        """What is already here, up to ``len(buffer)``; None if a record is still incomplete
        (the caller waits for the socket again, under its own deadline)."""
        if self.buffered:
            return self.recv_into(buffer)
        timeout = self.gettimeout()
        self.settimeout(0.0)
        try:
            return self.recv_into(buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        finally:
            self.settimeout(timeout)

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if self._early:
            view = memoryview(buffer).cast("B")
            n = min(len(view), len(self._early), nbytes or len(view))
            view[:n] = self._early[:n]
            self._early = self._early[n:]
            return n
        try:
            return super().recv_into(buffer, nbytes, flags)
        except ssl.SSLError as exc:
            if isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                raise
            raise OSError(errno.EPROTO, describe(exc)) from None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if self._early:
            out, self._early = self._early[:buflen], self._early[buflen:]
            return out
        return super().recv(buflen, flags)

    @property
    def buffered(self) -> int:
        """Bytes readable without waiting on the socket (read ahead, or decrypted and not taken)."""
        return len(self._early) + (self.pending() if getattr(self, "_sslobj", None) is not None else 0)

    # -- the destination's accept loop (non-blocking)

    def handshake_step(self) -> bool:
        """Advance a non-blocking server handshake; True once done. Raises :class:`TlsRefused`."""
        try:
            self.do_handshake()
            self.established = True
            return True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (ssl.SSLError, OSError) as exc:
            raise TlsRefused(describe(exc, handshake=True)) from None

    def peek_nowait(self, n: int) -> tuple[bytes, bool]:
        """Up to ``n`` first bytes without waiting (kept for the next reads) and whether the
        peer has closed."""
        eof = False
        while len(self._early) < n:
            try:
                chunk = ssl.SSLSocket.recv(self, n - len(self._early))
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except (ssl.SSLError, OSError) as exc:
                raise TlsRefused(describe(exc)) from None
            if not chunk:
                eof = True
                break
            self._early += chunk
        return self._early[:n], eof

    # -- ends

    def close_notify(self) -> None:
        """End the session cleanly (``close_notify``) without waiting for the peer's reply."""
        try:
            socket.socket.shutdown(self, socket.SHUT_RD)  # the reply is not awaited: read sees EOF
            self._sslobj.shutdown()  # type: ignore[attr-defined]
        except (ssl.SSLError, OSError, AttributeError):
            pass

    def _alert_after(self, exc: OSError) -> str:
        """Why a send failed: the peer's TLS alert if one is waiting (a refused client
        certificate shows only here in TLS 1.3), else the socket error."""
        try:
            self.settimeout(0.0)
            ssl.SSLSocket.recv(self, 1)
        except ssl.SSLError as alert:
            if not isinstance(alert, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
                return describe(alert)
        except OSError:
            pass
        return f"{exc.strerror} (the peer may have refused this TLS session: see its log)"


def client_session(sock: socket.socket, creds: TlsCreds, hostname: str, what: str) -> TlsSocket:
    """The client's handshake on a connected socket (its timeout is the handshake's deadline);
    a refusal is a :class:`~engine.errors.TlsError` naming ``what`` and why."""
    try:  # a failed wrap_socket has closed the connection (it owned it)
        tls = creds.context.wrap_socket(sock, server_hostname=hostname)
    except TimeoutError:
        raise MigrationTimeout(f"{what}: the TLS handshake did not finish within {sock.gettimeout():g}s") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{what}: TLS handshake failed: {describe(exc, handshake=True)}") from None
    assert isinstance(tls, TlsSocket)
    return tls


def server_session(conn: socket.socket, creds: TlsCreds) -> TlsSocket:
    """Start a server session on an accepted, non-blocking connection (:meth:`TlsSocket.handshake_step`)."""
    tls = creds.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
    assert isinstance(tls, TlsSocket)
    return tls


def buffered(sock: socket.socket) -> int:
    """Bytes ``sock`` can hand out without the socket becoming readable (0 for plain sockets)."""
    return sock.buffered if isinstance(sock, TlsSocket) else 0


def recv_ready(sock: socket.socket, buffer: Any) -> int | None:
    """After the socket polled readable: what is there (0 at the end); None when that was only
    part of a TLS record (wait again: never inside a record, past the caller's deadline)."""
    return sock.recv_nowait(buffer) if isinstance(sock, TlsSocket) else sock.recv_into(buffer)


def close_notify(sock: socket.socket) -> None:
    """A clean end of a TLS session (nothing for a plain socket)."""
    if isinstance(sock, TlsSocket):
        sock.close_notify()
