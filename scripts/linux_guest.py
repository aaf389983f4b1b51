#!/usr/bin/env python3
"""A small real Linux guest for the live-checkpoint tests: Debian's cloud kernel and busybox.

Why: the boot-sector guest (tests/qemu_guest/boot.S) proves RAM moves, but not that a real OS
survives being migrated out and resumed in a fresh QEMU. This guest runs Linux with an
initramfs whose ``/init`` keeps a 32 MiB tmpfs file with a known pattern and, forever, re-checks
its md5sum and prints one line per tick on the serial console::

    GUEST-INIT boot                   once, right after the kernel starts /init
    GUEST-PATTERN <md5>               the pattern file's md5 (equals pattern_md5())
    GUEST-TICK 1 ok                   after each md5sum of the file (BAD on a mismatch), then 0.2 s
    GUEST-TICK 2 ok                   sleep: a tick every ~0.7 s under TCG (md5sum takes ~0.45 s)

A resumed guest continues its tick numbers without a second ``GUEST-INIT boot``. /init turns
kernel console messages off once it runs, so the serial log holds only these lines. Under TCG
on this project's 2-core machine the first tick comes ~4-5 s after QEMU starts (7.2 and 10.0):
~3 s to /init, 0.4 s to write the pattern, two md5sums.

Migrating it: give the destination its own serial file (``file:`` truncates at open), and
parse the source's log and the destination's concatenated: the UART is migrated mid-line
when the cut falls inside one, so a tick line can start in one file and end in the other.
``-M pc`` is a different machine type in 7.2 and 10.0; between versions use
``pc-i440fx-7.2`` on both sides. With ``-nodefaults`` the RAM blocks are pc.ram (``-m``),
pc.bios, pc.rom and the ACPI blobs /rom@etc/acpi/tables, /rom@etc/table-loader and
/rom@etc/acpi/rsdp: no vga.vram, and the kernel and initrd travel in fw_cfg, not in RAM
blocks, which is why both sides need the same ``-kernel``/``-initrd``/``-append``.

Files (nothing is installed on the host): ``apt-get download`` fetches the package the
``linux-image-cloud-amd64`` metapackage depends on and ``busybox-static``; ``dpkg-deb -x``
unpacks them; the vmlinuz and the busybox binary are kept in the cache directory
(``MFD_GUEST_CACHE``, default ``.cache/linux-guest`` in the repository) with a ``guest.json``
manifest, so later runs neither consult apt nor download (``refresh=True`` re-resolves). The
initramfs (gzip'd newc cpio, written here without the cpio command) is named after a hash of
its contents and rebuilt only when busybox or the init script change.

Boot (QEMU 7.2 and 10.0, TCG)::

    vm, serial = peer(workdir, files, "vm")   # a QemuPeer with qemu_args(files, serial)
    run_until_ticks(vm, serial)

``qemu_args`` holds only what QemuPeer does not add itself (it adds ``-accel tcg -nodefaults
-no-user-config -display none`` and ``-M``/``-m``), so the same call serves a source and an
``-incoming defer`` destination. CLI: ``python scripts/linux_guest.py [--boot]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
MACHINE = "pc"
MEMORY = "256M"
APPEND = "console=ttyS0 quiet panic=-1"

PATTERN_SIZE = 32 << 20
#: The pattern: 32768 records of 1 KiB, "NNNNN\n" (0-padded record number) and PATTERN_BODY, so
#: page k holds records 4k..4k+3 at fixed offsets, every page differs and no byte is zero.
#: /init writes it with one ``seq -w -s "\n$body" 0 32767`` straight into the file (seq ends
#: with "\n") and appends the last body: ~0.4 s under TCG, where piping seq through
#: ``head -c`` took 4 s (busybox head -c copies in small reads).
PATTERN_RECORD = 1024
PATTERN_RECORDS = PATTERN_SIZE // PATTERN_RECORD
_WIDTH = len(str(PATTERN_RECORDS - 1))
_FILL = " GUEST-PATTERN abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"
PATTERN_BODY = (_FILL * (PATTERN_RECORD // len(_FILL) + 1))[: PATTERN_RECORD - _WIDTH - 1]
TICK_SECONDS = 0.2

#: busybox applets /init runs (symlinks in the initramfs; echo, printf, [ and set are ash builtins)
APPLETS = ("sh", "mount", "mkdir", "md5sum", "seq", "stat", "usleep", "cat")

INIT_SCRIPT = f"""#!/bin/sh
# PID 1 of the test guest (scripts/linux_guest.py). Never exits: PID 1 exiting panics the kernel.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# from here only emergencies reach the console, so no kernel message splits a tick line
echo 1 > /proc/sys/kernel/printk
echo GUEST-INIT boot
mkdir -p /pat
mount -t tmpfs -o size=48m tmpfs /pat
body='{PATTERN_BODY}'
seq -w -s "
$body" 0 {PATTERN_RECORDS - 1} > /pat/pattern
printf %s "$body" >> /pat/pattern
size=$(stat -c %s /pat/pattern)
[ "$size" = {PATTERN_SIZE} ] || echo "GUEST-ERROR pattern is $size bytes"
set -- $(md5sum /pat/pattern)
want=$1
echo "GUEST-PATTERN $want"
n=0
while :; do
    n=$((n + 1))
    set -- $(md5sum /pat/pattern)
    if [ "$1" = "$want" ]; then st=ok; else st=BAD; fi
    # one echo is one write(2) of the whole line
    echo "GUEST-TICK $n $st"
    usleep {int(TICK_SECONDS * 1e6)}
done
"""

#: bump when the initramfs layout changes in a way the content hash would not see
_INITRD_FORMAT = 1


class GuestError(RuntimeError):
    """The guest's files could not be prepared; the message is one line: what, and which command."""


@dataclasses.dataclass(frozen=True)
class GuestFiles:
    """What ``-kernel``/``-initrd`` need, plus the package versions they came from."""

    kernel: Path
    initrd: Path
    kernel_package: str = ""
    kernel_version: str = ""
    busybox_version: str = ""


# ----------------------------------------------------------------------------- serial log

_TICK = re.compile(r"^GUEST-TICK (\d+) (ok|BAD)\r?\n", re.MULTILINE)
_BOOT = re.compile(r"^GUEST-INIT boot\r?$", re.MULTILINE)
_PATTERN = re.compile(r"^GUEST-PATTERN ([0-9a-f]{32})\r?$", re.MULTILINE)


def _text(log: str | bytes) -> str:
    return log.decode("utf-8", "replace") if isinstance(log, bytes) else log


def ticks(text: str | bytes) -> list[int]:
    """N of every complete ``GUEST-TICK N ok`` line, in order (a line still being written is not one)."""
    return [int(m[1]) for m in _TICK.finditer(_text(text)) if m[2] == "ok"]


def bad_ticks(text: str | bytes) -> list[int]:
    """N of every ``GUEST-TICK N BAD`` line: the guest saw its pattern file change."""
    return [int(m[1]) for m in _TICK.finditer(_text(text)) if m[2] == "BAD"]


def boots(text: str | bytes) -> int:
    """How many times /init started (more than once means the guest rebooted)."""
    return len(_BOOT.findall(_text(text)))


def reported_md5(text: str | bytes) -> list[str]:
    """The md5 of every ``GUEST-PATTERN`` line (one per boot)."""
    return _PATTERN.findall(_text(text))


def pattern_bytes() -> bytes:
    """The guest's pattern file, computed here exactly as /init makes it."""
    data = "".join(f"{i:0{_WIDTH}d}\n{PATTERN_BODY}" for i in range(PATTERN_RECORDS)).encode()
    assert len(data) == PATTERN_SIZE
    return data


def pattern_md5() -> str:
    """What the guest's ``GUEST-PATTERN`` line must say."""
    return hashlib.md5(pattern_bytes()).hexdigest()


def read_serial(path: Path) -> str:
    """The serial log so far ("" before QEMU creates it)."""
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def wait_serial(path: Path, done: Callable[[str], bool], timeout: float, *, what: str,
                alive: Callable[[], bool] | None = None, poll: float = 0.05) -> str:
    """Poll the serial file until ``done(text)``; returns the text. Raises AssertionError
    naming ``what`` when the deadline passes or ``alive()`` turns false (QEMU exited)."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_serial(path)
        if done(text):
            return text
        if alive is not None and not alive():
            raise AssertionError(f"QEMU exited while waiting for {what}; serial log tail:\n{text[-2000:]}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} on the guest's serial port within {timeout:g}s;"
                                 f" serial log tail:\n{text[-2000:]}")
        time.sleep(poll)


# ----------------------------------------------------------------------------- QEMU


def qemu_args(files: GuestFiles, serial_path: Path | str) -> list[str]:
    """The guest's QEMU options after ``-M pc -m 256M`` (pass MACHINE/MEMORY to QemuPeer, and
    no ``serial=``: the serial file is here). The same list fits a destination (with another
    serial file): the kernel and initrd live in fw_cfg, which must match on both sides.
    ``-no-reboot``: a guest that panics or reboots makes QEMU exit instead of booting again."""
    return [
        "-kernel", str(files.kernel),
        "-initrd", str(files.initrd),
        "-append", APPEND,
        "-serial", f"file:{serial_path}",
        "-no-reboot",
    ]


def standalone_command(files: GuestFiles, serial_path: Path | str, binary: str = "qemu-system-x86_64") -> list[str]:
    """The whole command line QemuPeer would run (without QMP, -S and -incoming), for use by hand."""
    return [binary, "-M", MACHINE, "-m", MEMORY, "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-display", "none", *qemu_args(files, serial_path)]


# ----------------------------------------------------------------------------- fetching


def default_cache_dir() -> Path:
    env = os.environ.get("MFD_GUEST_CACHE")
    return Path(env) if env else ROOT / ".cache" / "linux-guest"


def _run(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), check=False, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestError(f"{' '.join(cmd)}: {exc}") from None


def _why(r: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines()
             if ln.strip() and not ln.startswith("W: Download is performed unsandboxed")]
    return f"exit {r.returncode}" + (f", {lines[-1][:200]}" if lines else "")


class _Apt:
    """apt look-ups with one ``apt-get update -qq`` (as root) when the package lists fail us."""

    def __init__(self) -> None:
        self.updated = False

    def _retry(self, cmd: list[str], ok: Callable[[subprocess.CompletedProcess[str]], bool],
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        r = _run(cmd, cwd=cwd)
        if ok(r) or self.updated or os.geteuid() != 0:
            return r
        self.updated = True
        u = _run(["apt-get", "update", "-qq"])
        if u.returncode != 0:
            raise GuestError(f"apt-get update -qq (after {' '.join(cmd)} failed: {_why(r)}): {_why(u)}")
        return _run(cmd, cwd=cwd)

    def kernel_package(self) -> str:
        """``linux-image-6.1.0-NN-cloud-amd64``: what the metapackage depends on now."""
        cmd = ["apt-cache", "depends", KERNEL_META]

        def found(r: subprocess.CompletedProcess[str]) -> bool:
            return r.returncode == 0 and _kernel_dep(r.stdout) is not None

        r = self._retry(cmd, found)
        name = _kernel_dep(r.stdout) if r.returncode == 0 else None
        if name is None:
            raise GuestError(f"{' '.join(cmd)}: no linux-image-*-cloud-amd64 dependency ({_why(r)})")
        return name

    def download(self, package: str, into: Path) -> Path:
        """``apt-get download PACKAGE`` into ``into``; returns the .deb."""
        into.mkdir(parents=True, exist_ok=True)
        cmd = ["apt-get", "download", "-q", package]
        before = set(into.glob("*.deb"))
        r = self._retry(cmd, lambda r: r.returncode == 0, cwd=into)
        if r.returncode != 0:
            raise GuestError(f"{' '.join(cmd)} (in {into}): {_why(r)}")
        new = sorted(set(into.glob("*.deb")) - before) or sorted(into.glob(f"{package}_*.deb"))
        if not new:
            raise GuestError(f"{' '.join(cmd)} (in {into}): exit 0 but no {package}_*.deb appeared")
        return max(new, key=lambda p: p.stat().st_mtime)


def _kernel_dep(depends_output: str) -> str | None:
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)\b", depends_output)
    return m.group(1) if m else None


def _deb_field(deb: Path, field: str) -> str:
    r = _run(["dpkg-deb", "-f", str(deb), field])
    if r.returncode != 0:
        raise GuestError(f"dpkg-deb -f {deb} {field}: {_why(r)}")
    return r.stdout.strip()


def _unpack_one(deb: Path, pattern: str, dest: Path) -> Path:
    """``dpkg-deb -x`` into a scratch directory and keep the one file matching ``pattern``."""
    with tempfile.TemporaryDirectory(prefix="unpack-", dir=dest.parent) as tmp:
        r = _run(["dpkg-deb", "-x", str(deb), tmp])
        if r.returncode != 0:
            raise GuestError(f"dpkg-deb -x {deb} {tmp}: {_why(r)}")
        hits = sorted(Path(tmp).glob(pattern))
        if not hits:
            raise GuestError(f"dpkg-deb -x {deb}: no {pattern} in the package")
        part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        shutil.copyfile(hits[0], part)
        part.chmod(0o755)
        part.replace(dest)
    return dest


def _fetch(cache: Path) -> dict[str, str]:
    """Download and unpack both packages; returns the manifest (file names relative to ``cache``)."""
    apt = _Apt()
    debs = cache / "debs"
    kpkg = apt.kernel_package()
    kdeb = apt.download(kpkg, debs)
    kver = _deb_field(kdeb, "Version")
    kernel = _unpack_one(kdeb, "boot/vmlinuz-*", cache / f"vmlinuz-{kpkg.removeprefix('linux-image-')}_{kver}")
    bdeb = apt.download(BUSYBOX_PACKAGE, debs)
    bver = _deb_field(bdeb, "Version")
    busybox = _unpack_one(bdeb, "bin/busybox", cache / f"busybox_{bver.split(':')[-1]}")
    for d in (kdeb, bdeb):  # 27 MB that the vmlinuz and busybox copies make redundant
        d.unlink(missing_ok=True)
    return {"kernel": kernel.name, "kernel_package": kpkg, "kernel_version": kver,
            "busybox": busybox.name, "busybox_version": bver}


# ----------------------------------------------------------------------------- initramfs


def _cpio_entry(out: io.BytesIO, ino: int, name: str, mode: int, data: bytes = b"",
                rdev: tuple[int, int] = (0, 0)) -> None:
    """One newc ("070701") record: 110-byte ASCII header, NUL-terminated name, data; the name
    and the data are each padded to a multiple of 4 bytes (counted from the archive start)."""
    nlink = 2 if stat.S_ISDIR(mode) else 1
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out.write(b"070701" + b"".join(b"%08X" % f for f in fields))
    out.write(encoded)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(data)
    out.write(b"\0" * (-out.tell() % 4))


def build_cpio(entries: Iterable[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A newc archive of ``(name, mode, data, (rdev major, minor))`` entries, parents first;
    owner root, mtime 0, so the bytes depend on the entries only."""
    out = io.BytesIO()
    ino = 0
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        _cpio_entry(out, ino, name, mode, data, rdev)
    _cpio_entry(out, ino + 1, "TRAILER!!!", 0)
    return out.getvalue()


def _initrd_entries(busybox: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    d, f, ln = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755, stat.S_IFLNK | 0o777
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = [
        (name, d, b"", (0, 0)) for name in ("bin", "dev", "proc", "sys", "tmp", "pat")]
    # the kernel opens /dev/console for init's stdio before /init mounts devtmpfs
    entries.append(("dev/console", stat.S_IFCHR | 0o600, b"", (5, 1)))
    entries.append(("bin/busybox", f, busybox, (0, 0)))
    entries += [(f"bin/{a}", ln, b"busybox", (0, 0)) for a in APPLETS]
    entries.append(("init", f, INIT_SCRIPT.encode(), (0, 0)))
    return entries


def build_initrd(busybox: Path, cache: Path) -> Path:
    """The gzip'd initramfs in ``cache``, named after a hash of what goes into it; built only
    when that file is missing."""
    data = Path(busybox).read_bytes()
    h = hashlib.sha256(b"%d\0" % _INITRD_FORMAT)
    h.update(hashlib.sha256(data).digest())
    h.update(INIT_SCRIPT.encode())
    h.update(" ".join(APPLETS).encode())
    path = cache / f"initrd-{h.hexdigest()[:16]}.cpio.gz"
    if path.exists():
        return path
    blob = gzip.compress(build_cpio(_initrd_entries(data)), compresslevel=6, mtime=0)
    part = path.with_name(path.name + f".{os.getpid()}.part")
    part.write_bytes(blob)
    part.replace(path)
    for old in cache.glob("initrd-*.cpio.gz"):  # outdated builds
        if old != path:
            old.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------- entry points


def ensure_guest(cache_dir: Path | None = None, *, refresh: bool = False) -> GuestFiles:
    """Kernel and initramfs ready to boot, fetched on first use (see the module docstring).
    ``refresh``: ask apt for the current kernel package again. Raises :class:`GuestError`."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestError(f"mkdir {cache}: {exc}") from None
    manifest_path = cache / "guest.json"
    manifest: dict[str, str] | None = None
    if not refresh and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            assert manifest is not None
            if not ((cache / manifest["kernel"]).exists() and (cache / manifest["busybox"]).exists()):
                manifest = None
        except (OSError, ValueError, KeyError, AssertionError):
            manifest = None
    if manifest is None:
        manifest = _fetch(cache)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    initrd = build_initrd(cache / manifest["busybox"], cache)
    return GuestFiles(kernel=cache / manifest["kernel"], initrd=initrd, kernel_package=manifest["kernel_package"],
                      kernel_version=manifest["kernel_version"], busybox_version=manifest["busybox_version"])


@dataclasses.dataclass(frozen=True)
class BootReport:
    """One boot under QemuPeer: seconds from QEMU's start, and what the guest printed."""

    qemu: str
    to_init: float
    to_first_tick: float
    to_last_tick: float
    serial: str
    ramblocks: str


def peer(workdir: Path, files: GuestFiles, name: str, *, binary: str | None = None,
         incoming: bool = False) -> tuple[Any, Path]:
    """A QEMU for the guest (a ``qemu_peer.QemuPeer``, started paused, or waiting for an
    incoming migration) and the file its serial console goes to."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import qemu_peer

    serial = workdir / f"{name}.serial"
    serial.unlink(missing_ok=True)
    return qemu_peer.QemuPeer(workdir, name=name, machine=MACHINE, memory=MEMORY, incoming=incoming,
                              extra_args=qemu_args(files, serial), binary=binary), serial


def run_until_ticks(vm: Any, serial: Path, count: int = 3, timeout: float = 60.0) -> str:
    """``cont``, then the serial console's text once it shows ``count`` ticks."""
    vm.execute("cont")
    return wait_serial(serial, lambda t: len(ticks(t)) >= count, timeout, what=f"{count} ticks", alive=vm.alive)


def boot_once(files: GuestFiles, workdir: Path, *, binary: str | None = None, count: int = 5,
              timeout: float = 120.0) -> BootReport:
    """Boot under QemuPeer (as the tests do) until ``count`` ok ticks, timing the way there;
    also lists the RAM blocks (``info ramblock``) a migration of this guest carries."""
    vm, serial = peer(workdir, files, "linux-guest", binary=binary)
    t0 = time.monotonic()
    with vm:
        vm.execute("cont")
        alive = vm.alive
        wait_serial(serial, lambda t: boots(t) > 0, timeout, what="GUEST-INIT boot", alive=alive)
        t_init = time.monotonic() - t0
        wait_serial(serial, lambda t: len(ticks(t)) > 0, timeout, what="the first tick", alive=alive)
        t_tick = time.monotonic() - t0
        text = wait_serial(serial, lambda t: len(ticks(t)) >= count, timeout, what=f"{count} ticks", alive=alive)
        t_last = time.monotonic() - t0
        ramblocks = str(vm.execute("human-monitor-command", {"command-line": "info ramblock"}))
        version = vm.execute("query-version")["qemu"]
    return BootReport(qemu="{major}.{minor}.{micro}".format(**version), to_init=t_init, to_first_tick=t_tick,
                      to_last_tick=t_last, serial=text, ramblocks=ramblocks)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="linux_guest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--boot", action="store_true", help="boot once under QEMU and print the first ticks")
    p.add_argument("--binary", default=None, help="QEMU binary (default: QEMU_BINARY or qemu-system-x86_64)")
    p.add_argument("--ticks", type=int, default=5, help="with --boot: how many ticks to wait for")
    p.add_argument("--refresh", action="store_true", help="re-resolve and re-download the packages")
    p.add_argument("--cache", type=Path, default=None, help="cache directory (default: MFD_GUEST_CACHE or .cache/linux-guest)")
    args = p.parse_args(argv)
    try:
        files = ensure_guest(args.cache, refresh=args.refresh)
    except GuestError as exc:
        print(f"linux_guest: error: {exc}", file=sys.stderr)
        return 1
    print(f"kernel  {files.kernel}  ({files.kernel_package} {files.kernel_version})")
    print(f"initrd  {files.initrd}  (busybox-static {files.busybox_version})")
    print("command " + " ".join(standalone_command(files, "serial.txt")))
    if not args.boot:
        return 0
    with tempfile.TemporaryDirectory(prefix="linux-guest-") as tmp:
        r = boot_once(files, Path(tmp), binary=args.binary, count=args.ticks)
    print(f"QEMU {r.qemu}: GUEST-INIT after {r.to_init:.2f}s, first tick after {r.to_first_tick:.2f}s,"
          f" tick {args.ticks} after {r.to_last_tick:.2f}s (from QEMU's start)")
    for line in r.serial.splitlines():
        if line.startswith("GUEST-"):
            print("  " + line.rstrip("\r"))
    print(r.ramblocks.rstrip())
    ok = boots(r.serial) == 1 and not bad_ticks(r.serial) and reported_md5(r.serial) == [pattern_md5()]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main())
