"""Profiling output: spans recorded per process, merged into Chrome trace-event JSON.

Each process that traces (the main process of each side, every channel process) keeps a
:class:`Trace`: a preallocated numpy record array of (start ns, duration ns, kind) filled by
``span(kind, t0)``, one array store per event, no I/O, no allocation. Timestamps come from
``time.perf_counter_ns`` (CLOCK_MONOTONIC, shared by all processes of the machine), so tracks
from different processes line up. A channel process sends its records to the parent as bytes
when it ends; the parent writes one file (opens in Perfetto or chrome://tracing) with one
track per process. When tracing is off, callers hold ``None`` and skip the call: the cost is
one ``is not None`` test per packet.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import numpy.typing as npt

#: span kinds (stable codes: they cross process boundaries as integers)
KINDS = {
    1: "wait for work", 2: "gather", 3: "compress", 4: "send", 5: "zero-page detection",
    6: "sync wait", 7: "recv header", 8: "recv payload", 9: "decompress", 10: "write pages",
    11: "barrier wait", 12: "main stream", 13: "dirty sync", 14: "stop-and-copy",
}
WAIT, GATHER, COMPRESS, SEND, ZERO_SCAN, SYNC_WAIT, RECV_HEADER, RECV_PAYLOAD, DECOMPRESS, WRITE, BARRIER, \
    MAIN_STREAM, DIRTY_SYNC, STOP_COPY = range(1, 15)

_REC = np.dtype([("t", "<i8"), ("d", "<i8"), ("k", "<i2")])
now_ns = time.perf_counter_ns


class Trace:
    """Span records of one process (or thread)."""

    def __init__(self, name: str, capacity: int = 1 << 18) -> None:
        self.name = name
        self.pid = os.getpid()
        self._rec = np.zeros(capacity, dtype=_REC)
        self.n = 0
        self.dropped = 0

    def span(self, kind: int, t0: int, t1: int | None = None) -> int:
        """Record ``[t0, t1)`` (t1 = now); returns t1 so spans can be chained."""
        t1 = now_ns() if t1 is None else t1
        if self.n < len(self._rec):
            self._rec[self.n] = (t0, t1 - t0, kind)
            self.n += 1
        else:
            self.dropped += 1
        return t1

    def to_bytes(self) -> bytes:
        return self._rec[: self.n].tobytes()

    @staticmethod
    def records(data: bytes) -> npt.NDArray[Any]:
        return np.frombuffer(data, dtype=_REC)


def chrome_events(tracks: Iterable[tuple[str, int, npt.NDArray[Any]]], process_name: str) -> list[dict[str, Any]]:
    """Trace-event dicts: one "thread" track per (name, pid) with its spans as complete events."""
    out: list[dict[str, Any]] = []
    main_pid = os.getpid()
    out.append({"ph": "M", "name": "process_name", "pid": main_pid, "args": {"name": process_name}})
    for order, (name, pid, recs) in enumerate(tracks):
        out.append({"ph": "M", "name": "thread_name", "pid": main_pid, "tid": pid, "args": {"name": f"{name} (pid {pid})"}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": main_pid, "tid": pid, "args": {"sort_index": order}})
        for t, d, k in recs.tolist():
            out.append({"ph": "X", "name": KINDS.get(k, str(k)), "pid": main_pid, "tid": pid,
                        "ts": t / 1000.0, "dur": max(d, 1) / 1000.0})
    return out


def write_trace(path: Path, tracks: Iterable[tuple[str, int, npt.NDArray[Any]]], process_name: str) -> None:
    events = chrome_events(tracks, process_name)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
