"""``python -m engine inspect FILE...``: decode captured migration bytes into a summary.

Each file is one connection's bytes as the source sent them, told apart by its first four:
``QEVM`` is a main stream, ``11 22 33 44`` a multifd channel (handshake, then packets). A main
stream goes through the destination's own parser, so inspect accepts exactly what ``incoming``
accepts; a channel is walked packet by packet, every payload through the channel's
decompressor; then the files are cross-checked (pages repeated within a sync round or resent
later, one SYNC packet per channel per sync point: each EOS, or each MULTIFD_FLUSH in QEMU 8.0+
streams). A capture cut mid-record is summarised up
to the cut and marked ``truncated`` (:func:`run_inspect` returns 1); bytes that are not
migration bytes (:class:`ConfigError`) or break the format (:class:`RemoteProtocolError`) end
it with one line. What is counted, and how to capture: docs/architecture.md, "inspect".
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..compression import RecvContext, method_for_flag
from ..compression.base import Buffer
from ..compression.registry import method_name_for_flag
from ..errors import ConfigError, MigrationError, RemoteProtocolError, TruncatedError
from ..wire.packet import (
    INIT_SIZE, MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_VERSION, PACKET_FIXED,
    MAX_PACKET_PAGES, PACKET_FIXED_SIZE, PAGES_PER_PACKET, TARGET_PAGE_SIZE, MultiFDInit, format_uuid, header_size,
)
from ..wire.stream import (
    QEMU_VM_FILE_MAGIC, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, Configuration, MainStreamParser, RamEOS, RamFlush,
    RamMemSize, RamPage, RamZeroPages, SectionBegin, SectionFooter, StreamHeader, StreamReader, StreamTail,
)
from ..wire.vmstate import parse_device_state, parse_tail

MAIN_MAGIC = QEMU_VM_FILE_MAGIC.to_bytes(4, "big")
CHANNEL_MAGIC = MULTIFD_MAGIC.to_bytes(4, "big")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"inspect: cannot read {str(path)!r}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- main stream


def inspect_main(path: Path, data: bytes) -> dict[str, Any]:
    """Summary of one main-stream capture."""
    reader = StreamReader.from_bytes(data, chunk=1 << 20)
    parser = MainStreamParser(reader)
    sections: dict[str, Counter[str]] = {}
    records: Counter[str] = Counter()
    per_block: dict[str, Counter[str]] = {}
    blocks: list[dict[str, Any]] = []
    out: dict[str, Any] = {"file": str(path), "kind": "main", "bytes": len(data)}
    header_end = ram_end = 0
    tail: bytes | None = None
    truncated: str | None = None
    continued = 0
    try:
        for ev in parser.events():
            if isinstance(ev, RamZeroPages):
                records["zero_pages"] += len(ev.offsets)
                per_block.setdefault(ev.block, Counter())["zero"] += len(ev.offsets)
            elif isinstance(ev, RamPage):
                records["page"] += 1
                per_block.setdefault(ev.block, Counter())["page"] += 1
            elif isinstance(ev, RamEOS):
                records["eos"] += 1
            elif isinstance(ev, RamFlush):
                records["multifd_flush"] += 1  # QEMU 8.0+: the sync points, instead of the EOS
            elif isinstance(ev, SectionBegin):
                sections.setdefault(ev.idstr, Counter())[ev.kind_name] += 1
                first = int.from_bytes(data[reader.consumed:reader.consumed + 8], "big")
                if first & RAM_SAVE_FLAG_CONTINUE and not first & RAM_SAVE_FLAG_EOS:
                    continued += 1  # the block named in an earlier section still applies (doc 5.4)
            elif isinstance(ev, SectionFooter):
                ram_end = reader.consumed
            elif isinstance(ev, RamMemSize):
                records["mem_size"] += 1
                blocks = [{"name": name, "size": size} for name, size in ev.blocks]
            elif isinstance(ev, StreamHeader):
                out["version"] = ev.version
                header_end = reader.consumed
            elif isinstance(ev, Configuration):
                out["machine"] = ev.machine
                out["configuration_subsections"] = [name for name, _ in ev.subsections]
                header_end = reader.consumed
            elif isinstance(ev, StreamTail):
                tail = ev.data
    except TruncatedError as exc:
        truncated = str(exc)
    out["blocks"] = blocks
    out["sections"] = {idstr: dict(c) for idstr, c in sections.items()}
    out["ram_records"] = {k: records[k] for k in ("mem_size", "zero_pages", "page", "eos")}
    if records["multifd_flush"]:
        out["ram_records"]["multifd_flush"] = records["multifd_flush"]
    out["sections_opening_with_continue"] = continued
    out["ram_pages_by_block"] = {name: {"zero": c["zero"], "page": c["page"]} for name, c in per_block.items()}
    part_bytes = {"header": header_end, "ram": max(0, ram_end - header_end), "device_state": 0, "vmdesc": 0}
    out["eof"] = False
    out["device_sections"] = []
    if tail is not None:
        state, desc = parse_tail(tail)
        part_bytes["device_state"] = len(state)
        part_bytes["vmdesc"] = len(tail) - len(state)
        out["eof"] = state.endswith(b"\0")
        if desc is None and not out["eof"] and truncated is None:
            truncated = f"main channel: end of stream inside the device state ({len(state)} bytes, no EOF, no vmdesc)"
        if desc is not None:
            devices = parse_device_state(state, desc)
            for sec in (devices or {}).get("sections") or []:
                out["device_sections"].append({k: sec[k] for k in ("section_id", "name", "instance_id",
                                                                    "version_id", "size")})
                sections.setdefault("devices", Counter())["FULL"] += 1
            out["sections"] = {idstr: dict(c) for idstr, c in sections.items()}
    out["vmdesc"] = part_bytes["vmdesc"] > 0
    out["part_bytes"] = part_bytes
    out["truncated"] = truncated
    return out


# ------------------------------------------------------------------ multifd channel


@dataclass
class _Sink:
    """A packet whose pages are only counted (implements ``compression.PacketSink``)."""

    payload: memoryview
    normal_pages: int
    delivered: int = 0

    @property
    def next_packet_size(self) -> int:
        return len(self.payload)

    def read_payload(self) -> memoryview:
        return self.payload

    def recv_into_pages(self) -> None:
        self.delivered = len(self.payload)

    def scatter(self, data: Buffer) -> None:
        self.delivered = len(np.frombuffer(data, dtype=np.uint8))


@dataclass
class _Rounds:
    """The pages each channel carried per sync round, as int64 keys (block id << 40 | page)."""

    block_ids: dict[str, int]
    per_channel: list[list[list[np.ndarray]]]

    def key(self, block: str, offsets: np.ndarray) -> np.ndarray:
        bid = self.block_ids.setdefault(block, len(self.block_ids))
        return (offsets.astype(np.int64) >> 12) | (bid << 40)

    def resent(self) -> tuple[int, int]:
        """(pages sent twice within one round, pages sent again in a later round)."""
        n = max((len(r) for r in self.per_channel), default=0)
        within = again = 0
        seen: list[np.ndarray] = []
        for i in range(n):
            parts = [r[i] for r in self.per_channel if i < len(r)]
            keys = np.concatenate([k for part in parts for k in part] or [np.zeros(0, np.int64)])
            uniq = np.unique(keys)
            within += len(keys) - len(uniq)
            seen.append(uniq)
        if seen:
            everything = np.concatenate(seen)
            again = len(everything) - len(np.unique(everything))
        return within, again


def inspect_channel(path: Path, data: bytes, rounds: _Rounds | None = None) -> dict[str, Any]:
    """Summary of one multifd channel capture (``rounds`` collects its pages per sync round)."""
    view = memoryview(data)
    if len(data) < INIT_SIZE:
        raise RemoteProtocolError(
            f"inspect: {path}: received {len(data)} bytes, expected a {INIT_SIZE}-byte multifd handshake"
        )
    init = MultiFDInit.unpack(view[:INIT_SIZE])
    if init.version != MULTIFD_VERSION:
        raise RemoteProtocolError(
            f"inspect: {path}: received handshake version {init.version}, expected {MULTIFD_VERSION}"
        )
    kinds: Counter[str] = Counter()
    flags: Counter[int] = Counter()
    blocks: Counter[str] = Counter()
    nums: list[int] = []
    sizes: list[int] = []
    pages = zero_pages = 0
    comps: set[int] = set()  # compression bits of packets that carry pages
    stale = 0
    decoders: dict[int, RecvContext] = {}
    decode_error: str | None = None
    truncated: str | None = None
    mine: list[list[np.ndarray]] = [[]]  # this channel's page keys, per sync round
    if rounds is not None:
        rounds.per_channel.append(mine)
    header_bytes = 0
    pos = INIT_SIZE
    while pos < len(data):
        if len(data) - pos < PACKET_FIXED_SIZE:
            truncated = f"{path}: ends {len(data) - pos} bytes into a packet header at byte {pos}"
            break
        magic, version, fl, pages_alloc, normal, next_size, packet_num, zero, _, name = PACKET_FIXED.unpack_from(view, pos)
        slots = max(pages_alloc, PAGES_PER_PACKET)  # an engine peer's packet-pages, else QEMU's 128
        hsize = header_size(slots)
        where = f"inspect: {path}: packet at byte {pos}"
        if magic != MULTIFD_MAGIC or version != MULTIFD_VERSION:
            raise RemoteProtocolError(
                f"{where}: received magic {magic:#010x} version {version},"
                f" expected {MULTIFD_MAGIC:#010x} version {MULTIFD_VERSION}"
            )
        if normal + zero > pages_alloc or pages_alloc > MAX_PACKET_PAGES:
            raise RemoteProtocolError(
                f"{where}: received normal_pages {normal} zero_pages {zero} pages_alloc {pages_alloc}, expected"
                f" normal_pages + zero_pages <= pages_alloc <= {MAX_PACKET_PAGES}"
            )
        if len(data) - pos < hsize:
            truncated = f"{path}: ends {len(data) - pos} bytes into a packet header at byte {pos}"
            break
        comp = fl & MULTIFD_FLAG_COMPRESSION_MASK
        payload_len = 0
        if normal:
            payload_len = next_size if comp else normal * TARGET_PAGE_SIZE
        end = pos + hsize + payload_len
        if end > len(data):
            truncated = f"{path}: ends inside the payload of packet_num {packet_num} at byte {pos}"
            break
        nums.append(packet_num)
        header_bytes += hsize
        flags[fl] += 1
        sync = bool(fl & MULTIFD_FLAG_SYNC)
        if normal or zero:
            kinds["merged_sync" if sync else "data"] += 1
            pages += normal
            zero_pages += zero
            block = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
            blocks[block] += normal + zero
            if rounds is not None:
                mine[-1].append(rounds.key(block, np.frombuffer(view, ">u8", normal + zero, pos + PACKET_FIXED_SIZE)))
        if normal:
            comps.add(comp)
            sizes.append(payload_len)
            if decode_error is None:
                decode_error = _decode(decoders, comp, view[pos + hsize:end], normal, packet_num)
        elif not zero:
            kinds["sync" if sync else "empty"] += 1
            if next_size or bytes(name[:1]) != b"\0":
                stale += 1  # leftovers of an earlier packet in the reused header (doc 2.2)
        if sync:
            mine.append([])  # pages after a SYNC belong to the next round
        pos = end
    for ctx in decoders.values():
        ctx.recv_cleanup()
    num_counts = Counter(nums)
    return {
        "file": str(path),
        "kind": "multifd",
        "bytes": len(data),
        "channel": init.channel_id,
        "uuid": format_uuid(init.uuid),
        "packets": len(nums),
        "data_packets": kinds["data"],
        "sync_packets": kinds["sync"],
        "merged_sync_packets": kinds["merged_sync"],
        "empty_packets": kinds["empty"],
        "syncs": kinds["sync"] + kinds["merged_sync"],
        "stale_empty_packets": stale,
        "flags": {f"{f:#x}": n for f, n in sorted(flags.items())},
        "compression": [method_name_for_flag(c) for c in sorted(comps)],
        "normal_pages": pages,
        "zero_pages": zero_pages,  # listed in packets (zero-page-detection=multifd)
        "payload_bytes": sum(sizes),
        "header_bytes": header_bytes,
        "payload_size": ({"min": min(sizes), "max": max(sizes), "mean": round(sum(sizes) / len(sizes))}
                         if sizes else None),
        "packet_num": {"first": nums[0], "last": nums[-1], "min": min(nums), "max": max(nums),
                       "repeated": sum(n - 1 for n in num_counts.values())} if nums else None,
        "ramblocks": dict(blocks),
        "payload_check": decode_error or "ok",
        "truncated": truncated,
    }


def _decode(decoders: dict[int, RecvContext], comp: int, payload: memoryview, normal: int,
            packet_num: int) -> str | None:
    """Run one payload through the channel's decompressor; an error message or None."""
    try:
        ctx = decoders.get(comp)
        if ctx is None:
            ctx = decoders[comp] = method_for_flag(comp).recv_setup()
        sink = _Sink(payload, normal)
        ctx.recv_pages(sink)
    except MigrationError as exc:
        return f"packet_num {packet_num}: {exc}"
    want = normal * TARGET_PAGE_SIZE
    if sink.delivered != want:
        return f"packet_num {packet_num}: received {sink.delivered} bytes of pages, expected {want}"
    return None


# ----------------------------------------------------------------------- together


def inspect_files(files: Sequence[Path]) -> dict[str, Any]:
    """Decode every file and cross-check them; the JSON-able report."""
    if not files:
        raise ConfigError("inspect: no files given")
    reports: list[dict[str, Any]] = []
    rounds = _Rounds({}, [])
    for path in files:
        data = _read(Path(path))
        head = data[:4]
        if head == MAIN_MAGIC:
            reports.append(inspect_main(Path(path), data))
        elif head == CHANNEL_MAGIC:
            reports.append(inspect_channel(Path(path), data, rounds))
        else:
            raise ConfigError(
                f"inspect: {str(path)!r} starts with {head.hex() or 'nothing'},"
                f" expected 5145564d ('QEVM', a main stream) or 11223344 (a multifd channel)"
            )
    mains = [r for r in reports if r["kind"] == "main"]
    chans = sorted((r for r in reports if r["kind"] == "multifd"), key=lambda r: r["channel"])
    totals: dict[str, Any] = {
        "main_streams": len(mains),
        "channels": [r["channel"] for r in chans],
        "multifd_packets": sum(r["packets"] for r in chans),
        "multifd_pages": sum(r["normal_pages"] for r in chans),
        "multifd_bytes": sum(r["bytes"] for r in chans),
        "zero_pages": sum(r["ram_records"]["zero_pages"] for r in mains),
        "multifd_zero_pages": sum(r["zero_pages"] for r in chans),
        "main_page_records": sum(r["ram_records"]["page"] for r in mains),
        "main_bytes": sum(r["bytes"] for r in mains),
    }
    if chans:
        # a page sent twice in one round (QEMU 7.2 does it now and then at batch boundaries) or
        # again in a later round (dirtied again while migrating: the cost of a live guest)
        within, again = rounds.resent()
        totals["pages_repeated_within_round"] = within
        totals["pages_resent_in_later_round"] = again
    if len(mains) == 1 and chans:
        rec = mains[0]["ram_records"]
        points = rec.get("multifd_flush", rec["eos"])
        off = {r["channel"]: r["syncs"] for r in chans if r["syncs"] != points}
        totals["sync_point"] = "MULTIFD_FLUSH" if "multifd_flush" in rec else "EOS"
        totals["sync_rounds"] = points
        totals["sync_consistent"] = not off
        if off:
            totals["sync_mismatch"] = {str(ch): n for ch, n in off.items()}
    return {"files": reports, "totals": totals}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


def render(report: dict[str, Any]) -> str:
    """The human-readable summary."""
    lines: list[str] = []
    for r in report["files"]:
        if r["kind"] == "main":
            lines.append(f"{r['file']}: main stream, {_mib(r['bytes'])}, QEVM v{r.get('version', '?')},"
                         f" machine {r.get('machine', '?')!r}")
            if r["blocks"]:
                lines.append("  RAM blocks: " + ", ".join(f"{b['name']} {_mib(b['size'])}" for b in r["blocks"]))
            for idstr, kinds in r["sections"].items():
                lines.append(f"  sections {idstr}: " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
            rec = r["ram_records"]
            lines.append(f"  ram records: MEM_SIZE {rec['mem_size']}, ZERO {rec['zero_pages']} pages,"
                         f" PAGE {rec['page']}, "
                         + (f"MULTIFD_FLUSH {rec['multifd_flush']} (sync points), EOS {rec['eos']};"
                            if "multifd_flush" in rec else f"EOS {rec['eos']} (sync points);")
                         + f" {r['sections_opening_with_continue']} sections open with CONTINUE")
            for name, c in r["ram_pages_by_block"].items():
                lines.append(f"    {name}: {c['zero']} zero pages, {c['page']} PAGE records")
            if r["device_sections"]:
                lines.append(f"  device sections ({len(r['device_sections'])}): "
                             + ", ".join(f"{d['name']}({d['size']})" for d in r["device_sections"]))
            pb = r["part_bytes"]
            lines.append(f"  bytes: header+config {pb['header']}, ram sections {pb['ram']},"
                         f" device state {pb['device_state']}, vmdesc {pb['vmdesc']};"
                         f" EOF {'yes' if r['eof'] else 'no'}")
        else:
            lines.append(f"{r['file']}: multifd channel {r['channel']}, {_mib(r['bytes'])}, uuid {r['uuid']}")
            lines.append(f"  packets {r['packets']}: data {r['data_packets']}, SYNC {r['sync_packets']},"
                         f" merged data+SYNC {r['merged_sync_packets']}, empty {r['empty_packets']}"
                         f" ({r['stale_empty_packets']} without pages carry stale ramblock/size)")
            lines.append("  flags: " + ", ".join(f"{f} x{n}" for f, n in r["flags"].items())
                         + f"; compression {', '.join(r['compression']) or '-'}")
            lines.append(f"  pages {r['normal_pages']}"
                         + (f" (+ {r['zero_pages']} zero pages listed)" if r["zero_pages"] else "")
                         + f", payload {_mib(r['payload_bytes'])}"
                         + (f" (per packet {r['payload_size']['min']}..{r['payload_size']['max']},"
                            f" mean {r['payload_size']['mean']})" if r["payload_size"] else "")
                         + f", headers {_mib(r['header_bytes'])}")
            if r["packet_num"]:
                pn = r["packet_num"]
                lines.append(f"  packet_num {pn['first']}..{pn['last']} (min {pn['min']}, max {pn['max']},"
                             f" repeated {pn['repeated']})")
            if r["ramblocks"]:
                lines.append("  blocks: " + ", ".join(f"{n} {p} pages" for n, p in r["ramblocks"].items()))
            lines.append(f"  payload check: {r['payload_check']}")
        if r["truncated"]:
            lines.append(f"  TRUNCATED: {r['truncated']}")
    t = report["totals"]
    summary = (f"total: {t['main_streams']} main stream(s), {len(t['channels'])} channel(s) {t['channels']},"
               f" {t['multifd_pages']} pages in {t['multifd_packets']} packets, {t['zero_pages']} zero pages"
               f" and {t['main_page_records']} PAGE records on main"
               + (f", {t['multifd_zero_pages']} zero pages listed in packets" if t["multifd_zero_pages"] else ""))
    if t["channels"]:
        summary += (f"; pages repeated within a sync round {t['pages_repeated_within_round']},"
                    f" resent in a later round {t['pages_resent_in_later_round']}")
    if "sync_rounds" in t:
        summary += (f"; {t['sync_rounds']} sync rounds, "
                    + (f"every channel has one SYNC per {t['sync_point']}" if t["sync_consistent"]
                       else f"MISMATCH (SYNC packets per channel: {t['sync_mismatch']})"))
    lines.append(summary)
    return "\n".join(lines)


def run_inspect(files: Sequence[Path], *, as_json: bool) -> int:
    """The ``inspect`` subcommand: print the report; 0 when every file decoded completely, 1 if truncated."""
    report = inspect_files(files)
    print(json.dumps(report, indent=2) if as_json else render(report), flush=True)
    return 1 if any(r["truncated"] for r in report["files"]) else 0
