"""Channel processes: forking, parent-death safety, errors as data, one shutdown path.

Channel processes are forked (:class:`Forked`, a bare ``os.fork``) from the process that owns
the guest RAM and the sockets, so they inherit the shared mappings and their own socket without
attaching anything by name. A child asks the kernel to SIGKILL it when the parent dies (no
orphans), ignores SIGINT (Ctrl-C reaches the whole process group, and only the parent decides
how a migration ends) and closes every inherited socket that is not its own (a peer sees EOF
exactly when the owner closes).
A child never raises into the void: :func:`child_main` reports any exception as a :class:`Failed`
event and exits 1. The parent waits on event pipes and process sentinels together, so an error,
a crash and a kill -9 all surface as one ``ChannelError`` naming the channel.
:class:`ChildGroup` owns the children: its idempotent ``close()`` joins them (success) or
terminates, kills and reaps them (failure), so no zombie is left whatever their state.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection as mpc
import os
import select
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import ChannelError, MigrationError
from .libc import libc

#: The one multiprocessing context of the engine (its pipes, locks and semaphores): children
#: inherit mappings, sockets and locks.
FORK = multiprocessing.get_context("fork")
_PR_SET_PDEATHSIG = 1
_FORK_BLOCKED = {signal.SIGINT, signal.SIGTERM}

Connection = mpc.Connection


@dataclass(frozen=True)
class Event:
    """A message from a channel process to its parent, on the child's event pipe."""

    channel: int


@dataclass(frozen=True)
class Failed(Event):
    """The child ended with an error (its text, or an internal error and where it happened)."""

    message: str


def close_quietly(obj: Any) -> None:
    """Close a file descriptor (an int) or anything with ``close()``; an OSError is ignored."""
    try:
        os.close(obj) if isinstance(obj, int) else obj.close()
    except OSError:
        pass


def _set_pdeathsig(libc: Any) -> None:
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except AttributeError:
        pass


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _keep_packet_buffers(libc: Any) -> None:
    """Serve the per-packet buffers (decompressed 512 KiB payloads, compressed output) from the
    heap and keep freed ones there: by default glibc hands such sizes out with ``mmap`` and
    unmaps them on free, so every packet would pay fresh-page faults for its buffers. The
    heap's high-water mark stays a few packets' worth."""
    try:
        libc.mallopt(_M_MMAP_THRESHOLD, 8 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except AttributeError:
        pass


def child_main(
    channel: int,
    parent_pid: int,
    events: Connection,
    close: Sequence[Any],
    target: Callable[..., None],
    args: tuple[Any, ...],
) -> None:
    """Entry point of every channel process (runs in the child)."""
    _set_pdeathsig(libc)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Forked with these blocked (see ChildGroup.start): a SIGTERM from the parent's shutdown
    # that raced the fork is delivered only now, to the default action, never to a handler
    # inherited from the parent.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORK_BLOCKED)
    # Everything inherited is long-lived: keep the cyclic GC from rescanning (and, through
    # reference-count writes, copying) the parent's objects on every packet's allocations.
    gc.freeze()
    # A channel loop makes no reference cycles; the collector would still run on its
    # per-packet allocations.
    gc.disable()
    _keep_packet_buffers(libc)
    for obj in close:  # inherited sockets and fds that belong to others
        close_quietly(obj)
    try:
        target(events, *args)
    except MigrationError as exc:
        _report(events, channel, str(exc))
        os._exit(1)
    except BaseException as exc:  # a bug: still report it as data, with where it happened
        where = traceback.extract_tb(exc.__traceback__)[-1]
        _report(events, channel, f"internal error {type(exc).__name__}: {exc} ({os.path.basename(where.filename)}:{where.lineno})")
        os._exit(1)
    os._exit(0)


def self_usage() -> tuple[int, int, int]:
    """(CPU microseconds, peak RSS KiB (VmHWM), private anonymous RSS KiB) of this process.

    Peak RSS counts the shared guest pages a process touched through its mapping (RssShmem);
    the private figure is what the process itself costs."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int((ru.ru_utime + ru.ru_stime) * 1e6)
    hwm = anon = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
    except OSError:
        hwm = ru.ru_maxrss
    return cpu, hwm, anon


def _report(events: Connection, channel: int, message: str) -> None:
    try:
        events.send(Failed(channel, message))
    except OSError:
        pass


class Forked:
    """A child process made with a bare ``os.fork``: what ``multiprocessing.Process`` makes,
    without its bootstrap (after-fork hooks, a new stdin, the process registry), which costs a
    child about a millisecond of CPU more before its first line runs, on a two-core machine
    while the migration's clock runs. ``run`` must end the child with ``os._exit``.
    ``sentinel`` is a pidfd, readable once the child has exited (``multiprocessing.connection.wait``
    takes it like a Process's); the exit status is reaped by :meth:`join`."""

    def __init__(self, run: Callable[[], None]) -> None:
        self.exitcode: int | None = None
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                run()
            finally:
                os._exit(1)
        self.pid = pid
        try:
            self.sentinel = os.pidfd_open(pid)  # Linux 5.3
        except OSError:  # no handle on it: do not leave it running
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        self._closed = False

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (None: for ever) for the child to exit, and reap it."""
        if self.exitcode is None:
            poll = select.poll()  # not select(): a process may have descriptors past FD_SETSIZE
            poll.register(self.sentinel, select.POLLIN)
            if poll.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))):
                _, status = os.waitpid(self.pid, 0)
                self.exitcode = os.waitstatus_to_exitcode(status)

    def _signal(self, sig: int) -> None:
        if self.exitcode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.sentinel)


class ChildGroup:
    """The channel processes of one side of a migration, and their event pipes."""

    def __init__(self, role: str, noun: str = "multifd channel") -> None:
        self.role = role  # "source", "destination", "guest", for messages
        self.noun = noun
        self.procs: list[Forked] = []
        self.events: list[Connection] = []  # parent's read ends, index = channel id
        self._closed = False

    def start(
        self,
        channel: int,
        target: Callable[..., None],
        args: tuple[Any, ...],
        *,
        own: socket.socket | None = None,
        others: Sequence[Any] = (),
    ) -> Connection:
        """Fork channel ``channel`` running ``target(events, *args)``; ``own`` is its socket.

        The parent closes its copy of ``own``: from here on the child is its only owner.
        """
        ev_read, ev_write = FORK.Pipe(duplex=False)
        close = [ev_read, *(s for s in others if s is not own)]
        parent = os.getpid()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _FORK_BLOCKED)
        try:
            proc = Forked(lambda: child_main(channel, parent, ev_write, close, target, args))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        ev_write.close()
        if own is not None:
            own.close()
        self.procs.append(proc)
        self.events.append(ev_read)
        return ev_read

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_events(self, timeout: float) -> list[Event]:
        """Events from any channel within ``timeout``; raises on a :class:`Failed` event or a dead child."""
        ready = mpc.wait([*self.events, *[p.sentinel for p in self.procs]], timeout)
        out: list[Event] = []
        dead: list[int] = []
        for obj in ready:
            if isinstance(obj, int):
                dead.append(next(i for i, p in enumerate(self.procs) if p.sentinel == obj))
                continue
            ch = self.events.index(obj)  # type: ignore[arg-type]
            out.extend(self._drain(ch))
        for ev in out:
            self._raise_failed(ev)
        for ch in dead:
            for ev in self._drain(ch):  # it may have reported just before dying
                self._raise_failed(ev)
                out.append(ev)
            proc = self.procs[ch]
            proc.join(0.1)
            code = proc.exitcode
            if code not in (0, None):
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                raise ChannelError(f"{self.noun} {ch} ({self.role}): process {proc.pid} {how}")
        return out

    def _raise_failed(self, ev: Event) -> None:
        if isinstance(ev, Failed):
            raise ChannelError(f"{self.noun} {ev.channel} ({self.role}): {ev.message}")

    def _drain(self, ch: int) -> list[Event]:
        conn = self.events[ch]
        out = []
        try:
            while conn.poll():
                out.append(conn.recv())
        except (EOFError, OSError):
            pass
        return out

    def close(self, *, graceful: bool, timeout: float = 5.0) -> None:
        """Idempotent: join (graceful) or terminate, then kill whatever is left, then reap."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + (timeout if graceful else 0.0)
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(1.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join(1.0)
        for conn in self.events:
            conn.close()
        for proc in self.procs:
            proc.close()
