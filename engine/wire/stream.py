"""The main migration stream (QEVM v3) when multifd is on: constants, events and pull parser.

Pure code. :class:`MainStreamParser` pulls bytes through a :class:`StreamReader` (fed by any
``fill(buffer) -> nbytes`` callable: a socket, a file, ``bytes`` in tests), validates every
field and yields typed events. Its mirror image, the encoder, is :mod:`engine.wire.encoder`.

Layout (wire doc section 5): ``QEVM`` + be32 version 3; the configuration section (``07`` +
be32 len + machine name + optional ``05`` subsections); sections framed as START/PART/END/FULL,
each closed by the footer ``7e`` + be32 section_id; then ``00`` EOF and optionally ``06`` +
be32 len + the vmdesc JSON.

The ``ram`` section (idstr ``ram``, instance 0, version 4) is a run of records, each headed by a
be64 word whose low 12 bits are flags and whose upper bits are a byte offset in a RAM block:
MEM_SIZE (block list), ZERO (+ fill byte), PAGE (+ 4096 bytes), EOS (the multifd sync point).
CONTINUE means "same block as the last record that named one"; that state lasts for the whole
stream, across sections, on both sides. Runs of ``ZERO|CONTINUE`` records (9 bytes each) are
decoded with numpy straight from the read buffer, not with a Python loop per page.

Everything after the first non-``ram`` FULL section (or EOF) is device state that only the
trailing vmdesc can describe: the parser hands it over whole as :class:`StreamTail` (bounded
by ``max_tail``; :mod:`engine.wire.vmstate` decodes it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from ..errors import RemoteProtocolError
from .packet import TARGET_PAGE_BITS, TARGET_PAGE_SIZE

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

RAM_SAVE_FLAG_FULL = 0x01  # obsolete
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200  # QEMU 8.0+: the multifd sync point (then EOS no longer is)
MIG_CMD_SWITCHOVER_START = 0x000B  # QEMU 10.0: a QEMU_VM_COMMAND before the END section
RAM_FLAGS_MASK = TARGET_PAGE_SIZE - 1

RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4
RAM_SECTION_ID = 2  # the id an engine source gives it (a replayed VM keeps its source's)

SECTION_NAMES = {
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
}

_BE32 = struct.Struct(">I")
_ZERO_RUN = np.dtype([("word", ">u8"), ("fill", "u1")])  # one ZERO|CONTINUE record, 9 bytes (also encoder.py's)
_ZERO_CONT = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE

#: Page offsets are handed out as int64: a larger MEM_SIZE total would let offsets of 2**63 and
#: more pass the bound checks and then overflow (or wrap negative) on conversion.
MAX_RAM_TOTAL = 1 << 63

#: Device state after RAM is small (a few KiB for a PC); refuse to buffer absurd tails.
DEFAULT_MAX_TAIL = 64 * 1024 * 1024


from .reader import FillFn as FillFn  # noqa: E402  (re-exported)
from .reader import StreamReader as StreamReader

# ------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StreamHeader:
    version: int


@dataclass(frozen=True)
class Configuration:
    machine: str
    subsections: tuple[tuple[str, bytes], ...] = ()
    raw: bytes = b""  # the section as received, from its type byte (replayed by a snapshot's migration)


@dataclass(frozen=True)
class SectionBegin:
    """A START/PART/END (or FULL ``ram``) section header for the ``ram`` section."""

    kind: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int

    @property
    def kind_name(self) -> str:
        return SECTION_NAMES.get(self.kind, hex(self.kind))


@dataclass(frozen=True)
class RamMemSize:
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class RamZeroPages:
    """``len(offsets)`` pages of ``block`` to fill with ``fill`` (byte offsets, int64)."""

    block: str
    offsets: npt.NDArray[np.int64]
    fill: int


@dataclass(frozen=True)
class RamPage:
    """One PAGE record; ``data`` is a view valid only until the next event is pulled."""

    block: str
    offset: int
    data: memoryview


@dataclass(frozen=True)
class RamEOS:
    """End of a ram section's records: the multifd sync point."""

    section_id: int
    kind: int


@dataclass(frozen=True)
class RamFlush:
    """``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (QEMU 8.0+): the multifd sync point. Once a stream has
    carried one, its EOS records are not sync points any more (QEMU's own rule)."""

    section_id: int


@dataclass(frozen=True)
class SwitchoverStart:
    """``MIG_CMD_SWITCHOVER_START`` (QEMU 10.0): the source is about to stop the guest."""


@dataclass(frozen=True)
class SectionFooter:
    section_id: int


@dataclass(frozen=True)
class StreamTail:
    """Everything from the first device (FULL) section or EOF byte to end of stream."""

    data: bytes


Event = (StreamHeader | Configuration | SectionBegin | RamMemSize | RamZeroPages | RamPage | RamEOS | RamFlush
         | SwitchoverStart | SectionFooter | StreamTail)


# -------------------------------------------------------------------------- parser


@dataclass
class _RamState:
    blocks: dict[str, int] = field(default_factory=dict)  # name -> used_length
    last_block: str | None = None
    section_ids: dict[int, str] = field(default_factory=dict)


class MainStreamParser:
    """Pulls events out of a main stream, validating every field as it goes.

    ``expected_blocks`` (name -> length), when given, must match MEM_SIZE exactly (a
    destination whose RAM was declared up front).
    """

    def __init__(self, reader: StreamReader, *, max_tail: int = DEFAULT_MAX_TAIL) -> None:
        self.r = reader
        self.max_tail = max_tail
        self.ram = _RamState()
        self.ram_ended = False

    # -- top level

    def events(self) -> Iterator[Event]:
        r = self.r
        magic = r.be32("the stream header")
        if magic != QEMU_VM_FILE_MAGIC:
            raise RemoteProtocolError(
                f"main channel: received stream magic {magic:#010x}, expected {QEMU_VM_FILE_MAGIC:#010x} ('QEVM')"
            )
        version = r.be32("the stream header")
        if version != QEMU_VM_FILE_VERSION:
            raise RemoteProtocolError(
                f"main channel: received stream version {version}, expected {QEMU_VM_FILE_VERSION}"
            )
        yield StreamHeader(version)
        while True:
            kind = r.u8("a section type")
            if kind == QEMU_VM_CONFIGURATION:
                yield self._configuration()
            elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
                section_id = r.be32("a section header")
                raw_idstr = self._short_bytes("a section idstr")
                idstr = raw_idstr.decode("utf-8", "replace")
                instance_id = r.be32("a section header")
                version_id = r.be32("a section header")
                if idstr != RAM_SECTION_IDSTR:
                    yield StreamTail(self._tail(kind, section_id, raw_idstr, instance_id, version_id))
                    return
                if instance_id != 0 or version_id != RAM_SECTION_VERSION:
                    raise RemoteProtocolError(
                        f"main channel: received section 'ram' instance {instance_id} version {version_id},"
                        f" expected instance 0 version {RAM_SECTION_VERSION}"
                    )
                self.ram.section_ids[section_id] = idstr
                yield SectionBegin(kind, section_id, idstr, instance_id, version_id)
                yield from self._ram_records(section_id, kind)
                yield self._footer(section_id)
                if kind == QEMU_VM_SECTION_FULL:
                    self.ram_ended = True
            elif kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                section_id = r.be32("a section header")
                known = self.ram.section_ids.get(section_id)
                if known is None:
                    raise RemoteProtocolError(
                        f"main channel: received {SECTION_NAMES[kind]} for section_id {section_id},"
                        f" expected one opened by START ({sorted(self.ram.section_ids) or 'none open'})"
                    )
                yield SectionBegin(kind, section_id, known, 0, RAM_SECTION_VERSION)
                yield from self._ram_records(section_id, kind)
                yield self._footer(section_id)
                if kind == QEMU_VM_SECTION_END:
                    self.ram_ended = True
            elif kind == QEMU_VM_COMMAND:
                yield self._command()
            elif kind == QEMU_VM_EOF:
                yield StreamTail(bytes([QEMU_VM_EOF]) + self.r.read_to_eof(self.max_tail, "the stream tail"))
                return
            else:
                raise RemoteProtocolError(
                    f"main channel: received section type {kind:#04x} at byte {r.consumed - 1}, expected one of"
                    " START 0x01, PART 0x02, END 0x03, FULL 0x04, CONFIGURATION 0x07, COMMAND 0x08, EOF 0x00"
                )

    def _command(self) -> SwitchoverStart:
        """A QEMU_VM_COMMAND between sections: only QEMU 10.0's SWITCHOVER_START carries no
        state the engine needs; any other command (postcopy, packaged streams) is refused."""
        at = self.r.consumed - 1
        head = self.r.read(4, "a command header")
        cmd, length = int.from_bytes(head[:2], "big"), int.from_bytes(head[2:], "big")
        if cmd != MIG_CMD_SWITCHOVER_START or length != 0:
            raise RemoteProtocolError(
                f"main channel: received command {cmd:#06x} with {length} bytes at byte {at}, expected"
                f" SWITCHOVER_START {MIG_CMD_SWITCHOVER_START:#06x} with 0 bytes"
            )
        return SwitchoverStart()

    def _tail(self, kind: int, section_id: int, idstr: bytes, instance_id: int, version_id: int) -> bytes:
        # Rebuilt from the raw idstr bytes: the tail must be exactly what was received.
        head = bytes([kind]) + _BE32.pack(section_id) + bytes([len(idstr)]) + idstr
        head += _BE32.pack(instance_id) + _BE32.pack(version_id)
        if kind == QEMU_VM_SECTION_START:
            raise RemoteProtocolError(
                f"main channel: received START for unsupported live section"
                f" {idstr.decode('utf-8', 'replace')!r}, expected only 'ram'"
            )
        return head + self.r.read_to_eof(self.max_tail, "the device state after RAM")

    def _short_bytes(self, what: str) -> bytes:
        n = self.r.u8(what)
        return self.r.read(n, what)

    def _short_string(self, what: str) -> str:
        return self._short_bytes(what).decode("utf-8", "replace")

    def _configuration(self) -> Configuration:
        r = self.r
        n = r.be32("the configuration section")
        if n > 255:
            raise RemoteProtocolError(f"main channel: received machine name length {n}, expected <= 255")
        raw_name = r.read(n, "the configuration section")
        machine = raw_name.decode("utf-8", "replace")
        raw = bytes([QEMU_VM_CONFIGURATION]) + _BE32.pack(n) + raw_name
        subs: list[tuple[str, bytes]] = []
        while r.peek_u8("the configuration section") == QEMU_VM_SUBSECTION:
            r.skip(1)
            raw_sub = self._short_bytes("a configuration subsection")
            name = raw_sub.decode("utf-8", "replace")
            sub_version = r.be32("a configuration subsection version")
            raw += bytes([QEMU_VM_SUBSECTION, len(raw_sub)]) + raw_sub + _BE32.pack(sub_version)
            if name == "configuration/target-page-bits":
                bits = r.be32(name)
                if bits != TARGET_PAGE_BITS:
                    raise RemoteProtocolError(
                        f"main channel: received target-page-bits {bits}, expected {TARGET_PAGE_BITS}"
                    )
                subs.append((name, _BE32.pack(bits)))
            elif name == "configuration/uuid":
                subs.append((name, r.read(16, name)))
            elif name == "configuration/capabilities":
                count = r.be32(name)
                if count > 64:
                    raise RemoteProtocolError(f"main channel: received {count} capabilities, expected <= 64")
                caps = [self._short_string(name) for _ in range(count)]
                if caps:
                    raise RemoteProtocolError(f"main channel: received validated capabilities {caps}, expected none"
                                              " (x-ignore-shared is not supported)")
                subs.append((name, b""))
            else:
                raise RemoteProtocolError(f"main channel: received unknown configuration subsection {name!r}")
            raw += subs[-1][1] or _BE32.pack(0)  # the capabilities' count is 0
        return Configuration(machine, tuple(subs), raw)

    def _footer(self, section_id: int) -> SectionFooter:
        kind = self.r.u8("a section footer")
        if kind != QEMU_VM_SECTION_FOOTER:
            raise RemoteProtocolError(
                f"main channel: received {kind:#04x} where the footer of section {section_id} belongs,"
                f" expected {QEMU_VM_SECTION_FOOTER:#04x}"
            )
        sid = self.r.be32("a section footer")
        if sid != section_id:
            raise RemoteProtocolError(f"main channel: received footer for section {sid}, expected {section_id}")
        return SectionFooter(section_id)

    # -- ram records

    def _ram_records(self, section_id: int, kind: int) -> Iterator[Event]:
        r = self.r
        ram = self.ram
        while True:
            word = r.be64("a ram record")
            flags = word & RAM_FLAGS_MASK
            addr = word & ~RAM_FLAGS_MASK
            base = flags & ~RAM_SAVE_FLAG_CONTINUE
            if base == RAM_SAVE_FLAG_EOS:
                yield RamEOS(section_id, kind)
                return
            if base == RAM_SAVE_FLAG_MEM_SIZE:
                yield self._mem_size(addr)
                continue
            if word == RAM_SAVE_FLAG_MULTIFD_FLUSH:
                yield RamFlush(section_id)
                continue
            if base not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE):
                raise RemoteProtocolError(
                    f"main channel: received ram record flags {flags:#x} at byte {r.consumed - 8},"
                    " expected MEM_SIZE 0x4, ZERO 0x2, PAGE 0x8, MULTIFD_FLUSH 0x200 or EOS 0x10 (with CONTINUE 0x20)"
                )
            if flags & RAM_SAVE_FLAG_CONTINUE:
                if ram.last_block is None:
                    raise RemoteProtocolError(
                        f"main channel: received a CONTINUE record at byte {r.consumed - 8} before any RAM block was named"
                    )
                block = ram.last_block
            else:
                block = self._short_string("a ram record's block name")
                if block not in ram.blocks:
                    raise RemoteProtocolError(
                        f"main channel: received unknown RAM block {block!r}, expected one of {sorted(ram.blocks)}"
                    )
                ram.last_block = block
            length = ram.blocks[block]
            if addr > length - TARGET_PAGE_SIZE:
                raise RemoteProtocolError(
                    f"main channel: received offset {addr:#x} in RAM block {block!r}, expected below {length:#x}"
                )
            if base == RAM_SAVE_FLAG_PAGE:
                yield RamPage(block, addr, r.read_view(TARGET_PAGE_SIZE, "a PAGE record"))
                continue
            fill = r.u8("a ZERO record")
            yield self._zero_run(block, addr, fill, length)

    def _zero_run(self, block: str, first: int, fill: int, length: int) -> RamZeroPages:
        """The ZERO record just read plus every ``ZERO|CONTINUE`` record with the same fill after it."""
        buf = self.r.buffered()
        n = len(buf) // _ZERO_RUN.itemsize
        offsets = [np.array([first], dtype=np.int64)]
        if n:
            recs = np.frombuffer(buf, dtype=_ZERO_RUN, count=n)
            words = recs["word"]
            ok = ((words & np.uint64(RAM_FLAGS_MASK)) == _ZERO_CONT) & (recs["fill"] == fill)
            run = n if ok.all() else int(np.argmin(ok))
            if run:
                # Compare as uint64: an offset of 2**63 or more would turn negative as int64
                # and slip past the bound (then index the block from its end).
                more = words[:run] & ~np.uint64(RAM_FLAGS_MASK)
                bad = more > np.uint64(length - TARGET_PAGE_SIZE)
                if bad.any():
                    i = int(np.argmax(bad))
                    raise RemoteProtocolError(
                        f"main channel: received offset {int(more[i]):#x} in RAM block {block!r},"
                        f" expected below {length:#x}"
                    )
                offsets.append(more.astype(np.int64))
                self.r.skip(run * _ZERO_RUN.itemsize)
        return RamZeroPages(block, np.concatenate(offsets), fill)

    def _mem_size(self, total: int) -> RamMemSize:
        r = self.r
        if total > MAX_RAM_TOTAL:
            raise RemoteProtocolError(
                f"main channel: received MEM_SIZE total {total:#x}, expected at most {MAX_RAM_TOTAL:#x}"
            )
        blocks: list[tuple[str, int]] = []
        remaining = total
        while remaining > 0:
            name = self._short_string("the MEM_SIZE block list")
            length = r.be64("the MEM_SIZE block list")
            if not name:
                raise RemoteProtocolError("main channel: received an empty RAM block name in MEM_SIZE")
            if length == 0 or length % TARGET_PAGE_SIZE or length > remaining:
                raise RemoteProtocolError(
                    f"main channel: received RAM block {name!r} of {length} bytes, expected a non-zero multiple of"
                    f" {TARGET_PAGE_SIZE} within the MEM_SIZE total of {total} (remaining {remaining})"
                )
            if any(name == b for b, _ in blocks):
                raise RemoteProtocolError(f"main channel: received RAM block {name!r} twice in MEM_SIZE")
            blocks.append((name, length))
            remaining -= length
        if not blocks:
            raise RemoteProtocolError("main channel: received MEM_SIZE with a total of 0 bytes, expected RAM blocks")
        self.ram.blocks = dict(blocks)
        self.ram.last_block = None
        return RamMemSize(tuple(blocks))


def block_lengths(mem: RamMemSize) -> Mapping[str, int]:
    return dict(mem.blocks)
