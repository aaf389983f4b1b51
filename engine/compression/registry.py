"""The method registry: a dict, one :func:`register_method`, and one lookup error.

Built-in methods live in sibling modules that call :func:`register_method` when imported;
``engine.compression`` imports every module of the package, so adding a method is one module
whose last line registers it.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import MultiFDMethod

_METHODS: dict[str, MultiFDMethod] = {}
_BY_FLAG: dict[int, MultiFDMethod] = {}


class UnknownMethodError(ConfigError):
    """No compression method of that name (or flag) is registered."""


def register_method(method: MultiFDMethod) -> MultiFDMethod:
    old = _BY_FLAG.get(method.flag)
    if old is not None and old.name != method.name:
        raise ValueError(f"flag {method.flag:#x} of {method.name!r} is taken by {old.name!r}")
    _METHODS[method.name] = method
    _BY_FLAG[method.flag] = method
    return method


def get_method(name: str) -> MultiFDMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown multifd-compression {name!r}, expected one of {', '.join(method_names())}"
        ) from None


def method_for_flag(flag: int) -> MultiFDMethod:
    try:
        return _BY_FLAG[flag]
    except KeyError:
        raise UnknownMethodError(f"unknown multifd compression flags {flag:#x}") from None


def method_name_for_flag(flag: int) -> str:
    """The registered name of a compression flag value (for messages and reports)."""
    method = _BY_FLAG.get(flag)
    return method.name if method is not None else f"unknown method {flag:#x}"


def method_names() -> list[str]:
    return list(_METHODS)
