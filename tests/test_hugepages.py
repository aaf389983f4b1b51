"""Guest RAM on 2 MiB pages (``GuestRam.use_huge_pages``, ``--huge-pages``): real shared
memory, a real fork, and a real engine-to-engine migration."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import numpy as np

from engine.memory.hugepages import HUGE_PAGE
from engine.memory.ram import BlockSpec, GuestRam
from support import Incoming, assert_same_ram, read_dump, run_engine


def _pmd_mapped_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("ShmemPmdMapped:"))


def test_use_huge_pages_keeps_the_guest_and_the_segment_in_step() -> None:
    with GuestRam.create([BlockSpec("pc.ram", 2 * HUGE_PAGE), BlockSpec("small", 16 * 4096)]) as ram:
        big, small = ram.blocks
        rng = np.random.default_rng(7)
        big.pages[:] = rng.integers(0, 256, size=big.pages.shape, dtype=np.uint8)
        before, small_buf = bytes(big.buf), small.buf
        pmd_before = _pmd_mapped_kib()

        done = ram.use_huge_pages()

        assert done in (0, big.size)  # 0 only where the kernel cannot collapse (no free 2 MiB blocks)
        assert small.buf is small_buf  # smaller than one 2 MiB page: left as it was
        assert ctypes.addressof(ctypes.c_char.from_buffer(big.buf)) % HUGE_PAGE == 0
        assert bytes(big.buf) == before
        if done:
            assert _pmd_mapped_kib() - pmd_before >= big.size // 1024
        # the new mapping and the segment file are the same memory, both ways
        big.pages[3, :4] = [1, 2, 3, 4]
        assert os.pread(big.fd, 4, 3 * 4096) == bytes([1, 2, 3, 4])
        os.pwrite(big.fd, b"\xee" * 8, 600 * 4096)
        assert bytes(big.pages[600, :8]) == b"\xee" * 8
        # a forked process (a channel, a writer) inherits the aligned mapping
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, bytes(big.pages[600, :8]) + bytes(big.pages[3, :4]))
            os._exit(0)
        os.close(w)
        assert os.read(r, 12) == b"\xee" * 8 + bytes([1, 2, 3, 4])
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0


def test_migrate_with_huge_pages_is_byte_exact(tmp_path: Path) -> None:
    common = ["--channels", "2", "--json"]
    with Incoming("tcp:127.0.0.1:0", *common, "--dump", str(tmp_path / "dst")) as dst:
        src = run_engine("migrate", dst.uri, "--ram-size", "8M", "--huge-pages", *common,
                         "--dump", str(tmp_path / "src"))
        assert src.returncode == 0, src.stderr
        assert dst.wait() == 0, dst.stderr
    assert_same_ram(read_dump(tmp_path / "src"), read_dump(tmp_path / "dst"))
    assert json.loads(src.stdout)["huge-pages-bytes"] in (0, 8 << 20)
