"""A source channel's pages into its socket by reference: ``vmsplice`` into a pipe, ``splice`` out.

``sendmsg`` makes the kernel copy every page into the socket's buffers. ``vmsplice`` instead
puts references to the guest's pages into a pipe (one slot per page, from the same iovec array
:class:`~engine.runtime.iov.PageIO` fills) and ``splice`` moves them into the socket, where TCP
(or a UNIX socket) sends them from guest RAM: the source's only copy of the page is gone, and
the receiver's is the one copy. The header is written into the pipe first (copied: its buffer
is reused by the next packet). A packet goes in pieces of at most the pipe's size, each drained
before the next, so ``vmsplice`` never waits; the socket keeps its timeout, as in ``PageIO``.

Like QEMU's ``zero-copy-send``, a page the guest writes while it is in flight may leave with its
new bytes. That is harmless for the same reason: the write dirtied the page, so a later section
sends it again, and the destination applies section k+1 only after every packet of section k.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import socket

import numpy as np
import numpy.typing as npt

from ..errors import ChannelError
from ..wire.packet import PAGES_PER_PACKET, TARGET_PAGE_SIZE
from .iov import ENTRY_SIZE, PageIO
from .libc import libc

_vmsplice = getattr(libc, "vmsplice", None)  # Linux only
if _vmsplice is not None:
    _vmsplice.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    _vmsplice.restype = ctypes.c_ssize_t
#: the pipe's size asked for (pipe-max-size's default, which unprivileged processes may use)
PIPE_SIZE = 1 << 20
#: fewer pipe slots than this and a packet would go in pieces too small to be worth it
MIN_SLOTS = 16


def can_splice() -> bool:
    return _vmsplice is not None and hasattr(os, "splice")


def page_io(sock: socket.socket, what: str, header: bytearray, packet_pages: int = PAGES_PER_PACKET) -> PageIO:
    """The source's way to send a ``none`` packet on a plain socket: by reference where the
    kernel can, else one ``sendmsg`` of the iovec array (no vmsplice, or a pipe too small)."""
    if can_splice():
        try:
            return PageSplicer(sock, what, header, packet_pages)
        except OSError:
            pass
    return PageIO(sock, what, header, packet_pages)


class PageSplicer(PageIO):
    """:class:`PageIO` whose :meth:`send_packet` passes the pages by reference. Owns a pipe:
    :meth:`close`. The pipe's slots hold one kernel page each (a 4 KiB target page inside a
    bigger host page takes one slot too); raises OSError when the pipe gets too few."""

    def __init__(self, sock: socket.socket, what: str, header: bytearray, packet_pages: int = PAGES_PER_PACKET) -> None:
        super().__init__(sock, what, header, packet_pages)
        self._head = memoryview(header)
        self._r, self._w = os.pipe()
        try:
            try:
                size = fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # a lower pipe-max-size: the pipe keeps its size
                size = fcntl.fcntl(self._w, fcntl.F_GETPIPE_SZ)
            self._slots = size // mmap.PAGESIZE
            self._header_slots = -(-len(header) // mmap.PAGESIZE)  # the header's bytes, written into pipe pages
            if self._slots < self._header_slots + MIN_SLOTS:
                raise OSError(f"{what}: a pipe of {size} bytes holds too few pages to splice from")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def send_packet(self, header_len: int, base: int, pages: npt.NDArray[np.int64]) -> int:
        if base % TARGET_PAGE_SIZE:  # a page across two of the kernel's pages would take two slots
            return super().send_packet(header_len, base, pages)
        n = self._fill(base, pages)
        os.write(self._w, self._head[:header_len])  # whole: the pipe is empty
        room = self._slots - self._header_slots
        queued, first = header_len, 1
        while first <= n:
            k = min(room, n + 1 - first)
            got = _vmsplice(self._w, self._iov_at + first * ENTRY_SIZE, k, os.SPLICE_F_NONBLOCK)  # type: ignore[misc]
            if got <= 0 or got % TARGET_PAGE_SIZE:  # whole pages, at least one: the pipe had room
                err = ctypes.get_errno() if got < 0 else 0
                raise ChannelError(f"{self.what}: vmsplice of {k} pages moved {got} bytes"
                                   + (f": {os.strerror(err)}" if err else ""))
            queued += got
            first += got // TARGET_PAGE_SIZE  # fewer than k if the pipe filled early: the rest next time
            self._drain(queued, more=first <= n)
            queued, room = 0, self._slots
        if queued:  # a packet without pages: its header alone
            self._drain(queued, more=False)
        return header_len + n * TARGET_PAGE_SIZE

    def _drain(self, nbytes: int, more: bool) -> None:
        """Splice ``nbytes`` from the pipe into the socket, waiting (at most its timeout) while it
        is full. A peer that is gone gives EPIPE, not SIGPIPE: Python ignores SIGPIPE, and the
        channel processes inherit that."""
        flags = os.SPLICE_F_MOVE | (os.SPLICE_F_MORE if more else 0)
        while nbytes:
            try:
                moved = os.splice(self._r, self.fd, nbytes, None, None, flags)  # positional: no keyword parsing
            except BlockingIOError:  # the socket is full
                self._wait(select.POLLOUT)
                continue
            except OSError as exc:
                raise ChannelError(f"{self.what}: send failed: {exc.strerror or exc}") from exc
            if moved <= 0:
                raise ChannelError(f"{self.what}: send failed: splice moved nothing with {nbytes} bytes in the pipe")
            nbytes -= moved
