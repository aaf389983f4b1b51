"""The destination side as an object: listen, receive in the background, query, cancel, wait.

Theory of operation
-------------------
:class:`IncomingMigration` runs :func:`engine.destination.run_incoming` on a background thread
(the loader thread, which also forks the channel processes: keep the object, and the thread
that calls ``start()``, alive until the migration ends). ``start()`` returns once the listener is
bound (or raises what went wrong), so ``.uri`` can be handed to a source at once.
``cancel()`` sets an event the accept loop and the loader check at least twice a second; the
loader then fails with MigrationCancelled and the one shutdown path stops the channels and
frees the RAM. With ``keep_ram`` (the default) the received :class:`GuestRam` is handed to the
caller in the result; leaving the ``with`` block closes it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

from .destination import IncomingResult, Loader, run_incoming
from .errors import MigrationError, MigrationTimeout
from .params import MigrationParams
from .ram import BlockSpec


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
    def status(self) -> str:
        if self.result is not None:
            return "completed"
        if self.error is not None:
            return "cancelled" if self._cancel.is_set() else "failed"
        return "active" if self._loader is not None else "setup"

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
