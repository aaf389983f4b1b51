"""The destination's entry points: :func:`run_incoming` and the :class:`IncomingMigration` object.

Theory of operation
-------------------
:func:`run_incoming` owns the listener, the RAM and the channel processes; its ``finally``
releases all three on every path. :class:`IncomingMigration` runs it on a background thread
(the loader thread, which also forks the channel processes: keep the object, and the thread
that calls ``start()``, alive until the migration ends). ``start()`` returns once the listener is
bound (or raises what went wrong), so ``.uri`` can be handed to a source at once.
``cancel()`` sets an event the accept loop and the loader check at least twice a second; the
loader then fails with MigrationCancelled and the one shutdown path stops the channels and
frees the RAM. With ``keep_ram`` (the default) the received :class:`GuestRam` is handed to the
caller in the result; leaving the ``with`` block closes it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, MigrationError, MigrationTimeout
from ..memory.ram import BlockSpec, GuestRam, prefault
from ..params import MigrationParams
from ..runtime.tls import TlsCreds
from ..runtime.trace import Trace
from ..runtime.transport import (
    UnixAddress,
    bound_uri,
    ensure_fd_budget,
    listen,
    parse_uri,
)
from ..stats import MigrationStatus
from ..wire.vmstate import parse_device_state, parse_tail
from .accept import Log, accept_migration, stderr_log
from .channels import RecvChannels
from .loader import IncomingResult, Loader


def run_incoming(
    uri: str,
    params: MigrationParams,
    *,
    listen_timeout: float = 600.0,
    log: Log = stderr_log,
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
    if prealloc and not declared:
        raise ConfigError("--prealloc needs the destination's RAM blocks declared with --ram [NAME=]SIZE")
    tls = TlsCreds.load(params.tls_creds, "server") if params.tls_creds else None
    GuestRam.prepare()
    declared_ram = GuestRam.create(declared) if declared else None
    standby: RecvChannels | None = None
    trace = Trace("destination main") if trace_file else None
    try:
        if declared_ram is not None and prealloc:
            # The channels start now, before listening, as QEMU pre-allocates before -incoming:
            # each maps all of the RAM (and so zeroes it), so the migration's pages arrive without
            # a page fault. A TLS session cannot move into a process started before it
            # (runtime/tls.py): with TLS the channels start after the handshakes, and the pages
            # are zeroed here instead.
            for block in declared_ram:
                prefault(block, populate=tls is not None)
            if tls is None:
                standby = RecvChannels(params.channels, declared_ram, params.method,
                                       stall_timeout=params.stall_timeout, tracing=trace is not None,
                                       packet_pages=params.packet_pages)
                standby.wait_ready(max(60.0, params.stall_timeout))
        listener = listen(addr, backlog=params.channels + 1)
    except BaseException:
        if standby is not None:
            standby.close(graceful=False)
        if declared_ram is not None:
            declared_ram.close()
        raise
    loader: Loader | None = None
    handed_over = False  # the caller owns loader.ram once the result is returned
    try:
        if on_listening:
            on_listening(bound_uri(listener, addr))
        acc = accept_migration(listener, params, listen_timeout=listen_timeout, log=log, cancel=cancel, tls=tls)
        loader = Loader(acc, params, listener, log, declared=declared_ram, cancel=cancel, trace=trace,
                        standby=standby)
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
        stats.status = MigrationStatus.COMPLETED
        result = IncomingResult(stats, loader.ram if keep_ram else None, loader.machine, loader.tail, desc, devices,
                                loader.machine_state())
        handed_over = keep_ram
        return result
    except MigrationError as exc:
        if loader is not None:
            loader.stats.status = MigrationStatus.FAILED
            loader.stats.error = str(exc)
        raise
    finally:
        listener.close()
        if isinstance(addr, UnixAddress):
            try:
                os.unlink(addr.path)
            except OSError:
                pass
        if standby is not None:  # not attached (the migration failed first), or already closed
            standby.close(graceful=False)
        if loader is not None and loader.ram is not None and not handed_over:
            loader.ram.close()
        if declared_ram is not None and not handed_over:
            declared_ram.close()


class IncomingMigration:
    def __init__(self, uri: str, params: MigrationParams, *, listen_timeout: float = 600.0,
                 declared: Sequence[BlockSpec] | None = None, prealloc: bool = False, keep_ram: bool = True,
                 trace_file: str | Path | None = None) -> None:
        self._args = dict(listen_timeout=listen_timeout, declared=declared, prealloc=prealloc, keep_ram=keep_ram,
                          trace_file=trace_file)
        self.requested_uri = uri
        self.params = params
        self.uri: str | None = None
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self._loader: Loader | None = None
        self._cancel = threading.Event()
        self._listening = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._log: list[str] = []

    def start(self, timeout: float = 30.0) -> IncomingMigration:
        """Bind the listener and start waiting for the source; returns with ``.uri`` set."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._thread.start()
        deadline_hit = not (self._listening.wait(timeout) or self._done.is_set())
        if self.error is not None:
            raise self.error
        if deadline_hit or self.uri is None:
            self.cancel()
            raise MigrationTimeout(f"the destination did not start listening within {timeout:g}s")
        return self

    def _run(self) -> None:
        def listening(uri: str) -> None:
            self.uri = uri
            self._listening.set()

        def on_loader(loader: Loader) -> None:
            self._loader = loader

        try:
            self.result = run_incoming(self.requested_uri, self.params, on_listening=listening, on_loader=on_loader,
                                       cancel=self._cancel, log=self._log.append, **self._args)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported through wait()
            self.error = exc.with_traceback(None) if isinstance(exc, MigrationError) else MigrationError(
                f"internal error {type(exc).__name__}: {exc}")
        finally:
            self._done.set()
            self._listening.set()

    @property
    def status(self) -> MigrationStatus:
        if self.result is not None:
            return MigrationStatus.COMPLETED
        if self.error is not None:
            return MigrationStatus.CANCELLED if self._cancel.is_set() else MigrationStatus.FAILED
        return MigrationStatus.ACTIVE if self._loader is not None else MigrationStatus.SETUP

    @property
    def log(self) -> list[str]:
        """Warnings (e.g. dropped stray connections), one line each."""
        return list(self._log)

    def query(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result.stats.to_json()
        if self._loader is not None:
            out = self._loader.query()
            out["status"] = self.status
            return out
        return {"status": self.status}

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> IncomingResult:
        if self._thread is None:
            raise MigrationError("the incoming migration was not started")
        if not self._done.wait(timeout):
            raise MigrationTimeout(f"the incoming migration did not finish within {timeout:g}s")
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def __enter__(self) -> IncomingMigration:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and not self._done.is_set():
            self.cancel()
            self._done.wait(self.params.stall_timeout + 10)
        if self.result is not None and self.result.ram is not None:
            self.result.ram.close()
