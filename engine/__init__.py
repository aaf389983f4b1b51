"""A QEMU 7.2-compatible multifd live-migration engine.

Public API::

    from engine import GuestRam, BlockSpec, MigrationParams, migrate, run_incoming
"""

from __future__ import annotations

import os as _os
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from .destination.incoming import IncomingMigration, run_incoming
    from .memory.ram import BlockSpec, GuestRam, RamBlock
    from .params import MigrationParams, parse_size
    from .source.migration import Migration, migrate

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


_LAZY = {
    "MigrationParams": "params", "parse_size": "params",
    "BlockSpec": "memory.ram", "GuestRam": "memory.ram", "RamBlock": "memory.ram",
    "Migration": "source.migration", "migrate": "source.migration",
    "IncomingMigration": "destination.incoming", "run_incoming": "destination.incoming",
}


def __getattr__(name: str) -> object:
    # Everything that needs numpy imports lazily: `import engine` (and so `python -m engine`
    # before its own start-up) stays light, and a Ctrl-C during start-up meets our handler.
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
