"""The snapshot command line in real processes: save, restore, inspect; its errors (in this
process); and the routing of ``migrate file:PATH`` / ``incoming file:PATH`` through
:func:`engine.cli.snapshot.dispatch`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.main import build_parser
from engine.cli.snapshot import dispatch
from support import ROOT, _env, assert_same_ram, error_lines, image_args, make_image, read_dump, run_main

CODE = "import sys; from engine.cli.snapshot import main; sys.exit(main(sys.argv[1:]))"


def snap(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=ROOT)


def snap_here(capsys, *args: str) -> subprocess.CompletedProcess[str]:
    """The entry point of :func:`snap`, run in this process."""
    from engine.cli.snapshot import main

    return run_main(capsys, *args, main=main)


@pytest.fixture
def images(tmp_path: Path) -> tuple[list[tuple[str, Path]], dict[str, bytes]]:
    spec = [("pc.ram", 1024, "mixed"), ("/rom@etc/acpi/tables", 32, "text"), ("vga/vram", 300, "zero")]
    imgs, data = [], {}
    for i, (name, pages, kind) in enumerate(spec):
        p = tmp_path / f"img{i}.raw"
        data[name] = make_image(p, pages, kind, seed=i)
        imgs.append((name, p))
    return imgs, data


@pytest.mark.parametrize("method", ["none", "lz4"])
def test_save_restore_dump(tmp_path: Path, images, method: str) -> None:
    imgs, data = images
    path = tmp_path / "g.snap"
    sv = snap("save", str(path), *image_args(imgs), "--channels", "2", "--compression", method, "--json", "--digest")
    assert sv.returncode == 0, sv.stderr
    out = json.loads(sv.stdout)
    assert out["status"] == "completed" and out["compression"] == method and out["file"] == str(path)
    assert out["file-size"] == path.stat().st_size and out["ram"]["total"] == sum(map(len, data.values()))
    rs = snap("restore", str(path), "--channels", "3", "--dump", str(tmp_path / "dump"), "--json", "--digest")
    assert rs.returncode == 0, rs.stderr
    back = json.loads(rs.stdout)
    assert back["status"] == "completed" and len(back["channels"]) == 3
    assert back["ram-digest"] == out["ram-digest"]
    assert_same_ram(read_dump(tmp_path / "dump"), data)


@pytest.mark.slow
def test_live_save_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "live.snap"
    sv = snap("save", str(path), "--ram-size", "16M", "--dirty-rate", "32M", "--writers", "2", "--channels", "2",
              "--compression", "zstd", "--downtime-limit", "1000", "--dump", str(tmp_path / "src"), "--json")
    assert sv.returncode == 0, sv.stderr
    out = json.loads(sv.stdout)
    assert out["status"] == "completed" and out["iterations"] and out["ram"]["dirty-sync-count"] >= 2
    rs = snap("restore", str(path), "--dump", str(tmp_path / "dst"))
    assert rs.returncode == 0, rs.stderr
    assert rs.stdout.startswith("snapshot restore: completed\n")
    assert_same_ram(read_dump(tmp_path / "dst"), read_dump(tmp_path / "src"))  # the RAM at stop-and-copy


def test_human_output_and_inspect(tmp_path: Path) -> None:
    path = tmp_path / "z.snap"
    sv = snap("save", str(path), "--ram-size", "8M", "--fill", "zero", "--no-fsync")
    assert sv.returncode == 0, sv.stderr
    assert sv.stdout.startswith("snapshot save: completed\n")
    assert f"  file             {path}: 8.0 MiB, on disk 0.0 MiB, compression none" in sv.stdout
    ins = snap("inspect", str(path))
    assert ins.returncode == 0, ins.stderr
    assert ins.stdout.startswith(f"{path}: snapshot (format version 2), complete\n")
    js = json.loads(snap("inspect", str(path), "--json").stdout)
    assert js["files"][0]["blocks"][0] | {} == {"name": "pc.ram", "size": 8 << 20, "pages": 2048, "present-pages": 0,
                                               "zero-pages": 2048, "regions": 8, "stored-bytes": 0,
                                               "data-offset": 4096}


def test_errors_are_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "g.snap"
    assert snap_here(capsys, "save", str(path), "--ram-size", "2M").returncode == 0
    data = bytearray(path.read_bytes())
    data[4096 + 5000] ^= 1  # in page 1 of pc.ram (present: the mixed fill with seed 0 made it non-zero)
    path.write_bytes(bytes(data))
    rs = snap_here(capsys, "restore", str(path), "--json")
    assert rs.returncode == 1 and rs.stdout == ""
    assert rs.stderr.count("\n") == 1
    assert rs.stderr.startswith(f"engine: error: snapshot {path}: block 'pc.ram' region at offset 0x0 checksum"
                                " mismatch (received 0x")
    missing = snap_here(capsys, "restore", str(tmp_path / "nope.snap"))
    assert (missing.returncode, missing.stderr) == (
        1, f"engine: error: snapshot {tmp_path / 'nope.snap'}: cannot open: No such file or directory\n")
    ins = snap_here(capsys, "inspect", str(tmp_path / "nope.snap"))
    assert (ins.returncode, ins.stderr) == (1, missing.stderr)
    bad = snap_here(capsys, "save", str(path), "--ram-size", "2M", "--compression", "gzip")
    assert (bad.returncode, bad.stderr) == (
        1, "engine: error: unknown multifd-compression 'gzip', expected one of none, lz4, zlib, zstd\n")
    with pytest.raises(SystemExit) as usage:
        snap_here(capsys, "save", str(path))
    assert usage.value.code == 2 and capsys.readouterr().err.startswith("engine: error: one of the arguments --ram-image")


def test_migrate_and_incoming_file_uris_route_to_save_and_restore(tmp_path: Path, capsys) -> None:
    """The lead wires dispatch() into engine.cli; here it runs on engine.cli's own namespaces."""
    path = tmp_path / "m.snap"
    args = build_parser().parse_args(["migrate", f"file:{path}", "--ram-size", "4M", "--channels", "2",
                                      "--compression", "zlib", "--level", "6", "--json", "--digest"])
    assert dispatch(args) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["status"] == "completed" and saved["compression"] == "zlib"
    args = build_parser().parse_args(["incoming", f"file:{path}", "--channels", "2", "--json", "--digest"])
    assert dispatch(args) == 0
    restored = json.loads(capsys.readouterr().out)
    assert restored["ram-digest"] == saved["ram-digest"]
    assert dispatch(build_parser().parse_args(["inspect", str(path)])) == 0
    assert "complete" in capsys.readouterr().out
    assert dispatch(build_parser().parse_args(["migrate", "tcp:127.0.0.1:1", "--ram-size", "4M"])) is None
    with pytest.raises(Exception, match="file: offsets are not supported"):
        dispatch(build_parser().parse_args(["incoming", f"file:{path},offset=0x1000"]))


def test_snapshot_files_take_no_packet_pages(tmp_path: Path, capsys) -> None:
    p = run_main(capsys, "migrate", f"file:{tmp_path}/g.snap", "--ram-size", "1M", "--packet-pages", "512")
    assert p.returncode != 0 and not (tmp_path / "g.snap").exists()
    assert error_lines(p.stderr) == [f"engine: error: --packet-pages sizes the packets of a tcp: or unix: migration;"
                                      f" 'file:{tmp_path}/g.snap' is a snapshot file, whose regions have their own size"]

