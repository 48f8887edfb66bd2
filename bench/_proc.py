"""Helpers shared by the bench scripts: /proc readings, a measured child wait, verdicts, checks.

Peak RSS of a child is ``VmHWM`` from ``/proc/PID/status``, polled while it runs, not
``ru_maxrss`` from ``wait4``: on Linux the exec'd child's maxrss starts from the RSS of the
forked (or vforked) copy of this Python process, so a child smaller than its parent is reported
at the parent's size (``/bin/true`` from a parent of 210 MiB: ``ru_maxrss`` 210 MiB, ``VmHWM``
under 2 MiB).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """utime+stime of ``pid`` in clock ticks (``/proc/PID/stat``)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def proc_cpu(pid: int | None) -> float:
    """user+sys seconds of a running process (0 if unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        return proc_ticks(pid) / CLK_TCK
    except FileNotFoundError:
        return 0.0


def vm_hwm(pid: int) -> int:
    """Peak RSS of ``pid`` so far in bytes (0 once it has exited, or if unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_measured(
    pid: int, poll: Callable[[], None] | None = None, interval: float = 0.01
) -> tuple[int, resource.struct_rusage, int]:
    """Wait for child ``pid``; return (exit code, its rusage, its peak RSS in bytes).

    A thread polls ``VmHWM`` (and calls ``poll``, if given) every ``interval`` seconds while
    the child runs. The child is first waited for without being reaped (``WNOWAIT``), so the
    poller stops before its PID can be reused; then ``wait4`` reaps it for the rusage. Growth
    in the child's last ``interval`` before it exits is not seen.
    """
    stop = threading.Event()
    peak = 0

    def poller() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, vm_hwm(pid))
            if poll is not None:
                poll()
            time.sleep(interval)

    watcher = threading.Thread(target=poller, daemon=True)
    watcher.start()
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    finally:
        stop.set()
        watcher.join()
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage, peak


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def require_root(script: str) -> bool:
    """False (after saying so on stderr) unless running as root, which containerd needs."""
    if os.geteuid() != 0:
        print(f"{script}: containerd needs root", file=sys.stderr)
        return False
    return True


def require_tools(script: str, tools: Iterable[str]) -> bool:
    """False (after naming the first missing one on stderr) unless every tool is on PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{script}: {tool} not found (apt-get install ...)", file=sys.stderr)
            return False
    return True
