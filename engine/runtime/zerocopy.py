"""QEMU's ``zero-copy-send``: guest pages handed to the kernel with ``MSG_ZEROCOPY``.

Theory of operation
-------------------
With ``SO_ZEROCOPY`` on a TCP socket, ``sendmsg(..., MSG_ZEROCOPY)`` pins the pages of the
buffers and the network stack reads them later, instead of copying them into the socket during
the call. The kernel numbers every such call and reports finished ones on the socket's error
queue (``sock_extended_err``, origin ``SO_EE_ORIGIN_ZEROCOPY``, a range of call numbers), with
``SO_EE_CODE_ZEROCOPY_COPIED`` when it had to copy after all (always over loopback). Until a
call is reported, the pages it named may still be read: so only guest RAM goes this way (a
packet's header is sent first with a plain copy, as QEMU does), and :meth:`ZeroCopySender.flush`
waits for every report before a SYNC packet, so a dirty-log sync never races a page that is
still being read. Each flush that saw a copy counts once, as QEMU's ``dirty-sync-missed-zero-copy``.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from typing import Sequence

from ..errors import ChannelError, ConfigError, MigrationTimeout

SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ZEROCOPY = 5
SO_EE_CODE_ZEROCOPY_COPIED = 1
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data


def enable_zero_copy(sock: socket.socket, what: str) -> None:
    """``SO_ZEROCOPY`` on ``sock``; one clear error if the kernel or the socket refuses it."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ConfigError(f"zero-copy-send needs a tcp: URI, got a {sock.family.name} socket ({what})")
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
    except OSError as exc:
        raise ConfigError(f"zero-copy-send: {what}: the kernel refused SO_ZEROCOPY ({exc.strerror or exc})") from None


class ZeroCopySender:
    """The ``MSG_ZEROCOPY`` sends of one socket and their completions (one per channel process)."""

    def __init__(self, sock: socket.socket, what: str, timeout: float) -> None:
        self.sock = sock
        self.what = what
        self.timeout = timeout
        # The error queue is read without waiting for data to arrive (the socket object has a
        # timeout, so its own calls would poll for POLLIN first): a second, non-blocking object.
        self._errq = sock.dup()
        self._errq.setblocking(False)
        self._poll = select.poll()
        self._poll.register(self._errq.fileno(), 0)  # POLLERR is always reported
        self.calls = 0  # sendmsg calls that queued data with MSG_ZEROCOPY
        self.completed = 0
        self.copied = 0  # completions the kernel had to copy
        self._copied_at_flush = 0
        self.missed = 0  # flushes that saw a copy (dirty-sync-missed-zero-copy)

    def send(self, buffers: Sequence[memoryview], total: int) -> int:
        """Send every buffer (byte views of guest RAM) with as few calls as the kernel allows."""
        views = list(buffers)
        done = 0
        try:
            while done < total:
                try:
                    n = self.sock.sendmsg(views, [], MSG_ZEROCOPY)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:  # ENOBUFS: too many sends pinned; reap, retry
                        raise
                    self.reap(wait=True)
                    continue
                if n:
                    self.calls += 1
                done += n
                while n and n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                if n:
                    views[0] = views[0][n:]
                self.reap(wait=False)
        except socket.timeout as exc:
            raise MigrationTimeout(f"{self.what}: sending stalled for {self.sock.gettimeout():g}s") from exc
        except OSError as exc:
            raise ChannelError(f"{self.what}: send failed: {exc.strerror or exc}") from exc
        return total

    def reap(self, *, wait: bool) -> None:
        """Take in the completions on the error queue; with ``wait``, at least one (or all)."""
        deadline = time.monotonic() + self.timeout
        while self.completed < self.calls:
            try:
                _, ancdata, _, _ = self._errq.recvmsg(0, 1024, MSG_ERRQUEUE)
            except BlockingIOError:
                if not wait:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MigrationTimeout(
                        f"{self.what}: {self.calls - self.completed} zero-copy sends not completed within"
                        f" {self.timeout:g}s"
                    ) from None
                self._poll.poll(min(left, 1.0) * 1000)
                continue
            except OSError as exc:
                raise ChannelError(f"{self.what}: reading zero-copy completions failed: {exc.strerror or exc}") from exc
            for _level, _type, data in ancdata:
                if len(data) < _EXTENDED_ERR.size:
                    continue
                ee_errno, origin, _, code, _, first, last = _EXTENDED_ERR.unpack_from(data)
                if origin != SO_EE_ORIGIN_ZEROCOPY:
                    continue
                if ee_errno:
                    raise ChannelError(f"{self.what}: zero-copy send failed: {errno.errorcode.get(ee_errno, ee_errno)}")
                n = (last - first + 1) & 0xFFFFFFFF
                self.completed += n
                if code & SO_EE_CODE_ZEROCOPY_COPIED:
                    self.copied += n
            if wait and self.completed >= self.calls:
                return

    def flush(self) -> None:
        """Wait until the kernel is done with every page sent so far (before a SYNC packet)."""
        self.reap(wait=True)
        if self.copied != self._copied_at_flush:
            self.missed += 1
            self._copied_at_flush = self.copied

    def close(self) -> None:
        self._errq.close()
