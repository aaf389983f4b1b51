"""Channel sets: the parent's handle on N forked channel processes, and each child's end of it.

The source, destination and snapshot each run N channel processes that differ only in their
loops and in what their command pipes carry (jobs; sync releases; rounds). Everything else is
here, once, so a side keeps only its own protocol. :class:`ChannelSet` forks the channels
through one :class:`~engine.runtime.procs.ChildGroup` (which owns their shutdown and turns an
error or a death into one ``ChannelError``), and gives each its row of a shared counter block
with named columns (:class:`~engine.stats.Counters`): statistics are read at any time without
asking the children. A child talks back only in typed events (:class:`Ready`, :class:`Synced`, :class:`Eof`,
:class:`Done`, :class:`Corrupt`, and ``procs.Failed`` for errors); the traces of a traced run
come home as :class:`TraceData` when a channel ends and are set aside in ``traces``, so a side's
event loop sees only the events of its own protocol.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence, TypeVar

import numpy as np
import numpy.typing as npt

from ..errors import ChannelError
from ..stats import ChannelStats, Counters
from .procs import ChildGroup, Connection, Event, close_quietly, self_usage
from .trace import Trace

Setup = TypeVar("Setup")


@dataclass(frozen=True)
class Synced(Event):
    """The channel has written (source) or read (destination) its SYNC packet ``packet_num``."""

    packet_num: int


@dataclass(frozen=True)
class Ready(Event):
    """A channel started ahead of its connection has done its set-up and waits for its socket."""


@dataclass(frozen=True)
class Eof(Event):
    """The channel's connection ended cleanly, on a packet boundary (destination)."""


@dataclass(frozen=True)
class Done(Event):
    """The channel has no item of round ``round`` left to claim (snapshot)."""

    round: int


@dataclass(frozen=True)
class Corrupt(Event):
    """A region of the snapshot file failed its checks; ``message`` names the file and where."""

    message: str


@dataclass(frozen=True)
class TraceData(Event):
    """A traced channel's span records (``Trace.to_bytes``), sent once, when it ends."""

    name: str
    pid: int
    data: bytes


class ChannelEnd:
    """A channel process's own end of its set (in the child): its index, the read end of its
    command pipe, its row of counters (a memoryview: its item updates, once or more per packet,
    are cheaper than numpy scalar ones) and its event pipe."""

    def __init__(self, index: int, events: Connection, control: Any, counters: memoryview) -> None:
        self.index = index
        self.events = events
        self.control = control
        self.counters = counters
        self.cpu_base_us = 0  # CPU spent before the migration (a standby channel's set-up): not counted

    def send(self, event: Event) -> None:
        self.events.send(event)

    def hand_over(self, trace: Trace | None) -> None:
        """Send the channel's trace to the parent (nothing when not tracing)."""
        if trace is not None:
            self.events.send(TraceData(self.index, trace.name, os.getpid(), trace.to_bytes()))


def _channel_main(events: Connection, loop: Callable[[ChannelEnd, Any], None], index: int,
                  counters: npt.NDArray[np.uint64], control: Any, setup: Any) -> None:
    """A channel process (run by ``procs.child_main``): its loop, then its resource usage."""
    me = ChannelEnd(index, events, control, counters[index].data)
    try:
        loop(me, setup)
    finally:
        row = me.counters
        cpu, row[Counters.PEAK_RSS], row[Counters.ANON_RSS] = self_usage()
        row[Counters.CPU_US] = cpu - me.cpu_base_us


class ChannelSet:
    """The parent's handle on N channel processes of one kind; each side subclasses it."""

    def __init__(self, n: int, role: str, *, noun: str = "multifd channel",
                 columns: type[Counters] = Counters) -> None:
        self.n = n
        self.group = ChildGroup(role, noun)
        self._shared = mmap.mmap(-1, 8 * n * len(columns.COLUMNS))
        self.counters = np.frombuffer(self._shared, dtype=np.uint64).reshape(n, len(columns.COLUMNS))
        self.control: list[Any] = []  # the parent's end of each channel's command pipe
        self.traces: list[tuple[str, int, bytes]] = []  # (track name, pid, records) from children
        self._closed = False

    def start(self, loop: Callable[[ChannelEnd, Setup], None], setup: Setup, control: tuple[Any, Any], *,
              own: Any = None, others: Sequence[Any] = ()) -> None:
        """Fork the next channel, running ``loop(ChannelEnd, setup)``. ``control`` is its
        command pipe (read end, write end: file descriptors or connections): the child keeps
        the read end, the parent the write end. ``own`` is the channel's socket (the parent's
        copy is closed); the child closes ``others`` and every channel's write end."""
        index, (read, write) = len(self.control), control
        self.control.append(write)
        try:
            self.group.start(index, _channel_main, (loop, index, self.counters, read, setup),
                             own=own, others=[*others, *self.control])
        finally:
            close_quietly(read)

    def events(self, timeout: float) -> list[Event]:
        """The channels' events within ``timeout``, traces set aside; raises on an error or a death."""
        out = []
        for ev in self.group.wait_events(timeout):
            if isinstance(ev, TraceData):
                self.traces.append((ev.name, ev.pid, ev.data))
            else:
                out.append(ev)
        return out

    def unexpected(self, ev: Event) -> NoReturn:
        raise ChannelError(f"{self.group.noun} {ev.channel} ({self.group.role}): unexpected message {ev!r}")

    def total(self, column: int) -> int:
        """A :class:`~engine.stats.Counters` column summed over the channels."""
        return int(self.counters[:, column].sum())

    def stats(self) -> list[ChannelStats]:
        return [ChannelStats.from_counters(i, pid, self.counters[i]) for i, pid in enumerate(self.group.pids)]

    def close(self, *, graceful: bool) -> None:
        """Idempotent: close the command pipes (a channel waiting for work sees their end), then
        end the processes (``ChildGroup.close``)."""
        if self._closed:
            return
        self._closed = True
        for end in self.control:
            close_quietly(end)
        self.group.close(graceful=graceful)
