"""Small pieces the real-system fixtures share: tools, stopping a child, its log, polling."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def require_tools(*names: str, hint: str = "") -> list[str]:
    """Fail the test (real-system tests never skip) unless every program in ``names`` is on PATH.

    The message names the missing programs, then ``hint`` (which package installs them, say).
    Returns the programs' full paths, in the order of ``names``.
    """
    found = [(name, shutil.which(name)) for name in names]
    missing = [name for name, path in found if path is None]
    if missing:
        hint = f": {hint}" if hint else ""
        pytest.fail(
            f"{', '.join(missing)} not found on PATH{hint}; real-system tests never skip",
            pytrace=False,
        )
    return [path for _, path in found if path is not None]


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


def log_size(path: Path) -> int:
    """A log file's size in bytes (0 while it does not exist): an offset for :func:`read_log`."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tail_log(path: Path, lines: int = 40, missing: str = "(no log)") -> str:
    """The last ``lines`` lines of a log file; ``missing`` while it does not exist or is empty."""
    text = read_log(path)
    return "\n".join(text.splitlines()[-lines:]) if text else missing


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1) -> T | None:
    """Call ``predicate`` until it returns something truthy; that value (None on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(interval)
