"""Soak: many migrations back to back, mixed settings, some cancelled, some with injected faults.

Runs for --seconds (bounded) and reports counts of completed / failed-as-expected / unexpected
outcomes, then checks that no shared-memory segment and no process was left behind.
Exit status 0 only if there was no unexpected outcome and no leak.

    ./scripts/soak --seconds 600          # a long run
    ./scripts/soak --seconds 20 --json    # what CI runs (tests/test_soak.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
METHODS = ["none", "zlib", "zstd", "lz4"]


def engine(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine", *args]


# the engine processes this soak starts tag their segments, so other runs do not count
os.environ["MFD_SHM_TAG"] = TAG = f"soak{os.getpid()}"


def shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"mfd_{TAG}_")}


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def start_destination(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    from engine.cli.common import wait_for_listening

    proc = subprocess.Popen(engine("incoming", "tcp:127.0.0.1:0", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    try:
        return proc, wait_for_listening(proc, 30)[0]
    except Exception:
        proc.kill()
        proc.communicate()
        raise


def one_run(rng: random.Random) -> tuple[str, str]:
    """One migration; returns (outcome, description). outcome: completed | expected-failure | unexpected."""
    method = rng.choice(METHODS)
    channels = rng.choice([1, 2, 3, 4, 8])
    size = rng.choice(["4M", "16M", "32M"])
    live = rng.random() < 0.4
    fault = rng.choice(["none", "none", "none", "cancel", "kill-src-channel", "kill-dst-channel", "kill-dst"])
    common = ["--channels", str(channels), "--compression", method, "--stall-timeout", "10"]
    desc = f"{method} x{channels} {size}{' live' if live else ''} fault={fault}"
    dst, uri = start_destination(common)
    src_args = ["migrate", uri, "--ram-size", size, *common]
    if live:
        src_args += ["--dirty-rate", "8M"]
    if fault != "none":
        src_args += ["--max-bandwidth", "8M"]  # slow enough to strike mid-way
    src = subprocess.Popen(engine(*src_args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        if fault != "none":
            time.sleep(rng.uniform(0.3, 1.0))
            if fault == "cancel":
                src.send_signal(signal.SIGINT)
            elif fault in ("kill-src-channel", "kill-dst-channel"):
                parent = src.pid if fault == "kill-src-channel" else dst.pid
                kids = [k for k in descendants(parent) if b"resource_tracker" not in _cmdline(k)]
                if kids:
                    try:
                        os.kill(rng.choice(kids), signal.SIGKILL)
                    except ProcessLookupError:  # it finished first: the run has no fault
                        pass
            elif fault == "kill-dst":
                dst.kill()
        _, serr = src.communicate(timeout=120)
        try:
            _, derr = dst.communicate(timeout=20 if src.returncode else 60)
        except subprocess.TimeoutExpired:
            if src.returncode == 0:
                raise
            # A source cancelled before it connected leaves the destination waiting for one
            # (as a QEMU -incoming does): SIGTERM must end that wait at once, cleanly.
            dst.send_signal(signal.SIGTERM)
            _, derr = dst.communicate(timeout=10)
            if dst.returncode != 143:
                return "unexpected", f"{desc}: a listening destination exited {dst.returncode} on SIGTERM"
    except subprocess.TimeoutExpired:
        src.kill()
        dst.kill()
        src.communicate()
        dst.communicate()
        return "unexpected", f"{desc}: a side hung"
    serr_s, derr_s = serr.decode(errors="replace"), derr.decode(errors="replace")
    if "Traceback" in serr_s or "Traceback" in derr_s:
        return "unexpected", f"{desc}: traceback: {(serr_s + derr_s)[-400:]}"
    if src.returncode == 0 and dst.returncode == 0:
        return "completed", desc
    if fault == "none":
        return "unexpected", f"{desc}: source {src.returncode} destination {dst.returncode}: {serr_s.strip()[-200:]} | {derr_s.strip()[-200:]}"
    return "expected-failure", desc


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to run (default 60)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    before = shm()
    counts = {"completed": 0, "expected-failure": 0, "unexpected": 0}
    problems: list[str] = []
    deadline = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < deadline:
        outcome, desc = one_run(rng)
        runs += 1
        counts[outcome] += 1
        if outcome == "unexpected":
            problems.append(desc)
        if not args.json:
            print(f"[{runs}] {outcome}: {desc}", flush=True)
    time.sleep(1.0)
    leaked_shm = sorted(shm() - before)
    leaked_procs = descendants(os.getpid())
    report = {"seed": seed, "runs": runs, **counts, "leaked-segments": leaked_shm,
              "leaked-processes": leaked_procs, "problems": problems}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if not problems and not leaked_shm and not leaked_procs else 1


if __name__ == "__main__":
    sys.exit(main())
