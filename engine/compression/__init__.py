"""Multifd compression methods (none, zlib, zstd, lz4) behind one registry.

Importing this package imports every method module in it; each registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import MultiFDMethod, PacketSink, PageBatch, RecvContext, SendContext
from .registry import (
    UnknownMethodError,
    get_method,
    method_for_flag,
    method_name_for_flag,
    method_names,
    register_method,
)

_INFRA = {"base", "registry"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "none", m.name)):
    if _info.name not in _INFRA:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "MultiFDMethod",
    "PacketSink",
    "PageBatch",
    "RecvContext",
    "SendContext",
    "UnknownMethodError",
    "get_method",
    "method_name_for_flag",
    "method_for_flag",
    "method_names",
    "register_method",
]
