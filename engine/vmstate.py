"""Device state after RAM, decoded generically through the trailing vmdesc JSON.

(To be completed for QEMU interop: walks FULL sections with the vmdesc field list the way
QEMU's scripts/analyze-migration.py does.)
"""

from __future__ import annotations

from typing import Any


def parse_device_state(state: bytes, vmdesc: dict[str, Any] | None) -> Any:
    """Device sections (bytes up to and including EOF) -> a JSON-able list; None if there are none."""
    if not state or state == b"\x00":
        return None
    return {"raw-bytes": len(state), "vmdesc": vmdesc}
