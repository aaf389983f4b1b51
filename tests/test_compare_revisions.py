"""scripts/compare-revisions: two engine revisions side by side (a small real run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "compare_revisions.py"


def _worktrees() -> str:
    return subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.slow
def test_head_against_this_checkout(tmp_path: Path) -> None:
    before = _worktrees()
    out = tmp_path / "ab.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "HEAD", "--size", "16M", "--rounds", "1", "--modes", "fresh",
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| none | fresh |" in r.stdout
    summary = json.loads(out.read_text())["summary"]
    assert [(row["case"], row["mode"], row["base"]["runs"], row["new"]["runs"]) for row in summary] == [
        ("none", "fresh", 1, 1)]
    assert summary[0]["throughput-ratio"] > 0
    assert _worktrees() == before  # the base worktree is gone again


def test_unknown_revision_is_a_one_line_error() -> None:
    before = _worktrees()
    r = subprocess.run([sys.executable, str(SCRIPT), "no-such-revision-xyz", "--size", "16M"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [f"scripts/compare-revisions: error: unknown revision 'no-such-revision-xyz', expected a commit,"
                     f" branch or tag of {ROOT}"], r.stderr
    assert "Traceback" not in r.stderr
    assert _worktrees() == before
