"""What a QEMU stream carries besides RAM, kept to be replayed: a machine's state.

A checkpoint of a real VM is its RAM plus everything else the source sent: the configuration
section (the machine type), the device sections that follow RAM with the EOF byte and the
vmdesc JSON (``device_state``, kept byte-exact), the ``ram`` section's id (device sections
carry their own ids, so a replay keeps RAM's), the uuid of the channel handshakes and the
multifd dialect the source spoke. :class:`MachineState` packs into a self-describing record
(a snapshot file keeps it in its index) and a source replays it around the RAM it sends.
Pure code: bytes in, bytes out.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from .encoder import StreamEncoder
from .packet import TARGET_PAGE_SIZE
from .stream import QEMU_VM_CONFIGURATION, RAM_SECTION_ID
from .vmstate import parse_device_state, parse_tail

MAGIC = b"MACHSTAT"
RECORD_VERSION = 1
_HEAD = struct.Struct("<8sII16sIIQ")  # magic, version, ram section id, uuid, config, dialect, device state lengths


@dataclass(frozen=True)
class MachineState:
    configuration: bytes  # the configuration section as received, from its type byte (b"": none was sent)
    device_state: bytes  # from the first device section after RAM to the end of the stream
    ram_section_id: int = RAM_SECTION_ID
    uuid: bytes = bytes(16)
    #: what the source spoke (``multifd-flush-after-each-section``, ``send-switchover-start``, ...)
    dialect: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, machine: str) -> MachineState:
        """An engine guest's: a configuration section naming ``machine``, and no device
        sections after RAM (EOF, then a vmdesc that lists none)."""
        enc = StreamEncoder()
        enc.configuration(machine)
        configuration = enc.take()
        enc.eof()
        enc.vmdesc(json.dumps({"page_size": TARGET_PAGE_SIZE, "devices": []}, separators=(", ", ": ")).encode())
        return cls(configuration, enc.take())

    @property
    def machine(self) -> str:
        """The machine type the configuration section names ("" when the source sent none)."""
        c = self.configuration
        return c[5:5 + int.from_bytes(c[1:5], "big")].decode("utf-8", "replace") if c else ""

    def devices(self) -> Any:
        """The device sections after RAM decoded through the vmdesc (None if there are none)."""
        return parse_device_state(*parse_tail(self.device_state))

    def pack(self) -> bytes:
        dialect = json.dumps(self.dialect, sort_keys=True).encode()
        return (_HEAD.pack(MAGIC, RECORD_VERSION, self.ram_section_id, self.uuid, len(self.configuration),
                           len(dialect), len(self.device_state))
                + self.configuration + dialect + self.device_state)

    @classmethod
    def unpack(cls, data: bytes) -> MachineState:
        """Raises ValueError (naming what is wrong) for a record that is not one of ours."""
        if len(data) < _HEAD.size:
            raise ValueError(f"machine state of {len(data)} bytes, shorter than its {_HEAD.size}-byte head")
        magic, version, section_id, uuid, n_config, n_dialect, n_state = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"machine state starts with {magic!r}, expected {MAGIC!r}")
        if version != RECORD_VERSION:
            raise ValueError(f"machine state record version {version}, expected {RECORD_VERSION}")
        if _HEAD.size + n_config + n_dialect + n_state != len(data):
            raise ValueError(f"machine state lengths add up to {_HEAD.size + n_config + n_dialect + n_state} bytes,"
                             f" the record has {len(data)}")
        pos = _HEAD.size
        config = data[pos:pos + n_config]
        pos += n_config
        try:
            dialect = json.loads(data[pos:pos + n_dialect])
        except ValueError:
            raise ValueError("machine state dialect is not JSON") from None
        pos += n_dialect
        if config and (config[0] != QEMU_VM_CONFIGURATION or len(config) < 5):  # (none: send-configuration=off)
            raise ValueError("machine state's configuration is not a configuration section")
        return cls(bytes(config), bytes(data[pos:pos + n_state]), section_id, bytes(uuid), dialect)
