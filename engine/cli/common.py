"""What every command line entry point shares: options, guest images, output, signals, exits.

Every failure the engine expects ends as one line on stderr (``engine: error: ...``) and a
non-zero exit status, never a traceback: 1 for a failed migration, 2 for bad arguments,
130/143 when cancelled by SIGINT/SIGTERM (:func:`run_command`).
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..compression import method_names
from ..errors import ConfigError, MigrationCancelled, MigrationError
from ..memory.ram import BlockSpec, GuestRam, block_digest, safe_file_name
from ..memory.workload import DIRTY_PATTERNS, FILLS, fill_pages
from ..params import (
    DEFAULT_CHANNELS,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_STALL_TIMEOUT,
    MigrationParams,
    parse_size,
)
from ..stats import human_summary
from ..wire.packet import MAX_PACKET_PAGES, PAGES_PER_PACKET, TARGET_PAGE_SIZE

if TYPE_CHECKING:
    from ..precopy import BackgroundJob


DEFAULT_BLOCK = "pc.ram"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"engine: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_channel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", "--multifd-channels", dest="channels", type=int, default=DEFAULT_CHANNELS,
                   metavar="N", help=f"multifd-channels (default {DEFAULT_CHANNELS})")
    p.add_argument("--compression", "--multifd-compression", dest="compression", default="none",
                   metavar="|".join(method_names()), help="multifd-compression (default none)")
    p.add_argument("--uuid", default=None, help="uuid for the channel handshake (default all zeros, as QEMU's)")
    p.add_argument("--packet-pages", type=int, default=None, metavar="N",
                   help=f"pages per multifd packet: {PAGES_PER_PACKET} (QEMU's, the default) up to {MAX_PACKET_PAGES},"
                        " for an engine peer that sets the same (fewer, bigger packets: less CPU per GiB)")
    p.add_argument("--dump", metavar="DIR", type=Path, default=None,
                   help="write each RAM block to a file in DIR plus DIR/manifest.json")
    p.add_argument("--json", action="store_true", help="print one JSON object (query-migrate names) instead of a summary")
    p.add_argument("--digest", action="store_true",
                   help="add a BLAKE2b digest of every RAM block (after the migration) to the output")
    p.add_argument("--trace", metavar="FILE", type=Path, default=None,
                   help="write a Chrome trace-event JSON profile (Perfetto, chrome://tracing): one track per process")
    p.add_argument("--stats-interval", metavar="MS", type=int, default=0,
                   help="print a JSON line of statistics every MS milliseconds while migrating")
    p.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="SECONDS",
                   help=f"deadline for connecting and each channel handshake (default {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help=f"deadline for any single wait on the peer or a channel (default {DEFAULT_STALL_TIMEOUT:g})")


def add_tls_args(p: argparse.ArgumentParser, endpoint: str) -> None:
    """QEMU's tls-creds-x509 directory and, per side, tls-hostname or tls-authz."""
    from ..runtime.tls import CA_CERT, ENDPOINT_FILES

    files = ", ".join((CA_CERT, *ENDPOINT_FILES[endpoint]))
    tls = p.add_argument_group("TLS (QEMU's tls-creds-x509)")
    tls.add_argument("--tls-creds", metavar="DIR", default=None,
                     help=f"TLS on every channel with the files in DIR: {files} (default: plain text)")
    if endpoint == "client":
        tls.add_argument("--tls-hostname", metavar="NAME", default=None,
                         help="the name the destination's certificate must carry (default: the URI's host)")
    else:
        tls.add_argument("--tls-authz", metavar="DN", action="append", default=None,
                         help="accept only sources whose certificate DN is DN, or matches it as a glob"
                              " (repeatable; e.g. 'CN=*.example.com,O=Example'; default: any the CA signed)")


def add_guest_args(p: argparse.ArgumentParser, *, snapshot: bool = False) -> None:
    """Where the guest's RAM comes from (``migrate`` and ``save``; ``migrate`` also takes a snapshot file)."""
    src = p.add_mutually_exclusive_group(required=True)
    if snapshot:
        src.add_argument("--snapshot", metavar="FILE", type=Path, default=None,
                         help="send a saved snapshot: its RAM, and the machine's device state when it has one"
                              " (a VM checkpointed with incoming --save), replayed as the source QEMU sent it")
    src.add_argument("--ram-image", action="append", metavar="[NAME=]PATH",
                     help=f"a RAM block from a file (repeat for several; default name {DEFAULT_BLOCK})")
    src.add_argument("--ram-size", metavar="SIZE", help="a generated guest of SIZE bytes (K/M/G suffixes)")
    p.add_argument("--fill", choices=FILLS, default="mixed", help="content of a --ram-size guest (default mixed)")
    p.add_argument("--seed", type=int, default=0, help="seed for --fill and the workload (default 0)")
    p.add_argument("--huge-pages", action="store_true",
                   help="back the guest's RAM with 2 MiB pages before it starts (MADV_COLLAPSE, Linux 6.1+):"
                        " takes time first, then every process maps the RAM with fewer page-table entries")


def add_precopy_args(live: Any, bandwidth_help: str) -> None:
    """The running guest and the precopy parameters (``migrate`` and ``save``)."""
    live.add_argument("--dirty-rate", metavar="BYTES/s", default=None,
                      help="run a guest workload dirtying this many bytes/s (K/M/G suffixes; 0 = as fast as it can)")
    live.add_argument("--dirty-pattern", choices=DIRTY_PATTERNS, default="uniform",
                      help="where the workload writes (default uniform)")
    live.add_argument("--writers", type=int, default=1, metavar="K", help="workload writer processes (default 1)")
    live.add_argument("--max-bandwidth", metavar="BYTES/s", default="0", help=bandwidth_help)
    live.add_argument("--downtime-limit", type=int, default=300, metavar="MS", help="downtime-limit in ms (default 300)")
    live.add_argument("--auto-converge", action="store_true", help="throttle the guest when it dirties too fast")
    live.add_argument("--cpu-throttle-initial", type=int, default=20, metavar="PCT", help="default 20")
    live.add_argument("--cpu-throttle-increment", type=int, default=10, metavar="PCT", help="default 10")
    live.add_argument("--max-cpu-throttle", type=int, default=99, metavar="PCT", help="default 99")
    live.add_argument("--max-iterations", type=int, default=100, metavar="N",
                      help="fail if not converged after N iterations (default 100)")
    live.add_argument("--max-time", type=float, default=0.0, metavar="SECONDS",
                      help="fail if not completed after this long (default 0 = no limit)")


def params_from_args(args: argparse.Namespace) -> MigrationParams:
    """MigrationParams from whichever of its fields this command's options set (the option
    ``--max-bandwidth`` fills ``max_bandwidth`` and so on); the rest keep their defaults."""
    names = {f.name for f in dataclasses.fields(MigrationParams) if f.init}
    given = {name: value for name, value in vars(args).items() if name in names and value is not None}
    if "uuid" in given:
        given["uuid"] = MigrationParams.uuid_from_text(given["uuid"])
    for name in ("multifd_flush_after_each_section", "send_switchover_start"):
        if name in given:
            given[name] = given[name] == "on"
    if "max_bandwidth" in given:
        given["max_bandwidth"] = parse_size(given["max_bandwidth"], "--max-bandwidth")
    return MigrationParams(**given)


def parse_ram_arg(text: str) -> BlockSpec:
    """``[NAME=]SIZE`` for a declared destination block."""
    name, eq, size = text.rpartition("=")
    if not eq:
        name = DEFAULT_BLOCK
    nbytes = parse_size(size, f"--ram {text!r} size")
    return BlockSpec(name, nbytes)


def parse_image_arg(text: str) -> tuple[str, Path]:
    name, eq, path = text.partition("=")
    if not eq:
        return DEFAULT_BLOCK, Path(text)
    if not name:
        raise ConfigError(f"--ram-image {text!r}: empty block name before '='")
    return name, Path(path)


def load_images(items: Sequence[str]) -> GuestRam:
    specs: list[BlockSpec] = []
    paths: list[Path] = []
    for item in items:
        name, path = parse_image_arg(item)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ConfigError(f"--ram-image {item!r}: cannot read {str(path)!r}: {exc.strerror}") from None
        if not path.is_file():
            raise ConfigError(f"--ram-image {item!r}: {str(path)!r} is not a regular file")
        if size == 0 or size % TARGET_PAGE_SIZE:
            raise ConfigError(
                f"--ram-image {item!r}: {size} bytes, expected a positive multiple of {TARGET_PAGE_SIZE}"
            )
        specs.append(BlockSpec(name, size))
        paths.append(path)
    ram = GuestRam.create(specs)
    try:
        for block, path in zip(ram, paths):
            with open(path, "rb", buffering=0) as f:
                view = block.buf
                got = 0
                while got < block.size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ConfigError(f"RAM image {str(path)!r} shrank while being read")
                    got += n
    except BaseException:
        ram.close()
        raise
    return ram


def generated_ram(size_text: str, fill: str, seed: int) -> GuestRam:
    size = parse_size(size_text, "--ram-size")
    if size <= 0 or size % TARGET_PAGE_SIZE:
        raise ConfigError(f"--ram-size {size_text!r} is {size} bytes, expected a positive multiple of {TARGET_PAGE_SIZE}")
    ram = GuestRam.create([BlockSpec(DEFAULT_BLOCK, size)])
    try:
        fill_pages(ram.blocks[0], fill, seed)
    except BaseException:
        ram.close()
        raise
    return ram


def dump_ram(ram: GuestRam, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Write each block to ``directory`` and a ``manifest.json`` listing them in order."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, block in enumerate(ram):
            fname = safe_file_name(i, block.name)
            with open(directory / fname, "wb") as f:
                f.write(block.buf)
            entries.append({"name": block.name, "file": fname, "size": block.size})
        manifest: dict[str, Any] = {"blocks": entries}
        if extra:
            manifest.update(extra)
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"--dump {str(directory)!r}: {exc.strerror or exc}") from None


def emit(stats: dict[str, Any], as_json: bool, role: str) -> None:
    if as_json:
        print(json.dumps(stats), flush=True)
    else:
        print(human_summary(stats, role), flush=True)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def progress_line(q: dict[str, Any]) -> str:
    """One line of live progress from a ``Migration.query()`` snapshot."""
    ram = q["ram"]
    its = q.get("iterations") or []
    rate = ram["mbps"] * 1e6 / 8 / (1 << 20)
    dirty = f"{its[-1]['dirty-pages-rate'] * TARGET_PAGE_SIZE / (1 << 20):.1f} MiB/s" if its else "-"
    return (f"{q['status']:<9} iteration {q.get('iteration', len(its))} | transferred {mib(ram['transferred'])}"
            f" | remaining {mib(ram['remaining'])} | {rate:.0f} MiB/s | dirty {dirty}"
            f" | expected downtime {q.get('expected-downtime', 0)} ms | throttle {q.get('cpu-throttle-percentage', 0)}%")


def stats_line(q: dict[str, Any]) -> dict[str, Any]:
    """The periodic ``--stats-interval`` record: query-migrate minus the per-iteration list."""
    line = {k: v for k, v in q.items() if k != "iterations"}
    line["time"] = round(time.time(), 3)
    return line


def run_live_job(args: argparse.Namespace, make_job: Callable[[GuestRam, Any, Any], BackgroundJob], *,
                 wait_running: bool = False, ram: GuestRam | None = None) -> dict[str, Any]:
    """What ``migrate`` and ``save`` share: the guest (RAM images or a generated guest, with a
    workload when ``--dirty-rate`` is given), the job, a progress line on a terminal,
    ``--stats-interval`` lines, cancel on Ctrl-C / SIGTERM, then ``--dump`` and ``--digest``.
    ``ram``: the guest's RAM already loaded (this function closes it). Returns the final
    ``query-migrate`` dict."""
    from ..memory.dirty import DirtyLog
    from ..memory.workload import Workload, WorkloadSpec

    spec = None
    if getattr(args, "dirty_rate", None) is not None:
        spec = WorkloadSpec(dirty_rate=parse_size(args.dirty_rate, "--dirty-rate"), pattern=args.dirty_pattern,
                            writers=args.writers, seed=args.seed)
    if ram is None:
        ram = load_images(args.ram_image) if args.ram_image else generated_ram(args.ram_size, args.fill, args.seed)
    show = sys.stderr.isatty() and not args.json
    stats_interval = getattr(args, "stats_interval", 0)
    interval = stats_interval / 1000 if stats_interval > 0 else None
    tick = min(0.25, interval) if interval else 0.25
    with ram:
        # before the writers fork, so that they inherit the 2 MiB-aligned mapping
        huge = ram.use_huge_pages() if args.huge_pages else None
        log = DirtyLog(ram) if spec else None
        workload = Workload(ram, spec, log).start() if spec else None
        try:
            if workload is not None and wait_running:
                _wait_running(workload)
            # leaving the block on Ctrl-C / SIGTERM cancels the job and waits for its shutdown
            with make_job(ram, log, workload) as job:
                next_stats = time.monotonic() + (interval or 0)
                try:
                    while not job.wait_done(tick):
                        if workload is not None:
                            workload.check()
                        if show:
                            print("\r" + progress_line(job.query()).ljust(120), end="", file=sys.stderr, flush=True)
                        if interval and time.monotonic() >= next_stats:
                            next_stats += interval
                            print(json.dumps(stats_line(job.query())), flush=True)
                finally:
                    if show:
                        print(file=sys.stderr)
                job.wait()
            if args.dump:
                dump_ram(ram, args.dump)
            out = job.query()
            if huge is not None:  # what --huge-pages could collapse (0: the kernel could not)
                out["huge-pages-bytes"] = huge
            if args.digest:
                out["ram-digest"] = {b.name: block_digest(b) for b in ram}
            return out
        finally:
            if workload is not None:
                workload.close()


def _wait_running(workload: Any, timeout: float = 10.0) -> None:
    """Start once the guest really runs (its writers have written), so that a live job is
    live from its first iteration."""
    deadline = time.monotonic() + timeout
    while workload.pages_written() == 0 and time.monotonic() < deadline:
        workload.check()
        time.sleep(0.005)


def vm_manifest(directory: Path, machine: str | None, devices: Any) -> dict[str, Any]:
    """What a dump's manifest says of a VM besides its RAM: the machine, and ``devices.json``
    (written here) when there are device sections."""
    extra: dict[str, Any] = {"machine": machine}
    if devices is not None:
        extra["devices"] = write_devices(directory, devices)
    return extra


def write_devices(directory: Path, devices: Any) -> str:
    """``devices.json`` in the dump directory; returns its name for the manifest."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "devices.json").write_text(json.dumps(devices, indent=2) + "\n")
    except OSError as exc:
        raise ConfigError(f"--dump {str(directory)!r}: {exc.strerror or exc}") from None
    return "devices.json"


LISTENING = "engine: listening on "


def wait_for_listening(proc: Any, timeout: float) -> tuple[str, bytes]:
    """For programs that start ``incoming`` with ``stderr=PIPE``: wait for the line naming the
    bound URI. Returns (uri, stderr bytes read so far); raises MigrationTimeout otherwise."""
    import selectors

    from ..errors import MigrationTimeout

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(0.1):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(LISTENING):
                    return line.removeprefix(LISTENING).strip(), buf
    finally:
        sel.close()
    raise MigrationTimeout(f"the destination did not start listening: {buf.decode(errors='replace').strip()}")


def run_command(body: Callable[[], int], what: str = "migration") -> int:
    """Run one command the way every entry point does: SIGTERM and Ctrl-C cancel it, and every
    failure is one ``engine: error:`` line with exit status 1 (143/130 after SIGTERM/SIGINT,
    141 when stdout was closed; argparse errors exit 2 on their own)."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise MigrationCancelled(f"{what} cancelled by SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return body()
    except MigrationCancelled as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"engine: error: {what} cancelled by SIGINT", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed (e.g. piped into head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except MigrationError as exc:
        print(f"engine: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
