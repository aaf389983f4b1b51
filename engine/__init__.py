"""A QEMU 7.2-compatible multifd live-migration engine.

Public API::

    from engine import GuestRam, BlockSpec, MigrationParams, migrate, run_incoming
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # channel processes need no BLAS thread pools

from .errors import (
    ChannelClosed,
    ChannelError,
    CompressionError,
    ConfigError,
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    ProtocolError,
    RemoteProtocolError,
    TruncatedError,
)
from .params import MigrationParams, parse_size
from .ram import BlockSpec, GuestRam, RamBlock

__all__ = [
    "BlockSpec",
    "ChannelClosed",
    "ChannelError",
    "CompressionError",
    "ConfigError",
    "GuestRam",
    "IncomingMigration",
    "MigrationCancelled",
    "MigrationError",
    "MigrationParams",
    "MigrationTimeout",
    "ProtocolError",
    "RamBlock",
    "RemoteProtocolError",
    "TruncatedError",
    "Migration",
    "migrate",
    "parse_size",
    "run_incoming",
]


def __getattr__(name: str) -> object:
    # the process-level entry points import lazily, to keep `import engine` light
    if name in ("migrate", "Migration"):
        from . import migration

        return getattr(migration, name)
    if name == "IncomingMigration":
        from .incoming import IncomingMigration

        return IncomingMigration
    if name == "run_incoming":
        from .destination import run_incoming

        return run_incoming
    raise AttributeError(name)
