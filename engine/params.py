"""Migration parameters with QEMU's names and defaults, validated once, up front.

:class:`MigrationParams` is frozen: one value describes a whole job, and a change while it runs
(``set_parameters``, QEMU's ``migrate-set-parameters``) replaces it. Field names are QEMU's
parameter names with underscores (``channels`` is ``multifd-channels``) and the defaults are
QEMU's, except ``max_bandwidth`` (0 = unlimited; QEMU limits by default) and the multifd
dialect: ``compat`` (default 7.2, so that a QEMU 7.2 destination needs no extra setting) sets
``zero_page_detection``, ``multifd_flush_after_each_section`` and ``send_switchover_start`` as
QEMU's machine-type compat properties do. The engine adds ``tcp_congestion``, ``packet_pages``,
``max_iterations``, ``max_time`` and two deadlines (QEMU has none and can hang). Every check
raises :class:`ConfigError` naming the received and the accepted values.
Every parameter (QEMU name, CLI flag, field, default, meaning): docs/parameters.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .compression import get_method
from .compression.base import MultiFDMethod
from .errors import ConfigError
from .wire.packet import MAX_CHANNELS, PAGES_PER_PACKET, check_packet_pages, parse_uuid

DEFAULT_CHANNELS = 2
DEFAULT_HANDSHAKE_TIMEOUT = 15.0
DEFAULT_STALL_TIMEOUT = 60.0
ZERO_PAGE_DETECTION = ("legacy", "multifd", "none")
DEFAULT_COMPAT = "7.2"
COMPAT_RANGE = ((7, 2), (10, 0))
VERSIONED_MACHINE = re.compile(r"^pc-(?:i440fx|q35)-(\d+)\.(\d+)$")
_CONGESTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")  # TCP_CA_NAME_MAX is 16 with the NUL

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)(?:i?[bB])?\s*$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def _compat_version(text: str) -> tuple[int, int]:
    lo, hi = COMPAT_RANGE
    m = re.match(r"^(\d+)\.(\d+)$", text.strip())
    version = (int(m.group(1)), int(m.group(2))) if m else None
    if version is None or not lo <= version <= hi:
        raise ConfigError(f"compat {text!r} is not a QEMU version this engine speaks, expected"
                          f" {lo[0]}.{lo[1]} .. {hi[0]}.{hi[1]}")
    return version


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
    channels: int = DEFAULT_CHANNELS  # multifd-channels, 1..255
    compression: str = "none"  # multifd-compression: a registered method's name
    level: int | None = None  # multifd-zlib-level / multifd-zstd-level / lz4 acceleration (None: the method's default)
    uuid: bytes = bytes(16)  # -uuid, sent in every channel handshake
    machine: str = "none"  # -machine, sent in the configuration section
    #: the QEMU version whose multifd dialect the source speaks, "7.2" .. "10.0" (None: from a
    #: versioned machine type such as pc-i440fx-9.2, else 7.2); it sets the next three defaults
    #: as QEMU's machine-type compat properties do
    compat: str | None = None
    zero_page_detection: str | None = None  # zero-page-detection: legacy (<= 8.2), multifd (9.0+) or none
    multifd_flush_after_each_section: bool | None = None  # on up to 8.0: sync at every EOS, no 0x200 records
    send_switchover_start: bool | None = None  # on from 10.0: SWITCHOVER_START before the END section
    tcp_congestion: str = "auto"  # (engine) the source's TCP congestion control: auto or a name
    zero_copy_send: bool = False  # the zero-copy-send capability: MSG_ZEROCOPY on the channel sockets
    #: (engine) pages per multifd packet: QEMU's 128, or up to 1024 when both sides are this
    #: engine and set the same (fewer packets: less work per byte in every channel)
    packet_pages: int = PAGES_PER_PACKET
    #: tls-creds: a directory as QEMU's tls-creds-x509 reads it (ca-cert.pem and the endpoint's
    #: certificate and key); TLS on every channel. None: plain text
    tls_creds: str | None = None
    tls_hostname: str | None = None  # tls-hostname: the name the destination's certificate must carry (source)
    tls_authz: tuple[str, ...] = ()  # tls-authz: client DNs allowed, exact or glob (destination); empty: any
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT  # (engine) connect + each 64-byte handshake, s
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # (engine) any single wait on the peer or a channel, s
    max_bandwidth: int = 0  # max-bandwidth, bytes/s with headers; 0 = unlimited (QEMU has a default limit)
    downtime_limit: int = 300  # downtime-limit, ms
    auto_converge: bool = False  # the auto-converge capability
    cpu_throttle_initial: int = 20  # cpu-throttle-initial, %
    cpu_throttle_increment: int = 10  # cpu-throttle-increment, %
    max_cpu_throttle: int = 99  # max-cpu-throttle, %
    max_iterations: int = 100  # (engine) fail instead of iterating forever
    max_time: float = 0.0  # (engine) fail after this many seconds; 0 = no limit
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
        self._resolve_compat()
        if self.zero_page_detection not in ZERO_PAGE_DETECTION:
            raise ConfigError(
                f"zero-page-detection {self.zero_page_detection!r} is not supported, expected one of"
                f" {', '.join(ZERO_PAGE_DETECTION)}"
            )
        if self.zero_copy_send and (self.compression != "none" or self.zero_page_detection == "multifd"):
            raise ConfigError(
                f"zero-copy-send needs multifd-compression none and zero-page-detection legacy or none,"
                f" got {self.compression} and {self.zero_page_detection} (only guest RAM itself can be sent"
                f" without a copy)"
            )
        self._check_tls()
        check_packet_pages(self.packet_pages)
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

    def _check_tls(self) -> None:
        authz = self.tls_authz  # one pattern, or any sequence of them: a tuple (the params stay hashable)
        object.__setattr__(self, "tls_authz", (authz,) if isinstance(authz, str) else tuple(authz))
        if self.tls_creds is None:
            for name in ("tls_hostname", "tls_authz"):
                if getattr(self, name):
                    raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)!r} needs tls-creds"
                                      " (a directory with ca-cert.pem and the endpoint's certificate and key)")
            return
        if not self.tls_creds:
            raise ConfigError("tls-creds is empty, expected a directory (or leave it unset for plain text)")
        if self.zero_copy_send:
            raise ConfigError("zero-copy-send is not available with tls-creds: TLS encrypts every byte in user"
                              " space, so there is nothing for the kernel to send in place (as in QEMU)")
        if self.tls_hostname is not None and not self.tls_hostname.strip():
            raise ConfigError("tls-hostname is empty, expected the name in the destination's certificate")

    def _resolve_compat(self) -> None:
        """Fill the dialect's unset settings from ``compat`` (frozen: set once, here)."""
        compat = self.compat
        if compat is None:
            m = VERSIONED_MACHINE.match(self.machine)
            compat = f"{int(m.group(1))}.{int(m.group(2))}" if m else DEFAULT_COMPAT
        version = _compat_version(compat)
        defaults = {
            "compat": f"{version[0]}.{version[1]}",
            "zero_page_detection": "legacy" if version < (9, 0) else "multifd",
            "multifd_flush_after_each_section": version <= (8, 0),
            "send_switchover_start": version >= (10, 0),
        }
        for name, value in defaults.items():
            if name == "compat" or getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @property
    def dialect(self) -> dict[str, object]:
        """What the source speaks, with QEMU's names (for ``--json`` and the summary)."""
        return {"compat": self.compat, "zero-page-detection": self.zero_page_detection,
                "multifd-flush-after-each-section": self.multifd_flush_after_each_section,
                "send-switchover-start": self.send_switchover_start}

    @property
    def effective_level(self) -> int:
        return self.method.default_level if self.level is None else self.level

    @staticmethod
    def uuid_from_text(text: str) -> bytes:
        try:
            return parse_uuid(text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
