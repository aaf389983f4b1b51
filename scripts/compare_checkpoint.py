#!/usr/bin/env python3
"""Checkpoint and resume of one VM, QEMU's ways and the engine's, side by side (issue 19).

Run it with ``scripts/compare-checkpoint`` (it sets up the venv); ``--help`` lists the options.

The VM is a ``-M none`` QEMU whose RAM is a generated image (``--size``, 1 GiB: 25% zero, 25%
random, 50% text-like pages, as compare-qemu's), resident before the checkpoint
(``-mem-prealloc``). Each round, in a rotating order:

* **QEMU 7.2 ``exec:cat``**: ``migrate "exec:cat > FILE"`` (one uncompressed stream), resume with
  a fresh ``-incoming defer`` QEMU and ``migrate-incoming "exec:cat FILE"``.
* **QEMU 10.0 mapped-ram**: capabilities ``mapped-ram`` and ``multifd`` with N channels,
  ``migrate file:FILE``; resume the same way with ``migrate-incoming file:FILE``.
* **engine**: the QEMU 7.2 VM (and, when installed, a QEMU 10.0 one) migrates with N multifd
  channels into ``incoming --save FILE --save-compression METHOD``; resume is ``migrate
  --snapshot FILE`` into a fresh QEMU of the same version (``--compat 10.0`` for 10.0).

Checkpoint time: from ``migrate`` until the file is complete (QEMU: the source's migration has
completed, which for ``exec:`` means ``cat`` has its last byte; the engine: its process has
committed the file and exited); resume time: from ``migrate-incoming`` (QEMU) or starting the
engine until the destination QEMU reports the migration completed. QEMU's start-up and
pre-allocation are outside both. Disk: the file's allocated blocks. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import linux_guest  # noqa: E402
import qemu_peer  # noqa: E402
from engine.compression import method_names  # noqa: E402
from engine.params import parse_size  # noqa: E402
from engine_runs import (  # noqa: E402
    EngineProcess, GiB, MiB, RunFailed, engine_env, make_image, remove_leftover_segments, shm_tag, wait_line, write_json,
)

FAST = 64 << 30  # max-bandwidth: effectively unlimited


#: ``--linux``: the Linux guest's kernel and initramfs; the VM boots it and runs (no image)
GUEST: linux_guest.GuestFiles | None = None


def _vm(workdir: Path, image: Path, size: int, binary: str | None, name: str) -> qemu_peer.QemuPeer:
    if GUEST is None:
        return qemu_peer.QemuPeer(workdir, name=name, memory=f"{size // MiB}M", mem_path=image,
                                  extra_args=["-mem-prealloc"], timeout=60.0 + 10.0 * size / GiB, binary=binary)
    peer: qemu_peer.QemuPeer
    peer, serial = linux_guest.peer(workdir, GUEST, name, binary=binary)
    try:
        linux_guest.run_until_ticks(peer, serial)
    except BaseException:
        peer.close()
        raise
    return peer


def _fresh(workdir: Path, size: int, binary: str | None) -> qemu_peer.QemuPeer:
    if GUEST is None:
        return qemu_peer.QemuPeer(workdir, name="resumed", memory=f"{size // MiB}M", incoming=True,
                                  timeout=60.0 + 10.0 * size / GiB, binary=binary)
    peer: qemu_peer.QemuPeer = linux_guest.peer(workdir, GUEST, "resumed", binary=binary, incoming=True)[0]
    return peer


def _completed(peer: qemu_peer.QemuPeer, timeout: float) -> dict[str, Any]:
    info = peer.wait_migration(timeout=timeout)
    if info.get("status") != "completed":
        raise RunFailed(f"{peer.name}: migration {info.get('status')}: {info.get('error-desc', '')}")
    return info


def _disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def qemu_file(kind: str, image: Path, size: int, workdir: Path, channels: int, timeout: float) -> dict[str, Any]:
    """QEMU 7.2 ``exec:cat`` (kind "exec") or QEMU 10.0 mapped-ram (kind "mapped-ram")."""
    binary = None if kind == "exec" else str(qemu_peer.QEMU10)
    path = workdir / f"qemu-{kind}.img"
    path.unlink(missing_ok=True)
    save_uri, load_uri = (f"exec:cat > {path}", f"exec:cat {path}") if kind == "exec" else (f"file:{path}",) * 2

    def setup(peer: qemu_peer.QemuPeer) -> None:
        peer.set_parameters(max_bandwidth=FAST)
        if kind == "mapped-ram":
            peer.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}]})
            peer.set_parameters(multifd_channels=channels)

    with _vm(workdir, image, size, binary, "vm") as vm:
        setup(vm)
        t0 = time.monotonic()
        vm.migrate(save_uri)
        info = _completed(vm, timeout)
        save_s = time.monotonic() - t0
    with _fresh(workdir, size, binary) as dst:
        setup(dst)
        t0 = time.monotonic()
        dst.execute("migrate-incoming", {"uri": load_uri})
        _completed(dst, timeout)
        load_s = time.monotonic() - t0
    out = {"checkpoint-s": save_s, "total-time-ms": info.get("total-time"), "resume-s": load_s,
           "disk": _disk(path), "file-size": path.stat().st_size}
    path.unlink()
    return out


def engine_file(image: Path, size: int, workdir: Path, channels: int, method: str, save_compression: str,
                timeout: float, tag: str, no_fsync: bool = False, binary: str | None = None) -> dict[str, Any]:
    """The VM (QEMU 7.2, or ``binary``) into ``incoming --save``, then ``migrate --snapshot`` into a
    fresh QEMU of the same version."""
    path = workdir / "engine.snap"
    path.unlink(missing_ok=True)
    env = engine_env(tag)
    common = ["--channels", str(channels), "--compression", method, "--json"]
    compat = ["--compat", "10.0"] if binary is not None else []

    def engine(args: list[str], name: str, started: Callable[[EngineProcess], None] | None = None) -> dict[str, Any]:
        """One engine process to its end (EngineProcess owns and reaps it); its JSON."""
        proc = EngineProcess(args, workdir, name, env)
        try:
            if started is not None:
                started(proc)
            deadline = time.monotonic() + timeout
            while not proc.poll():
                if time.monotonic() >= deadline:
                    raise RunFailed(f"engine {name} not finished after {timeout:g}s")
                time.sleep(0.01)
            if proc.returncode != 0:
                raise RunFailed(f"engine {name}: {proc.stderr().strip()}")
            return proc.json()
        finally:
            proc.close()

    with _vm(workdir, image, size, binary, "vm") as vm:
        vm.set_multifd(channels, method, max_bandwidth=FAST)
        t0 = 0.0

        def migrate_vm(proc: EngineProcess) -> None:  # once the engine listens
            nonlocal t0
            uri = wait_line(proc, "engine: listening on ", 60.0)
            t0 = time.monotonic()
            vm.migrate(uri)

        received = engine(["incoming", "tcp:127.0.0.1:0", *common, "--save", str(path), "--save-compression",
                           save_compression, *(["--no-fsync"] if no_fsync else [])], "engine-incoming", migrate_vm)
        save_s = time.monotonic() - t0
        info = _completed(vm, timeout)
    with _fresh(workdir, size, binary) as qdst:
        qdst.set_multifd(channels, method)
        uri = qdst.migrate_incoming("tcp:127.0.0.1:0")
        t0 = time.monotonic()
        sent = engine(["migrate", uri, "--snapshot", str(path), *common, *compat], "engine-migrate")
        _completed(qdst, timeout)
        load_s = time.monotonic() - t0
    out = {"checkpoint-s": save_s, "total-time-ms": info.get("total-time"), "resume-s": load_s,
           "disk": _disk(path), "file-size": path.stat().st_size,
           # where the engine's time goes: receiving, then writing the file; reading it, then sending
           "receive-ms": received["total-time"], "save-ms": received["snapshot"]["total-time"],
           "restore-ms": sent["snapshot"]["restore-time"], "send-ms": sent["total-time"]}
    path.unlink()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/compare-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1G", help="guest RAM (default 1G)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--channels", type=int, default=4, help="multifd channels (default 4)")
    p.add_argument("--compression", default="none", choices=method_names(), help="the wire's (default none)")
    p.add_argument("--save-compression", default="zstd", choices=method_names(), help="the file's (default zstd)")
    p.add_argument("--no-fsync", action="store_true",
                   help="the engine skips its two fsync calls (QEMU makes none) when it commits the file")
    p.add_argument("--linux", action="store_true",
                   help="the VM is the tests' running Linux guest (-M pc, 256 MiB) instead of a -M none image")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args(argv)
    global GUEST
    if args.linux:
        GUEST = linux_guest.ensure_guest()
        args.size = linux_guest.MEMORY
    size = parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="compare-checkpoint-"))
    tag = shm_tag()
    sides: dict[str, Callable[[], dict[str, Any]]] = {
        "QEMU 7.2 exec:cat": lambda: qemu_file("exec", image, size, workdir, args.channels, args.timeout),
        f"engine, QEMU 7.2 VM (file {args.save_compression})": lambda: engine_file(
            image, size, workdir, args.channels, args.compression, args.save_compression, args.timeout, tag,
            args.no_fsync),
    }
    if qemu_peer.QEMU10.exists():
        sides["QEMU 10.0 mapped-ram"] = lambda: qemu_file("mapped-ram", image, size, workdir, args.channels,
                                                          args.timeout)
        sides[f"engine, QEMU 10.0 VM (file {args.save_compression})"] = lambda: engine_file(
            image, size, workdir, args.channels, args.compression, args.save_compression, args.timeout, tag,
            args.no_fsync, str(qemu_peer.QEMU10))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    try:
        image = workdir / "ram.img"
        if GUEST is None:
            make_image(image, size)
        names = list(sides)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                r = sides[name]()
                runs[name].append(r)
                parts = "".join(f"  {k} {r[k]}" for k in ("receive-ms", "save-ms", "restore-ms", "send-ms") if k in r)
                print(f"  round {rnd + 1} {name:<24} checkpoint {r['checkpoint-s']:6.2f} s  resume"
                      f" {r['resume-s']:6.2f} s  disk {r['disk'] / MiB:7.1f} MiB{parts}", file=sys.stderr)
    finally:
        remove_leftover_segments(tag, "compare-checkpoint")
        shutil.rmtree(workdir, ignore_errors=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("checkpoint-s", "resume-s", "disk")}
           for name, rs in runs.items() if rs}
    guest = "running Linux guest (-M pc)" if GUEST is not None else "-M none guest"
    print(f"\n{size / MiB:g} MiB {guest}, {args.channels} channels (multifd ones), medians of {args.rounds}"
          f" interleaved rounds{', engine without fsync' if args.no_fsync else ''}\n")
    print("| how | checkpoint s | resume s | on disk MiB |\n| --- | --- | --- | --- |")
    for name, m in med.items():
        print(f"| {name} | {m['checkpoint-s']:.2f} | {m['resume-s']:.2f} | {m['disk'] / MiB:.0f} |")
    write_json(args.json, {"size": size, "channels": args.channels, "runs": runs, "medians": med},
               "compare-checkpoint")
    return 0


if __name__ == "__main__":
    sys.exit(main())
