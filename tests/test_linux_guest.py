"""The Linux guest of the live-checkpoint tests (scripts/linux_guest.py) boots under QEMU 7.2.

Debian's cloud kernel and busybox-static (fetched with ``apt-get download`` into the cache on
first use; the test fails with the reason when that cannot be done) boot ``-M pc -m 256M``
under TCG through QemuPeer, the way a migration source or destination is started. The serial
console must show /init starting once, the pattern's md5 as computed here, and ticks that
count up with the pattern intact.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest

from qemu_support import guest_files, requires_qemu  # noqa: F401 - guest_files is a fixture

# isort: split
import linux_guest  # scripts/linux_guest.py: qemu_support puts scripts/ on sys.path

pytestmark = [*requires_qemu, pytest.mark.slow, pytest.mark.timeout(240)]

BOOT_DEADLINE = 120.0  # TCG boot is a few seconds on an idle machine; CI may be slower and busy


def _run_of(numbers: list[int], length: int) -> bool:
    """``numbers`` holds ``length`` consecutive integers in a row (n, n+1, ...)."""
    run = 1
    for a, b in pairwise(numbers):
        run = run + 1 if b == a + 1 else 1
        if run >= length:
            return True
    return length <= 1 and bool(numbers)


def test_linux_guest_boots_and_ticks(tmp_path: Path, guest_files: linux_guest.GuestFiles) -> None:
    vm, serial = linux_guest.peer(tmp_path, guest_files, "guest")
    with vm as peer:
        peer.execute("cont")
        text = linux_guest.wait_serial(serial, lambda t: _run_of(linux_guest.ticks(t), 3), BOOT_DEADLINE,
                                       what="3 consecutive ok ticks", alive=peer.alive)
        assert peer.status() == "running"
    assert linux_guest.boots(text) == 1, text[-2000:]
    assert linux_guest.bad_ticks(text) == []
    assert linux_guest.reported_md5(text) == [linux_guest.pattern_md5()]
    assert "GUEST-ERROR" not in text
