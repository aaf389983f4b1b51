"""Command line for snapshot files: ``save FILE``, ``restore FILE``, ``inspect`` of snapshots.

:func:`add_parsers` adds ``save`` and ``restore`` to the main parser; :mod:`engine.cli.main`'s
command table calls :func:`cmd_save` / :func:`cmd_restore` (also for ``migrate|incoming
file:PATH``) and :func:`inspect_snapshots`. :func:`main` is a stand-alone entry point for
``save|restore|inspect`` of snapshot files only, with the same errors and exit statuses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ..compression import method_names
from ..errors import ConfigError
from ..memory.ram import block_digest
from ..params import DEFAULT_CHANNELS, DEFAULT_STALL_TIMEOUT, VERSIONED_MACHINE
from ..snapshot.format import describe_snapshot, is_snapshot_file, render_snapshot
from ..wire.packet import format_uuid
from .common import (
    Parser,
    add_guest_args,
    add_precopy_args,
    dump_ram,
    emit,
    params_from_args,
    run_command,
    run_live_job,
    vm_manifest,
)

FILE_SCHEME = "file:"


def _channels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channels", "--multifd-channels", dest="channels", type=int, default=DEFAULT_CHANNELS,
                   metavar="N", help=f"channel processes writing/reading in parallel (default {DEFAULT_CHANNELS})")
    p.add_argument("--json", action="store_true", help="print one JSON object (query-migrate names) instead of a summary")
    p.add_argument("--digest", action="store_true", help="add a BLAKE2b digest of every RAM block to the output")
    p.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                   help=f"deadline for any wait on a channel (default {DEFAULT_STALL_TIMEOUT:g})")


def add_parsers(sub: Any) -> None:
    """Add ``save`` and ``restore`` to an ``add_subparsers()`` object."""
    sv = sub.add_parser("save", help="save a guest's RAM to a snapshot file (live with --dirty-rate)")
    sv.add_argument("file", type=Path, help="the snapshot file to write (replaced if it exists)")
    _channels_arg(sv)
    sv.add_argument("--compression", "--multifd-compression", dest="compression", default="none",
                    metavar="|".join(method_names()), help="compress each 1 MiB group (default none: mapped pages)")
    sv.add_argument("--level", type=int, default=None, help="zlib 0..9 / zstd 0..20 level, lz4 acceleration (default 1)")
    add_guest_args(sv)
    sv.add_argument("--dump", metavar="DIR", type=Path, default=None,
                    help="also write the RAM as it was at stop-and-copy to DIR (files + manifest.json)")
    sv.add_argument("--no-fsync", action="store_true", help="do not fsync before and after the commit")
    add_precopy_args(sv.add_argument_group("live guest (precopy to the file)"),
                     "file bytes/s before stop-and-copy (K/M/G suffixes; default 0 = unlimited)")

    rs = sub.add_parser("restore", help="restore guest RAM from a snapshot file (checks every region)")
    rs.add_argument("file", type=Path, help="the snapshot file to read")
    _channels_arg(rs)
    rs.add_argument("--dump", metavar="DIR", type=Path, default=None, help="write each RAM block to a file in DIR plus DIR/manifest.json")


def file_uri_path(uri: str) -> Path:
    """``file:PATH`` (QEMU's syntax) -> PATH. QEMU's ``,offset=`` suffix is not supported."""
    path = uri[len(FILE_SCHEME):]
    if ",offset=" in path:
        raise ConfigError(f"URI {uri!r}: file: offsets are not supported; give a whole file")
    if not path:
        raise ConfigError(f"URI {uri!r}: expected file:PATH")
    return Path(path)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run the command if it is a snapshot command (or ``migrate|incoming file:PATH``, or
    ``inspect`` of snapshot files only); None if it is not one."""
    cmd = args.command
    if cmd == "save":
        return cmd_save(args, args.file)
    if cmd == "restore":
        return cmd_restore(args, args.file)
    uri = getattr(args, "uri", "")
    if cmd in ("migrate", "incoming") and isinstance(uri, str) and uri.startswith(FILE_SCHEME):
        path = file_uri_path(uri)
        return cmd_save(args, path) if cmd == "migrate" else cmd_restore(args, path)
    if cmd == "inspect" and args.files and all(is_snapshot_file(f) for f in args.files):
        return inspect_snapshots(args.files, as_json=args.json)
    return None


#: options that mean nothing when the far end of a migration is a snapshot file
_NOT_WITH_FILES = (
    ("tls_creds", "--tls-creds secures tcp: and unix: migrations; {file} is a snapshot file, which is not encrypted"),
    ("snapshot", "--snapshot sends a snapshot file to a tcp: or unix: URI; {file} would be another snapshot file"
                 " (copy the file instead)"),
    ("save", "--save checkpoints a tcp: or unix: migration; {file} already is a snapshot file (copy it instead)"),
    ("packet_pages", "--packet-pages sizes the packets of a tcp: or unix: migration; {file} is a snapshot file,"
                     " whose regions have their own size"),
)


def _check_file_options(args: argparse.Namespace, path: Path) -> None:
    for attr, message in _NOT_WITH_FILES:
        if getattr(args, attr, None) is not None:
            raise ConfigError(message.format(file=f"'file:{path}'"))


def cmd_save(args: argparse.Namespace, path: Path) -> int:
    from ..snapshot.jobs import SnapshotSave

    _check_file_options(args, path)
    params = params_from_args(args)
    fsync = not getattr(args, "no_fsync", False)
    out = run_live_job(args, lambda ram, log, guest: SnapshotSave(path, ram, params, tracker=log, guest=guest,
                                                                  fsync=fsync), wait_running=True)
    _emit_snapshot(out, args.json, "snapshot save")
    return 0


def cmd_restore(args: argparse.Namespace, path: Path) -> int:
    from ..snapshot.jobs import SnapshotRestore

    _check_file_options(args, path)
    job = SnapshotRestore(path, params_from_args(args))
    with job.run() as ram:
        out = job.stats.to_json()
        if args.digest:
            out["ram-digest"] = {b.name: block_digest(b) for b in ram}
        ms = job.machine_state
        if ms is not None:
            out["machine"] = ms.machine
        if args.dump is not None:
            # as incoming --dump writes a VM's: the machine and its decoded devices
            dump_ram(ram, args.dump, vm_manifest(args.dump, ms.machine, ms.devices()) if ms is not None else None)
    _emit_snapshot(out, args.json, "snapshot restore")
    return 0


def _emit_snapshot(out: dict[str, Any], as_json: bool, role: str) -> None:
    emit(out, as_json, role)
    if as_json:
        return
    for name, digest in out.get("ram-digest", {}).items():
        print(f"  digest           {name}: {digest}", flush=True)
    if "file-size" in out:
        print(f"  file             {out['file']}: {out['file-size'] / (1 << 20):.1f} MiB"
              + (f", on disk {out['disk-usage'] / (1 << 20):.1f} MiB" if "disk-usage" in out else "")
              + f", compression {out['compression']}", flush=True)


def inspect_snapshots(files: Sequence[Path], *, as_json: bool) -> int:
    """``inspect`` for snapshot files: 0 if all are complete, 1 if one is incomplete or truncated."""
    reports = [describe_snapshot(f) for f in files]
    if as_json:
        print(json.dumps({"files": reports}, indent=2), flush=True)
    else:
        print("\n".join(render_snapshot(r) for r in reports), flush=True)
    return 0 if all(r["status"] == "complete" for r in reports) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``save|restore|inspect``: like ``engine.cli.main``, but ``inspect`` takes
    snapshot files only (anything else gets the snapshot reader's precise error)."""
    parser = Parser(prog="python -m engine", description="snapshot files of guest RAM")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_parsers(sub)
    ins = sub.add_parser("inspect", help="describe snapshot files")
    ins.add_argument("files", nargs="+", type=Path)
    ins.add_argument("--json", action="store_true")

    def body() -> int:
        args = parser.parse_args(argv)
        if args.command == "inspect" and not all(is_snapshot_file(f) for f in args.files):
            for f in args.files:
                describe_snapshot(f)  # raises the precise error for the first bad one
        rc = dispatch(args)
        return 0 if rc is None else rc

    return run_command(body, "snapshot")


# ----------------------------------------------------------------- VM checkpoints

def check_save_path(path: Path) -> None:
    """``incoming --save FILE``: its directory exists and is writable, and FILE is no directory."""
    parent = path.parent
    if path.is_dir():
        raise ConfigError(f"--save {str(path)!r} is a directory, expected a file to write the snapshot to")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "does not exist" if not parent.is_dir() else "is not writable"
        raise ConfigError(f"--save {str(path)!r}: its directory {str(parent)!r} {why}")


def save_received(args: argparse.Namespace, result: Any) -> dict[str, Any]:
    """``incoming --save FILE``: the received RAM and machine state into a snapshot file (with
    the file's own compression); returns what the save reports."""
    from ..params import MigrationParams
    from ..snapshot.jobs import save

    params = MigrationParams(channels=args.channels, compression=args.save_compression,
                             stall_timeout=args.stall_timeout)
    out = save(args.save, result.ram, params, machine_state=result.machine_state, fsync=not args.no_fsync).to_json()
    return {k: out[k] for k in ("file", "compression", "total-time", "file-size", "disk-usage", "format-version")
            if k in out} | {"machine": result.machine_state.machine if result.machine_state else None}


def cmd_migrate_snapshot(args: argparse.Namespace) -> int:
    """``migrate URI --snapshot FILE``: restore the file's RAM, then migrate it with the saved
    machine state around it (configuration section, RAM's section id, device state after RAM),
    so that a QEMU started with ``-incoming defer`` and the same machine only needs ``cont``."""
    from ..snapshot.jobs import SnapshotRestore
    from ..source.migration import Migration

    if args.dirty_rate is not None:
        raise ConfigError("--snapshot sends a saved guest as it was; --dirty-rate would change its RAM under its"
                          " saved device state")
    restore = SnapshotRestore(args.snapshot, params_from_args(args))
    ram = restore.run()
    ms = restore.machine_state
    try:
        if ms is not None:
            if ms.configuration and args.machine not in (None, ms.machine):
                raise ConfigError(f"--machine {args.machine!r}: {str(args.snapshot)!r} is a checkpoint of machine"
                                  f" {ms.machine!r}, whose configuration section is sent as saved")
            if args.machine is None:
                args.machine = ms.machine or None
            if args.uuid is None and any(ms.uuid):
                args.uuid = format_uuid(ms.uuid)
            if args.compat is None and not VERSIONED_MACHINE.match(args.machine or ""):
                _dialect_of(args, ms.dialect)  # speak as the VM's own QEMU did
        params = params_from_args(args)
    except BaseException:
        ram.close()
        raise
    out = run_live_job(args, lambda ram_, log, guest: Migration(args.uri, ram_, params, machine_state=ms,
                                                                trace_file=args.trace), ram=ram)
    out["snapshot"] = {"file": str(args.snapshot), "restore-time": restore.stats.to_json()["total-time"],
                       "machine": ms.machine if ms is not None else None}
    emit(out, args.json, "source")
    return 0


def _dialect_of(args: argparse.Namespace, dialect: dict[str, Any]) -> None:
    """Unset dialect options from what the checkpointed VM's source spoke."""
    if args.zero_page_detection is None and dialect.get("zero-page-detection") in ("legacy", "multifd"):
        args.zero_page_detection = dialect["zero-page-detection"]
    for name in ("multifd-flush-after-each-section", "send-switchover-start"):
        attr = name.replace("-", "_")
        if getattr(args, attr) is None and isinstance(dialect.get(name), bool):
            setattr(args, attr, "on" if dialect[name] else "off")


if __name__ == "__main__":
    sys.exit(main())
