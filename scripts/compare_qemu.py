#!/usr/bin/env python3
"""QEMU (7.2, 10.0) and the engine side by side: the same RAM image, the same multifd settings
(issues 5 and 17).

Run it with ``scripts/compare-qemu`` (it sets up the venv); ``--help`` lists the options.

Theory of operation
-------------------
One RAM image (``--size``, 1 GiB by default; 25% zero, 25% random, 50% text-like pages: the
engine's own ``--fill mixed`` generator) is written to a temporary file, never to the work tree.
Each *run* migrates it once over TCP loopback, with the same ``multifd-channels``,
``multifd-compression`` and level on both sides:

* **QEMU -> QEMU** (``scripts/qemu_peer.py``): a ``-M none -m SIZE -mem-path IMAGE`` source
  with ``-mem-prealloc`` (its RAM resident before the migration, as a running guest's is and as
  the engine source's is), and a ``-M none -incoming defer`` destination, with ``-mem-prealloc``
  in the pre-allocated mode (``-mem-prealloc`` sets ``prealloc=on`` on the default RAM backend;
  ``-object memory-backend-ram,...`` would rename the RAM block and break the migration
  against a ``-M none`` source). ``max-bandwidth`` is raised to 64 GiB/s (QEMU's default,
  128 MiB/s, would make this a rate-limit benchmark).
* **engine -> engine**: ``python -m engine incoming ... --json`` (``--ram pc.ram=SIZE
  --prealloc`` in the pre-allocated mode), then ``python -m engine migrate ... --ram-image
  pc.ram=IMAGE --json``.

Which QEMUs: every ``--qemu PATH`` given, else the system's ``qemu-system-x86_64`` (QEMU 7.2 on
Debian 12; ``$QEMU_BINARY`` overrides it) plus QEMU 10.0 when ``scripts/install-qemu10`` has
installed it (``.qemu/10.0/qemu-system-x86_64``). Each is labelled with the version its
``--version`` prints and migrates to itself (QEMU 10.0 -> QEMU 10.0 at its defaults: 10.0's
multifd dialect, not 7.2's; each QEMU is compared with the engine, never with the other QEMU's
wire format). With one QEMU the output is the original two-sided one; with more, the table has
a column per QEMU and the engine's ratio to each, the chart a bar per QEMU, and each JSON summary
row a ``vs`` list (one entry per QEMU; the row's own ``qemu``/``ratio``/... are the first QEMU's).

Time: the source's ``total-time`` (QMP ``query-migrate`` once completed; the engine's JSON),
so neither side's process start-up, image loading or pre-allocation counts. Throughput is
guest RAM (MiB) / ``total-time`` (s). ``ram.transferred`` and ``downtime`` are recorded too.

CPU: the same window on both, from just before the migration starts until it has completed on
both sides, every process of both sides:

* QEMU: ``utime + stime`` of both QEMU processes from ``/proc/PID/stat`` (all their threads),
  read just before ``migrate`` (after start-up and pre-allocation) and just before ``quit``.
* engine: the destination's ``utime + stime + cutime + cstime`` read once it is listening (after
  start-up and ``--prealloc``), the source's when it opens its first socket (``/proc/PID/fd``,
  polled every 2 ms): after loading the image and any ``--huge-pages`` collapse, as its
  migration connects; at the end each main process's ``wait4()``
  rusage, which covers the process *and* every channel process it reaped. The channel
  processes' own ``cpu-seconds`` (JSON) split that into main and channels. (Adding the JSON
  figures to ``/usr/bin/time``'s would count every channel twice: its rusage includes them.)
  The end is the moment each main process has reaped its last channel process (polled every
  10 ms): after that it only unmaps and unlinks guest RAM (about 0.35 CPU s per GiB here), which
  QEMU does after ``quit``, outside its window. The JSON also has the figure up to exit
  (``cpu.to-exit``).
  Not counted: multiprocessing's resource-tracker process, which the engine never reaps; it
  only records segment names.

Page faults: minor faults of the same processes over the same window (``/proc/PID/stat``;
the engine's include the channel processes it reaped), and machine-wide ``/proc/vmstat``
THP and compaction counters (``vmstat``): fresh destination memory is paid for in faults.

RSS: the JSON's per-channel ``peak-rss-kib`` / ``private-rss-kib``; the main processes'
``VmHWM`` / ``RssAnon`` sampled from ``/proc`` every 50 ms, QEMU's cadence (``VmHWM`` only
grows, so the last sample is at most 50 ms old); in between, every 10 ms, only a check that the
channel processes are still there (a full sample costs about a millisecond of CPU, which the
engine's migration would otherwise share its two cores with).

Runs are interleaved: every round runs every (case, mode) once on each side (each QEMU and the
engine), rotating which one goes first from case to case and round to round (with one QEMU:
alternating), so a noisy neighbour hits all of them; zlib, ten times slower
than the rest, runs in the first ``--slow-rounds`` (3) only, to keep a default run under ten
minutes on a 2-core machine. The table shows medians and min-max. Before each round it waits up to ``--quiet-wait`` seconds for the other
processes on the machine to use less than ``--quiet-below`` of its CPUs, and it records how
busy the machine was during every run (``others-cpu-s``: CPU seconds used by processes that
are not this run's, measured from ``/proc/stat``).

Targets (the table's last column): issue 5's against a QEMU older than 10.0 (written against 7.2),
issue 17's against QEMU 10.0 and later; with ``--tls``, issue 20's (not slower than QEMU 7.2).

``--tls``: every migration, QEMU's and the engine's, runs over TLS on every channel with the
same throw-away CA and certificates (``scripts/tls_creds.py``, made in the work directory):
``-object tls-creds-x509`` and ``tls-creds`` for QEMU, ``--tls-creds`` for the engine.

``--results`` also writes the summary to ``benchmarks/results/DATE-compare-qemu-REVISION.md``
(revision, machine, QEMU versions, command, the table as printed) and every run next to it
(``.json``), as ``benchmarks/results/README.md`` describes.

``--trace DIR`` adds one engine run per case and mode after the rounds (not in the medians)
with ``--trace`` on both sides, and prints the time per span kind per kind of process: where
the engine's time goes.

Nothing is left behind: every QEMU and engine process is ended and reaped (also on Ctrl-C or
SIGTERM), the image is deleted, and any engine shared-memory segment carrying this run's
``MFD_SHM_TAG`` that survives is removed and reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import qemu_peer  # noqa: E402
import tls_creds  # noqa: E402
from engine.runtime.transport import LOCAL_CONGESTION, congestion_setting  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.wire.packet import PAGES_PER_PACKET, check_packet_pages  # noqa: E402
from engine_runs import (  # noqa: E402
    CASES, GiB, MiB, RunFailed, add_run_args, check_run_args, loadavg, machine_busy, machine_cpu, make_image,
    exit_status, proc_cpu, proc_huge_kib, proc_memory, proc_minflt, remove_leftover_segments, run_engine, shm_tag,
    vmstat, vmstat_delta, write_json,
)

QEMU_MAX_BANDWIDTH = 64 << 30  # bytes/s: effectively unlimited (QEMU's default is 128 MiB/s)
ENGINE_ONLY = frozenset({"lz4"})  # compared against QEMU "none", fresh destination
QEMU_UNCOMPRESSED_COUNT = frozenset({"zlib", "zstd"})  # 7.2's multifd-bytes: pages before compression
SLOW = frozenset({"zlib"})  # ~10x longer per run than none: --slow-rounds of them by default


def trace_summary(path: Path) -> dict[str, dict[str, float]]:
    """Seconds per span kind, summed over the tracks of each kind of process, from an engine
    ``--trace`` file: ``{"source channel (x4)": {"send": 0.61, ...}, "source migration thread": ...}``."""
    events = json.loads(path.read_text())["traceEvents"]
    names: dict[Any, str] = {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            label = str(ev["args"]["name"]).split(" (pid")[0]
            names[ev["tid"]] = " ".join(w for w in label.split() if not w.isdigit())
    counts: dict[str, int] = {}
    for label in names.values():
        counts[label] = counts.get(label, 0) + 1
    out: dict[str, dict[str, float]] = {}
    for ev in events:
        if ev.get("ph") != "X":
            continue
        label = names.get(ev["tid"], "?")
        key = f"{label} (x{counts[label]})" if counts.get(label, 1) > 1 else label
        spans = out.setdefault(key, {})
        spans[ev["name"]] = spans.get(ev["name"], 0.0) + ev["dur"] / 1e6
    return {k: {n: round(v, 3) for n, v in sorted(spans.items(), key=lambda kv: -kv[1])} for k, spans in out.items()}


def traced_runs(image: Path, size: int, jobs: Sequence[Job], directory: Path, *, channels: int, level: int,
                timeout: float, workdir: Path, tag: str, extra_src: Sequence[str] = (),
                extra_dst: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One extra engine run per job with ``--trace`` on both sides (not counted in the medians),
    with the measured runs' own ``extra_src`` and ``extra_dst``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for job in jobs:
        files = {side: (directory / f"engine-{job.compression}-{job.mode}-{side}.json").resolve()
                 for side in ("source", "destination")}
        try:
            r = run_engine(image, size, channels=channels, compression=job.compression,
                           level=level if job.compression != "none" else None, prealloc=job.mode == "prealloc",
                           workdir=workdir, timeout=timeout, tag=tag,
                           extra_src=[*extra_src, "--trace", str(files["source"])],
                           extra_dst=[*extra_dst, "--trace", str(files["destination"])])
        except RunFailed as exc:
            print(f"compare-qemu: traced {job.key} failed: {exc}", file=sys.stderr)
            continue
        entry: dict[str, Any] = {"job": job.key, "total-time": r["total-time"], "cpu": r["cpu"],
                                 "files": {k: str(v) for k, v in files.items()}, "spans-s": {}}
        for side, f in files.items():
            try:
                entry["spans-s"][side] = trace_summary(f)
            except (OSError, ValueError, KeyError) as exc:
                entry["spans-s"][side] = {"error": str(exc)}
        out.append(entry)
        print(f"\ntrace {job.key}: total-time {r['total-time']} ms, CPU s {r['cpu']}", file=sys.stderr)
        for side, tracks in entry["spans-s"].items():
            for track, spans in tracks.items():
                print(f"  {track:<34} " + ", ".join(f"{n} {v:.3f}s" for n, v in spans.items()), file=sys.stderr)
    return out


# ----------------------------------------------------------------------- QEMU processes




@dataclass(frozen=True)
class Qemu:
    """One QEMU binary under comparison."""

    path: str  # as run: a path, or a name found on PATH
    version: str  # "7.2.22", from ``--version``
    version_line: str  # the first line of ``--version``
    id: str = ""  # in job keys: "" when it is the only QEMU (keys stay "qemu/none/fresh"), else its version

    @property
    def series(self) -> tuple[int, int]:
        major, minor = self.version.split(".")[:2]
        return int(major), int(minor)

    @property
    def short(self) -> str:
        """``7.2``: in titles, legends and footnotes."""
        return "{}.{}".format(*self.series)

    @property
    def label(self) -> str:
        """Column label: ``QEMU`` when it is the only QEMU (the original table), else ``QEMU 10.0.2``."""
        return f"QEMU {self.id}" if self.id else "QEMU"

    @property
    def counts_uncompressed(self) -> bool:
        """7.2's ``ram.transferred`` (``multifd-bytes``) counts zlib/zstd pages before compression;
        10.0's counts the bytes sent (both measured; the versions between are not)."""
        return self.series < (10, 0)


class QemuNotUsable(Exception):
    """A QEMU to compare is missing or does not say its version (the message is one line)."""


def find_qemus(paths: Sequence[str] | None) -> list[Qemu]:
    """The QEMUs to compare: ``--qemu`` paths, else the system's plus QEMU 10.0 when installed
    (the same binary twice counts once). Raises :class:`QemuNotUsable`."""
    if paths:
        wanted = list(paths)
    else:
        wanted = [p for p in (qemu_peer.QEMU_BINARY,) if qemu_peer.qemu_available(p)]
        if os.access(qemu_peer.QEMU10, os.X_OK):
            wanted.append(str(qemu_peer.QEMU10))
        if not wanted:
            raise QemuNotUsable(f"{qemu_peer.QEMU_BINARY} not found (apt-get install qemu-system-x86)"
                                " and QEMU 10.0 not installed (scripts/install-qemu10)")
    found: list[Qemu] = []
    seen: set[str] = set()
    for path in wanted:
        where = shutil.which(path)
        if where is None:
            raise QemuNotUsable(f"--qemu {path}: not found or not executable")
        if os.sep in path:
            path = os.path.abspath(path)
        real = os.path.realpath(where)
        if real in seen:
            continue
        seen.add(real)
        try:
            version, line = qemu_peer.qemu_version(path)
        except qemu_peer.QMPError as exc:
            raise QemuNotUsable(str(exc)) from None
        found.append(Qemu(path=path, version=version, version_line=line))
    if len(found) > 1:
        ids: list[str] = []
        for q in found:
            qid, n = q.version, 2
            while qid in ids:
                qid, n = f"{q.version}-{n}", n + 1
            ids.append(qid)
        found = [Qemu(q.path, q.version, q.version_line, qid) for q, qid in zip(found, ids)]
    return found


def _qemu_level(compression: str, level: int | None) -> dict[str, Any]:
    if level is None or compression not in ("zlib", "zstd"):
        return {}
    return {f"multifd_{compression}_level": level}


def run_qemu(image: Path, size: int, *, channels: int, compression: str, level: int | None, prealloc: bool,
             workdir: Path, timeout: float, binary: str | None = None,
             tls: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """One QEMU -> QEMU migration of ``image`` (both sides ``binary``, default ``QEMU_BINARY``),
    over TLS with ``tls`` (the server's and the client's creds directories).
    Returns its measurements; raises :class:`RunFailed`. Both QEMUs are always quit (or killed)
    and reaped by ``QemuPeer``."""
    workdir.mkdir(parents=True, exist_ok=True)
    tls_args: dict[str, list[str]] = {"server": [], "client": []}
    tls_params: dict[str, Any] = {}
    if tls is not None:
        for endpoint, directory in zip(("server", "client"), tls):
            tls_args[endpoint] = ["-object", f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint}"]
        tls_params = {"tls_creds": "tls0"}
    start_timeout = 30.0 + 10.0 * size / GiB  # -mem-prealloc happens before QMP answers
    try:
        src = qemu_peer.QemuPeer(workdir, name="qemu-source", memory=f"{size // MiB}M", mem_path=image,
                                 extra_args=["-mem-prealloc", *tls_args["client"]], timeout=start_timeout,
                                 binary=binary)
        with src:
            src.set_multifd(channels, compression, max_bandwidth=QEMU_MAX_BANDWIDTH, **_qemu_level(compression, level),
                            **tls_params)
            dst = qemu_peer.QemuPeer(workdir, name="qemu-destination", memory=f"{size // MiB}M", incoming=True,
                                     extra_args=(["-mem-prealloc"] if prealloc else []) + tls_args["server"],
                                     timeout=start_timeout, binary=binary)
            with dst:
                dst.set_multifd(channels, compression, **_qemu_level(compression, level), **tls_params)
                uri = dst.migrate_incoming("tcp:127.0.0.1:0")
                load = loadavg()
                base = proc_cpu(src.pid) + proc_cpu(dst.pid)
                flt0 = proc_minflt(src.pid), proc_minflt(dst.pid)
                machine0, vm0 = machine_cpu(), vmstat()
                src.migrate(uri)
                info = src.wait_migration(timeout=timeout)
                if info.get("status") != "completed":
                    raise RunFailed(f"QEMU source status {info.get('status')}: {info.get('error-desc', '')}")
                if not info.get("total-time"):
                    raise RunFailed(f"QEMU source reports no total-time: {json.dumps(info)}")
                dinfo = dst.wait_migration(timeout=60.0)
                if dinfo.get("status") != "completed":
                    raise RunFailed(f"QEMU destination status {dinfo.get('status')}")
                end = proc_cpu(src.pid) + proc_cpu(dst.pid)
                faults = {"source": proc_minflt(src.pid) - flt0[0], "destination": proc_minflt(dst.pid) - flt0[1]}
                machine1, vm = machine_cpu(), vmstat_delta(vm0)
                mem = {"source": proc_memory(src.pid), "destination": proc_memory(dst.pid)}
                mem["destination"]["AnonHugePages"] = proc_huge_kib(dst.pid) or 0
    except qemu_peer.QMPError as exc:
        raise RunFailed(f"QEMU: {exc}") from None
    ours = end - base
    ram = info.get("ram", {})
    return {
        "impl": "qemu",
        "status": info["status"],
        "total-time": info["total-time"],
        "setup-time": info.get("setup-time"),
        "downtime": info.get("downtime"),
        "transferred": ram.get("transferred"),
        "multifd-bytes": ram.get("multifd-bytes"),
        "cpu-s": round(ours, 3),
        "minor-faults": faults,
        "rss": mem,
        "load": round(load, 2),
        "others-cpu-s": round(max(0.0, machine1[0] - machine0[0] - ours), 2),
        "wall-s": round(machine1[1] - machine0[1], 3),
        "vmstat": vm,
    }


# -------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Job:
    impl: str  # "qemu" | "engine"
    compression: str
    mode: str  # "fresh" | "prealloc"
    qemu: str = ""  # a QEMU job's Qemu.id ("" when only one QEMU is compared)

    @property
    def key(self) -> str:
        impl = f"{self.impl}-{self.qemu}" if self.qemu else self.impl
        return f"{impl}/{self.compression}/{self.mode}"


def plan(cases: Sequence[str], modes: Sequence[str], qemus: Sequence[Qemu]) -> list[tuple[Job, ...]]:
    """The groups run in every round, in order; each group is (one job per QEMU..., engine job),
    or what is left of it once jobs already planned (the QEMU none/fresh reference of lz4) are dropped."""
    groups: list[tuple[Job, ...]] = []
    seen: set[Job] = set()

    def add(*jobs: Job) -> None:
        new = tuple(j for j in jobs if j not in seen)
        seen.update(new)
        if new:
            groups.append(new)

    for mode in modes:
        for case in cases:
            add(*(reference(case, mode, q.id) for q in qemus), Job("engine", case, mode))
    return groups


def reference(case: str, mode: str, qemu: str = "") -> Job:
    """The QEMU run an engine case is compared with."""
    return Job("qemu", "none", "fresh", qemu) if case in ENGINE_ONLY else Job("qemu", case, mode, qemu)


# engine/QEMU throughput targets: issue 5's (written against QEMU 7.2) for a QEMU older than
# 10.0, with its lz4 bytes and CPU targets; issue 17's for QEMU 10.0 and later.
TARGETS: dict[tuple[str, str], float] = {
    ("none", "prealloc"): 1.0,
    ("none", "fresh"): 2.0,
    ("zstd", "prealloc"): 1.5,
    ("lz4", "fresh"): 1.0,
}
LZ4_MAX_BYTES = 0.75
CPU_MAX_RATIO = 1.5  # engine CPU s/GiB vs QEMU's, compression none
TARGETS_QEMU10: dict[tuple[str, str], float] = {
    ("none", "prealloc"): 1.0,
    ("none", "fresh"): 1.0,
    ("zstd", "prealloc"): 1.0,
}


def targets(qemu: Qemu, case: str, mode: str, vs: dict[str, Any], tls: bool = False) -> list[dict[str, Any]]:
    """Which targets this comparison has and whether each was met."""
    checks = []
    if tls:  # issue 20: not slower than QEMU 7.2 with TLS
        if qemu.series < (10, 0) and vs["ratio"] is not None:
            checks.append(("throughput >= 1x", vs["ratio"] >= 1.0))
        return [{"target": t, "met": ok} for t, ok in checks]
    if qemu.series >= (10, 0):
        target = TARGETS_QEMU10.get((case, mode))
        if target is not None and vs["ratio"] is not None:
            checks.append((f"throughput >= {target:g}x", vs["ratio"] >= target))
        return [{"target": t, "met": ok} for t, ok in checks]
    target = TARGETS.get((case, mode))
    if target is not None and vs["ratio"] is not None:
        checks.append((f"throughput >= {target:g}x", vs["ratio"] >= target))
    if case == "lz4" and vs["bytes-ratio"] is not None:
        checks.append((f"bytes <= {LZ4_MAX_BYTES:.0%}", vs["bytes-ratio"] <= LZ4_MAX_BYTES))
    if case == "none" and vs["cpu-ratio"] is not None:
        checks.append((f"CPU/GiB <= {CPU_MAX_RATIO:g}x", vs["cpu-ratio"] <= CPU_MAX_RATIO))
    return [{"target": t, "met": ok} for t, ok in checks]


def _med(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def summarize(results: dict[Job, list[dict[str, Any]]], cases: Sequence[str], modes: Sequence[str],
              size: int, qemus: Sequence[Qemu], tls: bool = False) -> list[dict[str, Any]]:
    """One row per (case, mode): medians of the engine and of each QEMU, the engine's ratios to
    each QEMU (``vs``, in ``qemus`` order), targets. The row's top-level ``qemu``, ``reference``,
    ``ratio``, ``cpu-ratio``, ``bytes-ratio`` and ``targets`` are those against the first QEMU
    (the original single-QEMU layout)."""
    gib = size / GiB

    def stats(job: Job) -> dict[str, Any]:
        runs = [r for r in results.get(job, []) if r.get("status") == "completed"]
        thr = [size / MiB / (r["total-time"] / 1000) for r in runs if r["total-time"]]
        cpu = [r["cpu-s"] / gib for r in runs]
        return {
            "runs": len(runs), "failed": len(results.get(job, [])) - len(runs),
            "mib-s": _med(thr), "mib-s-min": min(thr) if thr else None, "mib-s-max": max(thr) if thr else None,
            "total-time-ms": _med([r["total-time"] for r in runs]),
            "downtime-ms": _med([r["downtime"] for r in runs]),
            "setup-time-ms": _med([r["setup-time"] for r in runs]),
            "transferred": _med([r["transferred"] for r in runs]),
            "cpu-s-per-gib": _med(cpu), "cpu-s-per-gib-min": min(cpu) if cpu else None,
            "cpu-s-per-gib-max": max(cpu) if cpu else None,
            "others-cpu-s": _med([r["others-cpu-s"] for r in runs]),
            "load": _med([r["load"] for r in runs]),
            "minor-faults-per-gib": _med([sum(r["minor-faults"].values()) / gib for r in runs if "minor-faults" in r]),
        }

    def ratio(e: float | None, q: float | None) -> float | None:
        return e / q if e and q else None

    rows = []
    for mode in modes:
        for case in cases:
            e = stats(Job("engine", case, mode))
            vs = []
            for qemu in qemus:
                ref = reference(case, mode, qemu.id)
                q = stats(ref)
                one: dict[str, Any] = {
                    "qemu-version": qemu.version, "reference": ref.key, "qemu": q,
                    "ratio": ratio(e["mib-s"], q["mib-s"]),
                    "cpu-ratio": ratio(e["cpu-s-per-gib"], q["cpu-s-per-gib"]),
                    "bytes-ratio": ratio(e["transferred"], q["transferred"]),
                }
                one["targets"] = targets(qemu, case, mode, one, tls)
                vs.append(one)
            first = vs[0]
            rows.append({"case": case, "mode": mode, "reference": first["reference"], "qemu": first["qemu"],
                         "engine": e, "ratio": first["ratio"], "cpu-ratio": first["cpu-ratio"],
                         "bytes-ratio": first["bytes-ratio"], "targets": first["targets"], "vs": vs})
    return rows


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _range(side: dict[str, Any]) -> str:
    if side["mib-s"] is None:
        return "-"
    return f"{side['mib-s']:.0f} ({side['mib-s-min']:.0f}-{side['mib-s-max']:.0f})"


def _targets_cell(row: dict[str, Any], qemus: Sequence[Qemu]) -> str:
    def fmt(ts: Sequence[dict[str, Any]]) -> str:
        return ", ".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'}" for t in ts)

    if len(qemus) == 1:
        return fmt(row["targets"]) or "-"
    parts = [f"vs {q.id}: {fmt(v['targets'])}" for q, v in zip(qemus, row["vs"]) if v["targets"]]
    return "; ".join(parts) or "-"


def table(rows: Sequence[dict[str, Any]], channels: int, qemus: Sequence[Qemu]) -> str:
    """The summary as a markdown table: a column per QEMU and the engine for throughput, CPU and
    bytes sent, and the engine's ratio to each QEMU (one QEMU: the original table, unchanged)."""
    single = len(qemus) == 1
    head = ("| case | destination | " + "".join(f"{q.label} MiB/s (min-max) | " for q in qemus)
            + "engine MiB/s (min-max) | "
            + "".join("engine/QEMU | " if single else f"engine/{q.label} | " for q in qemus)
            + "".join(f"CPU s/GiB {q.label} | " for q in qemus) + "CPU s/GiB engine | "
            + "".join("CPU ratio | " if single else f"CPU ratio vs {q.id} | " for q in qemus)
            + "".join(f"sent MiB {q.label} | " for q in qemus) + "sent MiB engine | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    starred = False
    for r in rows:
        e, vs = r["engine"], r["vs"]
        name = f"{r['case']} {channels}ch" + (" (vs QEMU none fresh)" if r["case"] in ENGINE_ONLY else "")
        sent = []
        for q, v in zip(qemus, vs):
            star = q.counts_uncompressed and v["reference"].split("/")[1] in QEMU_UNCOMPRESSED_COUNT
            starred |= star
            sent.append(f" {_f(v['qemu']['transferred'] and v['qemu']['transferred'] / MiB)}{'*' if star else ''} |")
        lines.append(
            f"| {name} | {r['mode']} |" + "".join(f" {_range(v['qemu'])} |" for v in vs) + f" {_range(e)} |"
            + "".join(f" {_f(v['ratio'], '{:.2f}x')} |" for v in vs)
            + "".join(f" {_f(v['qemu']['cpu-s-per-gib'], '{:.2f}')} |" for v in vs)
            + f" {_f(e['cpu-s-per-gib'], '{:.2f}')} |"
            + "".join(f" {_f(v['cpu-ratio'], '{:.2f}x')} |" for v in vs)
            + "".join(sent) + f" {_f(e['transferred'] and e['transferred'] / MiB)} |"
            + f" {_targets_cell(r, qemus)} |"
        )
    if starred:
        old = sorted({q.short for q in qemus if q.counts_uncompressed}, key=lambda v: tuple(map(int, v.split("."))))
        new = sorted({q.short for q in qemus if not q.counts_uncompressed}, key=lambda v: tuple(map(int, v.split("."))))
        lines.append(f"\n\\* QEMU {' and '.join(old)} {'counts' if len(old) == 1 else 'count'} zlib/zstd pages"
                     " uncompressed in `ram.transferred` (`multifd-bytes`): not the bytes on the wire."
                     + (f" QEMU {' and '.join(new)} {'counts' if len(new) == 1 else 'count'} the bytes sent."
                        if new else ""))
    return "\n".join(lines)


QEMU_COLORS = ("#4c72b0", "#55a868", "#8172b2", "#c44e52", "#937860")
ENGINE_COLOR = "#dd8452"


def chart(rows: Sequence[dict[str, Any]], path: Path, title: str, qemus: Sequence[Qemu]) -> str | None:
    """A PNG: median MiB/s (min-max whiskers) and CPU s/GiB per case and mode, a bar per QEMU and
    the engine; the engine/QEMU ratios over the QEMU bars (one QEMU: between the two bars).
    Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (scripts/compare-qemu installs the 'bench' extra)"
    labels = [f"{r['case']}\n{r['mode']}" + ("\n(vs QEMU none fresh)" if r["case"] in ENGINE_ONLY else "") for r in rows]
    x = list(range(len(rows)))
    n = len(qemus) + 1
    w = 0.76 / n
    single = len(qemus) == 1
    sides: list[tuple[float, str, str, list[dict[str, Any]]]] = []  # offset, legend, colour, stats per row
    for k, q in enumerate(qemus):
        legend = f"QEMU {q.short}" if single else q.label
        sides.append(((k - (n - 1) / 2) * w, legend, QEMU_COLORS[k % len(QEMU_COLORS)], [r["vs"][k]["qemu"] for r in rows]))
    sides.append((((n - 1) / 2) * w, "engine", ENGINE_COLOR, [r["engine"] for r in rows]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, (1.6 if single else 1.2 + 0.4 * n) * len(rows)), 9), sharex=True)
    for off, legend, color, st in sides:
        vals = [s["mib-s"] or 0 for s in st]
        lo = [max(0.0, v - (s["mib-s-min"] or v)) for v, s in zip(vals, st)]
        hi = [max(0.0, (s["mib-s-max"] or v) - v) for v, s in zip(vals, st)]
        ax1.bar([i + off for i in x], vals, w, yerr=[lo, hi], capsize=3, color=color, label=legend)
        ax2.bar([i + off for i in x], [s["cpu-s-per-gib"] or 0 for s in st], w, color=color, label=legend)
    for i, r in enumerate(rows):
        for k, v in enumerate(r["vs"]):
            at = i if single else i + sides[k][0]
            if v["ratio"] is not None:
                top = max(v["qemu"]["mib-s-max"] or 0, r["engine"]["mib-s-max"] or 0) if single else (v["qemu"]["mib-s-max"] or 0)
                ax1.annotate(f"{v['ratio']:.2f}x", (at, top), ha="center", va="bottom", fontsize=9 if single else 8)
            if v["cpu-ratio"] is not None:
                top = (max(v["qemu"]["cpu-s-per-gib"] or 0, r["engine"]["cpu-s-per-gib"] or 0) if single
                       else (v["qemu"]["cpu-s-per-gib"] or 0))
                ax2.annotate(f"{v['cpu-ratio']:.2f}x", (at, top), ha="center", va="bottom", fontsize=9 if single else 8)
    ax1.set_ylabel("MiB/s of guest RAM (median, min-max)")
    wrap = int(fig.get_figwidth() * 11)  # characters of the title per line
    if single:
        ax1.set_title(textwrap.fill(title, wrap))
    else:
        ax1.set_title(textwrap.fill(title, wrap) + "\n(over each QEMU bar: engine / that QEMU)", fontsize=10)
    ax1.legend()
    ax2.set_ylabel("CPU s per GiB (both sides, all processes)")
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ results


RESULTS_DIR = ROOT / "benchmarks" / "results"


def machine_description() -> str:
    """One line: CPUs, memory, kernel, OS, TCP congestion control."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem = f", {kib / (1 << 20):.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    osname = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    cpus = f"{os.cpu_count()} CPUs" + (f" ({model})" if model else "")
    return (f"{cpus}{mem}; Linux {os.uname().release}" + (f", {osname}" if osname else "")
            + f"; TCP congestion control default {congestion_setting('default')}")


def results_path(revision: str, note: str | None) -> Path:
    """``benchmarks/results/DATE-compare-qemu-REVISION[-note].md``, not an existing one."""
    stem = f"{time.strftime('%Y-%m-%d')}-compare-qemu-{revision.replace('+', '-')}" + (f"-{note}" if note else "")
    path, n = RESULTS_DIR / f"{stem}.md", 2
    while path.exists() or path.with_suffix(".json").exists():
        path, n = RESULTS_DIR / f"{stem}-{n}.md", n + 1
    return path


def write_results(path: Path, out: dict[str, Any], summary: Sequence[str], qemus: Sequence[Qemu],
                  argv: Sequence[str]) -> None:
    """The summary as markdown (what the run printed, with the revision, machine, QEMUs and
    command) and every run as JSON next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = path.with_suffix(".json")
    revision = out["engine-revision"]
    lines = [
        f"# compare-qemu, {time.strftime('%Y-%m-%d')}, revision {revision}",
        "",
        f"- Revision: {revision}" + (" (engine/ with uncommitted changes)" if revision.endswith("+dirty") else ""),
        f"- Machine: {machine_description()}; both sides on it, TCP loopback",
        "- QEMU: " + "; ".join(f"{q.version_line} (`{q.path}`)" for q in qemus),
        f"- Command: `{shlex.join(['./scripts/compare-qemu', *argv])}`",
        f"- Every run: [{json_path.name}]({json_path.name})",
        "",
        "\n\n".join(part.strip() for part in summary),  # one paragraph per line printed
        "",
    ]
    path.write_text("\n".join(lines))
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"compare-qemu: wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} and"
          f" {json_path.name}", file=sys.stderr)


# ------------------------------------------------------------------------------ main


def wait_quiet(below: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the machine is less than ``below`` busy; returns the last figure."""
    deadline = time.monotonic() + max_wait
    while True:
        busy = machine_busy(1.0)
        if busy < below or time.monotonic() >= deadline:
            return busy


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/compare-qemu",
                                description="Migrate the same RAM image QEMU -> QEMU (for each QEMU compared) and"
                                            " engine -> engine, interleaved, and compare (medians, ratios, CPU,"
                                            " JSON, PNG).")
    add_run_args(p, default_cases=",".join(CASES))
    p.add_argument("--qemu", action="append", default=None, metavar="PATH",
                   help="a QEMU binary to compare with (repeatable; each migrates to itself and is labelled with"
                        " the version its --version prints). Default: the system's qemu-system-x86_64"
                        " ($QEMU_BINARY overrides it; QEMU 7.2 on Debian 12) plus QEMU 10.0 when"
                        " scripts/install-qemu10 has installed it (.qemu/10.0/qemu-system-x86_64)")
    p.add_argument("--slow-rounds", type=int, default=3, metavar="N",
                   help="run zlib (about 10x slower than the rest) in the first N rounds only"
                        " (default 3; 0 = every round)")
    p.add_argument("--chart", type=Path, default=None, metavar="FILE", help="write a PNG chart here (matplotlib)")
    p.add_argument("--results", action="store_true",
                   help="also write the summary to benchmarks/results/DATE-compare-qemu-REVISION[-NOTE].md (with"
                        " the revision, machine, QEMU versions and command) and every run to the .json next to it")
    p.add_argument("--note", default=None, metavar="WORD",
                   help="with --results: a word for the file name, e.g. host-cubic")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="after the rounds, one more engine run per case and mode with --trace on both sides"
                        " (Chrome trace JSON in DIR, not counted in the medians); prints time per span kind")
    p.add_argument("--image", type=Path, default=None,
                   help="use this RAM image instead of generating one (its size wins over --size; kept)")
    p.add_argument("--quiet-below", type=float, default=0.3, metavar="FRACTION",
                   help="before each round wait until the machine is less busy than this (default 0.3)")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for that per round (default 10; 0 = do not wait)")
    p.add_argument("--workdir", type=Path, default=None, help="where image and logs go (default a temp dir, removed)")
    p.add_argument("--tls", action="store_true",
                   help="every migration over TLS on every channel (tls-creds-x509 for QEMU, --tls-creds for the"
                        " engine), with a throw-away CA and certificates made in the work directory")
    p.add_argument("--packet-pages", type=int, default=PAGES_PER_PACKET, metavar="N",
                   help="the engine's pages per packet on both sides (default 128, as QEMU, which always uses 128;"
                        " up to 1024)")
    p.add_argument("--huge-pages", action="store_true",
                   help="the engine source's guest RAM on 2 MiB pages (migrate --huge-pages), as QEMU's RAM can"
                        " get transparent huge pages; the collapse happens before the migration starts")
    args = check_run_args(p, p.parse_args(argv))
    try:
        check_packet_pages(args.packet_pages)
    except ConfigError as exc:
        p.error(f"--{exc}")
    if args.note is not None and (not args.results or not args.note.replace("-", "").isalnum()):
        p.error("--note needs --results and one word of letters, digits and '-'")
    return args


def engine_revision() -> str:
    """``git describe`` of the work tree, ``+dirty`` when engine/ has uncommitted changes: the
    engine measured (others may be changing it between runs)."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "engine"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        qemus = find_qemus(args.qemu)
    except QemuNotUsable as exc:
        print(f"compare-qemu: error: {exc}", file=sys.stderr)
        return 2
    by_id = {q.id: q for q in qemus}
    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="compare-qemu-")) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tag = shm_tag()
    results: dict[Job, list[dict[str, Any]]] = {}
    started = time.time()
    size = args.size_bytes
    traces: list[dict[str, Any]] = []
    revision = engine_revision()
    interrupted = False
    try:
        if args.image is not None:
            image, size = args.image.resolve(), args.image.stat().st_size
        else:
            image, size = workdir / "ram.img", args.size_bytes
            t0 = time.monotonic()
            make_image(image, size)
            print(f"compare-qemu: {size / GiB:g} GiB image generated in {time.monotonic() - t0:.1f}s ({image})",
                  file=sys.stderr)
        tls = tls_creds.make_pair(workdir / "tls") if args.tls else None
        # the engine's own options, the same for every engine run (the traced ones too)
        packets = ["--packet-pages", str(args.packet_pages)] if args.packet_pages != PAGES_PER_PACKET else []
        extra_dst = [*packets, *(["--tls-creds", str(tls[0])] if tls else [])]
        extra_src = [*packets, *(["--huge-pages"] if args.huge_pages else []),
                     *(["--tls-creds", str(tls[1])] if tls else [])]
        groups = plan(args.cases, args.modes, qemus)
        width = max(24, *(len(j.key) for g in groups for j in g))
        print(f"compare-qemu: {args.rounds} rounds of {sum(len(g) for g in groups)} runs, {args.channels} channels,"
              f" engine at {revision}, uptime load {loadavg():.2f}", file=sys.stderr)
        if len(qemus) > 1:
            print("compare-qemu: " + "; ".join(f"qemu-{q.id}: {q.path}" for q in qemus), file=sys.stderr)
        for rnd in range(args.rounds):
            busy = wait_quiet(args.quiet_below, args.quiet_wait) if args.quiet_wait > 0 else machine_busy(0.5)
            print(f"compare-qemu: round {rnd + 1}/{args.rounds} (machine {busy:.0%} busy before it)", file=sys.stderr)
            for i, group in enumerate(groups):
                k = (rnd + i) % len(group)  # who goes first rotates (two jobs: they alternate)
                for job in group[k:] + group[:k]:
                    if job.compression in SLOW and 0 < args.slow_rounds <= rnd:
                        continue
                    level = args.level if job.compression != "none" else None
                    kw: dict[str, Any] = dict(channels=args.channels, compression=job.compression, level=level,
                                              prealloc=job.mode == "prealloc", timeout=args.timeout)
                    try:
                        if job.impl == "qemu":
                            qemu = by_id[job.qemu]
                            r = run_qemu(image, size, workdir=workdir / f"qemu{'-' + qemu.id if qemu.id else ''}",
                                         binary=qemu.path, tls=tls, **kw)
                            r["qemu-version"] = qemu.version
                        else:
                            r = run_engine(image, size, workdir=workdir / "engine", tag=tag,
                                           extra_src=extra_src, extra_dst=extra_dst, **kw)
                    except RunFailed as exc:
                        r = {"impl": job.impl, "status": "failed", "error": str(exc)}
                        if job.impl == "qemu":
                            r["qemu-version"] = by_id[job.qemu].version
                        print(f"compare-qemu: {job.key} round {rnd + 1} failed: {exc}", file=sys.stderr)
                    r.update(round=rnd + 1, compression=job.compression, mode=job.mode)
                    results.setdefault(job, []).append(r)
                    if r["status"] == "completed":
                        print(f"  {job.key:<{width}} {size / MiB / (r['total-time'] / 1000):8.0f} MiB/s"
                              f"  total-time {r['total-time']:>6} ms  cpu {r['cpu-s']:6.2f} s"
                              f"  sent {r['transferred'] / MiB:7.1f} MiB  others {r['others-cpu-s']:.2f} cpu-s",
                              file=sys.stderr)
        if args.trace is not None:
            engine_jobs = [j for g in groups for j in g if j.impl == "engine"]
            traces = traced_runs(image, size, engine_jobs, args.trace, channels=args.channels, level=args.level,
                                 timeout=args.timeout, workdir=workdir / "engine", tag=tag,
                                 extra_src=extra_src, extra_dst=extra_dst)
    except KeyboardInterrupt:
        interrupted = True
        print("compare-qemu: interrupted; summarising what completed", file=sys.stderr)
    finally:
        remove_leftover_segments(tag, "compare-qemu")
        if tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.image is None:
            (workdir / "ram.img").unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    rows = summarize(results, args.cases, args.modes, size, qemus, args.tls)
    slow = f" ({', '.join(sorted(SLOW & set(args.cases)))}: {min(args.slow_rounds, args.rounds)})" \
        if SLOW & set(args.cases) and 0 < args.slow_rounds < args.rounds else ""
    names = " and ".join(q.short if len(qemus) > 1 and i else f"QEMU {q.short}" for i, q in enumerate(qemus))
    title = (f"{names} vs engine: {size / MiB:g} MiB guest, {args.channels} multifd channels, TCP loopback"
             f"{', TLS on every channel' if args.tls else ''}"
             f"{f', engine packet-pages {args.packet_pages}' if args.packet_pages != PAGES_PER_PACKET else ''}"
             f"{', engine source on 2 MiB pages' if args.huge_pages else ''},"
             f" medians of {args.rounds} interleaved rounds{slow}")
    summary = [f"{title}\n", table(rows, args.channels, qemus)]
    loads = [r["load"] for runs in results.values() for r in runs if "load" in r]
    others = [r["others-cpu-s"] for runs in results.values() for r in runs if "others-cpu-s" in r]
    if loads:
        summary.append(f"\nnoise: 1-min load average {min(loads):.2f}-{max(loads):.2f} during the runs; CPU used by"
                       f" other processes during a run: median {statistics.median(others):.2f} s,"
                       f" max {max(others):.2f} s")
    system_cc = congestion_setting("default")
    summary.append(f"TCP congestion control: QEMU's senders use the system's default ({system_cc}); the engine's use"
                   f" tcp-congestion auto (the first of {', '.join(LOCAL_CONGESTION)} it may set, towards this host)")
    if len(qemus) > 1:
        summary.append("QEMUs: " + "; ".join(f"{q.label} = {q.path} ({q.version_line})" for q in qemus))
    print()
    print("\n".join(summary))
    out = {
        "title": title,
        "started": started,
        "config": {"size": args.size_bytes, "rounds": args.rounds, "cases": args.cases, "modes": args.modes,
                   "channels": args.channels, "level": args.level, "transport": "tcp:127.0.0.1",
                   "tls": args.tls, "engine-packet-pages": args.packet_pages, "engine-huge-pages": args.huge_pages,
                   "qemu-max-bandwidth": QEMU_MAX_BANDWIDTH, "cpus": os.cpu_count(),
                   "tcp-congestion": {"qemu": system_cc, "engine": "auto"}},
        "qemu-version": qemus[0].version_line,
        "qemus": [{"label": q.label, "key": f"qemu-{q.id}" if q.id else "qemu", "version": q.version,
                   "version-line": q.version_line, "path": q.path} for q in qemus],
        "engine-revision": revision,
        "summary": rows,
        "traces": traces,
        "runs": [r for runs in results.values() for r in runs],
    }
    write_json(args.json, out, "compare-qemu")
    if args.results:
        write_results(results_path(revision, args.note), out, summary, qemus, argv)
    if args.chart is not None:
        err = chart(rows, args.chart, title, qemus)
        print(f"compare-qemu: {'chart not written: ' + err if err else f'wrote {args.chart}'}", file=sys.stderr)
    return exit_status((r for runs in results.values() for r in runs), interrupted)


if __name__ == "__main__":
    sys.exit(main())
