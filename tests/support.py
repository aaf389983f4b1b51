"""Helpers for end-to-end tests: run the real CLI in real processes (or in this one, for its errors),
make RAM images, compare dumps, wait for conditions."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096


def engine_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Incoming:
    """``python -m engine incoming URI ...`` in a child process; knows its real URI."""

    def __init__(self, uri: str, *args: str, startup: float = 30.0) -> None:
        self.proc = subprocess.Popen(
            engine_cmd("incoming", uri, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT
        )
        self.stderr_head = b""
        self.uri = self._wait_listening(startup)
        self.stdout = ""
        self.stderr = ""

    def _wait_listening(self, timeout: float) -> str:
        from engine.cli.common import wait_for_listening
        from engine.errors import MigrationTimeout

        try:
            uri, self.stderr_head = wait_for_listening(self.proc, timeout)
        except MigrationTimeout as exc:
            self.kill()
            raise AssertionError(str(exc)) from None
        return uri

    def wait(self, timeout: float = 60.0) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout = out.decode()
        self.stderr = (self.stderr_head + err).decode()
        return self.proc.returncode

    def json(self) -> dict[str, Any]:
        return json.loads(self.stdout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        else:
            self.proc.communicate(timeout=10)


def wait_for(pred: Any, timeout: float, what: str) -> None:
    """Poll ``pred()`` every 10 ms until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def shm_bytes(pid: int) -> int:
    """Bytes of memory allocated in the shared-memory segments (guest RAM) of engine process
    ``pid``: on a destination, the pages received so far (a page never written is a hole)."""
    tag = os.environ.get("MFD_SHM_TAG", "")
    total = 0
    for seg in Path("/dev/shm").glob(f"mfd_{tag + '_' if tag else ''}{pid}_*"):
        try:
            total += seg.stat().st_blocks * 512
        except OSError:  # freed meanwhile
            pass
    return total


def wait_receiving(dst: Incoming, nbytes: int = 4 << 20, timeout: float = 20.0) -> None:
    """Wait until the destination process holds ``nbytes`` of received guest RAM: the
    migration is under way (set up, channels sending), and not over for a slow source."""

    def received() -> bool:
        assert dst.proc.poll() is None, f"the destination exited with status {dst.proc.returncode}"
        return shm_bytes(dst.proc.pid) >= nbytes

    wait_for(received, timeout, f"the destination to receive {nbytes >> 20} MiB")


def run_main(capsys: Any, *args: str, main: Any = None) -> subprocess.CompletedProcess[str]:
    """``engine.cli.main.main(args)`` (or another entry point ``main``) in this process, for
    errors that need no real process: the exit status and what it printed (``capsys``), shaped
    like :func:`run_engine`'s result. An argparse error raises SystemExit(2) here
    (``pytest.raises(SystemExit)``)."""
    import signal

    if main is None:
        from engine.cli.main import main
    capsys.readouterr()  # only this command's output
    sigterm = signal.getsignal(signal.SIGTERM)  # main() sets its own, then SIG_DFL
    try:
        code = main(list(args))
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["engine", *args], code, out, err)


def error_lines(stderr: str) -> list[str]:
    """The engine's one-line errors in ``stderr`` (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("engine: error:")]


def children(pid: int, *, zombies: bool = False) -> list[int]:
    """The child processes of ``pid`` (/proc), without zombies unless ``zombies``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == str(pid) and (zombies or fields[0] != "Z"):
                out.append(int(d.name))
    return sorted(out)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it has exited
        return b""


def channel_pids(pid: int, n: int, timeout: float = 10.0) -> list[int]:
    """The channel processes of an engine process (its children other than the resource tracker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [k for k in children(pid) if b"resource_tracker" not in _cmdline(k)]
        if len(kids) >= n:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not start {n} channel processes")


#: a source that takes about 3-4 s (64 MiB at 16 MiB/s): time to look at or strike its processes
SLOW = ["--ram-size", "64M", "--max-bandwidth", "16M"]


def start_source(uri: str, *args: str) -> subprocess.Popen[str]:
    """``python -m engine migrate URI ...`` in a child process (text pipes)."""
    return subprocess.Popen(engine_cmd("migrate", uri, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT)


def run_engine(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(engine_cmd(*args), capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def make_image(path: Path, pages: int, kind: str = "mixed", seed: int = 0) -> bytes:
    """A RAM image of ``pages`` pages: zero, random, text-like (compressible) or mixed."""
    rng = np.random.default_rng(seed)
    data = np.zeros((pages, PAGE), dtype=np.uint8)
    kinds = {"zero": 0, "random": 1, "text": 2}
    per_page = rng.integers(0, 3, size=pages) if kind == "mixed" else np.full(pages, kinds[kind])
    rnd = np.flatnonzero(per_page == 1)
    data[rnd] = rng.integers(0, 256, size=(len(rnd), PAGE), dtype=np.uint8)
    txt = np.flatnonzero(per_page == 2)
    words = np.frombuffer(b"abcdefgh migration page ", dtype=np.uint8)
    data[txt] = np.resize(words, PAGE)
    data[txt, :8] = txt.astype("<u8").view(np.uint8).reshape(-1, 8)  # unique per page
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


def read_dump(directory: Path) -> dict[str, bytes]:
    manifest = json.loads((directory / "manifest.json").read_text())
    out = {}
    for entry in manifest["blocks"]:
        data = (directory / entry["file"]).read_bytes()
        assert len(data) == entry["size"], entry
        out[entry["name"]] = data
    return out


def assert_same_ram(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert list(a) == list(b), (list(a), list(b))
    for name in a:
        if a[name] != b[name]:
            x = np.frombuffer(a[name], dtype=np.uint8).reshape(-1, PAGE)
            y = np.frombuffer(b[name], dtype=np.uint8).reshape(-1, PAGE)
            bad = np.flatnonzero((x != y).any(axis=1))
            raise AssertionError(f"block {name!r}: {len(bad)} pages differ, first at page {bad[0]}")


def image_args(images: Sequence[tuple[str, Path]]) -> list[str]:
    out = []
    for name, path in images:
        out += ["--ram-image", f"{name}={path}"]
    return out


# ------------------------------------------------------------ damaged inputs


@st.composite
def damaged(draw: st.DrawFn, base: st.SearchStrategy[bytes], min_ops: int = 0) -> bytes:
    """``base`` with up to four random edits: a bit flipped, a byte set, a cut, bytes inserted
    or deleted, a big-endian 32/64-bit field overwritten with a boundary value."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(min_ops, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "be32", "be64"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "be32" and pos + 4 <= len(data):
            data[pos:pos + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 255, 256, 2**31, 2**32 - 1])))
        elif op == "be64" and pos + 8 <= len(data):
            data[pos:pos + 8] = struct.pack(">Q", draw(st.sampled_from([0, 0x10, 0x22, 2**40 | 4, 2**63, 2**64 - 1])))
    return bytes(data)
