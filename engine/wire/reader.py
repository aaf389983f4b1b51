"""Buffered reads for the main-stream parser: bytes pulled from any ``fill(buffer) -> nbytes``.

Pure code: a socket, a file or a ``bytes`` object in tests supplies ``fill``; ``fill`` may raise
(a deadline, a channel failure) and the reader never swallows it. End of stream inside a
requested read is a :class:`TruncatedError` naming what was being read.
"""

from __future__ import annotations

import struct
from typing import Callable

from ..errors import RemoteProtocolError, TruncatedError

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


FillFn = Callable[[memoryview], int]


class StreamReader:
    """Buffered reads over ``fill(into) -> nbytes`` (0 = end of stream).

    ``fill`` may raise (a deadline, a channel failure); the reader never swallows it.
    Views returned by :meth:`read_view` are valid until the next read.
    """

    def __init__(self, fill: FillFn, capacity: int = 1 << 20) -> None:
        self._fill = fill
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.consumed = 0  # bytes handed out so far (stream position)
        self.eof = False

    @classmethod
    def from_bytes(cls, data: bytes, chunk: int = 1 << 16, capacity: int = 1 << 20) -> StreamReader:
        """A reader over ``data``, delivered at most ``chunk`` bytes per fill (for tests and files)."""
        pos = 0

        def fill(into: memoryview) -> int:
            nonlocal pos
            n = min(len(into), chunk, len(data) - pos)
            into[:n] = data[pos:pos + n]
            pos += n
            return n

        return cls(fill, capacity)

    @property
    def available(self) -> int:
        return self._end - self._start

    def _more(self) -> bool:
        if self.eof:
            return False
        if self._end == len(self._buf):
            if self._start == 0:
                raise AssertionError("stream reader buffer overflow")
            live = self._end - self._start
            self._buf[:live] = self._buf[self._start:self._end]
            self._start, self._end = 0, live
        n = self._fill(self._view[self._end:])
        if n == 0:
            self.eof = True
            return False
        self._end += n
        return True

    def ensure(self, n: int, what: str) -> None:
        """Make ``n`` bytes available or raise :class:`TruncatedError` naming ``what``."""
        while self._end - self._start < n:
            if not self._more():
                have = self._end - self._start
                raise TruncatedError(
                    f"main channel: end of stream inside {what} at byte {self.consumed + have}"
                    f" (received {have} of {n} bytes)"
                )

    def read_view(self, n: int, what: str) -> memoryview:
        self.ensure(n, what)
        v = self._view[self._start:self._start + n]
        self._start += n
        self.consumed += n
        return v

    def read(self, n: int, what: str) -> bytes:
        return bytes(self.read_view(n, what))

    def u8(self, what: str) -> int:
        self.ensure(1, what)
        b = self._buf[self._start]
        self._start += 1
        self.consumed += 1
        return b

    def be32(self, what: str) -> int:
        return int(_BE32.unpack(self.read_view(4, what))[0])

    def be64(self, what: str) -> int:
        return int(_BE64.unpack(self.read_view(8, what))[0])

    def peek_u8(self, what: str) -> int:
        self.ensure(1, what)
        return self._buf[self._start]

    def buffered(self) -> memoryview:
        return self._view[self._start:self._end]

    def skip(self, n: int) -> None:
        self._start += n
        self.consumed += n

    def read_to_eof(self, limit: int, what: str) -> bytes:
        """Everything up to end of stream; more than ``limit`` bytes is an error."""
        while self._more():
            if self._end - self._start > limit:
                break
            if self._end == len(self._buf) and self._start == 0:
                # A bigger buffer rather than bytearray.extend(): views handed out earlier
                # (a RamPage still held by the caller) forbid resizing in place.
                grown = bytearray(2 * len(self._buf))
                grown[:self._end] = self._view[:self._end]
                self._buf = grown
                self._view = memoryview(grown)
        if self._end - self._start > limit:
            raise RemoteProtocolError(f"main channel: {what} is larger than {limit} bytes")
        data = bytes(self._view[self._start:self._end])
        self.skip(len(data))
        return data


