"""Bad input: one clear line, non-zero exit, no traceback, nothing left behind.

Errors found before any peer is involved run ``engine.cli.main.main`` in this process
(:func:`run_main`); those a real destination process reports are end to end.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support import Incoming, make_image, run_engine, run_main


def _one_line_error(proc, *fragments: str, code: int | None = None) -> str:
    assert proc.returncode != 0
    if code is not None:
        assert proc.returncode == code
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_missing_image(tmp_path: Path, capsys) -> None:
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-image", str(tmp_path / "nope.bin"))
    _one_line_error(p, "nope.bin", "No such file", code=1)


def test_image_not_page_multiple(tmp_path: Path, capsys) -> None:
    img = tmp_path / "odd.bin"
    img.write_bytes(b"x" * 5000)
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-image", f"ram={img}")
    _one_line_error(p, "5000 bytes", "multiple of 4096", code=1)


def test_duplicate_block_names(tmp_path: Path, capsys) -> None:
    img = tmp_path / "a.bin"
    make_image(img, 2, "random")
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-image", str(img), "--ram-image", str(img))
    _one_line_error(p, "'pc.ram' given twice", code=1)


@pytest.mark.parametrize(
    "uri, fragment",
    [("ftp:host:1", "unsupported migration URI scheme 'ftp'"), ("tcp:host", "expected tcp:HOST:PORT"),
     ("tcp:127.0.0.1:99999", "invalid port '99999'"), ("nonsense", "invalid migration URI")],
)
def test_bad_uri(uri: str, fragment: str, capsys) -> None:
    p = run_main(capsys, "migrate", uri, "--ram-size", "1M")
    _one_line_error(p, fragment, code=1)


@pytest.mark.parametrize(
    "args, fragment",
    [(["--channels", "0"], "multifd-channels 0 is out of range, expected 1..255"),
     (["--channels", "256"], "multifd-channels 256 is out of range"),
     (["--compression", "gzip"], "unknown multifd-compression 'gzip'"),
     (["--compression", "zlib", "--level", "10"], "multifd-zlib-level 10 is out of range, expected 0..9"),
     (["--uuid", "xyz"], "invalid uuid 'xyz'"),
     (["--compat", "6.0"], "compat '6.0' is not a QEMU version this engine speaks, expected 7.2 .. 10.0"),
     (["--compat", "10.x"], "compat '10.x' is not a QEMU version this engine speaks, expected 7.2 .. 10.0"),
     (["--zero-copy-send", "--compression", "zstd"],
      "zero-copy-send needs multifd-compression none and zero-page-detection legacy or none, got zstd and legacy"
      " (only guest RAM itself can be sent without a copy)"),
     (["--zero-copy-send", "--zero-page-detection", "multifd"],
      "zero-copy-send needs multifd-compression none and zero-page-detection legacy or none, got none and"
      " multifd"),
     (["--packet-pages", "64"], "packet-pages 64 is out of range, expected 128..1024 (128 for a QEMU peer)")],
)
def test_bad_parameters(args: list[str], fragment: str, capsys) -> None:
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-size", "1M", *args)
    _one_line_error(p, fragment, code=1)


@pytest.mark.parametrize("size, fragment", [("12Q", "invalid --ram-size '12Q'"), ("5000", "expected a positive multiple of 4096")])
def test_bad_size(size: str, fragment: str, capsys) -> None:
    p = run_main(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-size", size)
    _one_line_error(p, fragment, code=1)


def test_nobody_listening(capsys) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = run_main(capsys, "migrate", f"tcp:127.0.0.1:{port}", "--ram-size", "1M")
    _one_line_error(p, f"cannot connect to tcp:127.0.0.1:{port}", "refused", code=1)


def _usage_error(capsys, *args: str):
    """An argparse error: SystemExit(2) out of main() and one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        run_main(capsys, *args)
    out, err = capsys.readouterr()
    assert out == ""
    return subprocess.CompletedProcess(["engine", *args], exc.value.code, out, err)


def test_argparse_errors_are_one_line(capsys) -> None:
    p = _usage_error(capsys, "migrate", "tcp:127.0.0.1:1")
    _one_line_error(p, "one of the arguments --snapshot --ram-image --ram-size is required", code=2)


def test_compression_mismatch_fails_cleanly(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--compression", "zstd", "--stall-timeout", "10") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "1M", "--fill", "random", "--compression", "zlib")
        assert dst.wait() == 1
    line = _one_line_error(type("P", (), {"returncode": 1, "stderr": dst.stderr.split("\n", 1)[1]})(),
                           "received compression flags 0x2, expected 0x4 (zstd)")
    assert "multifd channel" in line and "packet_num" in line


def test_channel_count_mismatch_too_many(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "2", "--stall-timeout", "10") as dst:
        run_engine("migrate", dst.uri, "--ram-size", "1M", "--channels", "3")
        assert dst.wait() == 1
    assert "received channel id 2, expected < 2 (multifd-channels)" in dst.stderr


@pytest.mark.slow  # waits out a 2 s handshake timeout
def test_channel_count_mismatch_too_few(tmp_path: Path) -> None:
    with Incoming("tcp:127.0.0.1:0", "--channels", "3", "--handshake-timeout", "2") as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "1M", "--channels", "2", "--stall-timeout", "5")
        assert dst.wait() == 1
    assert "2 of 3 multifd channels within 2s (missing channel ids [2])" in dst.stderr
    # Without a return path the source cannot learn of it (as with QEMU): a small guest fits in
    # the socket buffers and the source may even report completion.
    assert "Traceback" not in src.stderr


def test_uuid_mismatch(tmp_path: Path) -> None:
    u1 = "12345678-9abc-def0-1234-56789abcdef0"
    with Incoming("tcp:127.0.0.1:0", "--uuid", u1) as dst:
        run_engine("migrate", dst.uri, "--ram-size", "1M", "--stall-timeout", "5")
        assert dst.wait() == 1
    assert (
        f"received uuid '00000000-0000-0000-0000-000000000000' and expected uuid '{u1}' for channel" in dst.stderr
    )


def test_unknown_zero_page_detection_is_one_line(capsys) -> None:
    p = _usage_error(capsys, "migrate", "tcp:127.0.0.1:1", "--ram-size", "1M", "--zero-page-detection", "fast")
    _one_line_error(p, "argument --zero-page-detection: invalid choice: 'fast' (choose from 'legacy', 'multifd', 'none')",
                    code=2)


def test_zero_page_detection_parameter_is_validated() -> None:
    from engine.errors import ConfigError
    from engine.params import MigrationParams

    with pytest.raises(ConfigError, match="zero-page-detection 'fast' is not supported, expected one of legacy, multifd, none"):
        MigrationParams(zero_page_detection="fast")


def test_zero_copy_send_needs_tcp(tmp_path: Path, capsys) -> None:
    """Refused before any connection is made (nothing listens on the path)."""
    p = run_main(capsys, "migrate", f"unix:{tmp_path / 'nobody.sock'}", "--ram-size", "1M", "--zero-copy-send")
    _one_line_error(p, f"zero-copy-send needs a tcp: URI, got 'unix:{tmp_path / 'nobody.sock'}'", code=1)
