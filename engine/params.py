"""Migration parameters with QEMU's names and defaults, validated once, up front.

| field            | QEMU parameter          | default                   |
|------------------|-------------------------|---------------------------|
| channels         | multifd-channels        | 2 (1..255)                |
| compression      | multifd-compression     | none                      |
| level            | multifd-zlib-level / multifd-zstd-level (lz4: acceleration) | 1 |
| uuid             | -uuid (channel handshake) | all zeros               |
| machine          | -machine (configuration section) | none             |
| zero_page_detection | zero-page-detection (QEMU 9.0): legacy, multifd or none | legacy (QEMU 9.0: multifd) |
| tcp_congestion   | (engine) the source's TCP congestion control: auto or an algorithm | auto |

``zero-page-detection``: ``legacy`` (QEMU 7.2's only behaviour) scans pages in the migration
thread and sends zero pages as ZERO records on the main channel; ``multifd`` scans them in the
channel processes and lists them in the packets' ``zero_pages`` field, which a QEMU 7.2
destination ignores, so use it only towards this engine (whose destination always accepts
it); ``none`` sends every page whole. The default stays ``legacy`` so that a migration into a
QEMU 7.2 destination is correct without extra settings.

``tcp-congestion``: ``auto`` uses ``cubic`` (else ``reno``) towards a destination on this host
and the system's default towards any other; a name (``cubic``, ``bbr``, ...) is used for every
TCP connection of the migration. QEMU leaves the system's default everywhere; on a host whose
default is BBR, its pacing slows a same-host migration (see ``transport``).

Precopy (QEMU names and defaults, except where noted):

| max_bandwidth          | max-bandwidth (bytes/s, headers included) | 0 = unlimited (QEMU: 128 MiB/s) |
| downtime_limit         | downtime-limit (ms)                       | 300                       |
| auto_converge          | auto-converge capability                  | off                       |
| cpu_throttle_initial   | cpu-throttle-initial (%)                  | 20                        |
| cpu_throttle_increment | cpu-throttle-increment (%)                | 10                        |
| max_cpu_throttle       | max-cpu-throttle (%)                      | 99                        |
| max_iterations         | (engine) fail instead of iterating forever | 100                      |
| max_time               | (engine) fail after this many seconds      | 0 = no limit             |

Engine-only deadlines (QEMU has none and can hang; the engine never does):

| handshake_timeout | connect + every channel's 64-byte handshake | 15 s |
| stall_timeout     | any single wait for the peer or a channel    | 60 s |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .compression import get_method
from .compression.base import MultiFDMethod
from .errors import ConfigError
from .wire.packet import MAX_CHANNELS, parse_uuid

DEFAULT_CHANNELS = 2
DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_STALL_TIMEOUT = 60.0
ZERO_PAGE_DETECTION = ("legacy", "multifd", "none")
_CONGESTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")  # TCP_CA_NAME_MAX is 16 with the NUL

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)(?:i?[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str, what: str = "size") -> int:
    """QEMU-style sizes: plain bytes or a K/M/G/T/P/E suffix (binary units), e.g. ``1G``, ``512M``."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"invalid {what} {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 1G")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise ConfigError(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(value)


@dataclass(frozen=True)
class MigrationParams:
    channels: int = DEFAULT_CHANNELS
    compression: str = "none"
    level: int | None = None
    uuid: bytes = bytes(16)
    machine: str = "none"
    zero_page_detection: str = "legacy"
    tcp_congestion: str = "auto"
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    max_bandwidth: int = 0
    downtime_limit: int = 300
    auto_converge: bool = False
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    max_iterations: int = 100
    max_time: float = 0.0
    method: MultiFDMethod = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise ConfigError(f"multifd-channels {self.channels} is out of range, expected 1..{MAX_CHANNELS}")
        method = get_method(self.compression)
        object.__setattr__(self, "method", method)
        if self.level is not None:
            try:
                method.check_level(self.level)
            except Exception as exc:
                raise ConfigError(str(exc)) from None
        if self.zero_page_detection not in ZERO_PAGE_DETECTION:
            raise ConfigError(
                f"zero-page-detection {self.zero_page_detection!r} is not supported, expected one of"
                f" {', '.join(ZERO_PAGE_DETECTION)}"
            )
        if not _CONGESTION_NAME.match(self.tcp_congestion):
            raise ConfigError(
                f"tcp-congestion {self.tcp_congestion!r} is not a congestion control name: expected auto or"
                " an algorithm such as cubic, reno or bbr"
            )
        if len(self.uuid) != 16:
            raise ConfigError(f"uuid is {len(self.uuid)} bytes, expected 16")
        if not self.machine or len(self.machine.encode()) > 255:
            raise ConfigError(f"machine name {self.machine!r} must be 1..255 bytes")
        for name in ("handshake_timeout", "stall_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.max_bandwidth < 0:
            raise ConfigError(f"max-bandwidth {self.max_bandwidth} must be >= 0 (0 = unlimited)")
        if not 0 <= self.downtime_limit <= 2_000_000:
            raise ConfigError(f"downtime-limit {self.downtime_limit} is out of range, expected 0..2000000 ms")
        for name, lo, hi in (("cpu_throttle_initial", 1, 99), ("cpu_throttle_increment", 1, 99), ("max_cpu_throttle", 1, 99)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f"{name.replace('_', '-')} {v} is out of range, expected {lo}..{hi}")
        if self.max_iterations < 1:
            raise ConfigError(f"max-iterations {self.max_iterations} must be >= 1")
        if self.max_time < 0:
            raise ConfigError(f"max-time {self.max_time} must be >= 0 (0 = no limit)")

    @property
    def effective_level(self) -> int:
        return self.method.default_level if self.level is None else self.level

    @staticmethod
    def uuid_from_text(text: str) -> bytes:
        try:
            return parse_uuid(text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
