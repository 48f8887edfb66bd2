"""Small pieces the real-system fixtures share: stopping a child, reading its log."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def read_log(path: Path, since: int = 0) -> str:
    """A log file's text from byte offset ``since`` ("" while it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
