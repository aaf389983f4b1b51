"""QEMU 7.2 multifd channel structures: ``MultiFDInit_t`` and ``MultiFDPacket_t``.

Pure code: bytes in, validated values out (and back). Nothing here does I/O.
All integers are big-endian and the structures are packed (wire doc sections 1.2, 2.1).

``MultiFDInit_t`` (64 bytes) is the first thing on every multifd socket.
``MultiFDPacket_t`` is a 320-byte fixed part plus 128 offset slots (1344 bytes on 4 KiB
pages), always sent whole, followed by ``next_packet_size`` payload bytes when
``normal_pages > 0``. Two engines may agree on bigger packets (``packet-pages``, up to 1024):
then the header has that many slots, as ``pages_alloc`` says (QEMU's is always 128).

Receive-side validation follows QEMU 7.2 (``multifd_recv_unfill_packet``) with its
off-by-one fixed (a channel id must be ``< multifd-channels``): ramblock, offsets and
compression bits are only meaningful, and only checked, when the packet carries pages
because the sender leaves stale values in empty packets (doc 2.2).

``zero_pages`` is QEMU 9.0's field (``zero-page-detection=multifd``): the first u32 of the
reserved area after ``packet_num``, which QEMU 7.2 leaves zero. Such a packet lists its
``normal_pages`` offsets first, then its ``zero_pages`` offsets, and carries data only for the
normal ones. This engine's destination always understands it; its source sends it only when
asked to (a QEMU 7.2 destination would ignore the zero pages).
"""

from __future__ import annotations

import dataclasses
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, LocalProtocolError, RemoteProtocolError

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS  # 4096

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
MULTIFD_FLAG_SYNC = 1 << 0
MULTIFD_FLAG_COMPRESSION_MASK = 7 << 1
MULTIFD_FLAG_NOCOMP = 0 << 1
MULTIFD_FLAG_ZLIB = 1 << 1
MULTIFD_FLAG_ZSTD = 2 << 1
MULTIFD_FLAG_LZ4 = 3 << 1  # this engine's extension; QEMU 7.2 does not know it
#: QEMU 10.0's further methods and its VFIO device-state packets: named in the refusal
QEMU10_METHODS = {4 << 1: "qpl", 8 << 1: "uadk", 16 << 1: "qatzip"}
MULTIFD_FLAG_DEVICE_STATE = 32 << 1

MULTIFD_PACKET_SIZE = 512 * 1024
PAGES_PER_PACKET = MULTIFD_PACKET_SIZE // TARGET_PAGE_SIZE  # 128
#: packet-pages between two engines: QEMU's 128 (the default) up to this
MAX_PACKET_PAGES = 1024
RAMBLOCK_NAME_FIELD = 256
MAX_RAMBLOCK_NAME = 255
MAX_CHANNELS = 255

INIT_STRUCT = struct.Struct(">II16sB7s32s")
INIT_SIZE = INIT_STRUCT.size  # 64
#: magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
#: zero_pages (QEMU 9.0; reserved in 7.2), reserved, ramblock
PACKET_FIXED = struct.Struct(">IIIIIIQI28s256s")
PACKET_FIXED_SIZE = PACKET_FIXED.size  # 320


def header_size(packet_pages: int = PAGES_PER_PACKET) -> int:
    """The header of a packet with ``packet_pages`` offset slots (QEMU's: 1344 bytes)."""
    return PACKET_FIXED_SIZE + 8 * packet_pages


def max_payload(packet_pages: int = PAGES_PER_PACKET) -> int:
    """The largest payload a receiver of ``packet_pages``-page packets accepts (twice the pages,
    as QEMU's buffer; a compressor may expand incompressible pages a little)."""
    return 2 * packet_pages * TARGET_PAGE_SIZE


PACKET_HEADER_SIZE = header_size()  # 1344
#: The largest payload a QEMU 7.2 receiver accepts (its buffer is 2 x 512 KiB).
MAX_PACKET_PAYLOAD = max_payload()


def check_packet_pages(packet_pages: int) -> None:
    """``packet-pages`` is QEMU's 128 up to :data:`MAX_PACKET_PAGES` (a parameter: ConfigError)."""
    if not PAGES_PER_PACKET <= packet_pages <= MAX_PACKET_PAGES:
        raise ConfigError(f"packet-pages {packet_pages} is out of range, expected"
                          f" {PAGES_PER_PACKET}..{MAX_PACKET_PAGES} ({PAGES_PER_PACKET} for a QEMU peer)")

_ZERO_UUID = bytes(16)


def parse_uuid(text: str) -> bytes:
    """QEMU ``-uuid`` text (canonical form) -> the 16 raw bytes sent in ``MultiFDInit_t``."""
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise ValueError(f"invalid uuid {text!r}: expected the form 12345678-9abc-def0-1234-56789abcdef0") from None


def format_uuid(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


# --------------------------------------------------------------------------- init


@dataclass(frozen=True)
class MultiFDInit:
    """``MultiFDInit_t``: the 64-byte handshake of one multifd channel."""

    channel_id: int
    uuid: bytes = _ZERO_UUID
    magic: int = MULTIFD_MAGIC
    version: int = MULTIFD_VERSION

    def pack(self) -> bytes:
        if not 0 <= self.channel_id <= 255:
            raise LocalProtocolError(f"channel id {self.channel_id} does not fit in a u8")
        if len(self.uuid) != 16:
            raise LocalProtocolError(f"uuid is {len(self.uuid)} bytes, expected 16")
        return INIT_STRUCT.pack(self.magic, self.version, self.uuid, self.channel_id, bytes(7), bytes(32))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> MultiFDInit:
        if len(data) != INIT_SIZE:
            raise RemoteProtocolError(f"multifd handshake is {len(data)} bytes, expected {INIT_SIZE}")
        magic, version, uuid, channel_id, _u1, _u2 = INIT_STRUCT.unpack(data)
        return cls(channel_id=channel_id, uuid=bytes(uuid), magic=magic, version=version)


def validate_init(init: MultiFDInit, *, expected_uuid: bytes, channels: int, connected: set[int] | frozenset[int] = frozenset()) -> int:
    """Check a received handshake the way a QEMU 7.2 destination does; returns the channel id."""
    if init.magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(f"multifd handshake: received magic {init.magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if init.version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"multifd handshake: received version {init.version}, expected {MULTIFD_VERSION}")
    if init.uuid != expected_uuid:
        raise RemoteProtocolError(
            f"multifd handshake: received uuid '{format_uuid(init.uuid)}' and expected uuid "
            f"'{format_uuid(expected_uuid)}' for channel {init.channel_id}"
        )
    if init.channel_id >= channels:
        raise RemoteProtocolError(
            f"multifd handshake: received channel id {init.channel_id}, expected < {channels} (multifd-channels)"
        )
    if init.channel_id in connected:
        raise RemoteProtocolError(f"multifd handshake: received channel id {init.channel_id}, which is already set up")
    return init.channel_id


# ------------------------------------------------------------------------- packet


@dataclass(frozen=True)
class PacketHeader:
    """A decoded ``MultiFDPacket_t`` header.

    ``offsets`` holds only the first ``normal_pages`` slots, as native int64 byte offsets
    within ``ramblock``, and ``zero_offsets`` the next ``zero_pages`` ones; ``ramblock`` is
    ``""`` for empty packets (its value is stale).
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    ramblock: str
    offsets: npt.NDArray[np.int64]
    zero_offsets: npt.NDArray[np.int64] = dataclasses.field(default_factory=lambda: _NO_OFFSETS)

    @property
    def zero_pages(self) -> int:
        return len(self.zero_offsets)

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def compression(self) -> int:
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK


class PacketEncoder:
    """Builds packet headers into one reusable buffer (one per channel): 1344 bytes, or the
    header of ``packet_pages``-page packets.

    Unlike QEMU, stale slots and fields are cleared, so every header is deterministic.
    """

    def __init__(self, packet_pages: int = PAGES_PER_PACKET) -> None:
        check_packet_pages(packet_pages)
        self.packet_pages = packet_pages
        self.buf = bytearray(header_size(packet_pages))
        self._offsets = np.frombuffer(self.buf, dtype=">u8", count=packet_pages, offset=PACKET_FIXED_SIZE)
        self._little = self._offsets.view("<i8")  # the same slots, for encode_pages
        self._used = 0

    def encode(
        self,
        *,
        flags: int,
        packet_num: int,
        ramblock: bytes = b"",
        offsets: npt.NDArray[np.integer] | None = None,
        next_packet_size: int = 0,
        pages_alloc: int | None = None,
        zero_pages: int = 0,
    ) -> bytearray:
        """``offsets`` lists the normal pages' offsets, then the last ``zero_pages`` are the
        zero pages' (``zero-page-detection=multifd``). ``pages_alloc`` defaults to the slots."""
        n = 0 if offsets is None else len(offsets)
        self._fixed(flags, packet_num, ramblock, n, zero_pages, next_packet_size,
                    self.packet_pages if pages_alloc is None else pages_alloc)
        if n:
            self._offsets[:n] = offsets
        return self._clear_from(n)

    def encode_pages(
        self, *, flags: int, packet_num: int, ramblock: bytes, pages: npt.NDArray[np.int64], next_packet_size: int,
        zero_pages: int = 0,
    ) -> bytearray:
        """:meth:`encode` from page indices, as a source channel holds them (normal pages first,
        then the last ``zero_pages`` are the zero pages'): shifted into the header's byte
        offsets in place (a shift, then a byte swap: cheaper than one casting ufunc into the
        big-endian slots). Same header, same checks."""
        n = len(pages)
        self._fixed(flags, packet_num, ramblock, n, zero_pages, next_packet_size, self.packet_pages)
        slots = self._little[:n]
        np.left_shift(pages, TARGET_PAGE_BITS, out=slots)
        slots.byteswap(inplace=True)
        return self._clear_from(n)

    def _fixed(self, flags: int, packet_num: int, ramblock: bytes, n: int, zero_pages: int,
               next_packet_size: int, pages_alloc: int) -> None:
        """Check what a header of ``n`` offsets can hold and write its fixed part."""
        if n > self.packet_pages:
            raise LocalProtocolError(f"packet with {n} pages, at most {self.packet_pages} fit")
        if not 0 <= zero_pages <= n:
            raise LocalProtocolError(f"packet with {zero_pages} zero pages among {n} offsets")
        if len(ramblock) > MAX_RAMBLOCK_NAME:
            raise LocalProtocolError(f"RAM block name of {len(ramblock)} bytes, at most {MAX_RAMBLOCK_NAME}")
        if next_packet_size > max_payload(self.packet_pages):
            raise LocalProtocolError(f"payload of {next_packet_size} bytes, at most {max_payload(self.packet_pages)}")
        PACKET_FIXED.pack_into(
            self.buf, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, pages_alloc, n - zero_pages, next_packet_size,
            packet_num, zero_pages, bytes(28), ramblock,
        )

    def _clear_from(self, n: int) -> bytearray:
        """Zero the offset slots the previous header used beyond the ``n`` just written."""
        if self._used > n:
            self.buf[PACKET_FIXED_SIZE + 8 * n:PACKET_FIXED_SIZE + 8 * self._used] = bytes(8 * (self._used - n))
        self._used = n
        return self.buf


def encode_packet_header(**kwargs: object) -> bytes:
    """One-off header encoding (tests, tools); hot paths keep a :class:`PacketEncoder`."""
    return bytes(PacketEncoder().encode(**kwargs))  # type: ignore[arg-type]


def decode_packet_header(
    data: bytes | bytearray | memoryview,
    *,
    channel: int,
    expected_compression: int,
    blocks: Mapping[str, int],
    page_size: int = TARGET_PAGE_SIZE,
    expected_name: str = "",
    packet_pages: int = PAGES_PER_PACKET,
) -> PacketHeader:
    """Decode and validate one header (1344 bytes, or that of ``packet_pages``-page packets)
    before anything touches memory.

    ``blocks`` maps RAM block names to their lengths in bytes. Raises
    :class:`RemoteProtocolError` naming the channel, the packet_num and received vs expected.
    """
    if len(data) != header_size(packet_pages):
        raise RemoteProtocolError(
            f"multifd channel {channel}: packet header is {len(data)} bytes, expected {header_size(packet_pages)}"
        )
    flags, pages_alloc, normal_pages, next_size, packet_num, zero_pages, name_field = check_header_start(
        data, channel=channel, packet_pages=packet_pages)
    where = f"multifd channel {channel}, packet_num {packet_num}"
    if normal_pages > pages_alloc:
        raise RemoteProtocolError(
            f"{where}: received normal_pages {normal_pages}, expected <= pages_alloc {pages_alloc}"
        )
    if zero_pages > pages_alloc - normal_pages:
        raise RemoteProtocolError(
            f"{where}: received zero_pages {zero_pages}, expected <= pages_alloc - normal_pages"
            f" {pages_alloc - normal_pages}"
        )
    if flags & MULTIFD_FLAG_DEVICE_STATE and (normal_pages or zero_pages):  # empty: stale bits (doc 2.2)
        raise RemoteProtocolError(
            f"{where}: received a DEVICE_STATE packet (flags {flags:#x}: VFIO device state, QEMU 10.0),"
            " expected RAM pages: this engine migrates no VFIO device"
        )
    other = next((name for bit, name in QEMU10_METHODS.items() if flags & (0x1F << 1) == bit), None)
    if other is not None and (normal_pages or zero_pages):
        raise RemoteProtocolError(
            f"{where}: received compression flags {flags & (0x1F << 1):#x} ({other}, QEMU 10.0), expected"
            f" {expected_compression:#x}" + (f" ({expected_name})" if expected_name else "")
            + f": this engine has no {other}"
        )
    if normal_pages == 0 and zero_pages == 0:
        # ramblock, next_packet_size and the compression bits are stale here (doc 2.2).
        return PacketHeader(flags, pages_alloc, 0, 0, packet_num, "", _NO_OFFSETS)
    compression = flags & MULTIFD_FLAG_COMPRESSION_MASK
    if normal_pages == 0:
        next_size = 0  # no payload follows, whatever the field says
    elif compression != expected_compression:
        raise RemoteProtocolError(
            f"{where}: received compression flags {compression:#x}, expected {expected_compression:#x}"
            + (f" ({expected_name})" if expected_name else "")
        )
    if compression == MULTIFD_FLAG_NOCOMP:
        if next_size != normal_pages * page_size and next_size != 0:
            # QEMU 7.2 ignores the field for 'none'; a wrong non-zero value means a broken peer.
            raise RemoteProtocolError(
                f"{where}: received next_packet_size {next_size}, expected {normal_pages * page_size}"
                f" ({normal_pages} pages)"
            )
    elif next_size > max_payload(packet_pages):
        raise RemoteProtocolError(
            f"{where}: received next_packet_size {next_size}, expected <= {max_payload(packet_pages)}")
    name = _block_name(name_field)
    length = blocks.get(name)
    if length is None:
        raise RemoteProtocolError(f"{where}: received unknown RAM block {name!r}, expected one of {sorted(blocks)}")
    count = normal_pages + zero_pages
    offsets = np.frombuffer(data, dtype=">u8", count=count, offset=PACKET_FIXED_SIZE).astype(np.int64)
    # Three reductions decide; an offset >= 2**63 reads as negative. Only a bad header pays
    # for finding the first bad slot.
    if (int(np.bitwise_or.reduce(offsets)) & (page_size - 1)) or offsets.min() < 0 or offsets.max() > length - page_size:
        bad = (offsets & (page_size - 1)) != 0
        bad |= offsets > length - page_size
        bad |= offsets < 0
        i = int(np.argmax(bad))
        raw = int(np.frombuffer(data, dtype=">u8", count=1, offset=PACKET_FIXED_SIZE + 8 * i)[0])
        raise RemoteProtocolError(
            f"{where}: received offset[{i}] {raw:#x} in RAM block {name!r}, expected a multiple of "
            f"{page_size:#x} below {length:#x}"
        )
    if zero_pages:
        return PacketHeader(flags, pages_alloc, normal_pages, next_size, packet_num, name,
                            offsets[:normal_pages], offsets[normal_pages:])
    return PacketHeader(flags, pages_alloc, normal_pages, next_size, packet_num, name, offsets)


def check_header_start(data: bytes | bytearray | memoryview, *, channel: int,
                       packet_pages: int = PAGES_PER_PACKET) -> tuple[int, int, int, int, int, int, bytes]:
    """Check a header's fixed part (magic, version, ``pages_alloc``), which is all a receiver
    needs to know the header's length; returns flags, pages_alloc, normal_pages,
    next_packet_size, packet_num, zero_pages and the ramblock field."""
    magic, version, flags, pages_alloc, normal, size, num, zero, _, name = PACKET_FIXED.unpack_from(data, 0)
    where = f"multifd channel {channel}, packet_num {num}"
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(f"{where}: received packet magic {magic:#010x}, expected {MULTIFD_MAGIC:#010x}")
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"{where}: received packet version {version}, expected {MULTIFD_VERSION}")
    if not pages_alloc_fits(pages_alloc, packet_pages):
        raise RemoteProtocolError(f"{where}: received pages_alloc {pages_alloc}, expected"
                                  f" {_alloc_rule(packet_pages, pages_alloc)}")
    return flags, pages_alloc, normal, size, num, zero, name


def pages_alloc_fits(pages_alloc: int, packet_pages: int) -> bool:
    """QEMU's rule for its 128 slots (at most 128); with other sizes the header's length
    depends on ``pages_alloc``, so it must be exactly this side's packet-pages."""
    return pages_alloc <= packet_pages if packet_pages == PAGES_PER_PACKET else pages_alloc == packet_pages


def _alloc_rule(packet_pages: int, pages_alloc: int) -> str:
    """What ``pages_alloc`` must be (:func:`pages_alloc_fits`), in words, with a hint."""
    if packet_pages == PAGES_PER_PACKET:
        return f"<= {PAGES_PER_PACKET}" + (" (an engine source with packet-pages? set the same on both sides)"
                                           if PAGES_PER_PACKET < pages_alloc <= MAX_PACKET_PAGES else "")
    return f"{packet_pages} (packet-pages: the source must set the same; a QEMU source sends {PAGES_PER_PACKET})"


def _block_name(field: bytes) -> str:
    """The RAM block id in a packet's 256-byte ``ramblock`` field (NUL-terminated)."""
    return field[:MAX_RAMBLOCK_NAME].split(b"\0", 1)[0].decode("utf-8", "replace")


class PlainPacket(NamedTuple):
    """A packet read by :func:`plain_packet`: its block and its page offsets in bytes, as
    listed on the wire (checked): a big-endian view of the header's offset slots, so it is
    valid until the header's buffer takes the next header."""

    ramblock: str
    offsets: npt.NDArray[np.uint64]


_WIRE_OFFSET = np.dtype(">u8")  # a page offset as a header lists it
_IN_PAGE = np.uint64(TARGET_PAGE_SIZE - 1)


def plain_packet(data: bytes | bytearray | memoryview, blocks: Mapping[str, int],
                 packet_pages: int = PAGES_PER_PACKET) -> PlainPacket | None:
    """The common packet, checked without a Python loop: raw pages (``none``) of a known
    block, no flags, no zero pages, every offset page-aligned and inside the block.

    Anything else, valid or not, gives None and goes to :func:`decode_packet_header`, which
    knows every case and names what is wrong; this only decides "plain or not", so it never
    accepts a header that :func:`decode_packet_header` would reject. The destination's
    channels take this path for almost every packet, so the offsets are checked where they
    lie, by numpy: their bound by one ``max``, their alignment by one OR of them all (a set
    low bit anywhere shows in it). No Python object per offset, which matters most for
    bigger packets (docs/performance.md).
    """
    magic, version, flags, pages_alloc, normal, size, _, zero, _, name_field = PACKET_FIXED.unpack_from(data, 0)
    if (magic != MULTIFD_MAGIC or version != MULTIFD_VERSION or flags or zero
            or not 0 < normal <= pages_alloc or not pages_alloc_fits(pages_alloc, packet_pages)
            or (size and size != normal * TARGET_PAGE_SIZE)):
        return None
    name = _block_name(name_field)
    length = blocks.get(name)
    if length is None:
        return None
    offsets = np.frombuffer(data, _WIRE_OFFSET, normal, PACKET_FIXED_SIZE)
    if offsets.max() > length - TARGET_PAGE_SIZE or np.bitwise_or.reduce(offsets) & _IN_PAGE:
        return None
    return PlainPacket(name, offsets)


_NO_OFFSETS: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
_NO_OFFSETS.flags.writeable = False

