"""The README's main job: migrate a guest between two local processes and check it byte for byte.

Starts ``python -m engine incoming`` (the destination) and ``python -m engine migrate`` (the
source) as two processes on this machine, prints both sides' statistics side by side, and
compares the RAM digests of the two sides. Exit status 0 only when the migration completed and
the destination's RAM equals the source's.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def engine(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


def wait_listening(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(0.2):
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("engine: listening on "):
                    return line.split("listening on ", 1)[1].strip()
    raise SystemExit(f"demo: the destination did not start: {buf.decode(errors='replace').strip()}")


def row(name: str, a: object, b: object) -> str:
    return f"  {name:<22}{str(a):>20}{str(b):>20}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="guest RAM size (default 1G)")
    ap.add_argument("--fill", default="mixed", help="guest content: zero, random, mixed (default mixed)")
    ap.add_argument("--channels", type=int, default=4, help="multifd-channels (default 4)")
    ap.add_argument("--compression", default="none", help="multifd-compression (default none)")
    ap.add_argument("--uri", default="tcp:127.0.0.1:0", help="where the destination listens (default tcp:127.0.0.1:0)")
    ap.add_argument("--json", action="store_true", help="also print both sides' JSON")
    args = ap.parse_args()

    common = ["--channels", str(args.channels), "--compression", args.compression, "--json", "--digest"]
    print(f"demo: migrating a {args.size} {args.fill} guest over {args.channels} multifd channels "
          f"({args.compression}) between two local processes", flush=True)
    dst = subprocess.Popen(engine("incoming", args.uri, *common, "--listen-timeout", "60"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        uri = wait_listening(dst, 60)
        print(f"demo: destination pid {dst.pid} listening on {uri}", flush=True)
        src = subprocess.run(engine("migrate", uri, "--ram-size", args.size, "--fill", args.fill, *common),
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        dout, derr = dst.communicate(timeout=120)
    finally:
        if dst.poll() is None:
            dst.kill()
            dst.communicate()
    if src.returncode != 0:
        print(f"demo: source failed: {src.stderr.strip()}", file=sys.stderr)
        return 1
    if dst.returncode != 0:
        print(f"demo: destination failed: {derr.decode().strip()}", file=sys.stderr)
        return 1
    s, d = json.loads(src.stdout), json.loads(dout)
    print()
    print(row("", "source", "destination"))
    print(row("status", s["status"], d["status"]))
    for key, label in [("total-time", "total-time (ms)"), ("setup-time", "setup-time (ms)"), ("downtime", "downtime (ms)")]:
        print(row(label, s[key], d[key]))
    print(row("throughput (MiB/s)", s["throughput-mib-s"], d["throughput-mib-s"]))
    for key in ["total", "transferred", "duplicate", "normal", "multifd-bytes", "mbps", "dirty-sync-count"]:
        print(row(key, s["ram"][key], d["ram"][key]))
    for cs, cd in zip(s["channels"], d["channels"]):
        print(row(f"channel {cs['id']} packets", cs["packets"], cd["packets"]))
    same = s["ram-digest"] == d["ram-digest"]
    print()
    for name, digest in s["ram-digest"].items():
        print(f"  block {name!r}: source {digest}  destination {d['ram-digest'].get(name)}")
    if args.json:
        print(json.dumps({"source": s, "destination": d}, indent=2))
    if not same:
        print("demo: FAILED: destination RAM differs from the source", file=sys.stderr)
        return 1
    print(f"demo: OK: destination RAM equals the source's, byte for byte "
          f"({s['ram']['total'] >> 20} MiB at {s['throughput-mib-s']} MiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
