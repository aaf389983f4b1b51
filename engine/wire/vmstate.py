"""Device state after RAM, decoded generically through the trailing vmdesc JSON.

After the ram END section a QEMU source sends its non-iterative devices as SECTION_FULL
records, then ``00`` (EOF), then ``06`` + be32 length + the vmdesc JSON (wire doc 5.5, 5.6).
The engine knows none of QEMU's device structures and needs none: the vmdesc describes every
field QEMU wrote, in order, and this module walks it the way QEMU's
``scripts/analyze-migration.py`` does. Each FULL section is described by the vmdesc device
with the same ``(name, instance_id)``; a field's ``"size"`` is one element's (``"array_len"``
repeats it); ``"struct"`` and ``"tmp"`` fields are walked recursively and must consume exactly
their ``"size"`` (a built-in check of every struct); a description's ``"subsections"`` follow
its fields, each framed as ``05 len name be32 version``.

Integers become numbers, ``bool`` true/false, arrays lists (``uint8`` arrays one hex string),
everything else a hex string: plain JSON data, which the CLI writes to ``devices.json``. Pure
code: bytes in, data out. The rules in full: docs/architecture.md, "Device state".
"""

from __future__ import annotations

import json
import struct
from typing import Any, Mapping

from ..errors import RemoteProtocolError
from .stream import (
    QEMU_VM_EOF,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
)

_BE32 = struct.Struct(">I")
_INT_SIZES = (1, 2, 4, 8)


class _Cursor:
    """Reads the device-state bytes; every short read is an error naming what was being read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise RemoteProtocolError(
                f"device state: received {len(self.data) - self.pos} bytes at offset {self.pos} for {what},"
                f" expected {n}"
            )
        out = self.data[self.pos:end]
        self.pos = end
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be32(self, what: str) -> int:
        return int(_BE32.unpack(self.take(4, what))[0])

    def name(self, what: str) -> str:
        return self.take(self.u8(what), what).decode("utf-8", "replace")


def _scalar(kind: str, raw: bytes) -> Any:
    base = kind.split(" ", 1)[0]
    if base == "bool" and len(raw) == 1:
        return bool(raw[0])
    if base.startswith("uint") and len(raw) in _INT_SIZES:
        return int.from_bytes(raw, "big")
    if base.startswith("int") and len(raw) in _INT_SIZES:
        return int.from_bytes(raw, "big", signed=True)
    return raw.hex()


def _struct_desc(field: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The nested description of a struct (``"struct"``) or tmp (inline ``"fields"``) field."""
    if isinstance(field.get("struct"), Mapping):
        return field["struct"]  # type: ignore[no-any-return]
    if "fields" in field:
        return field
    return None


def _read_element(cur: _Cursor, field: Mapping[str, Any], path: str) -> Any:
    try:
        size = int(field["size"])
        kind = str(field.get("type", "buffer"))
    except (KeyError, TypeError, ValueError):
        raise RemoteProtocolError(
            f"device state: vmdesc field {path} has no usable size, expected an integer"
        ) from None
    nested = _struct_desc(field)
    if nested is None:
        return _scalar(kind, cur.take(size, path))
    start = cur.pos
    value = _read_struct(cur, nested, path)
    used = cur.pos - start
    if used != size:
        raise RemoteProtocolError(
            f"device state: struct {path} took {used} bytes, expected {size} (its vmdesc size)"
        )
    return value


def _count(value: Any, limit: int, path: str) -> int:
    """An ``array_len`` from the (peer-supplied) vmdesc, bounded by the bytes there are."""
    if not isinstance(value, int) or not 0 <= value <= limit:
        raise RemoteProtocolError(f"device state: vmdesc field {path} has array_len {value!r}, expected 0..{limit}")
    return value


def _read_struct(cur: _Cursor, desc: Mapping[str, Any], path: str) -> dict[str, Any]:
    """One described structure: its fields, then its subsections."""
    out: dict[str, Any] = {}
    for field in desc.get("fields", []):
        name = str(field.get("name", "?"))
        where = f"{path}.{name}"
        if "array_len" in field:
            count = _count(field["array_len"], len(cur.data), where)
            if field.get("type") == "uint8" and field.get("size") == 1:  # a byte array: one hex string
                value: Any = cur.take(count, where).hex()
            else:
                value = [_read_element(cur, field, f"{where}[{i}]") for i in range(count)]
            out[name] = value
        elif "index" in field:
            out.setdefault(name, []).append(_read_element(cur, field, f"{where}[{field['index']}]"))
        else:
            key = name
            n = 2
            while key in out:  # a repeated name (e.g. two "unused" gaps): keep both
                key = f"{name}#{n}"
                n += 1
            out[key] = _read_element(cur, field, where)
    subs = desc.get("subsections") or []
    if subs:
        found: dict[str, Any] = {}
        for sub in subs:
            want = str(sub.get("vmsd_name", "?"))
            mark = cur.u8(f"subsection {path}/{want}")
            if mark != QEMU_VM_SUBSECTION:
                raise RemoteProtocolError(
                    f"device state: received {mark:#04x} at offset {cur.pos - 1} in {path},"
                    f" expected subsection {want!r} ({QEMU_VM_SUBSECTION:#04x})"
                )
            got = cur.name(f"subsection {path}/{want}")
            version = cur.be32(f"subsection {path}/{want}")
            if got != want:
                raise RemoteProtocolError(f"device state: received subsection {got!r} in {path}, expected {want!r}")
            found[got] = {"version_id": version, "fields": _read_struct(cur, sub, f"{path}/{got}")}
        out["subsections"] = found
    return out


def _devices_by_key(vmdesc: Mapping[str, Any]) -> dict[tuple[str, int], Mapping[str, Any]]:
    devices = vmdesc.get("devices")
    if not isinstance(devices, list):
        raise RemoteProtocolError("device state: received a vmdesc without a \"devices\" list, expected one")
    out: dict[tuple[str, int], Mapping[str, Any]] = {}
    for dev in devices:
        try:
            out[(str(dev["name"]), int(dev["instance_id"]))] = dev
        except (KeyError, TypeError, ValueError):
            raise RemoteProtocolError(f"device state: received a vmdesc device entry {str(dev)[:80]!r},"
                                      " expected name and instance_id") from None
    return out


def parse_device_state(state: bytes, vmdesc: dict[str, Any] | None) -> Any:
    """Device sections (bytes up to and including EOF) -> a JSON-able dict; None if there are none.

    ``{"page_size": 4096, "bytes": N, "sections": [{"section_id", "name", "instance_id",
    "version_id", "vmsd_name", "size", "fields": {...}}, ...]}``; a stream with sections but no
    vmdesc gives ``{"bytes": N, "sections": null, "undecoded": "..."}`` (nothing describes them).
    Raises :class:`RemoteProtocolError` when the bytes do not match their description.
    """
    if not state or state == bytes([QEMU_VM_EOF]):
        return None
    if vmdesc is None:
        if state[-1] != QEMU_VM_EOF:
            raise RemoteProtocolError(
                f"device state: received {len(state)} bytes ending in {state[-1]:#04x} and no vmdesc,"
                f" expected EOF {QEMU_VM_EOF:#04x} (the stream was cut)"
            )
        return {"bytes": len(state), "sections": None,
                "undecoded": "the stream has no vmdesc JSON, so its device sections cannot be described"}
    try:
        return _parse_sections(state, vmdesc)
    except RecursionError:
        raise RemoteProtocolError("device state: received a vmdesc nested too deeply, expected a device tree") from None


def _parse_sections(state: bytes, vmdesc: dict[str, Any]) -> dict[str, Any]:
    known = _devices_by_key(vmdesc)
    cur = _Cursor(state)
    sections: list[dict[str, Any]] = []
    while True:
        at = cur.pos
        kind = cur.u8("a section type")
        if kind == QEMU_VM_EOF:
            break
        if kind != QEMU_VM_SECTION_FULL:
            raise RemoteProtocolError(
                f"device state: received section type {kind:#04x} at offset {at},"
                f" expected FULL {QEMU_VM_SECTION_FULL:#04x} or EOF {QEMU_VM_EOF:#04x}"
            )
        section_id = cur.be32("a section header")
        name = cur.name("a section idstr")
        instance_id = cur.be32("a section header")
        version_id = cur.be32("a section header")
        dev = known.get((name, instance_id))
        if dev is None:
            raise RemoteProtocolError(
                f"device state: received section {name!r} instance {instance_id}, expected one the vmdesc describes"
            )
        start = cur.pos
        fields = _read_struct(cur, dev, name)
        size = cur.pos - start
        mark = cur.u8(f"the footer of section {name!r}")
        if mark != QEMU_VM_SECTION_FOOTER:
            raise RemoteProtocolError(
                f"device state: received {mark:#04x} after section {name!r} ({size} bytes),"
                f" expected its footer {QEMU_VM_SECTION_FOOTER:#04x}"
            )
        sid = cur.be32(f"the footer of section {name!r}")
        if sid != section_id:
            raise RemoteProtocolError(
                f"device state: received footer for section {sid}, expected {section_id} ({name!r})"
            )
        sections.append({
            "section_id": section_id, "name": name, "instance_id": instance_id, "version_id": version_id,
            "vmsd_name": dev.get("vmsd_name", name), "size": size, "fields": fields,
        })
    if cur.pos != len(state):
        raise RemoteProtocolError(
            f"device state: received {len(state) - cur.pos} bytes after EOF, expected the vmdesc to follow EOF"
        )
    return {"page_size": vmdesc.get("page_size"), "bytes": len(state), "sections": sections}


def parse_tail(tail: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """Split the stream tail into device-state bytes (up to and including EOF) and the vmdesc."""
    n = len(tail)
    for pos in range(n - 5, -1, -1):
        if tail[pos] == QEMU_VM_VMDESCRIPTION and int.from_bytes(tail[pos + 1:pos + 5], "big") == n - pos - 5:
            if pos == 0 or tail[pos - 1] != QEMU_VM_EOF:
                continue
            try:
                desc = json.loads(tail[pos + 5:])
            except (ValueError, RecursionError):
                continue
            return tail[:pos], desc
    return tail, None
