"""``python -m engine incoming|migrate|inspect|save|restore``: parsing and dispatch only.

One command table (:data:`COMMANDS`) maps each subcommand to its function; ``migrate
file:PATH`` and ``incoming file:PATH`` are a snapshot save and restore, as in QEMU.
"""


from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..compression import method_names
from ..memory.ram import block_digest
from ..params import (
    ZERO_PAGE_DETECTION,
)
from ..snapshot.format import is_snapshot_file
from . import snapshot
from .common import (
    LISTENING,
    Parser,
    add_channel_args,
    add_tls_args,
    add_guest_args,
    add_precopy_args,
    dump_ram,
    emit,
    params_from_args,
    parse_ram_arg,
    run_command,
    run_live_job,
    stats_line,
    vm_manifest,
)

if TYPE_CHECKING:
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m engine", description="QEMU-compatible (7.2 and 10.0) multifd migration engine")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    inc = sub.add_parser("incoming", help="wait for one migration and receive it")
    inc.add_argument("uri", help="tcp:HOST:PORT, tcp:[IPV6]:PORT or unix:PATH (port 0 picks a free port)")
    add_channel_args(inc)
    inc.add_argument("--listen-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="how long to wait for a source to connect (default 600)")
    inc.add_argument("--ram", action="append", metavar="[NAME=]SIZE", default=None,
                     help="declare a RAM block up front (repeat, in order; like QEMU's -m); MEM_SIZE must match")
    inc.add_argument("--prealloc", action="store_true",
                     help="pre-fault the declared RAM before listening (QEMU's prealloc=on)")
    inc.add_argument("--save", metavar="FILE", type=Path, default=None,
                     help="checkpoint what arrives into a snapshot file: its RAM and the VM's device state, to be"
                          " resumed with migrate --snapshot FILE")
    inc.add_argument("--save-compression", choices=method_names(), default="none",
                     help="the snapshot file's own compression (default none; --compression is the wire's)")
    inc.add_argument("--no-fsync", action="store_true",
                     help="with --save: do not fsync before and after the commit (as QEMU's file migration)")
    add_tls_args(inc, "server")

    mig = sub.add_parser("migrate", help="migrate a guest's RAM to a destination")
    mig.add_argument("uri", help="tcp:HOST:PORT, tcp:[IPV6]:PORT or unix:PATH")
    add_channel_args(mig)
    add_guest_args(mig, snapshot=True)
    mig.add_argument("--level", type=int, default=None,
                     help="multifd-zlib-level / multifd-zstd-level / lz4 acceleration (default 1)")
    mig.add_argument("--machine", default=None,
                     help="machine name for the configuration section (default none; a --snapshot's own)")
    mig.add_argument("--compat", metavar="VERSION", default=None,
                     help="speak the multifd dialect of this QEMU version, 7.2 .. 10.0 (default 7.2, or the"
                          " version of a --machine pc-i440fx-X.Y / pc-q35-X.Y); sets the next three")
    mig.add_argument("--zero-page-detection", choices=ZERO_PAGE_DETECTION, default=None,
                     help="legacy: the migration thread finds zero pages and sends ZERO records (QEMU 7.2);"
                          " multifd: the channels find them and list them in packets (QEMU 9.0); none: send"
                          " every page whole (default: legacy up to --compat 8.2, multifd from 9.0)")
    mig.add_argument("--multifd-flush-after-each-section", choices=("on", "off"), default=None,
                     help="on: the destination syncs at every EOS (QEMU up to 8.0); off: at MULTIFD_FLUSH"
                          " records (default: on up to --compat 8.0)")
    mig.add_argument("--send-switchover-start", choices=("on", "off"), default=None,
                     help="SWITCHOVER_START before the END section (default: on from --compat 10.0)")
    mig.add_argument("--zero-copy-send", action="store_true", default=None,
                     help="QEMU's zero-copy-send capability: the channels send guest pages with MSG_ZEROCOPY"
                          " (Linux, tcp: URIs, multifd-compression none; the kernel still copies on loopback)")
    mig.add_argument("--tcp-congestion", default="auto", metavar="auto|NAME",
                     help="TCP congestion control of the source's sockets: auto uses cubic towards a destination"
                          " on this host (a pacing default such as bbr slows loopback) and the system's default"
                          " otherwise; NAME (cubic, reno, bbr, ...) for every connection (default auto)")
    add_tls_args(mig, "client")
    add_precopy_args(mig.add_argument_group("live guest (precopy)"),
                     "max-bandwidth, headers included (K/M/G suffixes; default 0 = unlimited; QEMU's is 128M)")

    ins = sub.add_parser("inspect", help="decode captured main-stream and multifd channel bytes")
    ins.add_argument("files", nargs="+", type=Path, help="captured streams (main channel and/or multifd channels)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")

    snapshot.add_parsers(sub)
    return parser


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.uri.startswith(snapshot.FILE_SCHEME):  # QEMU's file: migration is a snapshot save
        return snapshot.cmd_save(args, snapshot.file_uri_path(args.uri))
    if args.snapshot is not None:
        return snapshot.cmd_migrate_snapshot(args)
    from ..source.migration import Migration

    params = params_from_args(args)
    out = run_live_job(args, lambda ram, log, guest: Migration(args.uri, ram, params, tracker=log, guest=guest,
                                                               trace_file=args.trace))
    emit(out, args.json, "source")
    return 0


def cmd_incoming(args: argparse.Namespace) -> int:
    if args.uri.startswith(snapshot.FILE_SCHEME):  # ... and incoming from a file a restore
        return snapshot.cmd_restore(args, snapshot.file_uri_path(args.uri))
    from ..destination.incoming import run_incoming

    params = params_from_args(args)
    if args.save is not None:  # before listening: a checkpoint must not arrive with nowhere to go
        snapshot.check_save_path(args.save)

    def listening(uri: str) -> None:
        print(f"{LISTENING}{uri}", file=sys.stderr, flush=True)

    declared = [parse_ram_arg(text) for text in args.ram] if args.ram else None
    stop = threading.Event()
    printer: threading.Thread | None = None

    def on_loader(loader: Any) -> None:
        nonlocal printer
        if args.stats_interval > 0:
            def loop() -> None:
                while not stop.wait(args.stats_interval / 1000):
                    print(json.dumps(stats_line(loader.query())), flush=True)

            printer = threading.Thread(target=loop, name="stats", daemon=True)
            printer.start()

    try:
        result = run_incoming(args.uri, params, listen_timeout=args.listen_timeout, on_listening=listening,
                              keep_ram=args.dump is not None or args.digest or args.save is not None, declared=declared,
                              prealloc=args.prealloc, trace_file=args.trace, on_loader=on_loader)
    finally:
        stop.set()
        if printer is not None:
            printer.join(5)
    out = result.stats.to_json()
    if result.ram is not None:
        with result.ram:
            if args.digest:
                out["ram-digest"] = {b.name: block_digest(b) for b in result.ram}
            if args.dump is not None:
                dump_ram(result.ram, args.dump, vm_manifest(args.dump, result.machine, result.devices))
            if args.save is not None:
                out["snapshot"] = snapshot.save_received(args, result)
    emit(out, args.json, "destination")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if all(is_snapshot_file(f) for f in args.files):
        return snapshot.inspect_snapshots(args.files, as_json=args.json)
    from .inspect import run_inspect

    return run_inspect(args.files, as_json=args.json)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "migrate": cmd_migrate,
    "incoming": cmd_incoming,
    "inspect": cmd_inspect,
    "save": lambda args: snapshot.cmd_save(args, args.file),
    "restore": lambda args: snapshot.cmd_restore(args, args.file),
}


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)

    return run_command(body)
