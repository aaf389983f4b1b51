"""What a migration and a snapshot save share: one job on one background thread.

Theory of operation
-------------------
``start()`` runs the job's setup on the caller's thread (so a bad URI, a refused connection or
an unwritable file raises right there), then the rest on a background thread. Any thread may
``query()``, ``cancel()`` or ``wait()``: cancellation is an event the job checks between
chunks of work (:meth:`_check`), and the job sets ``_done`` exactly once, after its single
shutdown path has released everything (:meth:`_conclude`). Used as a context manager, leaving
the block early cancels the job and waits for that shutdown.

Both jobs are precopy loops: after each iteration :meth:`_end_of_iteration` records it and
decides, with QEMU's rules, whether the dirty remainder fits in ``downtime-limit``, whether
``auto-converge`` throttles the guest, or whether ``max-iterations`` / ``max-time`` ends it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Self

from .errors import MigrationCancelled, MigrationError, MigrationTimeout
from .memory.dirty import DirtyTracker, PageSets, count_pages, merge
from .memory.ram import GuestRam
from .params import MigrationParams
from .runtime.trace import DIRTY_SYNC, Trace, now_ns
from .stats import MigrationStats, MigrationStatus
from .wire.packet import TARGET_PAGE_SIZE

DIRTY_RATE_HIGH = 0.5  # auto-converge trigger: dirtied > 50% of what was sent (throttle-trigger-threshold)


RATE_WINDOW = 0.1  # seconds; QEMU enforces max-bandwidth per 100 ms too


class Throttleable(Protocol):
    def set_throttle(self, percent: int) -> None: ...


class RateLimiter:
    """``max-bandwidth`` as a token bucket: by any time t, at most ``rate * (t + window)``
    bytes have been handed out (a burst of one 100 ms window, then the rate). Sleeps the
    difference, checking for cancellation."""

    def __init__(self, rate: int, check: Any) -> None:
        self.rate = rate
        self.check = check
        self._t0: float | None = None
        self._b0 = 0

    def __call__(self, committed: int) -> None:
        if not self.rate:
            self._t0 = None
            return
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._b0 = now, committed
            return
        allowed = self.rate * (now - self._t0 + RATE_WINDOW)
        while committed - self._b0 > allowed:
            self.check()
            time.sleep(min((committed - self._b0 - allowed) / self.rate, 0.02))
            allowed = self.rate * (time.monotonic() - self._t0 + RATE_WINDOW)

    def reset(self, committed: int) -> None:
        """Start a new bucket (after the rate changed)."""
        self._t0, self._b0 = time.monotonic(), committed


class Guest(Protocol):
    """What the migration needs from a running guest: ``vm_stop`` / ``vm_start``."""

    def pause(self, timeout: float = ...) -> None: ...

    def resume(self) -> None: ...


@dataclass
class IterationStats:
    iteration: int
    pages: int
    zero_pages: int
    bytes: int
    duration: float
    dirty_pages: int  # dirtied during this iteration (found by the next sync)
    expected_downtime: float  # seconds, after this iteration
    throttle: int

    def to_json(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration, "pages": self.pages, "zero-pages": self.zero_pages, "bytes": self.bytes,
            "duration-ms": round(self.duration * 1000, 1), "dirty-pages": self.dirty_pages,
            "dirty-pages-rate": round(self.dirty_pages / max(self.duration, 1e-9)),
            "expected-downtime": round(self.expected_downtime * 1000), "cpu-throttle-percentage": self.throttle,
        }


class BackgroundJob:
    """The life cycle and the precopy state of a migration or a snapshot save."""

    what = "job"  # in messages: "migration", "snapshot save"
    converge_hint = "raise downtime-limit or enable auto-converge"

    def __init__(self, ram: GuestRam, params: MigrationParams, tracker: DirtyTracker | None,
                 guest: Guest | None) -> None:
        self.ram = ram
        self.params = params
        self.tracker = tracker
        self.guest = guest
        self.stats = MigrationStats(status=MigrationStatus.NONE)
        self.stats.ram.total = ram.total_size
        self.iterations: list[IterationStats] = []
        self.throttle = 0
        self.expected_downtime = 0.0
        self.dirty_pages_rate = 0
        self.error: MigrationError | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._guest_paused = False
        self._remaining_pages = ram.total_size // TARGET_PAGE_SIZE
        self._high = 0  # iterations in a row that dirtied fast (auto-converge)
        self.trace: Trace | None = None  # this thread's track (--trace)

    # ------------------------------------------------------------------ public API

    def start(self) -> Self:
        """Set up on this thread (raises on failure), then run in the background."""
        if self._thread is not None:
            return self
        self.stats = MigrationStats(status=MigrationStatus.SETUP)
        self.stats.ram.total = self.ram.total_size
        try:
            self._setup()
        except BaseException as exc:
            self._setup_failed(exc)
            raise
        self._thread = threading.Thread(target=self._run, name=self.what.replace(" ", "-"), daemon=True)
        self._thread.start()
        return self

    def set_parameters(self, **changes: Any) -> None:
        """``migrate-set-parameters`` while running: e.g. ``downtime_limit``, ``max_bandwidth``,
        ``auto_converge``, ``max_iterations``. Takes effect at the next chunk or iteration."""
        self.params = dataclasses.replace(self.params, **changes)

    def cancel(self) -> None:
        """Cancel (``migrate_cancel``): the job fails with "cancelled", the guest keeps running
        (a migration's destination fails, a snapshot save's partial file is removed)."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> MigrationStats:
        """Wait for the end; returns the stats on completion, raises the error otherwise."""
        if self._thread is None:
            raise MigrationError(f"the {self.what} was not started")
        if not self._done.wait(timeout):
            raise MigrationTimeout(f"the {self.what} did not finish within {timeout:g}s")
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.stats

    @property
    def status(self) -> MigrationStatus:
        return self.stats.status

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for the end (whatever its outcome); True once it ended."""
        return self._done.wait(timeout)

    def query(self) -> dict[str, Any]:
        """A ``query-migrate``-shaped snapshot (safe from any thread)."""
        st = self.stats
        if not self._done.is_set():
            self._refresh(st)
        st.ram.remaining = self._remaining_pages * TARGET_PAGE_SIZE
        out = st.to_json()
        out["expected-downtime"] = round(self.expected_downtime * 1000)
        out["ram"]["dirty-pages-rate"] = self.dirty_pages_rate
        out["cpu-throttle-percentage"] = self.throttle
        out["iterations"] = [it.to_json() for it in self.iterations]
        out["iteration"] = len(self.iterations) + (st.status == MigrationStatus.ACTIVE)
        return out

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and not self._done.is_set():
            self.cancel()
            self._done.wait(self.params.stall_timeout + 10)

    # ------------------------------------------------------------------- for subclasses

    def _setup(self) -> None:
        """Everything that must fail on the caller's thread."""

    def _work(self) -> None:
        """The job itself, on the background thread; raises to fail."""
        raise NotImplementedError

    def _finish(self, error: BaseException | None) -> None:
        """The single shutdown path (also after a failed ``_setup``); ends with :meth:`_conclude`."""
        raise NotImplementedError

    def _refresh(self, st: MigrationStats) -> None:
        """Copy the channels' live counters into ``st`` (for :meth:`query` while running)."""

    def _setup_failed(self, exc: BaseException) -> None:
        self._finish(exc)

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 - reported through wait()
            error = exc
        self._finish(error)

    def _sync_dirty(self) -> PageSets:
        """``migration_bitmap_sync``: the pages dirtied since the last sync (none without a
        tracker); every call counts in ``dirty-sync-count``."""
        t0 = now_ns()
        dirty = self.tracker.sync() if self.tracker is not None else {}
        if self.trace is not None:
            self.trace.span(DIRTY_SYNC, t0)
        self.stats.ram.dirty_sync_count += 1
        return dirty

    def _precopy(self, dirty: PageSets | None,
                 one_round: Callable[[PageSets | None], tuple[int, int, int, float, int]]) -> PageSets:
        """Precopy iterations from ``dirty`` (None: every page) until :meth:`_end_of_iteration`
        says the rest fits in ``downtime-limit``; returns the pages still dirty. ``one_round``
        sends the given pages and returns (pages, zero pages, bytes, seconds, bytes moved)."""
        st = self.stats
        st.setup_time = time.monotonic() - st.start
        st.status = MigrationStatus.ACTIVE
        iteration = 0
        while True:
            iteration += 1
            self._check()
            pages, zero, nbytes, dt, moved = one_round(dirty)
            dirty = self._sync_dirty()
            if self._end_of_iteration(iteration, pages, zero, nbytes, dt, count_pages(dirty), moved):
                return dirty

    def _stop_guest(self, dirty: PageSets) -> PageSets:
        """Stop-and-copy begins: pause the guest (``vm_stop``) and add what it dirtied last."""
        self.stats.status = MigrationStatus.DEVICE
        if self.guest is not None:
            self.guest.pause(timeout=self.params.stall_timeout)
            self._guest_paused = True
        if self.tracker is not None:
            dirty = merge(dirty, self._sync_dirty())
        return dirty

    def _end_of_iteration(self, iteration: int, pages: int, zero: int, nbytes: int, dt: float, remaining: int,
                          moved: int) -> bool:
        """Record a precopy iteration (``moved`` bytes in ``dt`` seconds; ``remaining`` pages
        dirty after it). True when those fit in ``downtime-limit`` at the measured bandwidth;
        else applies ``auto-converge`` and raises once ``max-iterations`` / ``max-time`` is hit."""
        p = self.params  # set_parameters() may have changed it
        self._remaining_pages = remaining
        self.expected_downtime = remaining * TARGET_PAGE_SIZE / max(moved / dt, 1.0)
        self.dirty_pages_rate = round(remaining / dt)
        self.iterations.append(IterationStats(iteration, pages, zero, nbytes, dt, remaining,
                                              self.expected_downtime, self.throttle))
        if self.expected_downtime * 1000 <= p.downtime_limit:
            return True
        set_throttle = getattr(self.guest, "set_throttle", None)
        if p.auto_converge and set_throttle is not None:
            self._high = self._high + 1 if remaining * TARGET_PAGE_SIZE > DIRTY_RATE_HIGH * moved else 0
            if self._high >= 2:
                self._high = 0
                self.throttle = (p.cpu_throttle_initial if not self.throttle
                                 else min(p.max_cpu_throttle, self.throttle + p.cpu_throttle_increment))
                set_throttle(self.throttle)
        why = None
        if iteration >= p.max_iterations:
            why = f"{iteration} iterations (max-iterations)"
        elif p.max_time and time.monotonic() - self.stats.start >= p.max_time:
            why = f"{p.max_time:g}s (max-time)"
        if why:
            raise MigrationError(
                f"{self.what} did not converge after {why}: {remaining * TARGET_PAGE_SIZE} bytes still dirty,"
                f" expected downtime {self.expected_downtime * 1000:.0f} ms > downtime-limit {p.downtime_limit} ms"
                f" ({self.converge_hint})"
            )
        return False

    def _conclude(self, error: BaseException | None) -> None:
        """The last step of the shutdown path, once everything is released: a failed or
        cancelled job resumes the guest (its RAM was only read), the status and the error
        are set, and waiters are woken."""
        st = self.stats
        if error is not None and self._guest_paused and self.guest is not None:
            self.guest.resume()
        if error is None:
            st.status = MigrationStatus.COMPLETED
        elif isinstance(error, (MigrationCancelled, KeyboardInterrupt)):
            st.status = MigrationStatus.CANCELLED
            self.error = (error.with_traceback(None) if isinstance(error, MigrationCancelled)  # frames pin RAM views
                          else MigrationCancelled(f"{self.what} cancelled"))
        else:
            st.status = MigrationStatus.FAILED
            self.error = error.with_traceback(None) if isinstance(error, MigrationError) else MigrationError(
                f"internal error {type(error).__name__}: {error}")
            st.error = str(self.error)
        if error is not None or st.end is None:  # a failed teardown: the clock runs to here
            st.end = time.monotonic()
        self._done.set()

    def _complete(self, down: float) -> None:
        """The last byte is written (every channel past its last SYNC, the stream's tail out):
        ``downtime`` ends here, and so does ``total-time`` if the teardown that follows (channel
        processes finishing and being reaped) succeeds, as in QEMU, whose clock stops before it
        joins its multifd threads."""
        now = time.monotonic()
        self.stats.downtime = now - down
        self.stats.end = now  # query() during the teardown already shows the final total-time

    def _check(self) -> None:
        if self._cancel.is_set():
            raise MigrationCancelled(f"{self.what} cancelled")
