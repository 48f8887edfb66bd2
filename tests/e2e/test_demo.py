"""``make demo`` (the README's main-job command) runs and shows verified pushes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_pushes_and_verifies():
    proc = subprocess.run(
        [sys.executable, str(REPO / "demo" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" OK\n") == 2
    assert "MISMATCH" not in proc.stdout
    assert "daemon exited with 0" in proc.stdout
