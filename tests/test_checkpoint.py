"""VM checkpoints through snapshot files (issue 19), the engine's side: the machine state
record, format version 2 next to version 1, ``incoming --save`` and ``migrate --snapshot``
between engines. Real QEMUs and a real Linux guest: test_qemu_checkpoint.py."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from engine.errors import SnapshotCorruptError
from engine.snapshot.format import HEADER_SIZE, Header, describe_snapshot, parse_header
from engine.snapshot.jobs import restore, save
from engine.wire.machine import MachineState
from engine.wire.stream import QEMU_VM_CONFIGURATION
from support import Incoming, assert_same_ram, error_lines, make_image, read_dump, run_engine, run_main

CONFIG = bytes([QEMU_VM_CONFIGURATION]) + struct.pack(">I", 13) + b"pc-i440fx-7.2"


def test_machine_state_round_trip() -> None:
    ms = MachineState(CONFIG, b"\x04devices\x00\x06vmdesc", 3, bytes(range(16)),
                      {"send-switchover-start": False})
    assert MachineState.unpack(ms.pack()) == ms


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:10], "machine state of 10 bytes, shorter than its 48-byte head"),
    (lambda b: b"X" + b[1:], "machine state starts with b'XACHSTAT', expected b'MACHSTAT'"),
    (lambda b: b + b"?", "machine state lengths add up to"),
])
def test_machine_state_damage(damage, message: str) -> None:
    raw = MachineState(CONFIG, b"\x00").pack()
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        MachineState.unpack(damage(raw))


def _as_version_1(path: Path) -> None:
    """Rewrite a version 2 file without a machine state as version 1 wrote it (no record length)."""
    data = bytearray(path.read_bytes())
    h = parse_header(path, bytes(data[:HEADER_SIZE]), len(data))
    meta = bytes(data[h.meta_offset + 8:h.file_size])  # drop the zero record length
    old = Header(h.nblocks, h.method, h.level, h.flags, h.iterations, h.meta_offset, len(meta), zlib.crc32(meta),
                 h.created_ns, version=1)
    path.write_bytes(old.pack() + bytes(data[HEADER_SIZE:h.meta_offset]) + meta)


@pytest.mark.parametrize("method", ["none", "zstd"])
def test_version_1_files_still_restore(tmp_path: Path, method: str) -> None:
    from engine import BlockSpec, GuestRam, MigrationParams
    from engine.memory.workload import fill_pages

    path = tmp_path / "old.snap"
    with GuestRam.create([BlockSpec("pc.ram", 4 << 20)]) as ram:
        fill_pages(ram.blocks[0], "mixed")
        save(path, ram, MigrationParams(channels=2, compression=method))
        _as_version_1(path)
        assert describe_snapshot(path)["format-version"] == 1 and "machine" not in describe_snapshot(path)
        with restore(path, channels=2) as back:
            assert bytes(back.blocks[0].buf) == bytes(ram.blocks[0].buf)


def test_a_damaged_machine_state_is_refused(tmp_path: Path) -> None:
    from engine import BlockSpec, GuestRam

    path = tmp_path / "vm.snap"
    with GuestRam.create([BlockSpec("pc.ram", 1 << 20)]) as ram:
        from engine.snapshot.jobs import save

        save(path, ram, machine_state=MachineState(CONFIG, b"\x00"), timeout=30)
    data = bytearray(path.read_bytes())
    h = parse_header(path, bytes(data[:HEADER_SIZE]), len(data))
    data[h.meta_offset + 8:h.meta_offset + 16] = b"NOTMACHS"  # the record's magic, checksum fixed up
    meta = bytes(data[h.meta_offset:h.file_size])
    fixed = Header(h.nblocks, h.method, h.level, h.flags, h.iterations, h.meta_offset, h.meta_size, zlib.crc32(meta),
                   h.created_ns)
    data[:HEADER_SIZE] = fixed.pack()
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=r"index: machine state starts with b'NOTMACHS'"):
        restore(path)


@pytest.mark.parametrize("save_compression", ["none", "zstd"])
def test_engine_checkpoint_and_resume(tmp_path: Path, save_compression: str) -> None:
    """engine -> incoming --save FILE -> migrate --snapshot FILE -> engine: byte-exact, and the
    file says what it holds."""
    image = tmp_path / "ram.img"
    make_image(image, 4096, "mixed", seed=5)
    snap = tmp_path / "vm.snap"
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--compression", "zstd", "--save", str(snap),
                  "--save-compression", save_compression, "--json") as dst:
        src = run_engine("migrate", dst.uri, "--ram-image", f"ram={image}", "--channels", "2", "--compression", "zstd",
                         "--machine", "pc-i440fx-7.2", "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait(60) == 0, dst.stderr
    saved = dst.json()["snapshot"]
    assert saved["file"] == str(snap) and saved["compression"] == save_compression and saved["machine"] == "pc-i440fx-7.2"
    desc = describe_snapshot(snap)
    assert desc["format-version"] == 2 and desc["machine"]["name"] == "pc-i440fx-7.2"
    assert desc["machine"]["device-sections"] == []  # an engine source sends RAM only
    with Incoming("tcp:127.0.0.1:0", "--channels", "4", "--dump", str(tmp_path / "dst"), "--json") as dst2:
        src2 = run_engine("migrate", dst2.uri, "--snapshot", str(snap), "--channels", "4", "--json")
        assert src2.returncode == 0, src2.stderr
        assert dst2.wait(60) == 0, dst2.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    manifest = (tmp_path / "dst" / "manifest.json").read_text()
    assert '"machine": "pc-i440fx-7.2"' in manifest


def test_a_snapshot_is_not_sent_to_a_file(tmp_path: Path, capsys: Any) -> None:
    p = run_main(capsys, "migrate", f"file:{tmp_path}/b.snap", "--snapshot", str(tmp_path / "a.snap"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert error_lines(p.stderr) == [
        f"engine: error: --snapshot sends a snapshot file to a tcp: or unix: URI; 'file:{tmp_path}/b.snap' would be"
        " another snapshot file (copy the file instead)"]


def test_a_snapshot_file_is_not_saved_again(tmp_path: Path, capsys: Any) -> None:
    """``incoming file:A --save B`` would be a copy: refused in one line, nothing written."""
    from engine import BlockSpec, GuestRam

    with GuestRam.create([BlockSpec("pc.ram", 1 << 20)]) as ram:
        save(tmp_path / "a.snap", ram)
    p = run_main(capsys, "incoming", f"file:{tmp_path}/a.snap", "--save", str(tmp_path / "b.snap"))
    assert p.returncode != 0 and "Traceback" not in p.stderr and not (tmp_path / "b.snap").exists()
    assert error_lines(p.stderr) == [
        f"engine: error: --save checkpoints a tcp: or unix: migration; 'file:{tmp_path}/a.snap' already is a"
        " snapshot file (copy it instead)"]


def test_a_checkpoint_keeps_its_machine(tmp_path: Path, capsys: Any) -> None:
    """A checkpoint's configuration section is replayed as saved: another --machine is refused."""
    from engine import BlockSpec, GuestRam

    snap = tmp_path / "vm.snap"
    with GuestRam.create([BlockSpec("pc.ram", 1 << 20)]) as ram:
        save(snap, ram, machine_state=MachineState(CONFIG, b"\x00"))
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--snapshot", str(snap), "--machine", "pc-q35-9.2")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert error_lines(p.stderr) == [
        f"engine: error: --machine 'pc-q35-9.2': '{snap}' is a checkpoint of machine 'pc-i440fx-7.2', whose"
        " configuration section is sent as saved"]


def test_a_checkpoint_resumes_in_its_source_dialect(tmp_path: Path) -> None:
    """Without --compat (and with a machine name that names no version) the resumed migration
    speaks as the checkpointed VM's source did."""
    image = tmp_path / "ram.img"
    make_image(image, 1024, "mixed", seed=2)
    snap = tmp_path / "vm.snap"
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--save", str(snap)) as dst:
        src = run_engine("migrate", dst.uri, "--ram-image", f"ram={image}", "--channels", "2", "--compat", "10.0")
        assert src.returncode == 0, src.stderr
        assert dst.wait(60) == 0, dst.stderr
    assert describe_snapshot(snap)["machine"]["dialect"] == {
        "multifd-flush-after-each-section": False, "send-switchover-start": True, "zero-page-detection": "multifd"}
    with Incoming("tcp:127.0.0.1:0", "--channels", "2") as dst2:
        src2 = run_engine("migrate", dst2.uri, "--snapshot", str(snap), "--channels", "2", "--json")
        assert src2.returncode == 0, src2.stderr
        assert dst2.wait(60) == 0, dst2.stderr
    assert json.loads(src2.stdout)["dialect"] | {"compat": None} == {
        "compat": None, "zero-page-detection": "multifd", "multifd-flush-after-each-section": False,
        "send-switchover-start": True}


@pytest.mark.slow
def test_a_failed_source_leaves_no_file(tmp_path: Path) -> None:
    """The file is written only once the migration has completed: a source killed mid-way
    leaves the destination failing in one line and no file, valid-looking or not."""
    import signal

    from support import SLOW, start_source, wait_receiving

    snap = tmp_path / "vm.snap"
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--save", str(snap), "--stall-timeout", "5") as dst:
        src = start_source(dst.uri, *SLOW, "--channels", "2")
        try:
            wait_receiving(dst)
            src.send_signal(signal.SIGKILL)
        finally:
            src.communicate(timeout=30)
        assert dst.wait(60) == 1
    lines = error_lines(dst.stderr)
    assert len(lines) == 1 and "Traceback" not in dst.stderr, dst.stderr
    assert not snap.exists()


def test_a_corrupt_region_fails_the_resume_in_one_line(tmp_path: Path, capsys: Any) -> None:
    """The file is read, and every region checked, before anything is sent."""
    from engine import BlockSpec, GuestRam, MigrationParams
    from engine.memory.workload import fill_pages

    snap = tmp_path / "vm.snap"
    with GuestRam.create([BlockSpec("pc.ram", 8 << 20)]) as ram:
        fill_pages(ram.blocks[0], "random")
        save(snap, ram, MigrationParams(channels=2, compression="zstd"))
    data = bytearray(snap.read_bytes())
    data[HEADER_SIZE + 100] ^= 0xFF  # inside the first group slot
    snap.write_bytes(bytes(data))
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--snapshot", str(snap), "--channels", "2")
    lines = error_lines(p.stderr)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"engine: error: snapshot {snap}: block 'pc.ram' region at offset")
    assert "checksum mismatch" in lines[0]


def test_save_path_checked_before_listening(tmp_path: Path, capsys: Any) -> None:
    p = run_main(capsys, "incoming", "tcp:127.0.0.1:0", "--save", str(tmp_path / "nope" / "vm.snap"))
    assert p.returncode != 0 and "listening" not in p.stderr
    assert error_lines(p.stderr) == [
        f"engine: error: --save '{tmp_path}/nope/vm.snap': its directory '{tmp_path}/nope' does not exist"]
    p = run_main(capsys, "incoming", "tcp:127.0.0.1:0", "--save", str(tmp_path))
    assert f"engine: error: --save '{tmp_path}' is a directory, expected a file to write the snapshot to" in p.stderr
