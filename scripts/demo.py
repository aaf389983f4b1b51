"""The README's main job: a live migration between two local processes, verified byte for byte.

The destination is ``python -m engine incoming`` in its own process. The source is this process:
it creates a 1 GiB mixed guest in shared memory, starts a workload ("vCPU" writer processes)
that keeps dirtying it, and migrates it live over 4 multifd channels with the Python API,
showing progress while it runs. At the end it prints a summary of both sides and compares the
destination's RAM with the source's RAM as it was at stop-and-copy.
Exit status 0 only when the migration completed and the RAM matches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import BlockSpec, GuestRam, MigrationError, MigrationParams, parse_size  # noqa: E402
from engine.cli.common import progress_line, wait_for_listening  # noqa: E402
from engine.memory.dirty import DirtyLog  # noqa: E402
from engine.source.migration import Migration  # noqa: E402
from engine.memory.ram import block_digest
from engine.memory.workload import fill_pages  # noqa: E402
from engine.memory.workload import DIRTY_PATTERNS, Workload, WorkloadSpec  # noqa: E402


def wait_listening(proc: subprocess.Popen[bytes], timeout: float) -> str:
    try:
        return wait_for_listening(proc, timeout)[0]
    except MigrationError as exc:
        raise SystemExit(f"demo: {exc}") from None


def row(name: str, a: object, b: object = "") -> str:
    return f"  {name:<24}{str(a):>20}{str(b):>20}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest RAM size (default 1G)")
    ap.add_argument("--channels", type=int, default=4, help="multifd-channels (default 4)")
    ap.add_argument("--compression", default="none", help="multifd-compression (default none)")
    ap.add_argument("--dirty-rate", default="64M", help="bytes/s the guest dirties (default 64M; 0 = flat out)")
    ap.add_argument("--dirty-pattern", choices=DIRTY_PATTERNS, default="uniform")
    ap.add_argument("--writers", type=int, default=2, help="guest writer processes (default 2)")
    ap.add_argument("--max-bandwidth", default="0", help="max-bandwidth (default 0 = unlimited)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="downtime-limit ms (default 300)")
    ap.add_argument("--auto-converge", action="store_true")
    ap.add_argument("--uri", default="tcp:127.0.0.1:0", help="where the destination listens")
    ap.add_argument("--json", action="store_true", help="also print both sides' query-migrate JSON")
    args = ap.parse_args()

    size = parse_size(args.size, "--size")
    params = MigrationParams(channels=args.channels, compression=args.compression,
                             max_bandwidth=parse_size(args.max_bandwidth, "--max-bandwidth"),
                             downtime_limit=args.downtime_limit, auto_converge=args.auto_converge)
    spec = WorkloadSpec(dirty_rate=parse_size(args.dirty_rate, "--dirty-rate"), pattern=args.dirty_pattern,
                        writers=args.writers)
    tty = sys.stdout.isatty()
    print(f"demo: live migration of a {args.size} mixed guest dirtying {args.dirty_rate}B/s ({spec.pattern},"
          f" {spec.writers} writers) over {args.channels} multifd channels ({args.compression})", flush=True)
    dst = subprocess.Popen(
        [sys.executable, "-m", "engine", "incoming", args.uri, "--channels", str(args.channels),
         "--compression", args.compression, "--json", "--digest", "--listen-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        uri = wait_listening(dst, 60)
        print(f"demo: destination process {dst.pid} listening on {uri}; source process {os.getpid()}", flush=True)
        with GuestRam.create([BlockSpec("pc.ram", size)]) as ram:
            fill_pages(ram.blocks[0], "mixed")
            log = DirtyLog(ram)
            with Workload(ram, spec, log) as guest:
                time.sleep(0.2)  # let the guest run before migrating
                mig = Migration(uri, ram, params, tracker=log, guest=guest)
                try:
                    with mig:
                        last = 0.0
                        while not mig._done.wait(0.2):
                            now = time.monotonic()
                            if tty:
                                print("\r" + progress_line(mig.query()).ljust(130), end="", flush=True)
                            elif now - last >= 1.0:
                                print(progress_line(mig.query()), flush=True)
                                last = now
                        src_stats = mig.wait()
                except KeyboardInterrupt:
                    mig.cancel()
                    print("\ndemo: cancelled", file=sys.stderr)
                    return 130
                except MigrationError as exc:
                    print(f"\ndemo: migration failed: {exc}", file=sys.stderr)
                    return 1
                if tty:
                    print()
                src = mig.query()
                src["ram-digest"] = {b.name: block_digest(b) for b in ram}  # the guest is paused
                written = guest.pages_written()
        dout, derr = dst.communicate(timeout=120)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.communicate()
    if dst.returncode != 0:
        print(f"demo: destination failed: {derr.decode().strip()}", file=sys.stderr)
        return 1
    d = json.loads(dout)
    print()
    print(row("", "source", "destination"))
    print(row("status", src["status"], d["status"]))
    print(row("total-time (ms)", src["total-time"], d["total-time"]))
    print(row("setup-time (ms)", src["setup-time"], d["setup-time"]))
    print(row("downtime (ms)", src["downtime"], f"limit {args.downtime_limit}"))
    print(row("expected-downtime (ms)", src["expected-downtime"]))
    print(row("iterations", len(src["iterations"])))
    print(row("dirty-sync-count", src["ram"]["dirty-sync-count"], d["ram"]["dirty-sync-count"]))
    print(row("guest RAM (MiB)", src["ram"]["total"] >> 20, d["ram"]["total"] >> 20))
    print(row("transferred (MiB)", round(src["ram"]["transferred"] / 2**20, 1), round(d["ram"]["transferred"] / 2**20, 1)))
    print(row("sent / guest size", f"{src['ram']['transferred'] / src['ram']['total']:.2f}x"))
    print(row("throughput (MiB/s)", src["throughput-mib-s"], d["throughput-mib-s"]))
    print(row("normal pages", src["ram"]["normal"], d["ram"]["normal"]))
    print(row("duplicate (zero) pages", src["ram"]["duplicate"], d["ram"]["duplicate"]))
    print(row("guest pages written", written))
    print()
    print("  iteration      pages  zero-pages   MiB sent    ms   dirtied  exp.downtime  throttle")
    for it in src["iterations"]:
        print(f"  {it['iteration']:>9} {it['pages']:>10} {it['zero-pages']:>11} {it['bytes'] / 2**20:>10.1f}"
              f" {it['duration-ms']:>5.0f} {it['dirty-pages']:>9} {it['expected-downtime']:>10} ms {it['cpu-throttle-percentage']:>7}%")
    print()
    for cs, cd in zip(src["channels"], d["channels"]):
        print(f"  channel {cs['id']}: source pid {cs['pid']} {cs['packets']} packets,"
              f" destination pid {cd['pid']} {cd['packets']} packets")
    if args.json:
        print(json.dumps({"source": src, "destination": d}, indent=2))
    same = src["ram-digest"] == d["ram-digest"]
    for name, digest in src["ram-digest"].items():
        print(f"  block {name!r}: source {digest}  destination {d['ram-digest'].get(name)}")
    if not same:
        print("demo: FAILED: the destination's RAM differs from the source's", file=sys.stderr)
        return 1
    print(f"demo: OK: the destination's RAM equals the source's at stop-and-copy, byte for byte"
          f" (downtime {src['downtime']} ms, {len(src['iterations'])} iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
