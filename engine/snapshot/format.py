"""Snapshot file format, version 2: guest RAM with a fixed place for every page ("mapped-ram"),
and optionally the rest of a VM's migration stream (its machine state), kept to be replayed.

Pure code: layouts, struct packing, validation and checksums. File I/O is limited to reading
and checking a file's header and index (:func:`read_snapshot`, :func:`describe_snapshot`);
the parallel data path is in :mod:`engine.snapshot.channels`. The layout, field by field, is
docs/snapshot-format.md.

A file is a one-page header, the data (``none``: every page at a fixed offset, zero pages
left as holes; compressed: a heap of 1 MiB group slots) and an index at the end (version 2:
the machine state record, possibly empty; then the block table, present-page bitmaps, a CRC-32
per 256-page region, the group index). Version 1 files (no machine state) still read. Everything is
little-endian and checked before use: the version first (a newer layout may move every field),
then the header's and the index's CRC-32, then every region's CRC-32 before it reaches guest
RAM. The header is written twice, the second time with COMMITTED after the data and the index,
so a save that did not finish reads as incomplete and a shorter file as truncated; every
error is one line naming the file, the block and the offset.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import numpy.typing as npt

from ..errors import (
    ConfigError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotFormatError,
)
from ..memory.ram import check_block
from ..memory.runs import page_runs
from ..wire.machine import MachineState
from ..wire.packet import MAX_RAMBLOCK_NAME, TARGET_PAGE_SIZE
from ..wire.vmstate import parse_tail

MAGIC = b"MFDSNAP\x00"
VERSION = 2
READS = (1, 2)  # version 1: no machine state record in the index
HEADER_SIZE = 4096
REGION_PAGES = 256
REGION_SIZE = REGION_PAGES * TARGET_PAGE_SIZE
FLAG_COMMITTED = 1
SLOT_ALIGN = 4096
MAX_META = 1 << 31  # an index larger than this is not one we wrote
MAX_SLOT = 2 * REGION_SIZE  # compressed groups are at most ~1.01 MiB (the methods' bounds)

_HEADER = struct.Struct("<8sIIIIII16siIQQQQQI")
_HEADER_CRC = struct.Struct("<I")
assert _HEADER.size == 100
_BLOCK = struct.Struct("<HHIQQ")
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("capacity", "<u4")])


# ------------------------------------------------------------------------------ errors

def _err(path: str | Path, message: str, cls: type[SnapshotError] = SnapshotCorruptError) -> SnapshotError:
    return cls(f"snapshot {path}: {message}")


def crc_mismatch(path: str | Path, where: str, received: int, expected: int) -> SnapshotCorruptError:
    return SnapshotCorruptError(
        f"snapshot {path}: {where} checksum mismatch (received {received:#010x}, expected {expected:#010x})")


def region_where(block: str, region: int) -> str:
    return f"block {block!r} region at offset {region * REGION_SIZE:#x}"


# ------------------------------------------------------------------------------ header

def _align(n: int, to: int = TARGET_PAGE_SIZE) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Header:
    nblocks: int
    method: str
    level: int
    flags: int = 0
    iterations: int = 0
    meta_offset: int = 0
    meta_size: int = 0
    meta_crc: int = 0
    created_ns: int = 0
    version: int = VERSION
    page_size: int = TARGET_PAGE_SIZE
    region_pages: int = REGION_PAGES
    header_size: int = HEADER_SIZE
    data_offset: int = HEADER_SIZE

    @property
    def committed(self) -> bool:
        return bool(self.flags & FLAG_COMMITTED)

    @property
    def file_size(self) -> int:
        return self.meta_offset + self.meta_size

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.version, self.header_size, self.flags, self.page_size, self.region_pages,
                           self.nblocks, self.method.encode(), self.level, self.iterations, self.data_offset,
                           self.meta_offset, self.meta_size, self.file_size, self.created_ns, self.meta_crc)
        raw += _HEADER_CRC.pack(zlib.crc32(raw))
        return raw.ljust(self.header_size, b"\0")


def parse_header(path: str | Path, data: bytes, file_size: int) -> Header:
    """Validate a header (``data``: the file's first bytes, up to 4096); raises SnapshotError."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        if file_size < len(MAGIC) and MAGIC.startswith(data) and data:
            raise _err(path, f"truncated: {file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
        if not data:
            raise _err(path, "empty file, not a snapshot", SnapshotFormatError)
        raise _err(path, f"not a snapshot file (starts with {bytes(data[:8])!r}, expected {MAGIC!r})",
                   SnapshotFormatError)
    if len(data) >= 12:
        (version,) = struct.unpack_from("<I", data, 8)
        if version not in READS:
            raise _err(path, f"format version {version}, but this engine reads versions"
                       f" {', '.join(map(str, READS))}" + (" (written by a newer engine?)" if version > VERSION else ""),
                       SnapshotFormatError)
    if file_size < HEADER_SIZE:
        raise _err(path, f"truncated: {file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    (crc,) = _HEADER_CRC.unpack_from(data, _HEADER.size)
    got = zlib.crc32(data[:_HEADER.size])
    if got != crc:
        raise crc_mismatch(path, "header", got, crc)
    (_, version, header_size, flags, page_size, region_pages, nblocks, method, level, iterations, data_offset,
     meta_offset, meta_size, size, created_ns, meta_crc) = _HEADER.unpack_from(data)
    h = Header(nblocks, method.rstrip(b"\0").decode("ascii", "replace"), level, flags, iterations, meta_offset,
               meta_size, meta_crc, created_ns, version, page_size, region_pages, header_size, data_offset)
    for name, got_v, want in (("header_size", header_size, HEADER_SIZE), ("page_size", page_size, TARGET_PAGE_SIZE),
                              ("region_pages", region_pages, REGION_PAGES), ("data_offset", data_offset, HEADER_SIZE)):
        if got_v != want:
            raise _err(path, f"header field {name} is {got_v}, expected {want}")
    if not h.committed:
        raise _err(path, "incomplete: the save did not finish (no commit record); it cannot be restored")
    if size != h.file_size or meta_offset < data_offset or meta_offset % TARGET_PAGE_SIZE or not 0 < meta_size < MAX_META:
        raise _err(path, f"header describes an impossible layout (index at {meta_offset:#x}, {meta_size} bytes,"
                   f" file size {size})")
    if file_size < h.file_size:
        raise _err(path, f"truncated: {file_size} bytes, expected {h.file_size}")
    if file_size > h.file_size:
        raise _err(path, f"{file_size - h.file_size} unexpected bytes after the index (file is {file_size} bytes,"
                   f" expected {h.file_size})")
    return h


# ------------------------------------------------------------------------------ index

@dataclass
class BlockIndex:
    """One block's entry in the index (arrays owned by this object)."""

    name: str
    size: int
    data_offset: int  # method none: file offset of page 0; compressed: 0
    bitmap: npt.NDArray[np.uint8] = field(repr=False)  # packed, LSB first
    crcs: npt.NDArray[np.uint32] = field(repr=False)
    groups: npt.NDArray[Any] | None = field(default=None, repr=False)  # INDEX_DTYPE, compressed only

    @property
    def npages(self) -> int:
        return self.size // TARGET_PAGE_SIZE

    @property
    def nregions(self) -> int:
        return -(-self.npages // REGION_PAGES)

    def present(self) -> npt.NDArray[np.uint8]:
        """One byte (0/1) per page."""
        return np.unpackbits(self.bitmap, count=self.npages, bitorder="little")


def regions_of(npages: int) -> int:
    return -(-npages // REGION_PAGES)


def raw_layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Method none: (data_offset per block, end of data)."""
    offs, pos = [], HEADER_SIZE
    for size in sizes:
        offs.append(pos)
        pos += size
    return offs, pos


def _pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def encode_index(blocks: Sequence[BlockIndex], compressed: bool, machine: MachineState | None = None) -> bytes:
    """The index of a version 2 file: the machine state record (length first; 0: none), then the blocks."""
    record = machine.pack() if machine is not None else b""
    parts = [struct.pack("<Q", len(record)), _pad8(record)]
    for b in blocks:
        name = b.name.encode()
        parts.append(_BLOCK.pack(len(name), 0, 0, b.size, b.data_offset) + _pad8(name))
    for b in blocks:
        parts.append(_pad8(b.bitmap.astype(np.uint8).tobytes()))
        parts.append(_pad8(b.crcs.astype("<u4").tobytes()))
        if compressed:
            assert b.groups is not None
            parts.append(b.groups.astype(INDEX_DTYPE).tobytes())
    return b"".join(parts)


def decode_index(path: str | Path, data: bytes, header: Header,
                 compressed: bool) -> tuple[MachineState | None, list[BlockIndex]]:
    """Parse and validate the index (its CRC already checked): the machine state (version 2
    on; None if the file has none) and the blocks."""
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise _err(path, f"index: {what} runs past the end of the index ({len(data)} bytes)")
        out = data[pos:pos + n]
        pos += n + (-n % 8)
        return out

    machine = None
    if header.version >= 2:
        (n,) = struct.unpack("<Q", take(8, "the machine state's length"))
        record = take(n, f"a machine state of {n} bytes")
        try:
            machine = MachineState.unpack(record) if n else None
        except ValueError as exc:
            raise _err(path, f"index: {exc}") from None
    entries = []
    for i in range(header.nblocks):
        name_len, _, _, size, data_offset = _BLOCK.unpack(take(_BLOCK.size, f"block table entry {i}"))
        raw = take(name_len, f"block {i}'s name")
        try:
            name = raw.decode()
            check_block(name, size)
        except (UnicodeDecodeError, ConfigError) as exc:
            raise _err(path, f"index: block table entry {i} is invalid ({exc})") from None
        entries.append((name, size, data_offset))
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise _err(path, "index: a block name appears twice")
    out = []
    end = header.data_offset
    for name, size, data_offset in entries:
        npages = size // TARGET_PAGE_SIZE
        nreg = regions_of(npages)
        bitmap = np.frombuffer(take(-(-npages // 8), f"block {name!r}'s bitmap"), dtype=np.uint8)
        crcs = np.frombuffer(take(4 * nreg, f"block {name!r}'s checksums"), dtype="<u4")
        groups = np.frombuffer(take(16 * nreg, f"block {name!r}'s group index"), dtype=INDEX_DTYPE) if compressed else None
        blk = BlockIndex(name, size, data_offset, bitmap, crcs, groups)
        present = blk.present()
        if npages % 8 and bitmap[-1] >> (npages % 8):
            raise _err(path, f"index: block {name!r}: bitmap has bits past its {npages} pages")
        if compressed:
            assert groups is not None
            counts = np.add.reduceat(present, np.arange(0, npages, REGION_PAGES)) if npages else present[:0]
            bad = np.flatnonzero(((groups["length"] == 0) != (counts == 0)) | (groups["length"] > groups["capacity"])
                                 | (groups["capacity"] > MAX_SLOT)
                                 | ((groups["length"] > 0) & ((groups["offset"] < header.data_offset)
                                    | (groups["offset"] + groups["length"] > header.meta_offset))))
            if len(bad):
                g = groups[bad[0]]
                raise _err(path, f"index: {region_where(name, int(bad[0]))}: impossible group slot (offset"
                           f" {int(g['offset']):#x}, length {int(g['length'])}, capacity {int(g['capacity'])},"
                           f" {int(counts[bad[0]])} pages present)")
        else:
            if data_offset < end or data_offset % TARGET_PAGE_SIZE or data_offset + size > header.meta_offset:
                raise _err(path, f"index: block {name!r}: data area at {data_offset:#x} ({size} bytes) is outside"
                           f" the data section or overlaps another block")
            end = data_offset + size
        out.append(blk)
    if pos != len(data):
        raise _err(path, f"index: {len(data) - pos} unexpected bytes after the last block")
    return machine, out


# ------------------------------------------------------------------------------ checksums

def stored_crc(pages: npt.NDArray[np.uint8], present: npt.NDArray[np.uint8]) -> int:
    """CRC-32 of the present pages of a region (``pages``: (n, 4096)), in page order."""
    idx = np.flatnonzero(present)
    if len(idx) == len(present):
        return zlib.crc32(pages.data.cast("B"))
    crc = 0
    flat = pages.data.cast("B")
    for a, b in page_runs(idx):
        crc = zlib.crc32(flat[a * TARGET_PAGE_SIZE:b * TARGET_PAGE_SIZE], crc)
    return crc


# ------------------------------------------------------------------------------ reading a file

@dataclass
class Snapshot:
    """A validated snapshot file's header and index."""

    path: str
    header: Header
    blocks: list[BlockIndex]
    file_size: int
    disk_usage: int
    machine: MachineState | None = None

    @property
    def compressed(self) -> bool:
        return self.header.method != "none"


def _pread(path: str | Path, fd: int, n: int, off: int, what: str) -> bytes:
    try:
        return os.pread(fd, n, off)
    except OSError as exc:
        raise _err(path, f"cannot read {what}: {exc.strerror}", SnapshotError) from None


def open_snapshot(path: str | Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _err(path, f"cannot open: {exc.strerror}", SnapshotError) from None


def read_snapshot(path: str | Path, fd: int) -> Snapshot:
    """Read and validate the header and index of an open snapshot file."""
    st = os.fstat(fd)
    head = _pread(path, fd, HEADER_SIZE, 0, "the header")
    header = parse_header(path, head, st.st_size)
    meta = _pread(path, fd, header.meta_size, header.meta_offset, "the index")
    if len(meta) != header.meta_size:
        raise _err(path, f"truncated: {header.meta_offset + len(meta)} bytes, expected {header.file_size}")
    got = zlib.crc32(meta)
    if got != header.meta_crc:
        raise crc_mismatch(path, f"index at offset {header.meta_offset:#x}", got, header.meta_crc)
    machine, blocks = decode_index(path, meta, header, header.method != "none")
    return Snapshot(str(path), header, blocks, st.st_size, st.st_blocks * 512, machine)


def describe_snapshot(path: str | Path) -> dict[str, Any]:
    """What ``inspect`` shows for a snapshot file. A complete file is fully validated (header,
    index; not the data regions) and described block by block; an incomplete or truncated one
    is described as far as its header goes, with ``status`` and ``error`` saying why. Raises
    :class:`SnapshotError` for files that are not snapshots of this version, or whose header or
    index fail their checksum."""
    fd = open_snapshot(path)
    try:
        st = os.fstat(fd)
        out: dict[str, Any] = {"file": str(path), "kind": "snapshot", "format-version": VERSION,  # until read
                               "file-size": st.st_size, "disk-usage": st.st_blocks * 512}
        try:
            snap = read_snapshot(path, fd)
        except SnapshotCorruptError as exc:
            msg = str(exc)
            if "incomplete" not in msg and "truncated" not in msg:
                raise
            out["status"] = "incomplete" if "incomplete" in msg else "truncated"
            out["error"] = msg
            return out
    finally:
        os.close(fd)
    h = snap.header
    out["format-version"] = h.version
    if snap.machine is not None:
        out["machine"] = describe_machine(snap.machine)
    out.update({"status": "complete", "compression": h.method, "level": h.level, "region-size": REGION_SIZE,
                "iterations": h.iterations, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(h.created_ns / 1e9)),
                "index-offset": h.meta_offset, "index-size": h.meta_size})
    blocks, live = [], 0
    for b in snap.blocks:
        present = int(np.count_nonzero(b.present()))
        stored = int(b.groups["length"].sum()) if b.groups is not None else present * TARGET_PAGE_SIZE
        if b.groups is not None:
            live += int(b.groups["capacity"][b.groups["length"] > 0].sum())
        blocks.append({"name": b.name, "size": b.size, "pages": b.npages, "present-pages": present,
                       "zero-pages": b.npages - present, "regions": b.nregions, "stored-bytes": stored,
                       **({"data-offset": b.data_offset} if b.groups is None else {})})
    out["blocks"] = blocks
    out["guest-bytes"] = sum(b.size for b in snap.blocks)
    out["stored-bytes"] = sum(b["stored-bytes"] for b in blocks)
    if snap.compressed:
        out["garbage-bytes"] = max(0, h.meta_offset - h.data_offset - live)
    return out


def render_snapshot(d: dict[str, Any]) -> str:
    """A human summary of :func:`describe_snapshot`'s dict."""
    mib = 1 << 20
    head = f"{d['file']}: snapshot (format version {d['format-version']}), {d['status']}"
    if d["status"] != "complete":
        return f"{head}\n  {d['error']}"
    lines = [head,
             f"  compression {d['compression']} (level {d['level']}), {len(d['blocks'])} block(s),"
             f" {d['guest-bytes'] / mib:.1f} MiB of guest RAM, saved in {d['iterations']} iteration(s) at {d['created']}",
             f"  file {d['file-size'] / mib:.1f} MiB, on disk {d['disk-usage'] / mib:.1f} MiB,"
             f" stored {d['stored-bytes'] / mib:.1f} MiB"
             + (f", garbage {d['garbage-bytes'] / mib:.1f} MiB" if "garbage-bytes" in d else "")]
    if "machine" in d:
        m = d["machine"]
        names = ", ".join(m["device-sections"][:8]) + (", ..." if len(m["device-sections"]) > 8 else "")
        lines.append(f"  machine {m['name']!r}, {len(m['device-sections'])} device section(s) in"
                     f" {m['device-state-bytes'] / 1024:.1f} KiB: {names}")
    for b in d["blocks"]:
        lines.append(f"  block {b['name']!r:<24} {b['size'] / mib:9.1f} MiB  present {b['present-pages']:>8} pages"
                     f"  zero {b['zero-pages']:>8} pages  stored {b['stored-bytes'] / mib:.1f} MiB")
    return "\n".join(lines)


def describe_machine(m: MachineState) -> dict[str, Any]:
    """A machine state for ``inspect``: the machine, its device sections (named by the vmdesc)."""
    try:
        _, vmdesc = parse_tail(m.device_state)
        sections = [str(d.get("name")) for d in (vmdesc or {}).get("devices", [])]
    except Exception:  # noqa: BLE001 - kept byte-exact whatever it holds; inspect shows what it can
        sections = []
    return {"name": m.machine, "device-sections": sections, "device-state-bytes": len(m.device_state),
            "ram-section-id": m.ram_section_id, "uuid": m.uuid.hex(), "dialect": m.dialect}


def is_snapshot_file(path: str | Path) -> bool:
    """True if the file starts with the snapshot magic (for routing ``inspect``)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


assert MAX_RAMBLOCK_NAME < 1 << 16
