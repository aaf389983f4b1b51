#!/usr/bin/env python3
"""A TCP proxy that records what a migration source sends, connection by connection.

Theory of operation
-------------------
:class:`CaptureProxy` listens on ``127.0.0.1`` (port 0 = any free port) and, for every
connection it accepts, opens one to the upstream address and forwards bytes both ways. The
bytes the *client* (the migration source) sends are also appended to ``conn<k>.bin`` in the
capture directory, ``k`` being the accept order: for a QEMU 7.2 source ``conn0.bin`` is the main
channel and the others are the multifd channels (their ids are in their 64-byte handshakes);
``python -m engine inspect`` tells them apart by their first bytes anyway.

Fault injection: connections whose accept index is in ``silent`` are connected upstream but
nothing is ever forwarded in either direction (a peer that never sends its handshake).

One thread accepts; one thread per connection pumps both directions with ``select``. Every
wait has a timeout, and :meth:`CaptureProxy.close` (idempotent; the context manager calls it)
shuts every socket down before joining, so it stops everything within a few seconds. Close it
only after both peers are done if the captures must be complete. EOF is propagated with ``shutdown(SHUT_WR)``.

Command line::

    scripts/capture_proxy.py UPSTREAM_HOST:PORT CAPTURE_DIR   # prints "listening on tcp:127.0.0.1:P"
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Collection, IO

CHUNK = 1 << 20


class CaptureProxy:
    """Forward connections to ``upstream``, recording client->server bytes in ``capture_dir``."""

    def __init__(self, upstream: tuple[str, int], capture_dir: Path | None = None, *,
                 silent: Collection[int] = (), connect_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.capture_dir = Path(capture_dir) if capture_dir is not None else None
        if self.capture_dir is not None:
            self.capture_dir.mkdir(parents=True, exist_ok=True)
        self.silent = frozenset(silent)
        self.connect_timeout = connect_timeout
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=300)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self.accepted = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, name="capture-proxy-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> CaptureProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def files(self) -> list[Path]:
        """The capture files, in accept order."""
        if self.capture_dir is None:
            return []
        return [self.capture_dir / f"conn{k}.bin" for k in range(self.accepted)
                if (self.capture_dir / f"conn{k}.bin").exists()]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            k = self.accepted
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(k, client), name=f"capture-proxy-{k}", daemon=True)
            with self._lock:
                self._socks.append(client)
                self._threads.append(t)
            t.start()

    def _serve(self, k: int, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=self.connect_timeout)
        except OSError as exc:
            self.errors.append(f"connection {k}: cannot connect upstream: {exc}")
            client.close()
            return
        with self._lock:
            if self._closed:  # close() already took its list of sockets
                up.close()
                client.close()
                return
            self._socks.append(up)
        if k in self.silent:
            self._stop.wait()  # hold both ends open, forward nothing
            return
        out: IO[bytes] | None = None
        if self.capture_dir is not None:
            out = open(self.capture_dir / f"conn{k}.bin", "wb")
        try:
            self._pump(client, up, out)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(f"connection {k}: {exc}")
        finally:
            if out is not None:
                out.close()

    def _pump(self, client: socket.socket, up: socket.socket, out: IO[bytes] | None) -> None:
        open_from = {client: up, up: client}  # source -> where its bytes go
        while open_from and not self._stop.is_set():
            ready, _, _ = select.select(list(open_from), [], [], 0.1)
            for src in ready:
                data = src.recv(CHUNK)
                dst = open_from[src]
                if not data:
                    del open_from[src]
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                if src is client and out is not None:
                    out.write(data)
                dst.sendall(data)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every socket, join every thread. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        self._acceptor.join(timeout)
        self.listener.close()
        with self._lock:
            self._closed = True
            socks, threads = list(self._socks), list(self._threads)
        for s in socks:  # wakes a pump blocked in sendall
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for s in socks:
            s.close()


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: capture_proxy.py UPSTREAM_HOST:PORT CAPTURE_DIR", file=sys.stderr)
        return 2
    host, _, port = argv[0].rpartition(":")
    with CaptureProxy((host or "127.0.0.1", int(port)), Path(argv[1])) as proxy:
        print(f"capture_proxy: listening on {proxy.uri}", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    print(f"capture_proxy: {proxy.accepted} connections captured in {os.path.abspath(argv[1])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
