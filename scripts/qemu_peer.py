#!/usr/bin/env python3
"""Start a QEMU migration peer (source or destination) and drive it over QMP.

Theory of operation
-------------------
:class:`QemuPeer` runs one ``qemu-system-x86_64`` process with a QMP monitor on a private unix
socket and is its only owner: it is a context manager whose exit always ends the process
(QMP ``quit``, then SIGKILL) and reaps it, whatever state QEMU is in (a 7.2 destination can
freeze, monitor included, on a half-open multifd socket: wire doc 1.3).

:class:`QMPClient` is a minimal QMP client: one unix socket, the greeting, ``qmp_capabilities``,
``execute`` (replies matched by ``id``) and events (queued while waiting for replies, taken by
:meth:`QMPClient.wait_event`). Every read has a deadline; a deadline that passes raises
:class:`QMPTimeout` naming what was awaited.

Two peer shapes cover the interop work (wire doc intro, sections 6 and 8):

* ``-M none -m SIZE -mem-path IMAGE``: a CPU-less source whose RAM block ``ram`` is a private
  mapping of a prefilled file, so its content is known byte for byte;
* ``-M none -m SIZE -incoming defer``: a destination whose RAM is read back with ``pmemsave``;

plus anything else through ``machine``/``extra_args`` (the live-guest test boots ``-M pc``).
Multifd is configured the way QEMU's migration-test does it: capability ``multifd`` and the
parameters ``multifd-channels``/``multifd-compression`` before ``migrate``/``migrate-incoming``.

Command line (for benchmarks and by hand)::

    scripts/qemu_peer.py destination --memory 64M --channels 4 --compression zstd --pmemsave out.bin
    scripts/qemu_peer.py source tcp:127.0.0.1:4444 --ram-image ram.img --channels 4 --compression zstd

Each prints one JSON object (QEMU's final ``query-migrate`` reply) and exits 0 on ``completed``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

QEMU_BINARY = os.environ.get("QEMU_BINARY", "qemu-system-x86_64")
#: QEMU 10.0, where scripts/install-qemu10 unpacks it (a wrapper next to its private apt state)
QEMU10 = Path(__file__).resolve().parent.parent / ".qemu" / "10.0" / "qemu-system-x86_64"
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
DEFAULT_TIMEOUT = 30.0


class QMPError(Exception):
    """QEMU answered a command with an error, or the monitor went away."""


class QMPTimeout(QMPError):
    """A deadline passed while waiting on QEMU."""


def qemu_available(binary: str | None = None) -> bool:
    return shutil.which(binary or QEMU_BINARY) is not None


def qemu_version(binary: str | None = None, timeout: float = 30.0) -> tuple[str, str]:
    """``("10.0.2", "QEMU emulator version 10.0.2 (Debian ...)")`` from ``BINARY --version``.
    Raises :class:`QMPError` when it does not run or prints no version."""
    cmd = [binary or QEMU_BINARY, "--version"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        raise QMPError(f"{cmd[0]} --version: {exc}") from None
    line = (r.stdout.strip().splitlines() or [""])[0]
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", line)
    if r.returncode != 0 or m is None:
        raise QMPError(f"{cmd[0]} --version: exit {r.returncode}, {(line or r.stderr.strip())[:200]!r}")
    return m.group(1), line


def parse_size(text: str) -> int:
    """``64M``, ``150M``, ``1G`` or plain bytes (binary units, like QEMU's ``-m``)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B")
    suffix = t[-1:] if t[-1:] in units else ""
    return int(float(t[: len(t) - len(suffix)]) * units[suffix])


# ----------------------------------------------------------------------------- QMP


class QMPClient:
    """A QMP connection over a unix socket. Not thread-safe; one per QEMU."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, *, alive: Any = None) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._buf = b""
        self._next_id = 0
        self.sock = self._connect(path, timeout, alive)
        try:
            greeting = self._read_message(time.monotonic() + timeout, "the QMP greeting")
            if "QMP" not in greeting:
                raise QMPError(f"received {greeting!r} from {path}, expected the QMP greeting")
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _connect(path: str, timeout: float, alive: Any) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                sock.connect(path)
                return sock
            except OSError as exc:
                sock.close()
                if alive is not None and not alive():
                    raise QMPError(f"QEMU exited before its QMP socket {path} accepted a connection") from exc
                if time.monotonic() >= deadline:
                    raise QMPTimeout(f"QMP socket {path} did not accept a connection within {timeout:g}s") from exc
                time.sleep(0.02)

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"no QMP message while waiting for {what}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout(f"no QMP message while waiting for {what}") from None
            except OSError as exc:
                raise QMPError(f"QMP connection failed while waiting for {what}: {exc}") from exc
            if not chunk:
                raise QMPError(f"QMP connection closed by QEMU while waiting for {what}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Run one command; returns its ``return`` value, raises :class:`QMPError` on ``error``."""
        self._next_id += 1
        msg_id = self._next_id
        req: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            req["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"QMP {command}: send failed: {exc}") from exc
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline, f"the reply to {command}")
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != msg_id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError(f"QMP {command}: {err.get('class')}: {err.get('desc')}")
            return msg.get("return")

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The first queued or arriving event called ``name`` (earlier ones of other names are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            msg = self._read_message(deadline, f"the {name} event")
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------- QEMU


class QemuPeer:
    """One QEMU process with a QMP monitor; a context manager that always kills and reaps it.

    ``mem_path``: prefilled file backing the RAM (a source with known content).
    ``incoming``: start with ``-incoming defer`` (a destination).
    ``paused``: ``-S`` (no vCPU runs; with ``-M none`` there is none anyway).
    ``binary``: the QEMU to run (default ``QEMU_BINARY``), e.g. the QEMU 10.0 wrapper that
    ``scripts/install-qemu10`` prints.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        name: str = "qemu",
        machine: str = "none",
        memory: str = "64M",
        mem_path: Path | None = None,
        incoming: bool = False,
        paused: bool = True,
        uuid: str | None = None,
        serial: Path | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
        binary: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.timeout = timeout
        # unix socket paths are limited to 107 bytes: keep the socket in a short private dir
        self._sockdir = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
        self.qmp_path = os.path.join(self._sockdir, "qmp.sock")
        self.log_path = self.workdir / f"{name}.log"
        cmd = [
            binary or QEMU_BINARY, "-M", machine, "-m", memory, "-accel", "tcg", "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if mem_path is not None:
            cmd += ["-mem-path", str(mem_path)]
        if incoming:
            cmd += ["-incoming", "defer"]
        if paused:
            cmd += ["-S"]
        if uuid is not None:
            cmd += ["-uuid", uuid]
        if serial is not None:
            cmd += ["-serial", f"file:{serial}"]
        cmd += list(extra_args)
        self.cmd = cmd
        self.qmp: QMPClient | None = None
        self._log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        except BaseException:
            self._log.close()
            shutil.rmtree(self._sockdir, ignore_errors=True)
            raise
        try:
            self.qmp = QMPClient(self.qmp_path, timeout, alive=lambda: self.proc.poll() is None)
        except QMPError as exc:
            self.close()
            raise QMPError(f"{exc}; {self.name}'s output: {self.log().strip()[-1000:] or '(none)'}") from None
        except BaseException:
            self.close()
            raise

    # -- lifetime

    def __enter__(self) -> QemuPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        """QEMU's stdout+stderr so far (for error messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit on its own; returns its status. Raises QMPTimeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise QMPTimeout(f"{self.name} (pid {self.pid}) did not exit within {timeout:g}s") from None

    def close(self) -> None:
        """Idempotent: ``quit`` over QMP if it answers, then SIGKILL; always reaps."""
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(QMPError, OSError):
                self.qmp.execute("quit", timeout=2.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3.0)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10.0)
        if self.qmp is not None:
            self.qmp.close()
        self._log.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    # -- QMP helpers

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        if self.qmp is None:
            raise QMPError(f"{self.name}: no QMP connection")
        return self.qmp.execute(command, arguments, timeout=self.timeout if timeout is None else timeout)

    def set_multifd(self, channels: int, compression: str = "none", **parameters: Any) -> None:
        """Capability ``multifd`` on, ``multifd-channels``/``multifd-compression`` and any other
        migration parameters (Python names with ``_`` become QEMU's ``-``)."""
        self.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        self.set_parameters(**{"multifd_channels": channels, "multifd_compression": compression, **parameters})

    def set_parameters(self, **parameters: Any) -> None:
        if parameters:
            self.execute("migrate-set-parameters", {k.replace("_", "-"): v for k, v in parameters.items()})

    def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> str:
        """``migrate-incoming``; returns the URI a source should use (the real port)."""
        self.execute("migrate-incoming", {"uri": uri})
        info = self.query_migrate()
        addrs = info.get("socket-address") or []
        if not addrs:
            raise QMPError(f"{self.name}: query-migrate shows no socket-address after migrate-incoming: {info}")
        a = addrs[0]
        if a.get("type") == "unix":
            return f"unix:{a['path']}"
        host = a["host"]
        return f"tcp:[{host}]:{a['port']}" if ":" in host else f"tcp:{host}:{a['port']}"

    def migrate(self, uri: str) -> None:
        self.execute("migrate", {"uri": uri})

    def query_migrate(self) -> dict[str, Any]:
        info: dict[str, Any] = self.execute("query-migrate")
        return info

    def status(self) -> str:
        return str(self.execute("query-status")["status"])

    def wait_migration(self, states: Iterable[str] = FINAL_STATES, timeout: float = 60.0,
                       poll: float = 0.05) -> dict[str, Any]:
        """Poll ``query-migrate`` until its status is one of ``states``; returns that reply."""
        want = set(states)
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while True:
            info = self.query_migrate()
            if info.get("status") in want:
                return info
            if info.get("status") in FINAL_STATES:
                raise QMPError(f"{self.name}: migration ended {info.get('status')!r} while waiting for"
                               f" {sorted(want)}: {info.get('error-desc', '')}")
            if time.monotonic() >= deadline:
                raise QMPTimeout(f"{self.name}: migration status {info.get('status')!r} after {timeout:g}s,"
                                 f" expected one of {sorted(want)}")
            time.sleep(poll)

    def wait_dirty_sync(self, count: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``ram.dirty-sync-count`` reaches ``count`` (migration-test's "pass")."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.query_migrate()
            if info.get("ram", {}).get("dirty-sync-count", 0) >= count:
                return info
            if info.get("status") in FINAL_STATES:
                raise QMPError(f"{self.name}: migration ended {info.get('status')!r} before dirty sync {count}")
            if time.monotonic() >= deadline:
                raise QMPTimeout(f"{self.name}: dirty-sync-count {info.get('ram', {}).get('dirty-sync-count')}"
                                 f" after {timeout:g}s, expected {count}")
            time.sleep(0.05)

    def pmemsave(self, addr: int, size: int, path: Path, timeout: float = 60.0) -> bytes:
        """Guest-physical ``[addr, addr+size)`` as bytes (QMP ``pmemsave``, works without a CPU)."""
        path = Path(path)
        self.execute("pmemsave", {"val": addr, "size": size, "filename": str(path)}, timeout=timeout)
        data = path.read_bytes()
        if len(data) != size:
            raise QMPError(f"{self.name}: pmemsave wrote {len(data)} bytes, expected {size}")
        return data


# --------------------------------------------------------------------- entry points


def source(workdir: Path, *, ram_image: Path, memory: str | None = None, machine: str = "none",
           channels: int = 2, compression: str = "none", uuid: str | None = None, name: str = "source",
           extra_args: Sequence[str] = (), binary: str | None = None,
           parameters: dict[str, Any] | None = None) -> QemuPeer:
    """A paused ``-M none`` source whose RAM is ``ram_image`` (size from the file unless given);
    ``parameters``: more migration parameters (e.g. ``tls_creds``)."""
    mem = memory or f"{Path(ram_image).stat().st_size // (1 << 20)}M"
    peer = QemuPeer(workdir, name=name, machine=machine, memory=mem, mem_path=ram_image, uuid=uuid,
                    extra_args=extra_args, binary=binary)
    try:
        peer.set_multifd(channels, compression, **(parameters or {}))
    except BaseException:
        peer.close()
        raise
    return peer


def destination(workdir: Path, *, memory: str = "64M", machine: str = "none", channels: int = 2,
                compression: str = "none", uuid: str | None = None, name: str = "destination",
                extra_args: Sequence[str] = (), binary: str | None = None,
                parameters: dict[str, Any] | None = None) -> tuple[QemuPeer, str]:
    """A paused ``-incoming defer`` destination, listening; returns it and its URI."""
    peer = QemuPeer(workdir, name=name, machine=machine, memory=memory, incoming=True, uuid=uuid,
                    extra_args=extra_args, binary=binary)
    try:
        peer.set_multifd(channels, compression, **(parameters or {}))
        uri = peer.migrate_incoming("tcp:127.0.0.1:0")
    except BaseException:
        peer.close()
        raise
    return peer, uri


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qemu_peer.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("source", "destination"):
        s = sub.add_parser(role)
        if role == "source":
            s.add_argument("uri", help="where to migrate, e.g. tcp:127.0.0.1:4444")
            s.add_argument("--ram-image", type=Path, required=True, help="file whose bytes become the RAM")
            s.add_argument("--max-bandwidth", type=int, default=None, help="bytes/s (QEMU default 128 MiB/s)")
        else:
            s.add_argument("--pmemsave", type=Path, default=None, help="after completion, write RAM here")
        s.add_argument("--memory", default=None if role == "source" else "64M", help="-m SIZE")
        s.add_argument("--machine", default="none")
        s.add_argument("--channels", type=int, default=2)
        s.add_argument("--compression", default="none", choices=["none", "zlib", "zstd"])
        s.add_argument("--uuid", default=None)
        s.add_argument("--timeout", type=float, default=300.0, help="deadline for the whole migration")
        s.add_argument("--workdir", type=Path, default=None, help="where QEMU's log goes (default: a temp dir)")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qemu-peer-"))
    try:
        if args.role == "source":
            with source(workdir, ram_image=args.ram_image, memory=args.memory, machine=args.machine,
                        channels=args.channels, compression=args.compression, uuid=args.uuid) as peer:
                if args.max_bandwidth is not None:
                    peer.set_parameters(max_bandwidth=args.max_bandwidth)
                peer.migrate(args.uri)
                info = peer.wait_migration(timeout=args.timeout)
        else:
            peer, uri = destination(workdir, memory=args.memory, machine=args.machine, channels=args.channels,
                                    compression=args.compression, uuid=args.uuid)
            with peer:
                print(f"qemu_peer: listening on {uri}", file=sys.stderr, flush=True)
                info = peer.wait_migration(timeout=args.timeout)
                if info.get("status") == "completed" and args.pmemsave is not None:
                    peer.pmemsave(0, parse_size(args.memory), args.pmemsave.resolve())
    except QMPError as exc:
        print(f"qemu_peer: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(info), flush=True)
    return 0 if info.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(_main())
