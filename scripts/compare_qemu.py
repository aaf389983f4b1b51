#!/usr/bin/env python3
"""QEMU 7.2 and the engine side by side: the same RAM image, the same multifd settings (issue 5).

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

Time: the source's ``total-time`` (QMP ``query-migrate`` once completed; the engine's JSON),
so neither side's process start-up, image loading or pre-allocation counts. Throughput is
guest RAM (MiB) / ``total-time`` (s). ``ram.transferred`` and ``downtime`` are recorded too.

CPU: the same window on both, from just before the migration starts until it has completed on
both sides, every process of both sides:

* QEMU: ``utime + stime`` of both QEMU processes from ``/proc/PID/stat`` (all their threads),
  read just before ``migrate`` (after start-up and pre-allocation) and just before ``quit``.
* engine: the destination's ``utime + stime + cutime + cstime`` read once it is listening (after
  start-up and ``--prealloc``), the source's once it has read the whole image (``rchar`` in
  ``/proc/PID/io`` has reached the image size: it is one ``read()``) or has connected,
  whichever is seen first (polled every 2 ms); at the end each main process's ``wait4()``
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
``VmHWM`` / ``RssAnon`` sampled from ``/proc`` every 10 ms (``VmHWM`` only grows, so the last
sample is at most 10 ms old).

Runs are interleaved: every round runs every (case, mode) once on each side, alternating which
side goes first from round to round, so a noisy neighbour hits both; zlib, ten times slower
than the rest, runs in the first ``--slow-rounds`` (3) only, to keep a default run under ten
minutes on a 2-core machine. The table shows medians and min-max. Before each round it waits up to ``--quiet-wait`` seconds for the other
processes on the machine to use less than ``--quiet-below`` of its CPUs, and it records how
busy the machine was during every run (``others-cpu-s``: CPU seconds used by processes that
are not this run's, measured from ``/proc/stat``).

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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import qemu_peer  # noqa: E402
from engine.runtime.transport import LOCAL_CONGESTION, congestion_setting  # noqa: E402
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
                timeout: float, workdir: Path, tag: str) -> list[dict[str, Any]]:
    """One extra engine run per job with ``--trace`` on both sides (not counted in the medians)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for job in jobs:
        files = {side: (directory / f"engine-{job.compression}-{job.mode}-{side}.json").resolve()
                 for side in ("source", "destination")}
        try:
            r = run_engine(image, size, channels=channels, compression=job.compression,
                           level=level if job.compression != "none" else None, prealloc=job.mode == "prealloc",
                           workdir=workdir, timeout=timeout, tag=tag,
                           extra_src=["--trace", str(files["source"])],
                           extra_dst=["--trace", str(files["destination"])])
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


def _qemu_level(compression: str, level: int | None) -> dict[str, Any]:
    if level is None or compression not in ("zlib", "zstd"):
        return {}
    return {f"multifd_{compression}_level": level}


def run_qemu(image: Path, size: int, *, channels: int, compression: str, level: int | None, prealloc: bool,
             workdir: Path, timeout: float) -> dict[str, Any]:
    """One QEMU -> QEMU migration of ``image``. Returns its measurements; raises
    :class:`RunFailed`. Both QEMUs are always quit (or killed) and reaped by ``QemuPeer``."""
    workdir.mkdir(parents=True, exist_ok=True)
    start_timeout = 30.0 + 10.0 * size / GiB  # -mem-prealloc happens before QMP answers
    try:
        src = qemu_peer.QemuPeer(workdir, name="qemu-source", memory=f"{size // MiB}M", mem_path=image,
                                 extra_args=["-mem-prealloc"], timeout=start_timeout)
        with src:
            src.set_multifd(channels, compression, max_bandwidth=QEMU_MAX_BANDWIDTH, **_qemu_level(compression, level))
            dst = qemu_peer.QemuPeer(workdir, name="qemu-destination", memory=f"{size // MiB}M", incoming=True,
                                     extra_args=["-mem-prealloc"] if prealloc else [], timeout=start_timeout)
            with dst:
                dst.set_multifd(channels, compression, **_qemu_level(compression, level))
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

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.compression}/{self.mode}"


def plan(cases: Sequence[str], modes: Sequence[str]) -> list[tuple[Job, ...]]:
    """The pairs run in every round, in order; each pair is (QEMU job, engine job) or a single job."""
    pairs: list[tuple[Job, ...]] = []
    seen: set[Job] = set()

    def add(*jobs: Job) -> None:
        new = tuple(j for j in jobs if j not in seen)
        seen.update(new)
        if new:
            pairs.append(new)

    for mode in modes:
        for case in cases:
            if case in ENGINE_ONLY:
                add(Job("qemu", "none", "fresh"), Job("engine", case, mode))
            else:
                add(Job("qemu", case, mode), Job("engine", case, mode))
    return pairs


def reference(case: str, mode: str) -> Job:
    """The QEMU run an engine case is compared with."""
    return Job("qemu", "none", "fresh") if case in ENGINE_ONLY else Job("qemu", case, mode)


TARGETS: dict[tuple[str, str], float] = {
    ("none", "prealloc"): 1.0,
    ("none", "fresh"): 2.0,
    ("zstd", "prealloc"): 1.5,
    ("lz4", "fresh"): 1.0,
}
LZ4_MAX_BYTES = 0.75
CPU_MAX_RATIO = 1.5  # engine CPU s/GiB vs QEMU's, compression none


def _med(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def summarize(results: dict[Job, list[dict[str, Any]]], cases: Sequence[str], modes: Sequence[str],
              size: int) -> list[dict[str, Any]]:
    """One row per (case, mode): medians of both sides, ratios, targets."""
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

    rows = []
    for mode in modes:
        for case in cases:
            ref = reference(case, mode)
            q, e = stats(ref), stats(Job("engine", case, mode))
            row: dict[str, Any] = {"case": case, "mode": mode, "reference": ref.key, "qemu": q, "engine": e}
            row["ratio"] = (e["mib-s"] / q["mib-s"]) if e["mib-s"] and q["mib-s"] else None
            row["cpu-ratio"] = (e["cpu-s-per-gib"] / q["cpu-s-per-gib"]) if e["cpu-s-per-gib"] and q["cpu-s-per-gib"] else None
            row["bytes-ratio"] = (e["transferred"] / q["transferred"]) if e["transferred"] and q["transferred"] else None
            checks = []
            target = TARGETS.get((case, mode))
            if target is not None and row["ratio"] is not None:
                checks.append((f"throughput >= {target:g}x", row["ratio"] >= target))
            if case == "lz4" and row["bytes-ratio"] is not None:
                checks.append((f"bytes <= {LZ4_MAX_BYTES:.0%}", row["bytes-ratio"] <= LZ4_MAX_BYTES))
            if case == "none" and row["cpu-ratio"] is not None:
                checks.append((f"CPU/GiB <= {CPU_MAX_RATIO:g}x", row["cpu-ratio"] <= CPU_MAX_RATIO))
            row["targets"] = [{"target": t, "met": ok} for t, ok in checks]
            rows.append(row)
    return rows


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _range(side: dict[str, Any]) -> str:
    if side["mib-s"] is None:
        return "-"
    return f"{side['mib-s']:.0f} ({side['mib-s-min']:.0f}-{side['mib-s-max']:.0f})"


def table(rows: Sequence[dict[str, Any]], channels: int) -> str:
    head = ("| case | destination | QEMU MiB/s (min-max) | engine MiB/s (min-max) | engine/QEMU | "
            "CPU s/GiB QEMU | CPU s/GiB engine | CPU ratio | sent MiB QEMU | sent MiB engine | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        q, e = r["qemu"], r["engine"]
        name = f"{r['case']} {channels}ch" + (" (vs QEMU none fresh)" if r["case"] in ENGINE_ONLY else "")
        targets = ", ".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'}" for t in r["targets"]) or "-"
        lines.append(
            f"| {name} | {r['mode']} | {_range(q)} | {_range(e)} | {_f(r['ratio'], '{:.2f}x')} |"
            f" {_f(q['cpu-s-per-gib'], '{:.2f}')} | {_f(e['cpu-s-per-gib'], '{:.2f}')} | {_f(r['cpu-ratio'], '{:.2f}x')} |"
            f" {_f(q['transferred'] and q['transferred'] / MiB)}{'*' if r['reference'].split('/')[1] in QEMU_UNCOMPRESSED_COUNT else ''} |"
            f" {_f(e['transferred'] and e['transferred'] / MiB)} |"
            f" {targets} |"
        )
    if any(r["reference"].split("/")[1] in QEMU_UNCOMPRESSED_COUNT for r in rows):
        lines.append("\n\\* QEMU 7.2 counts zlib/zstd pages uncompressed in `ram.transferred` (`multifd-bytes`):"
                     " not the bytes on the wire.")
    return "\n".join(lines)


def chart(rows: Sequence[dict[str, Any]], path: Path, title: str) -> str | None:
    """A PNG: median MiB/s (min-max whiskers) and CPU s/GiB per case and mode. Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (scripts/compare-qemu installs the 'bench' extra)"
    labels = [f"{r['case']}\n{r['mode']}" + ("\n(vs QEMU none fresh)" if r["case"] in ENGINE_ONLY else "") for r in rows]
    x = list(range(len(rows)))
    w = 0.38
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(rows)), 9), sharex=True)
    for off, side, color in ((-w / 2, "qemu", "#4c72b0"), (w / 2, "engine", "#dd8452")):
        vals = [r[side]["mib-s"] or 0 for r in rows]
        lo = [max(0.0, v - (r[side]["mib-s-min"] or v)) for v, r in zip(vals, rows)]
        hi = [max(0.0, (r[side]["mib-s-max"] or v) - v) for v, r in zip(vals, rows)]
        ax1.bar([i + off for i in x], vals, w, yerr=[lo, hi], capsize=3, color=color,
                label="QEMU 7.2" if side == "qemu" else "engine")
        cpu = [r[side]["cpu-s-per-gib"] or 0 for r in rows]
        ax2.bar([i + off for i in x], cpu, w, color=color, label="QEMU 7.2" if side == "qemu" else "engine")
    for i, r in enumerate(rows):
        if r["ratio"] is not None:
            top = max(r["qemu"]["mib-s-max"] or 0, r["engine"]["mib-s-max"] or 0)
            ax1.annotate(f"{r['ratio']:.2f}x", (i, top), ha="center", va="bottom", fontsize=9)
        if r["cpu-ratio"] is not None:
            top = max(r["qemu"]["cpu-s-per-gib"] or 0, r["engine"]["cpu-s-per-gib"] or 0)
            ax2.annotate(f"{r['cpu-ratio']:.2f}x", (i, top), ha="center", va="bottom", fontsize=9)
    ax1.set_ylabel("MiB/s of guest RAM (median, min-max)")
    ax1.set_title(title)
    ax1.legend()
    ax2.set_ylabel("CPU s per GiB (both sides, all processes)")
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


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
                                description="Migrate the same RAM image QEMU 7.2 -> QEMU 7.2 and engine -> engine,"
                                            " interleaved, and compare (medians, ratios, CPU, JSON, PNG).")
    add_run_args(p, default_cases=",".join(CASES))
    p.add_argument("--slow-rounds", type=int, default=3, metavar="N",
                   help="run zlib (about 10x slower than the rest) in the first N rounds only"
                        " (default 3; 0 = every round)")
    p.add_argument("--chart", type=Path, default=None, metavar="FILE", help="write a PNG chart here (matplotlib)")
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
    return check_run_args(p, p.parse_args(argv))


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
    args = parse_args(argv)
    if not qemu_peer.qemu_available():
        print(f"compare-qemu: error: {qemu_peer.QEMU_BINARY} not found (apt-get install qemu-system-x86)",
              file=sys.stderr)
        return 2
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
        pairs = plan(args.cases, args.modes)
        print(f"compare-qemu: {args.rounds} rounds of {sum(len(p) for p in pairs)} runs, {args.channels} channels,"
              f" engine at {revision}, uptime load {loadavg():.2f}", file=sys.stderr)
        for rnd in range(args.rounds):
            busy = wait_quiet(args.quiet_below, args.quiet_wait) if args.quiet_wait > 0 else machine_busy(0.5)
            print(f"compare-qemu: round {rnd + 1}/{args.rounds} (machine {busy:.0%} busy before it)", file=sys.stderr)
            for i, pair in enumerate(pairs):
                order = pair if (rnd + i) % 2 == 0 else tuple(reversed(pair))
                for job in order:
                    if job.compression in SLOW and 0 < args.slow_rounds <= rnd:
                        continue
                    level = args.level if job.compression != "none" else None
                    kw: dict[str, Any] = dict(channels=args.channels, compression=job.compression, level=level,
                                              prealloc=job.mode == "prealloc", timeout=args.timeout)
                    try:
                        if job.impl == "qemu":
                            r = run_qemu(image, size, workdir=workdir / "qemu", **kw)
                        else:
                            r = run_engine(image, size, workdir=workdir / "engine", tag=tag, **kw)
                    except RunFailed as exc:
                        r = {"impl": job.impl, "status": "failed", "error": str(exc)}
                        print(f"compare-qemu: {job.key} round {rnd + 1} failed: {exc}", file=sys.stderr)
                    r.update(round=rnd + 1, compression=job.compression, mode=job.mode)
                    results.setdefault(job, []).append(r)
                    if r["status"] == "completed":
                        print(f"  {job.key:<24} {size / MiB / (r['total-time'] / 1000):8.0f} MiB/s"
                              f"  total-time {r['total-time']:>6} ms  cpu {r['cpu-s']:6.2f} s"
                              f"  sent {r['transferred'] / MiB:7.1f} MiB  others {r['others-cpu-s']:.2f} cpu-s",
                              file=sys.stderr)
        if args.trace is not None:
            engine_jobs = [j for pair in pairs for j in pair if j.impl == "engine"]
            traces = traced_runs(image, size, engine_jobs, args.trace, channels=args.channels, level=args.level,
                                 timeout=args.timeout, workdir=workdir / "engine", tag=tag)
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

    rows = summarize(results, args.cases, args.modes, size)
    slow = f" ({', '.join(sorted(SLOW & set(args.cases)))}: {min(args.slow_rounds, args.rounds)})" \
        if SLOW & set(args.cases) and 0 < args.slow_rounds < args.rounds else ""
    title = (f"QEMU 7.2 vs engine: {size / MiB:g} MiB guest, {args.channels} multifd channels, TCP loopback,"
             f" medians of {args.rounds} interleaved rounds{slow}")
    print(f"\n{title}\n")
    print(table(rows, args.channels))
    loads = [r["load"] for runs in results.values() for r in runs if "load" in r]
    others = [r["others-cpu-s"] for runs in results.values() for r in runs if "others-cpu-s" in r]
    if loads:
        print(f"\nnoise: 1-min load average {min(loads):.2f}-{max(loads):.2f} during the runs; CPU used by other"
              f" processes during a run: median {statistics.median(others):.2f} s, max {max(others):.2f} s")
    system_cc = congestion_setting("default")
    print(f"TCP congestion control: QEMU's senders use the system's default ({system_cc}); the engine's use"
          f" tcp-congestion auto (the first of {', '.join(LOCAL_CONGESTION)} it may set, towards this host)")
    out = {
        "title": title,
        "started": started,
        "config": {"size": args.size_bytes, "rounds": args.rounds, "cases": args.cases, "modes": args.modes,
                   "channels": args.channels, "level": args.level, "transport": "tcp:127.0.0.1",
                   "qemu-max-bandwidth": QEMU_MAX_BANDWIDTH, "cpus": os.cpu_count(),
                   "tcp-congestion": {"qemu": system_cc, "engine": "auto"}},
        "qemu-version": subprocess.run([qemu_peer.QEMU_BINARY, "--version"], capture_output=True, text=True,
                                       timeout=30).stdout.splitlines()[0],
        "engine-revision": revision,
        "summary": rows,
        "traces": traces,
        "runs": [r for runs in results.values() for r in runs],
    }
    write_json(args.json, out, "compare-qemu")
    if args.chart is not None:
        err = chart(rows, args.chart, title)
        print(f"compare-qemu: {'chart not written: ' + err if err else f'wrote {args.chart}'}", file=sys.stderr)
    return exit_status((r for runs in results.values() for r in runs), interrupted)


if __name__ == "__main__":
    sys.exit(main())
