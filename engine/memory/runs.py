"""Runs of consecutive pages: how a packet's scattered pages become a few ranges of guest RAM
(views to send or compress, ``pwrite`` and ``preadv`` calls, zero-fills)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import numpy.typing as npt

#: above this many pages numpy finds the runs faster than the Python loop (docs/performance.md)
NUMPY_RUNS_FROM = 384


def consecutive_runs(values: Sequence[int], step: int = 1) -> list[tuple[int, int]]:
    """Runs of consecutive values, each ``step`` after the one before, in the given order (the
    values need not be sorted): ``[(first, last + step), ...]``. Page indices with ``step`` 1
    (:func:`page_runs`), byte offsets of pages with ``step`` 4096.

    A plain loop: at a QEMU packet's 128 values, inside a busy channel process, one pass in
    Python costs less than the several numpy calls (or a C-level ``map`` trick) that would do
    the same (docs/performance.md, "Python per packet").
    """
    if not values:
        return []
    runs = []
    start = stop = values[0]
    for value in values:
        if value != stop:
            runs.append((start, stop))
            start = value
        stop = value + step
    runs.append((start, stop))
    return runs


def page_runs(idx: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Coalesce page indices into runs of consecutive pages: ``[(start, stop), ...]``, stops
    exclusive, in the given order (indices from the wire need not be sorted). Bigger packets
    (``packet-pages``) and snapshot regions find the runs with numpy: a Python step per run,
    not per page."""
    if len(idx) < NUMPY_RUNS_FROM:
        return consecutive_runs(idx.tolist())
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1  # where a run starts, after the first
    starts = idx[np.concatenate(([0], breaks))]
    stops = idx[np.concatenate((breaks - 1, [len(idx) - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist()))
