"""The README's main command works (on a smaller guest, to keep the suite quick)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import ROOT, _env


@pytest.mark.slow
def test_demo_runs_and_verifies() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--size", "64M", "--dirty-rate", "8M"],
                       capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "demo: OK: the destination's RAM equals the source's at stop-and-copy" in p.stdout
    assert "iteration" in p.stdout and "downtime (ms)" in p.stdout
