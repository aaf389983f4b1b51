"""The main-stream loader: applies the source's main channel to guest RAM and runs the barrier.

Theory of operation
-------------------
The loader runs in the destination's main thread. It pulls events from the main-stream parser;
its reads wait on the main socket, the channel processes' event pipes and sentinels, and the
listener together, so a channel failure or a stray connection is handled while the main
channel is quiet. MEM_SIZE creates the RAM blocks (shared memory) and forks the N channel
processes; ZERO and PAGE records are applied here; each EOS runs the sync barrier
(:meth:`RecvChannels.barrier`). After the stream's tail (device state, EOF, vmdesc) every
channel must end on a packet boundary. A QEMU source that is cancelled shuts its sockets down
mid-stream, which is reported as such (not as a malformed record).
"""

from __future__ import annotations

import multiprocessing.connection as mpc
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    ChannelError,
    ConfigError,
    MigrationCancelled,
    MigrationTimeout,
    RemoteProtocolError,
    TruncatedError,
)
from ..memory.ram import BlockSpec, GuestRam
from ..params import MigrationParams
from ..runtime.tls import TlsRefused, buffered, recv_ready
from ..runtime.trace import BARRIER, Trace, now_ns, write_trace
from ..stats import Counters, MigrationStats, MigrationStatus
from ..wire.machine import MachineState
from ..wire.packet import TARGET_PAGE_BITS
from ..wire.stream import (
    Configuration, MainStreamParser, RamEOS, RamFlush, RamMemSize, RamPage, RamZeroPages, SectionBegin, StreamReader,
    StreamTail, SwitchoverStart,
)
from .accept import Accepted, Log, admit, classify, peer_name
from .channels import RecvChannels


@dataclass
class IncomingResult:
    stats: MigrationStats
    ram: GuestRam | None = None
    machine: str | None = None
    tail: bytes = b""
    vmdesc: dict[str, Any] | None = None
    #: device sections after RAM, decoded through the vmdesc (None when the stream had none)
    devices: Any = None
    #: everything but RAM, to be kept with it (``incoming --save``) and replayed
    machine_state: MachineState | None = None


class Loader:
    """Applies main-stream events to guest RAM and runs the sync barrier."""

    def __init__(self, acc: Accepted, params: MigrationParams, listener: socket.socket | None, log: Log, *,
                 declared: GuestRam | None = None, cancel: threading.Event | None = None,
                 trace: Trace | None = None, standby: RecvChannels | None = None) -> None:
        self.acc = acc
        self.params = params
        self.listener = listener
        self.log = log
        self.declared = declared  # RAM set up before listening (--ram); MEM_SIZE must match it
        self.cancel = cancel
        self.trace = trace
        self.ram: GuestRam | None = None
        self.channels: RecvChannels | None = None
        self.standby = standby  # channels started ahead for the declared RAM (prealloc)
        self.stats = MigrationStats()
        self.stats.start = acc.connect_time
        self.machine: str | None = None
        self.tail = b""
        self.main_bytes = 0
        self.main_normal = 0  # pages that came whole on the main channel (PAGE records)
        self.main_zero = 0  # ZERO records
        self.main_eof = False
        self.section = "the stream header"
        self.flushes = False  # the stream has carried a MULTIFD_FLUSH (QEMU 8.0+)
        self.switchover_start = False  # ... a SWITCHOVER_START command (QEMU 10.0)
        self.configuration = b""  # the configuration section as received
        self.ram_section_id: int | None = None

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
            # a TLS session may hold decrypted bytes the socket no longer shows as readable
            ready = [main] if buffered(main) else mpc.wait(handles, min(left, 0.5))
            if self.channels is not None and any(h is not main and h is not self.listener for h in ready):
                self.channels.poll(0)
            if self.listener is not None and self.listener in ready:
                conn = admit(self.listener, self.acc.tls, self.log)
                if conn is not None:
                    self.acc.pending[conn] = time.monotonic() + self.params.handshake_timeout
            for h in ready:
                if h in self.acc.pending:
                    self._extra_connection(h)
            if main in ready:
                try:
                    n = recv_ready(main, view)
                except OSError as exc:
                    raise ChannelError(f"main channel: receive failed: {exc.strerror or exc}") from exc
                if n is None:
                    continue
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
            kind = classify(conn, self.params, everyone)
        except TlsRefused as exc:
            del self.acc.pending[conn]
            self.log(f"refused {peer_name(conn)}: {exc}")
            conn.close()
            return
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
        for ev in parser.events():
            if isinstance(ev, RamZeroPages):
                self._zero(ev)
            elif isinstance(ev, RamPage):
                self._page(ev)
            elif isinstance(ev, RamFlush):
                self.flushes = True  # QEMU 8.0+: from now on the flushes are the sync points
                self._barrier("MULTIFD_FLUSH")
            elif isinstance(ev, RamEOS):
                if not self.flushes:  # QEMU 7.2: every EOS is a sync point
                    self._barrier("EOS")
            elif isinstance(ev, SectionBegin):
                self.section = f"ram section {ev.section_id} ({ev.kind_name})"
                if self.ram_section_id is None:
                    self.ram_section_id = ev.section_id
            elif isinstance(ev, RamMemSize):
                self._mem_size(ev)
            elif isinstance(ev, Configuration):
                self.machine = ev.machine
                self.configuration = ev.raw
            elif isinstance(ev, SwitchoverStart):
                self.switchover_start = True
            elif isinstance(ev, StreamTail):
                self.tail = ev.data
        if self.ram is None:
            raise RemoteProtocolError("main channel: the stream ended without a ram section (no MEM_SIZE)")
        if not parser.ram_ended:
            raise RemoteProtocolError("main channel: the stream ended before the ram END section")
        assert self.channels is not None
        self.channels.finish(self.params.stall_timeout)

    def machine_state(self) -> MachineState | None:
        """Everything of the stream but RAM (None before a ram section; a source with
        ``send-configuration=off`` has an empty configuration, replayed as such)."""
        if self.ram_section_id is None:
            return None
        zero_in_packets = self.channels is not None and self.channels.total(Counters.ZERO) > 0
        dialect = {"multifd-flush-after-each-section": not self.flushes,
                   "send-switchover-start": self.switchover_start,
                   "zero-page-detection": "multifd" if zero_in_packets else "legacy"}
        return MachineState(self.configuration, self.tail, self.ram_section_id, self.params.uuid, dialect)

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
        if self.standby is not None:
            self.standby.attach(self.acc.channels)
            self.channels = self.standby
        else:
            self.channels = RecvChannels(self.acc.channels, self.ram, self.params.method,
                                         stall_timeout=self.params.stall_timeout, close_in_children=others,
                                         tracing=self.trace is not None, known_zero=self.declared is not None,
                                         packet_pages=self.params.packet_pages)
        self.stats.setup_time = time.monotonic() - self.stats.start
        self.stats.status = MigrationStatus.ACTIVE

    def _barrier(self, record: str) -> None:
        """The multifd sync point (``multifd_recv_sync_main``): every channel's SYNC packet."""
        if self.channels is None:
            raise RemoteProtocolError(f"main channel: received {record} before MEM_SIZE set up the RAM blocks")
        t0 = now_ns()
        self.channels.barrier(self.section)
        if self.trace is not None:
            self.trace.span(BARRIER, t0)
        self.stats.ram.dirty_sync_count += 1

    def _zero(self, ev: RamZeroPages) -> None:
        assert self.ram is not None and self.channels is not None
        idx = ev.offsets >> TARGET_PAGE_BITS
        if ev.fill:
            self.ram[ev.block].pages[idx] = ev.fill
            self.channels.held.mark_written(self.ram.index_of(ev.block))
        else:
            self.channels.held.zero_pages(ev.block, idx)
        self.main_zero += len(ev.offsets)

    def _page(self, ev: RamPage) -> None:
        assert self.ram is not None and self.channels is not None
        i = ev.offset >> 12
        self.ram[ev.block].pages[i] = np.frombuffer(ev.data, dtype=np.uint8)
        self.channels.held.mark_written(self.ram.index_of(ev.block))
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
