"""Helpers for the QEMU interop tests: a real ``qemu-system-x86_64`` (7.2) against the engine CLI.

``scripts/qemu_peer.py`` starts and drives QEMU over QMP; ``scripts/capture_proxy.py`` records
what a source sends. This module imports both, builds RAM images and the live guest's boot
sector, and checks that an engine process left nothing behind.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import pytest

from support import ROOT, Incoming, make_image

sys.path.insert(0, str(ROOT / "scripts"))

import capture_proxy as capture_proxy  # noqa: E402
import linux_guest as linux_guest  # noqa: E402
import qemu_peer as qemu_peer  # noqa: E402

CaptureProxy = capture_proxy.CaptureProxy
QemuPeer = qemu_peer.QemuPeer

#: ``-M none -m 64M``: one RAM block named ``ram`` (wire doc 5.4)
NONE_RAM = 64 << 20
NONE_PAGES = NONE_RAM // 4096
GUEST_DIR = Path(__file__).resolve().parent / "qemu_guest"

#: ``pytestmark = requires_qemu`` for a module of QEMU tests; ``@needs_qemu`` for one test
requires_qemu = [
    pytest.mark.qemu,
    pytest.mark.skipif(not qemu_peer.qemu_available(), reason="qemu-system-x86_64 is not installed"),
]

F = TypeVar("F", bound=Callable[..., Any])


def needs_qemu(test: F) -> F:
    for mark in reversed(requires_qemu):
        test = mark(test)
    return test


Image = tuple[Path, bytes]

#: QEMU 10.0 as ``scripts/install-qemu10`` unpacks it (``./scripts/test`` runs that)
QEMU10 = qemu_peer.QEMU10


def qemu_binary(version: str) -> str | None:
    """The binary of QEMU "7.2" (the system's: None) or "10.0" (skips the test if not installed)."""
    if version == "7.2":
        return None
    if not QEMU10.exists():
        pytest.skip("QEMU 10.0 is not installed (scripts/install-qemu10)")
    return str(QEMU10)


@pytest.fixture(scope="session")
def guest_files() -> linux_guest.GuestFiles:
    """The live tests' Linux guest: Debian's cloud kernel and busybox, fetched and packed once
    (cached between runs). Not being able to make it fails the test: it is part of the suite."""
    try:
        return linux_guest.ensure_guest()
    except linux_guest.GuestError as exc:
        pytest.fail(f"cannot prepare the Linux guest: {exc}")


@pytest.fixture(scope="session")
def ram_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    """A 64 MiB image: a third each of zero, random and text-like pages (so ZERO records on
    main and compressible and incompressible multifd pages)."""
    path = tmp_path_factory.mktemp("qemu-image") / "ram.img"
    raw = make_image(path, NONE_PAGES, "mixed", seed=7)
    return path, raw


def incoming(*args: str, listen_timeout: float = 60.0) -> Incoming:
    """An engine destination on a free 127.0.0.1 port."""
    return Incoming("tcp:127.0.0.1:0", *args, "--listen-timeout", f"{listen_timeout:g}")


def qemu_into_engine(tmp_path: Path, image: Path, method: str, channels: int, dump: Path,
                     binary: str | None = None, *, qemu_args: Sequence[str] = (),
                     qemu_params: dict[str, Any] | None = None, engine_args: Sequence[str] = ()) -> tuple[Incoming, str]:
    """A paused ``-M none`` QEMU source migrates ``image`` into an engine destination, which must
    exit 0 after dumping to ``dump``; returns the destination and the source's run state after.
    ``qemu_args``/``qemu_params``: more QEMU options and migration parameters; ``engine_args``:
    more ``incoming`` options."""
    with qemu_peer.source(tmp_path, ram_image=image, channels=channels, compression=method, binary=binary,
                          extra_args=qemu_args, parameters=qemu_params) as src:
        src.set_parameters(max_bandwidth=10 << 30)
        with incoming("--channels", str(channels), "--compression", method, "--json", "--dump", str(dump),
                      *engine_args) as dst:
            src.migrate(dst.uri)
            info = src.wait_migration(timeout=60)
            assert dst.wait(60) == 0, dst.stderr
        assert info["status"] == "completed", info
        return dst, src.status()


def engine_into_qemu(tmp_path: Path, image: Path, method: str, channels: int, *args: str,
                     binary: str | None = None, qemu_args: Sequence[str] = (),
                     qemu_params: dict[str, Any] | None = None) -> tuple[Any, bytes]:
    """The engine migrates ``image`` into a paused ``-M none -m 64M`` QEMU destination, which must
    complete; returns the engine's run and the destination's RAM (``pmemsave``)."""
    from support import run_engine

    peer, uri = qemu_peer.destination(tmp_path, memory="64M", channels=channels, compression=method, binary=binary,
                                      extra_args=qemu_args, parameters=qemu_params)
    with peer:
        r = run_engine("migrate", uri, "--ram-image", f"ram={image}", "--channels", str(channels),
                       "--compression", method, *args)
        assert r.returncode == 0, r.stderr
        info = peer.wait_migration(timeout=60)
        assert info["status"] == "completed", (info, peer.log())
        return r, peer.pmemsave(0, NONE_RAM, tmp_path / "pmem.bin")


def host_port(uri: str) -> tuple[str, int]:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return host, int(port)


def error_line(stderr: str) -> str:
    """The engine's one-line error (the last ``engine: error:`` line)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("engine: error: ")]
    assert lines, f"no 'engine: error:' line in stderr:\n{stderr}"
    return lines[-1].removeprefix("engine: error: ")


def assert_error(stderr: str, pattern: str) -> str:
    """The engine's error line must match ``pattern`` in full (a regex)."""
    line = error_line(stderr)
    assert re.fullmatch(pattern, line), f"engine error {line!r} does not match {pattern!r}"
    assert "Traceback" not in stderr, stderr
    return line


def descendants(pid: int) -> set[int]:
    """Live child processes of ``pid`` (one level; the engine forks its channels directly)."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(d.name))
    return out


def shm_of(pid: int) -> list[str]:
    """Shared-memory segments created by process ``pid`` (the engine names them
    mfd_[<MFD_SHM_TAG>_]<pid>_*; the test session sets a tag)."""
    tag = os.environ.get("MFD_SHM_TAG", "")
    prefix = f"mfd_{tag + '_' if tag else ''}{pid}_"
    return sorted(p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix))


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)}
        if alive:
            time.sleep(0.05)
    return alive


def _zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) == "Z"
    except OSError:
        return False


def compare_pages(name: str, got: bytes, want: bytes) -> None:
    """Byte-exact, with a useful message (first differing page) instead of a 64 MiB diff."""
    assert len(got) == len(want), f"{name}: {len(got)} bytes, expected {len(want)}"
    if got != want:
        a = np.frombuffer(got, np.uint8).reshape(-1, 4096)
        b = np.frombuffer(want, np.uint8).reshape(-1, 4096)
        bad = np.flatnonzero((a != b).any(axis=1))
        raise AssertionError(f"{name}: {len(bad)} pages differ, first at page {bad[0]} (offset {bad[0] * 4096:#x})")


# tests/qemu_guest/boot.S, hand-encoded (SeaBIOS loads it at 0x7c00). Offsets on the left.
_BOOT_CODE = bytes.fromhex(
    # .code16
    "fa"                    # 00  cli
    "31c0"                  # 01  xor   %ax,%ax
    "8ed8"                  # 03  mov   %ax,%ds
    "660f0116787c"          # 05  lgdtl 0x7c78 (gdt_desc)
    "0f20c0"                # 0b  mov   %cr0,%eax
    "6683c801"              # 0e  or    $1,%eax          (CR0.PE)
    "0f22c0"                # 12  mov   %eax,%cr0
    "66ea1d7c00000800"      # 15  ljmpl $0x08,$0x7c1d    (to pm32, 32-bit code segment)
    # .code32, pm32:
    "66b81000"              # 1d  mov   $0x10,%ax        (flat data segment)
    "8ed8"                  # 21  mov   %ax,%ds
    "8ec0"                  # 23  mov   %ax,%es
    "8ed0"                  # 25  mov   %ax,%ss
    "bc007c0000"            # 27  mov   $0x7c00,%esp
    "e492"                  # 2c  in    $0x92,%al        (fast A20 ...)
    "0c02"                  # 2e  or    $0x2,%al
    "e692"                  # 30  out   %al,$0x92        (... on)
    "66baf803"              # 32  mov   $0x3f8,%dx       (COM1)
    "b041"                  # 36  mov   $'A',%al
    "ee"                    # 38  out   %al,(%dx)
    "31c9"                  # 39  xor   %ecx,%ecx        (pass counter)
    "b800001000"            # 3b  pass: mov $0x100000,%eax
    "fe00"                  # 40  page: incb (%eax)
    "0500100000"            # 42  add   $0x1000,%eax
    "3d00004006"            # 47  cmp   $0x6400000,%eax  (100 MiB)
    "72f2"                  # 4c  jb    page
    "41"                    # 4e  inc   %ecx
    "f7c13f000000"          # 4f  test  $63,%ecx
    "75e4"                  # 55  jnz   pass
    "b042"                  # 57  mov   $'B',%al
    "ee"                    # 59  out   %al,(%dx)
    "ebdf"                  # 5a  jmp   pass
    "00000000"              # 5c  padding to 8 bytes
    "0000000000000000"      # 60  gdt: null descriptor
    "ffff0000009acf00"      # 68  0x08: code, base 0, limit 4 GiB, 32-bit
    "ffff00000092cf00"      # 70  0x10: data, base 0, limit 4 GiB, 32-bit
    "1700607c0000"          # 78  gdt_desc: limit 23, base 0x7c60
)
BOOT_SECTOR = _BOOT_CODE.ljust(510, b"\0") + b"\x55\xaa"  # 1fe: boot signature


def assemble_boot_sector(directory: Path) -> bytes | None:
    """tests/qemu_guest/boot.S assembled with binutils; None when ``as``/``ld`` are missing."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        return None
    obj = directory / "boot.o"
    out = directory / "boot-as.bin"
    for cmd in (["as", "--32", "-o", str(obj), str(GUEST_DIR / "boot.S")],
                ["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(out), str(obj)]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr}"
    return out.read_bytes()


def boot_sector(directory: Path) -> Path:
    """The guest's 512-byte boot disk: boot.S assembled at test time, or the hand-encoded
    bytes where binutils is missing."""
    data = assemble_boot_sector(directory)
    if data is None:
        data = BOOT_SECTOR
    assert len(data) == 512 and data[510:] == b"\x55\xaa", f"boot sector is {len(data)} bytes"
    out = directory / "boot.bin"
    out.write_bytes(data)
    return out


def wait_serial(path: Path, what: bytes, timeout: float = 30.0, peer: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and what in path.read_bytes():
            return
        if peer is not None and not peer.alive():
            raise AssertionError(f"QEMU exited before writing {what!r} to its serial port:\n{peer.log()}")
        time.sleep(0.05)
    raise AssertionError(f"no {what!r} on the guest's serial port within {timeout:g}s")


def run_py(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stderr line of ``proc`` starting with ``prefix``, within ``timeout``."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = ""
    try:
        while time.monotonic() < deadline:
            if not sel.select(min(0.2, max(0.0, deadline - time.monotonic()))):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stderr.readline()  # a whole line is there: the writer flushes per line
            if not line:
                break
            seen += line
            if line.startswith(prefix):
                return line.strip()
    finally:
        sel.close()
    raise AssertionError(f"no line starting {prefix!r} within {timeout:g}s; stderr so far:\n{seen}")


def iter_devices(devices: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from devices.get("sections") or []
