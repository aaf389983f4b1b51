"""Conformance suite for the multifd compression methods, pure (no sockets, no processes).

Every test marked "conformance" is parametrised over ``method_names()``, so a newly registered
method is covered without touching this file. The channel is replaced by two small doubles:
:class:`ArrayBatch` (a ``PageBatch`` whose ``gather()`` reuses one scratch array, like the
send channel's) and :class:`BytesPacket` (a ``PacketSink`` whose ``read_payload()`` returns a
view of one reused per-channel buffer, like the receive channel's). Both buffers are scribbled
over after each packet, so a method that keeps a reference to them across packets fails.

Corrupt payloads and QEMU-format facts: test_compression_streams.py; the doubles and page
makers: compression_support.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.compression import (
    MultiFDMethod,
    RecvContext,
    SendContext,
    UnknownMethodError,
    get_method,
    method_for_flag,
    method_names,
    register_method,
)
from engine.compression import registry
from engine.compression.base import Buffer, PacketSink, PageBatch
from engine.errors import CompressionError, ConfigError, MigrationError
from engine.wire.packet import (
    MAX_PACKET_PAYLOAD,
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_FLAG_NOCOMP,
    PAGES_PER_PACKET,
)

from compression_support import METHODS, sender, receiver, KINDS, make_pages, mixed_packets


# ----------------------------------------------------------------- registry


def test_builtin_methods_are_registered() -> None:
    assert {"none", "zlib", "zstd", "lz4"} <= set(METHODS)
    assert len(set(METHODS)) == len(METHODS)


@pytest.mark.parametrize(
    ("name", "flag", "qemu"),
    [("none", 0, True), ("zlib", 2, True), ("zstd", 4, True), ("lz4", 6, False)],
    ids=["none", "zlib", "zstd", "lz4"],
)
def test_method_flags(name: str, flag: int, qemu: bool) -> None:
    method = get_method(name)
    assert method.name == name
    assert method.flag == flag
    assert method.qemu_compatible is qemu
    assert method_for_flag(flag) is method


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_method_metadata(name: str) -> None:
    method = get_method(name)
    assert method.name == name
    assert method.flag & ~MULTIFD_FLAG_COMPRESSION_MASK == 0, "compression bits are 1..3 of the packet flags"
    assert method_for_flag(method.flag) is method
    lo, hi = method.level_range
    assert lo <= method.default_level <= hi


def test_flags_are_unique() -> None:
    flags = [get_method(n).flag for n in METHODS]
    assert len(set(flags)) == len(flags)


@pytest.mark.parametrize("name", ["lzo", "", "ZLIB", "zlib "], ids=["lzo", "empty", "upper", "space"])
def test_unknown_method_lists_valid_names(name: str) -> None:
    with pytest.raises(UnknownMethodError) as info:
        get_method(name)
    assert str(info.value) == f"unknown multifd-compression {name!r}, expected one of {', '.join(METHODS)}"
    for valid in ("none", "zlib", "zstd", "lz4"):
        assert valid in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, MigrationError)


def test_unknown_flag() -> None:
    with pytest.raises(UnknownMethodError, match=r"^unknown multifd compression flags 0x8$"):
        method_for_flag(0x8)


def test_register_refuses_a_taken_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_FLAG", dict(registry._BY_FLAG))
    zlib_method = get_method("zlib")
    clash = MultiFDMethod("clash", zlib_method.flag, zlib_method.send_setup, zlib_method.recv_setup)
    with pytest.raises(ValueError, match=r"^flag 0x2 of 'clash' is taken by 'zlib'$"):
        register_method(clash)
    assert "clash" not in method_names()


class _IdentitySend(SendContext):
    def send_prepare(self, batch: PageBatch) -> Sequence[Buffer]:
        return [batch.gather()]


class _IdentityRecv(RecvContext):
    def recv_pages(self, packet: PacketSink) -> None:
        packet.scatter(packet.read_payload())


def test_register_a_new_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BY_FLAG", dict(registry._BY_FLAG))
    method = register_method(MultiFDMethod("identity", 7 << 1, lambda level: _IdentitySend(), _IdentityRecv))
    assert get_method("identity") is method is method_for_flag(0xE)
    assert "identity" in method_names()
    pages = make_pages(3, ["random"], 0)
    assert np.array_equal(receiver("identity").recv(sender("identity").send(pages), 3), pages)


# -------------------------------------------------------------------- levels


def test_qemu_level_ranges_are_pinned() -> None:
    zl, zs = get_method("zlib"), get_method("zstd")
    assert (zl.level_range, zl.default_level, zl.level_parameter) == ((0, 9), 1, "multifd-zlib-level")
    assert (zs.level_range, zs.default_level, zs.level_parameter) == ((0, 20), 1, "multifd-zstd-level")


@pytest.mark.parametrize(
    ("name", "level", "message"),
    [
        ("zlib", 10, "multifd-zlib-level 10 is out of range, expected 0..9"),
        ("zlib", -1, "multifd-zlib-level -1 is out of range, expected 0..9"),
        ("zstd", 21, "multifd-zstd-level 21 is out of range, expected 0..20"),
        ("zstd", -1, "multifd-zstd-level -1 is out of range, expected 0..20"),
    ],
    ids=["zlib-10", "zlib-negative", "zstd-21", "zstd-negative"],
)
def test_level_out_of_range(name: str, level: int, message: str) -> None:
    with pytest.raises(CompressionError) as info:
        get_method(name).check_level(level)
    assert str(info.value) == message


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_check_level_bounds(name: str) -> None:
    method = get_method(name)
    lo, hi = method.level_range
    for level in (lo, method.default_level, hi):
        assert method.check_level(level) == level
    what = method.level_parameter or f"{name} level"
    for level in (lo - 1, hi + 1):
        with pytest.raises(CompressionError, match=f"^{what} {level} is out of range, expected {lo}..{hi}$"):
            method.check_level(level)


def _levels(name: str) -> list[int]:
    method = get_method(name)
    return sorted({method.level_range[0], method.default_level, method.level_range[1]})


LEVEL_CASES = [(name, level) for name in METHODS for level in _levels(name)]


@pytest.mark.parametrize(("name", "level"), LEVEL_CASES, ids=[f"{n}-{lv}" for n, lv in LEVEL_CASES])
def test_conformance_round_trip_at_level_bounds(name: str, level: int) -> None:
    tx, rx = sender(name, level), receiver(name)
    for pages in mixed_packets(4, seed=level % 97):
        assert np.array_equal(rx.recv(tx.send(pages), len(pages)), pages)


@pytest.mark.parametrize(("name", "level"), LEVEL_CASES, ids=[f"{n}-{lv}" for n, lv in LEVEL_CASES])
def test_conformance_worst_case_payload_fits_a_qemu_receiver(name: str, level: int) -> None:
    """128 incompressible pages must stay within the receiver's 1 MiB buffer (doc 2.3)."""
    tx, rx = sender(name, level), receiver(name)
    for seed, kinds in enumerate([["text"], ["random"], ["zero"], ["random"]]):
        pages = make_pages(PAGES_PER_PACKET, kinds, seed)
        payload = tx.send(pages)
        assert 0 < len(payload) <= MAX_PACKET_PAYLOAD
        assert np.array_equal(rx.recv(payload, PAGES_PER_PACKET), pages)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_many_packets_through_persistent_contexts(name: str) -> None:
    """One context per channel for the whole migration: 40 packets, 1..128 pages each."""
    tx, rx = sender(name), receiver(name)
    sizes = []
    for pages in mixed_packets(40, seed=7):
        payload = tx.send(pages)
        sizes.append(len(pages))
        assert np.array_equal(rx.recv(payload, len(pages)), pages)
    assert min(sizes) == 1 and max(sizes) == PAGES_PER_PACKET


@pytest.mark.parametrize("name", METHODS, ids=str)
def test_conformance_channels_are_independent(name: str) -> None:
    """Two channels interleaved: each receiver only sees its own sender's packets."""
    txs, rxs = [sender(name), sender(name)], [receiver(name), receiver(name)]
    for k, pages in enumerate(mixed_packets(12, seed=3)):
        ch = k % 2 if k < 6 else (k // 3) % 2
        assert np.array_equal(rxs[ch].recv(txs[ch].send(pages), len(pages)), pages)


_packet_specs = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 8), st.integers(1, PAGES_PER_PACKET)),
        st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.parametrize("name", METHODS, ids=str)
@given(specs=_packet_specs)
def test_conformance_round_trip_property(name: str, specs: list[tuple[int, list[str], int]]) -> None:
    tx, rx = sender(name), receiver(name)
    for n, kinds, seed in specs:
        pages = make_pages(n, kinds, seed)
        payload = tx.send(pages)
        if get_method(name).flag == MULTIFD_FLAG_NOCOMP:
            assert payload == pages.tobytes()  # raw pages in offset order (doc 2.3)
        assert len(payload) <= MAX_PACKET_PAYLOAD
        assert np.array_equal(rx.recv(payload, n), pages)


