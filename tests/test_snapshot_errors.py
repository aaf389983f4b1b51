"""Broken snapshot files: truncated, bit-flipped, torn by a crash, another format version, not a
snapshot, missing. Every one is refused with one exact line; nothing is restored, nothing leaks."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from engine import BlockSpec, GuestRam, MigrationParams
from engine.errors import MigrationError
from engine.memory.workload import fill_pages
from engine.snapshot.jobs import restore, save
from engine.snapshot.format import (
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Header,
    SnapshotFormatError,
    describe_snapshot,
    open_snapshot,
    read_snapshot,
)
from engine.errors import SnapshotCorruptError, SnapshotError
from support import ROOT, _env, wait_for

PAGE = 4096


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One good snapshot per layout (mapped pages, compressed groups), made once."""
    d = tmp_path_factory.mktemp("snapshots")
    out = {}
    with GuestRam.create([BlockSpec("pc.ram", 3 << 20), BlockSpec("vga/vram", 1 << 20)]) as ram:
        for i, b in enumerate(ram):
            fill_pages(b, "mixed", seed=i)
        for method in ("none", "zstd"):
            out[method] = d / f"{method}.snap"
            save(out[method], ram, MigrationParams(channels=2, compression=method), fsync=False)
    return out


@pytest.fixture
def copy(files, tmp_path):
    def make(method: str = "none") -> Path:
        dst = tmp_path / f"bad-{method}.snap"
        shutil.copyfile(files[method], dst)
        return dst

    return make


def index_of(path: Path):
    fd = open_snapshot(path)
    try:
        return read_snapshot(path, fd)
    finally:
        os.close(fd)


def refused(path: Path, cls: type[SnapshotError] = SnapshotCorruptError, channels: int = 2) -> str:
    with pytest.raises(cls) as err:
        restore(path, channels=channels)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def stored_region(path: Path, data_offset: int, present: np.ndarray, region: int) -> bytes:
    raw = path.read_bytes()
    pages = np.flatnonzero(present[region * 256:(region + 1) * 256]) + region * 256
    return b"".join(raw[data_offset + p * PAGE:data_offset + (p + 1) * PAGE] for p in pages)


@pytest.mark.parametrize("channels", [1, 4])
def test_bit_flip_in_a_mapped_page(copy, channels: int) -> None:
    path = copy("none")
    snap = index_of(path)
    blk = snap.blocks[0]
    present = blk.present()
    page = int(np.flatnonzero(present[256:])[10]) + 256  # a present page in region 1
    flip(path, blk.data_offset + page * PAGE + 1234)
    received = zlib.crc32(stored_region(path, blk.data_offset, present, 1))
    assert refused(path, channels=channels) == (
        f"snapshot {path}: block 'pc.ram' region at offset 0x100000 checksum mismatch"
        f" (received {received:#010x}, expected {int(blk.crcs[1]):#010x})")


def test_bit_flip_in_a_compressed_group(copy) -> None:
    path = copy("zstd")
    blk = index_of(path).blocks[1]
    g = blk.groups[0]
    flip(path, int(g["offset"]) + int(g["length"]) // 2)
    raw = path.read_bytes()[int(g["offset"]):int(g["offset"]) + int(g["length"])]
    assert refused(path) == (
        f"snapshot {path}: block 'vga/vram' region at offset 0x0 checksum mismatch"
        f" (received {zlib.crc32(raw):#010x}, expected {int(blk.crcs[0]):#010x})")


def test_a_flip_in_a_zero_page_hole_is_harmless(copy) -> None:
    """Absent pages are never read: a changed byte in a hole does not reach guest RAM."""
    path = copy("none")
    blk = index_of(path).blocks[0]
    page = int(np.flatnonzero(blk.present() == 0)[0])
    flip(path, blk.data_offset + page * PAGE)
    with restore(path) as ram:
        assert not ram["pc.ram"].pages[page].any()


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_bit_flip_in_the_index(copy, method: str) -> None:
    path = copy(method)
    h = index_of(path).header
    flip(path, h.meta_offset + 3)
    meta = path.read_bytes()[h.meta_offset:]
    assert refused(path) == (f"snapshot {path}: index at offset {h.meta_offset:#x} checksum mismatch"
                             f" (received {zlib.crc32(meta):#010x}, expected {h.meta_crc:#010x})")


@pytest.mark.parametrize("offset", [20, 33, 66, 99], ids=["page_size", "method", "meta_offset", "last_byte"])
def test_bit_flip_in_the_header(copy, offset: int) -> None:
    path = copy("none")
    flip(path, offset)
    head = path.read_bytes()[:104]
    (expected,) = struct.unpack_from("<I", head, 100)
    assert refused(path) == (f"snapshot {path}: header checksum mismatch"
                             f" (received {zlib.crc32(head[:100]):#010x}, expected {expected:#010x})")


def test_a_different_format_version(copy) -> None:
    path = copy("none")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", VERSION + 1))
    assert refused(path, SnapshotFormatError) == (
        f"snapshot {path}: format version 3, but this engine reads versions 1, 2 (written by a newer engine?)")
    with pytest.raises(SnapshotFormatError):
        describe_snapshot(path)


@pytest.mark.parametrize("cut", ["half", "index", "header", "magic"])
def test_truncated(copy, cut: str) -> None:
    path = copy("none")
    size = path.stat().st_size
    h = index_of(path).header
    keep = {"half": size // 2, "index": h.meta_offset + 5, "header": 2000, "magic": 5}[cut]
    os.truncate(path, keep)
    msg = refused(path)
    if cut in ("half", "index"):
        assert msg == f"snapshot {path}: truncated: {keep} bytes, expected {size}"
        assert describe_snapshot(path)["status"] == "truncated"
    else:
        assert msg == f"snapshot {path}: truncated: {keep} bytes, shorter than the 4096-byte header"


def test_extra_bytes_after_the_index(copy) -> None:
    path = copy("zstd")
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"junk")
    assert refused(path) == (f"snapshot {path}: 4 unexpected bytes after the index (file is {size + 4} bytes,"
                             f" expected {size})")


def test_uncommitted_header(copy) -> None:
    path = copy("none")
    h = index_of(path).header
    raw = Header(h.nblocks, h.method, h.level).pack()  # what save writes first
    with open(path, "r+b") as f:
        f.write(raw)
    msg = f"snapshot {path}: incomplete: the save did not finish (no commit record); it cannot be restored"
    assert refused(path) == msg
    assert describe_snapshot(path) | {"disk-usage": 0} == {
        "file": str(path), "kind": "snapshot", "format-version": 2, "file-size": path.stat().st_size,
        "disk-usage": 0, "status": "incomplete", "error": msg}


def test_a_save_killed_midway_is_detected_as_incomplete(tmp_path: Path) -> None:
    """SIGKILL a live save (CLI process): channels and writers die with it; the file is torn."""
    path = tmp_path / "torn.snap"
    code = "import sys; from engine.cli.snapshot import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "save", str(path), "--ram-size", "16M", "--dirty-rate", "0",
         "--downtime-limit", "0", "--max-iterations", "1000000", "--channels", "2"],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def writing() -> bool:
        assert proc.poll() is None, proc.communicate(timeout=30)[1].decode()
        return path.exists() and path.stat().st_blocks * 512 > 4 << 20

    try:
        # the save never converges (downtime-limit 0): once it has written, any moment is midway
        wait_for(writing, 30, "the save to write 4 MiB")
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -9
    assert refused(path) == (f"snapshot {path}: incomplete: the save did not finish (no commit record);"
                             " it cannot be restored")


def test_not_a_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "text.snap"
    path.write_text("hello world, this is not a snapshot\n" * 200)
    assert refused(path, SnapshotFormatError) == (
        f"snapshot {path}: not a snapshot file (starts with b'hello wo', expected {MAGIC!r})")
    empty = tmp_path / "empty.snap"
    empty.write_bytes(b"")
    assert refused(empty, SnapshotFormatError) == f"snapshot {empty}: empty file, not a snapshot"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing.snap"
    assert refused(missing, SnapshotError) == f"snapshot {missing}: cannot open: No such file or directory"
    assert refused(tmp_path, SnapshotError).startswith(f"snapshot {tmp_path}: ")


def test_restore_into_ram_of_another_shape(files) -> None:
    with GuestRam.create([BlockSpec("pc.ram", 1 << 20)]) as other:
        with pytest.raises(MigrationError) as err:
            restore(files["none"], into=other)
    assert str(err.value) == (f"snapshot {files['none']}: its blocks [('pc.ram', 3145728), ('vga/vram', 1048576)]"
                              " do not match the target RAM's [('pc.ram', 1048576)]")


def test_golden_header_bytes() -> None:
    """The header layout is the file format: pin it (version 2 kept version 1's header; only
    the index changed)."""
    fields = dict(flags=1, iterations=4, meta_offset=0x5000, meta_size=0x120, meta_crc=0xDEADBEEF,
                  created_ns=1_700_000_000_000_000_000)
    v2 = Header(2, "zstd", 3, **fields).pack()
    assert v2[8:12] == struct.pack("<I", 2)
    raw = Header(2, "zstd", 3, version=1, **fields).pack()  # type: ignore[arg-type]
    assert v2[:8] + v2[12:100] == raw[:8] + raw[12:100]
    assert len(raw) == HEADER_SIZE and not any(raw[104:])
    assert raw[:104].hex() == (
        "4d4644534e415000" "01000000" "00100000" "01000000" "00100000" "00010000" "02000000"
        "7a737464000000000000000000000000" "03000000" "04000000" "0010000000000000" "0050000000000000"
        "2001000000000000" "2051000000000000" "00002a36fe9c9717" "efbeadde" "f6d0371a")
    assert struct.unpack_from("<I", raw, 100)[0] == zlib.crc32(raw[:100])


def rewrite(path: Path, meta: bytes | None = None, **header_changes) -> Header:
    """Re-commit a file with a changed index and/or header fields, checksums recomputed."""
    import dataclasses

    h = index_of(path).header
    raw = bytearray(path.read_bytes())
    if meta is not None:
        raw[h.meta_offset:] = meta
        header_changes.update(meta_size=len(meta), meta_crc=zlib.crc32(meta))
    h = dataclasses.replace(h, **header_changes)
    raw[:HEADER_SIZE] = h.pack()
    path.write_bytes(bytes(raw))
    return h


def test_an_index_that_lies_with_valid_checksums(copy) -> None:
    path = copy("zstd")
    h = index_of(path).header
    meta = bytearray(path.read_bytes()[h.meta_offset:])
    blk = index_of(path).blocks[0]
    # the group index of block 0 starts after the block table, block 0's bitmap and checksums
    at = meta.find(blk.groups.tobytes())
    struct.pack_into("<Q", meta, at, h.meta_offset)  # region 0's slot now starts at the index
    g = blk.groups[0]
    rewrite(path, bytes(meta))
    present = int(np.count_nonzero(blk.present()[:256]))
    assert refused(path) == (
        f"snapshot {path}: index: block 'pc.ram' region at offset 0x0: impossible group slot (offset"
        f" {h.meta_offset:#x}, length {int(g['length'])}, capacity {int(g['capacity'])}, {present} pages present)")


def test_an_unknown_compression_method(copy) -> None:
    path = copy("zstd")
    rewrite(path, method="brotli")
    assert refused(path) == f"snapshot {path}: compressed with 'brotli', which this engine does not know"
