"""The source's migration driver (QEMU's migration thread) and the ``migrate`` API.

Theory of operation
-------------------
``start()`` connects the main channel and the N multifd channels (forking their processes) on
the caller's thread, so a bad URI or a refused connection raises right there; the rest runs as
a :class:`~engine.precopy.BackgroundJob`: the ram START section, one PART section per precopy
iteration (pages dirtied since the previous sync, ending with the multifd SYNC and the EOS),
and stop-and-copy (the END section, EOF, vmdesc) once the rest fits in ``downtime-limit``.
The precopy policy (convergence, auto-converge, limits) is :mod:`engine.precopy`'s; the pages
of a section are batched into packets by :class:`~engine.source.ram_saver.RamSaver`. On failure
or cancel the guest is resumed (its RAM was only read) and every channel is stopped and reaped.
``query()`` is safe from any thread: it reads plain counters and the channels' shared ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..memory.dirty import DirtyTracker, PageSets, count_pages
from ..memory.ram import GuestRam
from ..params import MigrationParams
from ..precopy import RATE_WINDOW, BackgroundJob, Guest, RateLimiter
from ..runtime.tls import TlsCreds, client_session, close_notify
from ..runtime.trace import STOP_COPY, Trace, now_ns, write_trace
from ..runtime.transport import (
    Address,
    Deadline,
    TcpAddress,
    connect,
    ensure_fd_budget,
    parse_uri,
    send_all,
)
from ..runtime.zerocopy import enable_zero_copy
from ..stats import MigrationStats
from ..wire.encoder import StreamEncoder
from ..wire.machine import MachineState
from ..wire.packet import PAGES_PER_PACKET, TARGET_PAGE_SIZE, MultiFDInit
from .channels import SendChannels
from .ram_saver import ZERO_SCAN_CHUNK, RamSaver


class Migration(BackgroundJob):
    """One outgoing migration. Use as a context manager, or ``start()`` / ``wait()``.

    ``tracker`` finds dirty pages between iterations (a :class:`~engine.memory.dirty.DirtyLog` filled
    by the guest's writers, or a :class:`~engine.memory.dirty.ChecksumTracker`); without one the guest
    is taken as static. ``guest`` is paused for stop-and-copy.
    """

    what = "migration"
    converge_hint = "raise max-bandwidth or downtime-limit, or enable auto-converge"

    def __init__(self, uri: str, ram: GuestRam, params: MigrationParams, *, tracker: DirtyTracker | None = None,
                 guest: Guest | None = None, trace_file: str | Path | None = None,
                 machine_state: MachineState | None = None) -> None:
        super().__init__(ram, params, tracker, guest)
        #: what the stream carries besides RAM: a checkpointed VM's, replayed as its source sent
        #: it, or an engine guest's (the configuration section, then EOF and an empty vmdesc)
        self.machine_state = machine_state or MachineState.fresh(params.machine)
        self.uri = uri
        self.addr = parse_uri(uri)
        self._channels: SendChannels | None = None
        self._main: Any = None
        self._saver: RamSaver | None = None
        self._limiter: RateLimiter | None = None
        self.trace_file = Path(trace_file) if trace_file else None
        self.trace = Trace("source migration thread") if trace_file else None

    # ------------------------------------------------------------------ public API

    def set_parameters(self, **changes: Any) -> None:
        super().set_parameters(**changes)
        new = self.params
        if self._limiter is not None and self._limiter.rate != new.max_bandwidth:
            self._limiter.rate = new.max_bandwidth
            self._limiter.reset(self._committed())

    # ------------------------------------------------------------------- internals

    def _refresh(self, st: MigrationStats) -> None:
        """Page counts are the channels' (``normal``: pages they sent whole; zero pages they
        listed in packets) plus the ZERO records of the migration thread."""
        st.extra["dialect"] = self.params.dialect
        if self.params.packet_pages != PAGES_PER_PACKET:  # an engine-to-engine setting
            st.extra["packet-pages"] = self.params.packet_pages
        if self._channels is not None:
            st.channels = self._channels.stats()
            st.ram.multifd_bytes = sum(c.bytes for c in st.channels)
            st.ram.normal = sum(c.normal_pages for c in st.channels)
            zero_records = self._saver.zero_records if self._saver is not None else 0
            st.ram.duplicate = zero_records + sum(c.zero_pages for c in st.channels)

    def _transferred(self) -> int:
        ch = self._channels
        multifd = ch.bytes_sent() if ch is not None else 0
        return self.stats.ram.main_bytes + multifd

    def _committed(self) -> int:
        """Bytes handed to the channels so far (for ``max-bandwidth``: counted at hand-off,
        so the channels' queues cannot run ahead of the limit); compressed sizes are only
        known once sent, so compressed methods count what was sent."""
        ch = self._channels
        if ch is None:
            return self.stats.ram.main_bytes
        multifd = ch.bytes_committed if ch.method.name == "none" else ch.bytes_sent()
        return self.stats.ram.main_bytes + multifd

    def _main_send(self, data: bytes) -> None:
        send_all(self._main, [data], "main channel")

    def _setup(self) -> None:
        """Connect the main channel, write the stream header, connect and hand over the
        multifd channels (forking their processes)."""
        p = self.params
        if p.zero_copy_send and not isinstance(self.addr, TcpAddress):
            raise ConfigError(f"zero-copy-send needs a tcp: URI, got {self.addr.uri!r}")
        ensure_fd_budget(p.channels, "source")
        enc = StreamEncoder()
        self._enc = enc
        tls = TlsCreds.load(p.tls_creds, "client") if p.tls_creds else None
        hostname = tls_hostname(p, self.addr) if tls else ""

        def open_channel(what: str, timeout: float) -> Any:
            sock = connect(self.addr, timeout, p.tcp_congestion)
            return client_session(sock, tls, hostname, f"{what} to {self.addr.uri}") if tls else sock

        self._main = open_channel("main channel", p.handshake_timeout)
        self._main.settimeout(p.stall_timeout)
        enc.header()
        enc.raw(self.machine_state.configuration)
        data = enc.take()
        self._main_send(data)
        self.stats.ram.main_bytes += len(data)
        socks = []
        deadline = Deadline(p.handshake_timeout)
        try:
            for i in range(p.channels):
                sock = open_channel(f"multifd channel {i}", max(deadline.remaining(), 0.001))
                socks.append(sock)
                if p.zero_copy_send:
                    enable_zero_copy(sock, f"multifd channel {i}")
                sock.settimeout(p.stall_timeout)
                send_all(sock, [MultiFDInit(i, p.uuid).pack()], f"multifd channel {i} handshake")
            self._channels = SendChannels(socks, self.ram, p.method, p.effective_level,
                                          stall_timeout=p.stall_timeout, close_in_children=[self._main],
                                          should_stop=self._check, tracing=self.trace is not None,
                                          detect_zero=p.zero_page_detection == "multifd",
                                          zero_copy=p.zero_copy_send, packet_pages=p.packet_pages)
        finally:
            if self._channels is None:
                for s in socks:
                    s.close()

    def _make_saver(self) -> RamSaver:
        assert self._channels is not None
        limiter = self._limiter = RateLimiter(self.params.max_bandwidth, self._check)

        def after_chunk() -> None:
            self._check()
            limiter(self._committed())
            if self._saver is not None:
                self._remaining_pages = self._section_pages - self._saver.pages_done

        chunk = ZERO_SCAN_CHUNK
        if self.params.max_bandwidth:  # small enough chunks to hold a 100 ms window
            chunk = int(np.clip(self.params.max_bandwidth * RATE_WINDOW / TARGET_PAGE_SIZE / 2,
                                self.params.packet_pages, max(ZERO_SCAN_CHUNK, self.params.packet_pages)))
        saver = RamSaver(self._main_send, self._enc, self._channels, self.ram, self.stats,
                         after_chunk=after_chunk, chunk_pages=chunk,
                         scan_zero=self.params.zero_page_detection == "legacy",
                         flush_records=not self.params.multifd_flush_after_each_section,
                         switchover_start=bool(self.params.send_switchover_start),
                         section_id=self.machine_state.ram_section_id)
        saver.trace = self.trace
        return saver

    def _work(self) -> None:
        saver = self._saver = self._make_saver()
        self._section_pages = 0
        saver.save_setup()
        first = self._sync_dirty()  # dirty-sync-count 1: the first iteration sends every page
        dirty = self._precopy(first if self.tracker is not None else None, self._one_section)
        self._stop_and_copy(dirty)

    def _one_section(self, dirty: PageSets | None) -> tuple[int, int, int, float, int]:
        """One precopy iteration: the ``dirty`` pages (None: all) as one ram PART section."""
        assert self._saver is not None
        st = self.stats
        pages = count_pages(dirty) if dirty is not None else self.ram.total_size // TARGET_PAGE_SIZE
        self._section_pages = pages
        t0, b0, z0 = time.monotonic(), self._transferred(), st.ram.duplicate
        self._saver.save_section(dirty)  # returns once every packet of it is written
        self._refresh(st)
        sent = self._transferred() - b0
        return pages, st.ram.duplicate - z0, sent, max(time.monotonic() - t0, 1e-6), sent

    def _stop_and_copy(self, dirty: PageSets) -> None:
        st = self.stats
        assert self._saver is not None and self._channels is not None
        down = time.monotonic()
        self._down_ns = now_ns()
        dirty = self._stop_guest(dirty)
        self._section_pages = count_pages(dirty)
        self._saver.after_chunk = self._check  # stop-and-copy ignores max-bandwidth
        self._saver.save_section(dirty, end=True)
        self._enc.raw(self.machine_state.device_state)  # device sections, EOF, vmdesc
        data = self._enc.take()
        self._main_send(data)
        st.ram.main_bytes += len(data)
        # every data packet was written before the END section's EOS; the rest is teardown
        self._complete(down)
        self._remaining_pages = 0
        if self.trace is not None:
            self.trace.span(STOP_COPY, self._down_ns)
        self._channels.quit(timeout=self.params.stall_timeout)

    def _finish(self, error: BaseException | None) -> None:
        st = self.stats
        ok = error is None
        if self._channels is not None:
            self._refresh(st)
            self._channels.close(graceful=ok)
        if self.trace is not None and self.trace_file is not None:
            self._write_trace()
        if self._main is not None:
            if ok:
                close_notify(self._main)
            try:
                self._main.shutdown(2)
            except OSError:
                pass
            self._main.close()
        self._conclude(error)


    def _write_trace(self) -> None:
        assert self.trace is not None and self.trace_file is not None
        tracks = [(self.trace.name, self.trace.pid, Trace.records(self.trace.to_bytes()))]
        if self._channels is not None:
            tracks += [(name, pid, Trace.records(data)) for name, pid, data in sorted(self._channels.traces)]
        try:
            write_trace(self.trace_file, tracks, "multifd source")
        except OSError as exc:
            self.stats.extra["trace-error"] = f"cannot write {str(self.trace_file)!r}: {exc.strerror}"


def tls_hostname(params: MigrationParams, addr: Address) -> str:
    """The name the destination's certificate must carry: ``tls-hostname``, else the URI's host (as QEMU)."""
    name = params.tls_hostname or (addr.host if isinstance(addr, TcpAddress) else None)
    if name is None:
        raise ConfigError(f"tls-creds with {addr.uri!r} needs tls-hostname: a unix: URI has no host name to check"
                          " the destination's certificate against")
    try:
        name.encode("idna")  # what every handshake would fail on after taking over its socket
    except UnicodeError:
        raise ConfigError(f"tls-hostname {name!r} is not a valid host name or address") from None
    return name


def migrate(uri: str, ram: GuestRam, params: MigrationParams, *, tracker: DirtyTracker | None = None,
            guest: Guest | None = None, timeout: float | None = None) -> MigrationStats:
    """Migrate and wait (blocking). Raises :class:`MigrationError` on failure."""
    with Migration(uri, ram, params, tracker=tracker, guest=guest) as m:
        return m.wait(timeout)
