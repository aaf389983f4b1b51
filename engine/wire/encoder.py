"""The main-stream encoder: the source's side of the QEVM stream, one record at a time.

Pure code, no I/O: :class:`StreamEncoder` appends records to a ``bytearray``
(:attr:`StreamEncoder.out`) and the caller sends and clears it. It writes exactly what
:class:`~engine.wire.stream.MainStreamParser` reads, with the same constants; the stream's
layout is described in :mod:`engine.wire.stream`.

The encoder keeps the CONTINUE state ("same block as the last record that named one") for
the whole stream, across sections, as QEMU does; MEM_SIZE starts it afresh. A run of zero pages
is one ZERO record naming the block, then 9-byte ``ZERO|CONTINUE`` records built as one numpy
array, never a Python loop per page.
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import LocalProtocolError
from .packet import MAX_RAMBLOCK_NAME, TARGET_PAGE_SIZE
from .stream import (
    _ZERO_CONT,
    _ZERO_RUN,
    MIG_CMD_SWITCHOVER_START,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamEncoder:
    """Appends main-stream records to :attr:`out`; the caller sends and clears it.

    Tracks the CONTINUE state ("last block named") for the whole stream, like QEMU.
    """

    def __init__(self) -> None:
        self.out = bytearray()
        self._last_block: bytes | None = None

    def raw(self, data: bytes) -> None:
        """Bytes kept from another stream (a snapshot's configuration and device state), as they are."""
        self.out += data

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def header(self) -> None:
        self.out += _BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION)

    def configuration(self, machine: str) -> None:
        name = machine.encode()
        self.out += bytes([QEMU_VM_CONFIGURATION]) + _BE32.pack(len(name)) + name

    def section_start(self, section_id: int, idstr: str, instance_id: int, version_id: int, *, full: bool = False) -> None:
        name = idstr.encode()
        if len(name) > 255:
            raise LocalProtocolError(f"section idstr of {len(name)} bytes, at most 255")
        kind = QEMU_VM_SECTION_FULL if full else QEMU_VM_SECTION_START
        self.out += bytes([kind]) + _BE32.pack(section_id) + bytes([len(name)]) + name
        self.out += _BE32.pack(instance_id) + _BE32.pack(version_id)

    def section_part(self, section_id: int, *, end: bool = False) -> None:
        self.out += bytes([QEMU_VM_SECTION_END if end else QEMU_VM_SECTION_PART]) + _BE32.pack(section_id)

    def footer(self, section_id: int) -> None:
        self.out += bytes([QEMU_VM_SECTION_FOOTER]) + _BE32.pack(section_id)

    def ram_mem_size(self, blocks: Sequence[tuple[str, int]]) -> None:
        total = sum(length for _, length in blocks)
        self.out += _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)
        for name, length in blocks:
            raw = _block_name(name)
            self.out += bytes([len(raw)]) + raw + _BE64.pack(length)
        self._last_block = None

    def _block_prefix(self, name: str, flag: int, offset: int) -> bytes:
        raw = _block_name(name)
        if raw == self._last_block:
            return _BE64.pack(offset | flag | RAM_SAVE_FLAG_CONTINUE)
        self._last_block = raw
        return _BE64.pack(offset | flag) + bytes([len(raw)]) + raw

    def ram_zero_pages(self, block: str, offsets: npt.NDArray[np.integer], fill: int = 0) -> None:
        """ZERO records for ``offsets`` (byte offsets in ``block``), vectorised."""
        n = len(offsets)
        if n == 0:
            return
        self.out += self._block_prefix(block, RAM_SAVE_FLAG_ZERO, int(offsets[0])) + bytes([fill])
        if n > 1:
            recs = np.empty(n - 1, dtype=_ZERO_RUN)
            recs["word"] = np.asarray(offsets[1:], dtype=np.uint64) | np.uint64(_ZERO_CONT)
            recs["fill"] = fill
            self.out += recs.tobytes()

    def ram_page(self, block: str, offset: int, data: bytes | memoryview) -> None:
        if len(data) != TARGET_PAGE_SIZE:
            raise LocalProtocolError(f"PAGE record of {len(data)} bytes, expected {TARGET_PAGE_SIZE}")
        self.out += self._block_prefix(block, RAM_SAVE_FLAG_PAGE, offset)
        self.out += data

    def ram_eos(self) -> None:
        self.out += _BE64.pack(RAM_SAVE_FLAG_EOS)

    def ram_multifd_flush(self) -> None:
        """QEMU 8.0+'s sync point (multifd-flush-after-each-section off): after the SYNC packets."""
        self.out += _BE64.pack(RAM_SAVE_FLAG_MULTIFD_FLUSH)

    def switchover_start(self) -> None:
        """QEMU 10.0's MIG_CMD_SWITCHOVER_START, before the END section (send-switchover-start)."""
        self.out += bytes([QEMU_VM_COMMAND]) + _BE16.pack(MIG_CMD_SWITCHOVER_START) + _BE16.pack(0)

    def eof(self) -> None:
        self.out += bytes([QEMU_VM_EOF])

    def vmdesc(self, text: bytes) -> None:
        self.out += bytes([QEMU_VM_VMDESCRIPTION]) + _BE32.pack(len(text)) + text


def _block_name(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_RAMBLOCK_NAME:
        raise LocalProtocolError(f"RAM block name of {len(raw)} bytes, expected 1..{MAX_RAMBLOCK_NAME}")
    return raw
