"""The C library, loaded once per process, for what Python's ``os`` and ``mmap`` lack:
``sendmsg``/``recvmsg`` over an iovec array, ``vmsplice``, ``mmap`` at a chosen address,
``madvise`` of any buffer, ``prctl`` and ``mallopt``. Each module declares the argument types
of the calls it makes."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)

_madvise = libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(view: memoryview, advice: int) -> bool:
    """``madvise`` over the memory a writable, page-aligned buffer views, whatever mapping it
    belongs to; False where the kernel refuses (an advice it lacks, no memory for it)."""
    if not len(view):
        return True
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return int(_madvise(address, len(view), advice)) == 0
