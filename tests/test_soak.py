"""A short soak in CI: mixed settings, cancels and injected faults; no unexpected outcome, no leak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import ROOT, _env


@pytest.mark.slow
def test_short_soak() -> None:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "25", "--seed", "7", "--json"],
                       capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["unexpected"] == 0, report["problems"]
    assert report["leaked-segments"] == [] and report["leaked-processes"] == []
    assert report["runs"] >= 3
    assert p.returncode == 0
    print(f"soak: {report['runs']} runs, {report['completed']} completed, "
          f"{report['expected-failure']} failed as expected")
