#!/usr/bin/env python3
"""Two engine revisions side by side: the same RAM image migrated by each, interleaved.

Run it with ``scripts/compare-revisions`` (it sets up the venv); ``--help`` lists the options.

Theory of operation
-------------------
``BASE`` (a git revision, ``HEAD`` by default) is checked out into a temporary git worktree;
the other side is this checkout as it is, uncommitted changes included, or ``--new REV`` in a
second worktree. Every round runs each (compression, destination mode) case once per
revision, alternating which revision goes first from case to case and round to round, so a
noisy neighbour or a drifting machine hits both. Each run is ``engine_runs.run_engine``: the
same CLI processes, CPU accounting (both sides, every process, during the migration) and
leftover checks as ``scripts/compare-qemu``, started from that revision's checkout.

The table shows, per case, the medians (min-max) of throughput (guest MiB / the source's
``total-time``) and of CPU seconds per GiB for each revision, and new/base ratios: the
side-by-side numbers a speed-up claim needs on a machine whose speed drifts by 10-20%.

Nothing is left behind: the worktrees are removed (``git worktree remove --force``), the image
deleted, and any engine shared-memory segment carrying this run's tag removed and reported,
also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import statistics
import subprocess
import sys
import tempfile
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import tls_creds  # noqa: E402
from engine_runs import (  # noqa: E402
    GiB, MiB, RunFailed, add_run_args, check_run_args, exit_status, make_image, remove_leftover_segments,
    run_engine, shm_tag, write_json,
)

PROG = "scripts/compare-revisions"


class GitError(Exception):
    pass


def git(*args: str, cwd: Path = ROOT) -> str:
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise GitError(f"git {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def checkout(rev: str, where: Path) -> str:
    """A detached worktree of ``rev`` at ``where``; returns its short commit id."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", "--short", f"{rev}^{{commit}}")
    except GitError:
        raise GitError(f"unknown revision {rev!r}, expected a commit, branch or tag of {ROOT}") from None
    git("worktree", "add", "--detach", "--force", str(where), commit)
    return commit


def remove_worktree(where: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(where))
    except (GitError, OSError, subprocess.SubprocessError):
        shutil.rmtree(where, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, timeout=60)


def describe_worktree() -> str:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "engine")
    return head + ("+work-tree changes" if dirty else "")


def _med(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(results: dict[tuple[str, str, str], list[dict[str, Any]]], cases: Sequence[str],
              modes: Sequence[str], size: int) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        for mode in modes:
            row: dict[str, Any] = {"case": case, "mode": mode}
            for side in ("base", "new"):
                runs = [r for r in results.get((side, case, mode), []) if r.get("status") == "completed"]
                thr = [size / MiB / (r["total-time"] / 1000) for r in runs if r["total-time"]]
                cpu = [r["cpu-s"] / (size / GiB) for r in runs]
                row[side] = {"runs": len(runs), "mib-s": _med(thr), "mib-s-min": min(thr, default=None),
                             "mib-s-max": max(thr, default=None), "cpu-s-per-gib": _med(cpu)}
            b, n = row["base"], row["new"]
            row["throughput-ratio"] = n["mib-s"] / b["mib-s"] if b["mib-s"] and n["mib-s"] else None
            row["cpu-ratio"] = (n["cpu-s-per-gib"] / b["cpu-s-per-gib"]
                                if b["cpu-s-per-gib"] and n["cpu-s-per-gib"] else None)
            rows.append(row)
    return rows


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| case | destination | base MiB/s (min-max) | new MiB/s (min-max) | new/base throughput"
             " | base CPU s/GiB | new CPU s/GiB | new/base CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for side in ("base", "new"):
            s = r[side]
            cells.append(f"{_f(s['mib-s'], '{:.0f}')} ({_f(s['mib-s-min'], '{:.0f}')}-{_f(s['mib-s-max'], '{:.0f}')})")
        lines.append(f"| {r['case']} | {r['mode']} | {cells[0]} | {cells[1]} | {_f(r['throughput-ratio'], '{:.2f}x')}"
                     f" | {_f(r['base']['cpu-s-per-gib'], '{:.2f}')} | {_f(r['new']['cpu-s-per-gib'], '{:.2f}')}"
                     f" | {_f(r['cpu-ratio'], '{:.2f}x')} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Migrate the same RAM image with two engine revisions,"
                                                       " interleaved, and compare (medians, ratios, CPU).")
    p.add_argument("base", nargs="?", default="HEAD", help="the baseline git revision (default HEAD)")
    p.add_argument("--new", default=None, metavar="REV",
                   help="the revision to compare (default: this checkout as it is, uncommitted changes included)")
    add_run_args(p, default_cases="none")
    p.add_argument("--tls", action="store_true",
                   help="both revisions over TLS (--tls-creds, a throw-away CA made in the work directory)")
    return check_run_args(p, p.parse_args(argv))


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def checkouts(args: argparse.Namespace, workdir: Path, trees: list[Path]) -> tuple[dict[str, Path], dict[str, str]]:
    """The checkout each side runs from and its revision; worktrees made are added to ``trees``."""
    roots = {"base": workdir / "base"}
    trees.append(roots["base"])
    revs = {"base": checkout(args.base, roots["base"])}
    if args.new is None:
        roots["new"], revs["new"] = ROOT, describe_worktree()
    else:
        roots["new"] = workdir / "new"
        trees.append(roots["new"])
        revs["new"] = checkout(args.new, roots["new"])
    return roots, revs


def run_rounds(args: argparse.Namespace, image: Path, roots: dict[str, Path], revs: dict[str, str], workdir: Path,
               tag: str, results: dict[tuple[str, str, str], list[dict[str, Any]]]) -> None:
    """Every case once per side per round, the side that goes first alternating."""
    size = args.size_bytes
    tls: dict[str, Any] = {}
    if args.tls:
        server, client = tls_creds.make_pair(workdir / "tls")
        tls = {"extra_dst": ["--tls-creds", str(server)], "extra_src": ["--tls-creds", str(client)]}
    for rnd in range(args.rounds):
        print(f"{PROG}: round {rnd + 1}/{args.rounds}", file=sys.stderr)
        for k, (mode, case) in enumerate(itertools.product(args.modes, args.cases)):
            for side in (("base", "new") if (rnd + k) % 2 == 0 else ("new", "base")):
                try:
                    r = run_engine(image, size, channels=args.channels, compression=case,
                                   level=args.level if case != "none" else None, prealloc=mode == "prealloc",
                                   workdir=workdir / "runs", timeout=args.timeout, tag=tag, root=roots[side], **tls)
                except RunFailed as exc:
                    r = {"status": "failed", "error": str(exc)}
                    print(f"{PROG}: {side}/{case}/{mode} round {rnd + 1} failed: {exc}", file=sys.stderr)
                r.update(side=side, revision=revs[side], round=rnd + 1, compression=case, mode=mode)
                results.setdefault((side, case, mode), []).append(r)
                if r["status"] == "completed":
                    print(f"  {side:<4} {case}/{mode:<8} {size / MiB / (r['total-time'] / 1000):8.0f} MiB/s"
                          f"  total-time {r['total-time']:>6} ms  cpu {r['cpu-s']:6.2f} s", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="compare-revisions-"))
    tag = shm_tag()
    size = args.size_bytes
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    trees: list[Path] = []
    revs: dict[str, str] = {}
    interrupted = False
    try:
        try:
            roots, revs = checkouts(args, workdir, trees)
        except GitError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        image = workdir / "ram.img"
        make_image(image, size)
        print(f"{PROG}: base {revs['base']} vs new {revs['new']}: {args.rounds} rounds,"
              f" {size / MiB:g} MiB guest, {args.channels} channels", file=sys.stderr)
        run_rounds(args, image, roots, revs, workdir, tag, results)
    except KeyboardInterrupt:
        interrupted = True
        print(f"{PROG}: interrupted; summarising what completed", file=sys.stderr)
    finally:
        for tree in trees:
            remove_worktree(tree)
        remove_leftover_segments(tag, PROG)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    rows = summarize(results, args.cases, args.modes, size)
    title = (f"engine {revs.get('new', '?')} (new) vs {revs.get('base', '?')} (base): {size / MiB:g} MiB guest,"
             f" {args.channels} multifd channels, TCP loopback{', TLS on every channel' if args.tls else ''},"
             f" medians of {args.rounds} interleaved rounds")
    print(f"\n{title}\n")
    print(table(rows))
    runs = [r for side_runs in results.values() for r in side_runs]
    write_json(args.json, {"title": title, "started": started, "revisions": revs,
                           "config": {"size": size, "rounds": args.rounds, "cases": args.cases, "modes": args.modes,
                                      "channels": args.channels, "level": args.level},
                           "summary": rows, "runs": runs}, PROG)
    return exit_status(runs, interrupted)


if __name__ == "__main__":
    sys.exit(main())
