"""The engine runs that scripts/compare-qemu and scripts/compare-revisions share.

``run_engine`` migrates a RAM image engine -> engine through the CLI (both processes started
from a given checkout) and measures it: the source's ``total-time``, CPU of every process of
both sides over the migration window, minor faults, RSS peaks (the accounting is described in
compare_qemu.py's docstring). Also here: the /proc readers it needs, the RAM image generator,
segment-leak clean-up, and the command-line options both scripts take. Pure helpers and one
owner per process (:class:`EngineProcess` always ends and reaps its process).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENGINE_BLOCK = "pc.ram"
CASES = ("none", "zstd", "zlib", "lz4")
MODES = ("fresh", "prealloc")
FULL_EVERY = 5  # polls (10 ms each) per full sample of a running engine process


class RunFailed(Exception):
    """One migration did not complete (the message says which side and why)."""


# ------------------------------------------------------------------------ /proc readers


def proc_cpu(pid: int, *, children: bool = False) -> float:
    """CPU seconds (user + system) of process ``pid``, all threads; with ``children`` plus the
    children it has reaped (``cutime + cstime``). Raises OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLK_TCK


def live_children(pid: int) -> list[int]:
    """The child processes of ``pid`` still running (not yet reaped)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def proc_minflt(pid: int, *, children: bool = False) -> int:
    """Minor page faults of ``pid`` (all threads; with ``children`` plus its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]) + (int(fields[8]) if children else 0)  # minflt, cminflt (fields 10, 11)


def with_live_children(read: Callable[..., Any], pid: int) -> Any:
    """``read(pid, children=True)`` plus ``read(child)`` of every child still running: what a
    process and its children have used so far, reaped or not."""
    total = read(pid, children=True)
    for child in live_children(pid):
        try:
            total += read(child)
        except OSError:  # it ended meanwhile
            pass
    return total


def proc_memory(pid: int) -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssShmem`` (KiB) of ``pid``; empty if it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def proc_huge_kib(pid: int) -> int | None:
    """``AnonHugePages`` (KiB) of ``pid``: guest RAM backed by transparent huge pages."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return 0


def has_socket(pid: int) -> bool:
    """Whether process ``pid`` has a socket open (a few readlinks of ``/proc/PID/fd``)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def proc_children(pid: int) -> list[int]:
    """Child pids of every thread of ``pid``."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False  # gone (reaped): still one of the channel processes seen


VMSTAT_KEYS = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall", "compact_fail", "compact_success",
               "pgfault")


def vmstat() -> dict[str, int]:
    """Machine-wide ``/proc/vmstat`` counters that explain fresh-memory costs (THP faults,
    direct compaction stalls, page faults)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, val = line.partition(" ")
                if key in VMSTAT_KEYS:
                    out[key] = int(val)
    except OSError:
        pass
    return out


def vmstat_delta(before: dict[str, int]) -> dict[str, int]:
    now = vmstat()
    return {k: now[k] - before[k] for k in now if k in before}


def machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds, wall seconds) of the whole machine so far, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    busy = sum(vals[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / CLK_TCK, time.monotonic()


def machine_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (0..1)."""
    b0, t0 = machine_cpu()
    time.sleep(interval)
    b1, t1 = machine_cpu()
    return (b1 - b0) / max((t1 - t0) * (os.cpu_count() or 1), 1e-9)


def loadavg() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------ the RAM image


def make_image(path: Path, size: int, seed: int = 0) -> None:
    """``size`` bytes of the engine's ``mixed`` guest (``--ram-size SIZE --fill mixed``) in ``path``."""
    from engine.memory.ram import BlockSpec, GuestRam
    from engine.memory.workload import fill_pages

    if size <= 0 or size % PAGE:
        raise SystemExit(f"compare-qemu: error: --size {size} is not a positive multiple of {PAGE}")
    with GuestRam.create([BlockSpec(ENGINE_BLOCK, size)]) as ram:
        fill_pages(ram.blocks[0], "mixed", seed)
        with open(path, "wb") as f:
            for off in range(0, size, 64 * MiB):
                f.write(ram.blocks[0].buf[off:off + 64 * MiB])


# ------------------------------------------------------------------- engine processes


def shm_tag() -> str:
    return f"cq{os.getpid()}"


def engine_env(tag: str, root: Path = ROOT) -> dict[str, str]:
    """The environment of an engine process run from the checkout ``root``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env["MFD_SHM_TAG"] = tag
    return env


def leftover_segments(tag: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if f"_{tag}_" in n)
    except OSError:
        return []


def remove_leftover_segments(tag: str, prog: str) -> None:
    """Unlink any engine segment carrying ``tag`` that a run left behind, and say so."""
    left = leftover_segments(tag)
    for name in left:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass
    if left:
        print(f"{prog}: warning: removed {len(left)} leftover engine segment(s): {left}", file=sys.stderr)


class EngineProcess:
    """One ``python -m engine ...`` process; the only owner: ``close()`` always ends and reaps it.

    stdout and stderr go to files (no pipe can fill up); the end is collected with ``wait4`` so
    its rusage covers the process and the channel processes it reaped."""

    def __init__(self, args: Sequence[str], workdir: Path, name: str, env: dict[str, str],
                 root: Path = ROOT) -> None:
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.argv = [sys.executable, "-m", "engine", *args]
        self.returncode: int | None = None
        self.rusage: Any = None
        self.peak: dict[str, int] = {}  # max seen of VmHWM, VmRSS, RssAnon, RssShmem
        self.channel_pids: set[int] = set()
        self.done_cpu: float | None = None  # CPU when its channel processes were all reaped
        self.done_machine: tuple[float, float] | None = None  # machine_cpu() at that moment
        self.done_minflt: int | None = None
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                         env=env, cwd=root)
        except BaseException:
            self._out.close()
            self._err.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sample(self, full: bool = True) -> None:
        """Notice the end of the migration (see :meth:`track`); when ``full``, also update the
        RSS peaks and look for new channel processes. A full sample reads several files of
        ``/proc``, about a millisecond of CPU, so the runs take one every :data:`FULL_EVERY`
        polls: the cadence of QEMU's runs, polled with ``query-migrate`` every 50 ms."""
        if self.returncode is None:
            if full:
                for k, v in proc_memory(self.pid).items():
                    self.peak[k] = max(self.peak.get(k, 0), v)
            self.track(refresh=full or not self.channel_pids)

    def track(self, refresh: bool = True) -> None:
        """Record the CPU (``children=True``) at the moment the last channel process has been
        reaped: the migration is over, tearing down guest RAM (about 0.35 CPU s per GiB to
        unmap and unlink here) is not, as QEMU's happens after ``quit``. ``refresh``: list
        the children again (else only check that the known ones are still there)."""
        if self.done_cpu is not None or self.returncode is not None:
            return
        try:
            # Remember every channel process seen: /proc/PID/task/*/children can miss a child
            # for an instant (reparenting between threads), so the end is when all of those
            # are gone (reaped), and no other child is there. A child caught between fork and
            # exec of multiprocessing's resource tracker is dropped once it shows as such.
            if refresh:
                self.channel_pids.update(proc_children(self.pid))
                self.channel_pids = {c for c in self.channel_pids if not _is_resource_tracker(c)}
            if self.channel_pids and not any(os.path.exists(f"/proc/{c}") for c in self.channel_pids):
                self.done_cpu = proc_cpu(self.pid, children=True)
                self.done_minflt = proc_minflt(self.pid, children=True)
                self.done_machine = machine_cpu()
        except OSError:
            pass

    def poll(self) -> bool:
        """True once it has exited (reaped, rusage collected)."""
        if self.returncode is None:
            pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode  # reaped here: Popen must not wait again
                self.rusage = ru
        return self.returncode is not None

    def cpu_total(self) -> float:
        """Process + reaped children, from wait4 (after it exited)."""
        return float(self.rusage.ru_utime + self.rusage.ru_stime)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def json(self) -> dict[str, Any]:
        text = self.stdout().strip().splitlines()
        if not text:
            raise RunFailed(f"engine {self.name} printed no JSON (exit {self.returncode}): {self.stderr().strip()}")
        out: dict[str, Any] = json.loads(text[-1])
        return out

    def close(self) -> None:
        """SIGTERM (the engine cancels and cleans up), then SIGKILL; reaped with deadlines."""
        try:
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                if self.poll():
                    break
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + grace
                while not self.poll() and time.monotonic() < deadline:
                    time.sleep(0.02)
            if not self.poll():
                print(f"compare-qemu: warning: engine {self.name} (pid {self.pid}) not reaped after SIGKILL",
                      file=sys.stderr)
        except ChildProcessError:
            self.returncode = self.returncode if self.returncode is not None else -1
        finally:
            self._out.close()
            self._err.close()


def wait_line(proc: EngineProcess, prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in proc.stderr().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        if proc.poll():
            raise RunFailed(f"engine {proc.name} exited {proc.returncode} before listening: {proc.stderr().strip()}")
        if time.monotonic() >= deadline:
            raise RunFailed(f"engine {proc.name} not listening after {timeout:g}s: {proc.stderr().strip()}")
        time.sleep(0.005)


def _channel_rss(js: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"id": c.get("id"), "peak-rss-kib": c.get("peak-rss-kib"), "private-rss-kib": c.get("private-rss-kib"),
             "cpu-seconds": c.get("cpu-seconds")} for c in js.get("channels", [])]


def run_engine(image: Path, size: int, *, channels: int, compression: str, level: int | None, prealloc: bool,
               workdir: Path, timeout: float, tag: str | None = None, uri: str = "tcp:127.0.0.1:0",
               extra_src: Sequence[str] = (), extra_dst: Sequence[str] = (), root: Path = ROOT) -> dict[str, Any]:
    """One engine -> engine migration of ``image`` through the CLI, both sides run from the
    checkout ``root``. Returns its measurements; raises :class:`RunFailed`. Both processes are
    always ended and reaped."""
    tag = tag or shm_tag()
    env = engine_env(tag, root)
    workdir.mkdir(parents=True, exist_ok=True)
    common = ["--channels", str(channels), "--compression", compression, "--json"]
    dst_args = ["incoming", uri, *common, *extra_dst]
    if prealloc:
        dst_args += ["--ram", f"{ENGINE_BLOCK}={size}", "--prealloc"]
    src_args_tail = [*common, "--ram-image", f"{ENGINE_BLOCK}={image}", *extra_src]
    if level is not None and compression != "none":
        src_args_tail += ["--level", str(level)]
    procs: list[EngineProcess] = []
    try:
        dst = EngineProcess(dst_args, workdir, "engine-destination", env, root)
        procs.append(dst)
        dst_uri = wait_line(dst, "engine: listening on ", 60.0 + 10.0 * size / GiB)
        # + its live children: a pre-allocated destination's channels have mapped the RAM by now
        dst_base = with_live_children(proc_cpu, dst.pid)
        dst_flt0 = with_live_children(proc_minflt, dst.pid)
        src_flt0 = 0
        machine0 = machine_cpu()  # replaced when the source's migration starts
        vm0 = vmstat()
        load = loadavg()
        src = EngineProcess(["migrate", dst_uri, *src_args_tail], workdir, "engine-source", env, root)
        procs.append(src)
        src_base: float | None = None
        polls = 0
        deadline = time.monotonic() + timeout + 30.0 + 5.0 * size / GiB
        while not (src.poll() and dst.poll()):
            if time.monotonic() >= deadline:
                raise RunFailed(f"engine migration not finished after {timeout + 30.0 + 5.0 * size / GiB:g}s")
            if src_base is None and src.returncode is None:
                # The source's migration starts with its first socket: loading the image (and
                # --huge-pages' collapse) opens none, and the migration connects first thing.
                try:
                    cpu = proc_cpu(src.pid, children=True)
                    flt = proc_minflt(src.pid, children=True)
                    if has_socket(src.pid):
                        src_base, src_flt0, machine0, vm0 = cpu, flt, machine_cpu(), vmstat()
                except OSError:
                    pass
                time.sleep(0.002)
                continue
            polls += 1
            full = polls % FULL_EVERY == 0
            src.sample(full)
            dst.sample(full)
            time.sleep(0.01)
        vm = vmstat_delta(vm0)
        exit_machine = machine_cpu()
        if src.returncode != 0 or dst.returncode != 0:
            raise RunFailed(f"engine source exit {src.returncode}: {src.stderr().strip()[-500:]} | "
                            f"destination exit {dst.returncode}: {dst.stderr().strip()[-500:]}")
        if src_base is None:
            raise RunFailed("engine source finished before its start could be sampled")
        sj, dj = src.json(), dst.json()
        if sj.get("status") != "completed":
            raise RunFailed(f"engine source status {sj.get('status')}: {sj.get('error-desc', '')}")
        if not sj.get("total-time"):
            raise RunFailed(f"engine source reports no total-time: {json.dumps(sj)[:2000]}")
        src_ch = sum(c.get("cpu-seconds", 0.0) for c in sj.get("channels", []))
        dst_ch = sum(c.get("cpu-seconds", 0.0) for c in dj.get("channels", []))
        for proc, base, ch in ((src, src_base, src_ch), (dst, dst_base, dst_ch)):
            if proc.done_cpu is not None and proc.done_cpu - base < ch - 0.05:  # seen too early: not the end
                proc.done_cpu = proc.done_minflt = proc.done_machine = None
        src_exit, dst_exit = src.cpu_total() - src_base, dst.cpu_total() - dst_base
        src_cpu = (src.done_cpu if src.done_cpu is not None else src.cpu_total()) - src_base
        dst_cpu = (dst.done_cpu if dst.done_cpu is not None else dst.cpu_total()) - dst_base
        ours = src_cpu + dst_cpu
        ends = [p.done_machine for p in (src, dst) if p.done_machine is not None]
        machine1 = max(ends, key=lambda m: m[1]) if len(ends) == 2 else exit_machine
        return {
            "impl": "engine",
            "status": sj["status"],
            "total-time": sj["total-time"],
            "setup-time": sj.get("setup-time"),
            "downtime": sj.get("downtime"),
            "transferred": sj["ram"]["transferred"],
            "multifd-bytes": sj["ram"].get("multifd-bytes"),
            "cpu-s": round(ours, 3),
            "minor-faults": {
                "source": (src.done_minflt if src.done_minflt is not None else src.rusage.ru_minflt) - src_flt0,
                "destination": (dst.done_minflt if dst.done_minflt is not None else dst.rusage.ru_minflt) - dst_flt0},
            "cpu": {"source": round(src_cpu, 3), "destination": round(dst_cpu, 3),
                    "source-channels": round(src_ch, 3), "destination-channels": round(dst_ch, 3),
                    "source-main": round(src_cpu - src_ch, 3), "destination-main": round(dst_cpu - dst_ch, 3),
                    "to-exit": round(src_exit + dst_exit, 3),
                    "end-seen": [src.done_cpu is not None, dst.done_cpu is not None]},
            "rss": {
                "source-main": src.peak,
                "destination-main": dst.peak,
                "source-channels": _channel_rss(sj),
                "destination-channels": _channel_rss(dj),
            },
            "load": round(load, 2),
            "others-cpu-s": round(max(0.0, machine1[0] - machine0[0] - ours), 2),
            "wall-s": round(machine1[1] - machine0[1], 3),
            "vmstat": vm,
        }
    finally:
        for p in reversed(procs):
            p.close()


def add_run_args(p: argparse.ArgumentParser, *, default_cases: str) -> None:
    """The options every side-by-side script shares (compare-qemu, compare-revisions)."""
    p.add_argument("--size", default="1G", help="guest RAM size (K/M/G suffixes; default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--cases", default=default_cases,
                   help=f"comma-separated subset of {','.join(CASES)} (default {default_cases})")
    p.add_argument("--modes", default=",".join(MODES), help="destination modes: fresh,prealloc (default both)")
    p.add_argument("--channels", type=int, default=4, help="multifd-channels on both sides (default 4)")
    p.add_argument("--level", type=int, default=1, help="zlib/zstd level and lz4 acceleration (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write every run and the summary here")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline for one migration, seconds (default 300)")


def check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Split and check the shared options; ``args.size_bytes`` is the guest size. Errors exit 2
    with argparse's one-line message."""
    from engine.errors import ConfigError
    from engine.params import parse_size

    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for c in args.cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}, expected some of {', '.join(CASES)}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}, expected some of {', '.join(MODES)}")
    if args.rounds < 1 or not 1 <= args.channels <= 255:
        p.error("--rounds must be >= 1 and --channels 1..255")
    try:
        args.size_bytes = parse_size(args.size, "--size")
    except ConfigError as exc:
        p.error(str(exc))
    return args


def write_json(path: Path | None, out: dict[str, Any], prog: str) -> None:
    """``--json FILE``: every run and the summary."""
    if path is not None:
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{prog}: wrote {path}", file=sys.stderr)


def exit_status(runs: Iterable[dict[str, Any]], interrupted: bool) -> int:
    """130 after Ctrl-C, 1 if any run failed, else 0."""
    if interrupted:
        return 130
    return 0 if all(r.get("status") == "completed" for r in runs) else 1
