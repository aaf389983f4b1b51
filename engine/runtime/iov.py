"""One ``sendmsg`` / ``recvmsg`` per packet over guest pages, with no Python object per page.

``socket.sendmsg`` wants one buffer object per run of pages, and the runs must be found first:
a Python loop over the packet's pages and a memoryview per run, in every channel, for every
packet. Here a packet's iovec array (header, then one 4 KiB entry per page) is filled from the
page indices by one numpy operation and handed to libc's ``sendmsg`` / ``recvmsg`` through
ctypes, so the per-packet cost no longer depends on how the pages are scattered; the kernel
walks one entry per page as fast as one per run (docs/performance.md).

A call takes at most ``IOV_MAX`` entries, so a packet of more pages than that goes in more
than one call; after a partial call the next entry is found by a search of the entries'
running lengths (numpy), not by a walk over them.

The socket keeps its Python timeout (it is non-blocking underneath): a call that finds the
socket full (or empty) waits in ``poll`` for at most that timeout, as ``socket.sendmsg`` does,
and the errors read as ``transport``'s. Only plain sockets: TLS and ``zero-copy-send`` keep
their own paths.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ChannelError, MigrationTimeout, TruncatedError
from ..wire.packet import PAGES_PER_PACKET, TARGET_PAGE_BITS, TARGET_PAGE_SIZE
from .libc import libc


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_sendmsg = libc.sendmsg
_sendmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int]
_sendmsg.restype = ctypes.c_ssize_t
_recvmsg = libc.recvmsg
_recvmsg.argtypes = [ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int]
_recvmsg.restype = ctypes.c_ssize_t
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0x4000)
ENTRY_SIZE = ctypes.sizeof(_IoVec)  # bytes of one iovec entry
_SYSCONF_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else -1
IOV_MAX = _SYSCONF_IOV_MAX if _SYSCONF_IOV_MAX > 0 else 1024  # -1: no limit stated (Linux's is 1024)


def address_of(array: npt.NDArray[Any]) -> int:
    """The address of a numpy array's first byte (its buffer stays owned by the array)."""
    return int(array.__array_interface__["data"][0])


class PageIO:
    """A channel's iovec array and message header, reused for every packet (one per process).

    Entry 0 is the packet header; entries 1..n are guest pages; on the receive side one more
    entry after the pages takes whatever follows them in the socket, up to a header's worth
    (the next packet's header: usually one ``recvmsg`` per packet)."""

    def __init__(self, sock: socket.socket, what: str, header: bytearray, packet_pages: int = PAGES_PER_PACKET) -> None:
        self.sock, self.fd, self.what = sock, sock.fileno(), what
        self._iov = (_IoVec * (packet_pages + 2))()
        raw = memoryview(self._iov).cast("B")
        self._cols = np.frombuffer(raw, dtype=np.uint64).reshape(packet_pages + 2, 2)
        self._cols[:, 1] = TARGET_PAGE_SIZE
        self._header = (ctypes.c_char * len(header)).from_buffer(header)
        self._iov_at = ctypes.addressof(self._iov)
        self._msg = _MsgHdr()
        self._msg_ref = ctypes.byref(self._msg)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLOUT | select.POLLIN)

    def close(self) -> None:
        """Nothing to release here (a subclass may own file descriptors)."""

    def _fill(self, base: int, pages: npt.NDArray[np.int64]) -> int:
        n = len(pages)
        bases = self._cols[1:n + 1, 0]
        # page indices are never negative: viewed as unsigned, the shift needs no casting loop
        np.left_shift(pages.view(np.uint64), TARGET_PAGE_BITS, out=bases)
        bases += base
        return n

    def _wait(self, events: int) -> None:
        """Wait (at most the socket's timeout) until the socket can take or give bytes."""
        timeout = self.sock.gettimeout()
        self._poll.modify(self.fd, events)
        if not self._poll.poll(None if timeout is None else int(timeout * 1000) + 1):
            if events == select.POLLOUT:
                raise MigrationTimeout(f"{self.what}: sending stalled for {timeout:g}s (the peer is not reading)")
            raise MigrationTimeout(f"{self.what}: nothing received for {timeout:g}s")

    def _transfer(self, call: Any, flags: int, first: int, count: int, need: int, events: int) -> int:
        """Run ``call`` over entries ``[first, first + count)`` until at least ``need`` bytes
        have moved; returns the bytes moved (at most the entries' total)."""
        msg, iov, at = self._msg, self._iov, self._iov_at
        end = first + count
        msg.iov, msg.iovlen = at + first * ENTRY_SIZE, min(count, IOV_MAX)
        done, cut, by = 0, -1, 0  # the entry a partial call ended in, and by how much its start moved
        ends: npt.NDArray[np.uint64] | None = None  # the entries' running lengths, from a first partial call
        try:
            while True:
                r = call(self.fd, self._msg_ref, flags)
                if r < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                        self._wait(events)
                    elif err != errno.EINTR:
                        raise OSError(err, os.strerror(err))
                    continue
                if r == 0:
                    raise TruncatedError(f"{self.what}: connection closed after {done} of {need} bytes")
                done += r
                if done >= need:
                    return int(done)
                if ends is None:
                    ends = np.cumsum(self._cols[first:end, 1])
                if cut >= 0:  # undo the last cut: entries are cut from their original start
                    iov[cut].base -= by
                    iov[cut].len += by
                k = first + int(np.searchsorted(ends, done, side="right"))  # the entry the next byte is in
                into = done - (int(ends[k - first - 1]) if k > first else 0)
                cut, by = k, into
                if into:
                    iov[k].base += into
                    iov[k].len -= into
                msg.iov, msg.iovlen = at + k * ENTRY_SIZE, min(end - k, IOV_MAX)
        except OSError as exc:  # the call's own errors (ours are not OSErrors)
            verb = "send" if events == select.POLLOUT else "receive"
            raise ChannelError(f"{self.what}: {verb} failed: {exc.strerror or exc}") from exc
        finally:
            if cut >= 0:  # the page entries' lengths are reused by the next packet
                self._cols[:, 1] = TARGET_PAGE_SIZE

    def send_packet(self, header_len: int, base: int, pages: npt.NDArray[np.int64]) -> int:
        """Send the header (its first ``header_len`` bytes) and pages ``pages`` of the block
        mapped at ``base``; returns the bytes sent."""
        n = self._fill(base, pages)
        head = self._iov[0]
        head.base, head.len = ctypes.addressof(self._header), header_len
        total = header_len + n * TARGET_PAGE_SIZE
        self._transfer(_sendmsg, _MSG_NOSIGNAL, 0, n + 1, total, select.POLLOUT)
        return total

    def recv_pages(self, base: int, offsets: npt.NDArray[Any], ahead: int) -> int:
        """Receive ``len(offsets)`` pages at byte ``offsets`` (checked by the caller) of the
        block mapped at ``base``, and up to ``ahead`` bytes more into the header buffer; returns
        the bytes that went into the header buffer."""
        n = len(offsets)
        bases = self._cols[1:n + 1, 0]
        np.add(offsets, np.uint64(base), out=bases, casting="unsafe")
        tail = self._iov[n + 1]
        tail.base, tail.len = ctypes.addressof(self._header), ahead
        need = n * TARGET_PAGE_SIZE
        got = self._transfer(_recvmsg, 0, 1, n + 1, need, select.POLLIN)
        self._cols[n + 1, 1] = TARGET_PAGE_SIZE
        return got - need
