"""The live test's guest: boot.S assembled with binutils equals the hand-encoded fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_support import BOOT_SECTOR, assemble_boot_sector


def test_boot_sector_matches_hand_encoding(tmp_path: Path) -> None:
    assembled = assemble_boot_sector(tmp_path)
    if assembled is None:
        pytest.skip("binutils (as, ld) is not installed; the live test uses the hand-encoded bytes")
    assert len(BOOT_SECTOR) == 512 and BOOT_SECTOR[510:] == b"\x55\xaa"
    assert assembled == BOOT_SECTOR, "tests/qemu_guest/boot.S and BOOT_SECTOR in tests/qemu_support.py differ"
