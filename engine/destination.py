"""The destination: accept and classify connections, load the main stream, run the barrier.

Theory of operation
-------------------
:func:`accept_migration` listens and tells connections apart by their first bytes, as QEMU 8.0+
does (``QEVM`` = main channel, ``0x11223344`` = a multifd channel, mapped by the id in its
handshake), so the order of connects does not matter (a QEMU 7.2 source connects the main
channel first and works either way). A connection that sends neither within the handshake
deadline, or sends something else, is dropped without disturbing the migration (and counted
in the error if the migration's own channels then fail to arrive in time: a QEMU 7.2
destination would freeze on such a connection instead).

The loader runs in this process's main thread. It pulls events from the main-stream parser;
its reads wait on the main socket, the channel processes' event pipes and sentinels, and the
listener together, so a channel failure or a stray connection is handled while the main
channel is quiet. MEM_SIZE creates the RAM blocks (shared memory) and forks the N channel
processes; ZERO and PAGE records are applied here; each EOS runs the sync barrier
(:meth:`RecvChannels.barrier`). After the stream's tail (device state, EOF, vmdesc) every
channel must end on a packet boundary. The device sections are decoded through the vmdesc
(:mod:`engine.vmstate`) once everything has arrived; a QEMU source that is cancelled shuts its
sockets down mid-stream, which is reported as such (not as a malformed record).

This process owns the listener, the RAM and the channel processes; ``run_incoming``'s
``finally`` releases all three on every path.
"""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import (
    ChannelError,
    ConfigError,
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    RemoteProtocolError,
    TruncatedError,
)
from .params import MigrationParams
from .ram import BlockSpec, GuestRam, prefault
from .recv_channels import RecvChannels
from .stats import MigrationStats
from .stream import (
    QEMU_VM_EOF,
    QEMU_VM_VMDESCRIPTION,
    Configuration,
    MainStreamParser,
    RamEOS,
    RamMemSize,
    RamPage,
    RamZeroPages,
    SectionBegin,
    StreamReader,
    StreamTail,
)
from .vmstate import parse_device_state
from .trace import BARRIER, Trace, now_ns, write_trace
from .transport import Deadline, UnixAddress, bound_uri, ensure_fd_budget, listen, parse_uri
from .wire import INIT_SIZE, MULTIFD_MAGIC, TARGET_PAGE_BITS, MultiFDInit, validate_init

QEVM = b"QEVM"
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"engine: {msg}", file=sys.stderr, flush=True)


@dataclass
class Accepted:
    main: socket.socket
    channels: list[socket.socket]
    connect_time: float
    #: connections accepted but not yet identified when the migration's own were complete
    pending: dict[socket.socket, float] = field(default_factory=dict)


def _classify(conn: socket.socket, params: MigrationParams, chans: dict[int, socket.socket]) -> str | None:
    """'main', 'multifd', 'stray' or None (need more bytes). Raises on a bad multifd handshake."""
    try:
        head = conn.recv(INIT_SIZE, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return "stray"
    if not head:
        return "stray"
    if len(head) < 4:
        return None if QEVM.startswith(head) or MULTIFD_MAGIC_BYTES.startswith(head) else "stray"
    if head[:4] == QEVM:
        return "main"
    if head[:4] == MULTIFD_MAGIC_BYTES:
        if len(head) < INIT_SIZE:
            return None
        init = MultiFDInit.unpack(conn.recv(INIT_SIZE))
        ch = validate_init(init, expected_uuid=params.uuid, channels=params.channels, connected=set(chans))
        chans[ch] = conn
        return "multifd"
    return "stray"


def accept_migration(listener: socket.socket, params: MigrationParams, *, listen_timeout: float, log: Log,
                     cancel: threading.Event | None = None) -> Accepted:
    """Wait for one migration: its main channel and all N multifd channels."""
    pending: dict[socket.socket, float] = {}
    chans: dict[int, socket.socket] = {}
    main: socket.socket | None = None
    first: float | None = None
    wait_all: Deadline | None = None
    listen_deadline = Deadline(listen_timeout)
    silent = 0  # connections dropped because they sent no handshake in time
    ok = False

    def no_handshake() -> str:
        n = silent + len(pending)  # still-unidentified connections have been silent as long
        if not n:
            return ""
        return f"; {n} connection{'s' if n > 1 else ''} sent no handshake within {params.handshake_timeout:g}s"

    try:
        while main is None or len(chans) < params.channels:
            if cancel is not None and cancel.is_set():
                raise MigrationCancelled("incoming migration cancelled")
            now = time.monotonic()
            if wait_all is None and listen_deadline.expired():
                raise MigrationTimeout(f"no migration arrived within {listen_timeout:g}s{no_handshake()}")
            if wait_all is not None and wait_all.expired():
                have = "the main channel" if main is not None else "no main channel"
                raise MigrationTimeout(
                    f"received {have} and {len(chans)} of {params.channels} multifd channels within"
                    f" {params.handshake_timeout:g}s (missing channel ids"
                    f" {sorted(set(range(params.channels)) - set(chans))}{no_handshake()})"
                )
            for conn, dl in list(pending.items()):
                if now >= dl:
                    log(f"dropped a connection that sent no handshake within {params.handshake_timeout:g}s")
                    del pending[conn]
                    conn.close()
                    silent += 1
            ready = mpc.wait([listener, *pending], 0.2)
            for obj in ready:
                if obj is listener:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    pending[conn] = time.monotonic() + params.handshake_timeout
                    if first is None:
                        first = time.monotonic()
                    continue
                conn = obj  # type: ignore[assignment]
                kind = _classify(conn, params, chans)
                if kind is None:
                    continue
                del pending[conn]
                if kind == "main" and main is None:
                    main = conn
                elif kind == "multifd":
                    pass
                else:
                    log("dropped a connection that is neither a main nor a multifd channel" if kind == "stray"
                        else "dropped a second main-channel connection")
                    conn.close()
                    continue
                if wait_all is None:
                    wait_all = Deadline(params.handshake_timeout)
        ok = True
    finally:
        if not ok:
            for conn in pending:
                conn.close()
            for conn in chans.values():
                conn.close()
            if main is not None:
                main.close()
    assert main is not None and first is not None
    socks = [chans[i] for i in range(params.channels)]
    for s in [main, *socks]:
        s.setblocking(True)
    return Accepted(main, socks, first, pending)


@dataclass
class IncomingResult:
    stats: MigrationStats
    ram: GuestRam | None = None
    machine: str | None = None
    tail: bytes = b""
    vmdesc: dict[str, Any] | None = None
    #: device sections after RAM, decoded through the vmdesc (None when the stream had none)
    devices: Any = None


class Loader:
    """Applies main-stream events to guest RAM and runs the sync barrier."""

    def __init__(self, acc: Accepted, params: MigrationParams, listener: socket.socket | None, log: Log, *,
                 declared: GuestRam | None = None, cancel: threading.Event | None = None,
                 trace: Trace | None = None) -> None:
        self.acc = acc
        self.params = params
        self.listener = listener
        self.log = log
        self.declared = declared  # RAM set up before listening (--ram); MEM_SIZE must match it
        self.cancel = cancel
        self.trace = trace
        self.ram: GuestRam | None = None
        self.channels: RecvChannels | None = None
        self.stats = MigrationStats()
        self.stats.start = acc.connect_time
        self.machine: str | None = None
        self.tail = b""
        self.main_bytes = 0
        self.main_normal = 0  # pages that came whole on the main channel (PAGE records)
        self.main_zero = 0  # ZERO records
        self.main_eof = False
        self.section = "the stream header"

    # -- reading the main socket while watching everything else

    def _fill(self, view: memoryview) -> int:
        main = self.acc.main
        deadline = time.monotonic() + self.params.stall_timeout
        while True:
            handles: list[Any] = [main]
            if self.channels is not None:
                handles += self.channels.event_handles
            if self.listener is not None:
                handles.append(self.listener)
            handles += self._extras_due()
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationTimeout(
                    f"main channel: nothing received for {self.params.stall_timeout:g}s (in {self.section})"
                )
            if self.cancel is not None and self.cancel.is_set():
                raise MigrationCancelled("incoming migration cancelled")
            ready = mpc.wait(handles, min(left, 0.5))
            if self.channels is not None and any(h is not main and h is not self.listener for h in ready):
                self.channels.poll(0)
            if self.listener is not None and self.listener in ready:
                conn, _ = self.listener.accept()
                conn.setblocking(False)
                self.acc.pending[conn] = time.monotonic() + self.params.handshake_timeout
            for h in ready:
                if h in self.acc.pending:
                    self._extra_connection(h)
            if main in ready:
                try:
                    n = main.recv_into(view)
                except OSError as exc:
                    raise ChannelError(f"main channel: receive failed: {exc.strerror or exc}") from exc
                self.main_bytes += n
                self.main_eof = n == 0
                return n

    def _extras_due(self) -> list[socket.socket]:
        """Stray connections still being identified; drops those past their deadline."""
        now = time.monotonic()
        for conn, dl in list(self.acc.pending.items()):
            if now >= dl:
                self.log(f"dropped a connection that sent no handshake within {self.params.handshake_timeout:g}s")
                del self.acc.pending[conn]
                conn.close()
        return list(self.acc.pending)

    def _extra_connection(self, conn: socket.socket) -> None:
        """A connection beyond the migration's 1 + N: a channel id error is fatal, the rest is ignored."""
        everyone = {i: conn for i in range(self.params.channels)}
        try:
            kind = _classify(conn, self.params, everyone)
        except BaseException:
            del self.acc.pending[conn]
            conn.close()
            raise
        if kind is None:
            return
        del self.acc.pending[conn]
        conn.close()
        self.log("extra incoming migration connection; ignoring")

    # -- applying events

    def run(self) -> None:
        try:
            self._run()
        except TruncatedError as exc:
            if not self.main_eof:
                raise
            # A QEMU source that is cancelled (migrate_cancel) or fails shuts its sockets down
            # mid-stream; say so in one line instead of only naming the record that was cut.
            detail = str(exc).removeprefix("main channel: ")
            raise TruncatedError(
                f"main channel: connection closed by the source before the end of the migration,"
                f" in {self.section}: {detail}"
            ) from exc

    def _run(self) -> None:
        reader = StreamReader(self._fill)
        parser = MainStreamParser(reader)
        stats = self.stats
        for ev in parser.events():
            if isinstance(ev, RamZeroPages):
                self._zero(ev)
            elif isinstance(ev, RamPage):
                self._page(ev)
            elif isinstance(ev, RamEOS):
                if self.channels is None:
                    raise RemoteProtocolError("main channel: received EOS before MEM_SIZE set up the RAM blocks")
                t0 = now_ns()
                self.channels.barrier(self.section)
                if self.trace is not None:
                    self.trace.span(BARRIER, t0)
                stats.ram.dirty_sync_count += 1
            elif isinstance(ev, SectionBegin):
                self.section = f"ram section {ev.section_id} ({ev.kind_name})"
            elif isinstance(ev, RamMemSize):
                self._mem_size(ev)
            elif isinstance(ev, Configuration):
                self.machine = ev.machine
            elif isinstance(ev, StreamTail):
                self.tail = ev.data
        if self.ram is None:
            raise RemoteProtocolError("main channel: the stream ended without a ram section (no MEM_SIZE)")
        if not parser.ram_ended:
            raise RemoteProtocolError("main channel: the stream ended before the ram END section")
        assert self.channels is not None
        self.channels.finish(self.params.stall_timeout)

    def _mem_size(self, ev: RamMemSize) -> None:
        if self.ram is not None:
            if list(ev.blocks) == [(b.name, b.size) for b in self.ram]:
                return
            raise RemoteProtocolError("main channel: received a second MEM_SIZE with a different block list")
        if self.declared is not None:
            want = [(b.name, b.size) for b in self.declared]
            if list(ev.blocks) != want:
                raise RemoteProtocolError(
                    f"main channel: received MEM_SIZE blocks {list(ev.blocks)}, expected the declared {want}"
                )
            self.ram = self.declared
        else:
            specs = [BlockSpec(name, size) for name, size in ev.blocks]
            self.ram = GuestRam.create(specs)
        self.stats.ram.total = self.ram.total_size
        others: list[Any] = [self.acc.main]
        if self.listener is not None:
            others.append(self.listener)
        self.channels = RecvChannels(self.acc.channels, self.ram, self.params.method,
                                     stall_timeout=self.params.stall_timeout, close_in_children=others,
                                     tracing=self.trace is not None)
        self.stats.setup_time = time.monotonic() - self.stats.start
        self.stats.status = "active"

    def _zero(self, ev: RamZeroPages) -> None:
        assert self.ram is not None and self.channels is not None
        idx = ev.offsets >> TARGET_PAGE_BITS
        if ev.fill:
            self.ram[ev.block].pages[idx] = ev.fill
        else:
            self.channels.held.zero_pages(ev.block, idx)
        self.main_zero += len(ev.offsets)

    def _page(self, ev: RamPage) -> None:
        assert self.ram is not None and self.channels is not None
        i = ev.offset >> 12
        self.ram[ev.block].pages[i] = np.frombuffer(ev.data, dtype=np.uint8)
        self.main_normal += 1

    def refresh(self, *, live: bool = True) -> MigrationStats:
        """Bring the counters up to date: the channels' (read live from their shared counters,
        or as :meth:`close` left them) plus what came on the main channel."""
        st = self.stats
        if live and self.channels is not None:
            st.channels = self.channels.stats()
        st.ram.main_bytes = self.main_bytes
        st.ram.multifd_bytes = sum(c.bytes for c in st.channels)
        st.ram.normal = self.main_normal + sum(c.normal_pages for c in st.channels)
        st.ram.duplicate = self.main_zero + sum(c.zero_pages for c in st.channels)
        return st

    def query(self) -> dict[str, Any]:
        """A query-migrate-shaped snapshot of the destination (safe from another thread)."""
        return self.refresh().to_json()

    def write_trace(self, path: Path) -> None:
        assert self.trace is not None
        tracks = [(self.trace.name, self.trace.pid, Trace.records(self.trace.to_bytes()))]
        if self.channels is not None:
            tracks += [(name, pid, Trace.records(data)) for name, pid, data in sorted(self.channels.traces)]
        try:
            write_trace(path, tracks, "multifd destination")
        except OSError as exc:
            raise ConfigError(f"--trace {str(path)!r}: {exc.strerror or exc}") from None

    def close(self, ok: bool) -> None:
        for conn in self.acc.pending:
            conn.close()
        self.acc.pending.clear()
        if self.channels is not None:
            self.stats.channels = self.channels.stats()
            self.channels.close(graceful=ok)
        for s in [self.acc.main, *self.acc.channels]:
            s.close()


def parse_tail(tail: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Split the stream tail into device-state bytes (up to and including EOF) and the vmdesc."""
    n = len(tail)
    for pos in range(n - 5, -1, -1):
        if tail[pos] == QEMU_VM_VMDESCRIPTION and int.from_bytes(tail[pos + 1:pos + 5], "big") == n - pos - 5:
            if pos == 0 or tail[pos - 1] != QEMU_VM_EOF:
                continue
            try:
                desc = json.loads(tail[pos + 5:])
            except (ValueError, RecursionError):
                continue
            return tail[:pos], desc
    return tail, None


def run_incoming(
    uri: str,
    params: MigrationParams,
    *,
    listen_timeout: float = 600.0,
    log: Log = _stderr,
    on_listening: Callable[[str], None] | None = None,
    keep_ram: bool = False,
    declared: Sequence[BlockSpec] | None = None,
    prealloc: bool = False,
    cancel: threading.Event | None = None,
    trace_file: str | Path | None = None,
    on_loader: Callable[[Loader], None] | None = None,
) -> IncomingResult:
    """Receive one migration on ``uri``. With ``keep_ram`` the caller owns (and must close) ``result.ram``.

    ``declared`` sets the RAM blocks up front (QEMU's ``-m``): the incoming MEM_SIZE list must
    match it; with ``prealloc`` they are also pre-faulted before listening (QEMU's
    ``prealloc=on``). ``cancel`` ends the wait or the migration with MigrationCancelled.
    """
    addr = parse_uri(uri)
    ensure_fd_budget(params.channels, "destination")
    declared_ram = None
    if declared:
        declared_ram = GuestRam.create(declared)
        if prealloc:
            for block in declared_ram:
                # allocated, not mapped: the channels write with pwrite (nothing to fault in), and
                # reserved pages still read as holes (HeldData: zero pages need no write)
                prefault(block, populate=False)
    elif prealloc:
        declared_ram = None
        raise ConfigError("--prealloc needs the destination's RAM blocks declared with --ram [NAME=]SIZE")
    try:
        listener = listen(addr, backlog=params.channels + 1)
    except BaseException:
        if declared_ram is not None:
            declared_ram.close()
        raise
    loader: Loader | None = None
    handed_over = False  # the caller owns loader.ram once the result is returned
    trace = Trace("destination main") if trace_file else None
    try:
        if on_listening:
            on_listening(bound_uri(listener, addr))
        acc = accept_migration(listener, params, listen_timeout=listen_timeout, log=log, cancel=cancel)
        loader = Loader(acc, params, listener, log, declared=declared_ram, cancel=cancel, trace=trace)
        if on_loader:
            on_loader(loader)
        ok = False
        try:
            loader.run()
            ok = True
        finally:
            loader.close(ok)
            if trace is not None and trace_file:
                loader.write_trace(Path(trace_file))
        stats = loader.refresh(live=False)
        stats.end = time.monotonic()
        state, desc = parse_tail(loader.tail)
        devices = parse_device_state(state, desc)
        stats.status = "completed"
        result = IncomingResult(stats, loader.ram if keep_ram else None, loader.machine, loader.tail, desc, devices)
        handed_over = keep_ram
        return result
    except MigrationError as exc:
        if loader is not None:
            loader.stats.status = "failed"
            loader.stats.error = str(exc)
        raise
    finally:
        listener.close()
        if isinstance(addr, UnixAddress):
            try:
                os.unlink(addr.path)
            except OSError:
                pass
        if loader is not None and loader.ram is not None and not handed_over:
            loader.ram.close()
        if declared_ram is not None and not handed_over:
            declared_ram.close()
