"""Scheduling for ``bench/push.py --compete``: the unit's settings, applied to bench children.

systemd turns ``CPUWeight=`` into the cgroup's ``cpu.weight`` (cgroup v2) or ``cpu.shares`` =
weight x 1024 / 100 (a cgroup v1 ``cpu`` hierarchy), ``Nice=`` into ``setpriority`` and
``IOSchedulingClass=``/``IOSchedulingPriority=`` into ``ioprio_set``. A bench host need not
boot systemd, so this module does the same by hand, reading the settings from the unit file
itself: the bench measures what the package installs. ``IOWeight=`` is left out: it needs BFQ
or the io.cost controller, and the competing build here is CPU-bound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_WEIGHT = 100  # systemd's CPUWeight= default, and cgroup v2's
V1_DEFAULT_SHARES = 1024
IO_CLASSES = {"realtime": "1", "best-effort": "2", "idle": "3"}


def unit_settings(path: Path) -> dict[str, str]:
    """The ``[Service]`` assignments of a unit file (the last one of a key wins)."""
    settings: dict[str, str] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


@dataclass(frozen=True)
class Scheduling:
    """CPU weight, nice level and I/O class of one process (the defaults: an ordinary one)."""

    cpu_weight: int = DEFAULT_WEIGHT
    nice: int = 0
    io_class: str = ""
    io_priority: str = ""

    @classmethod
    def from_unit(cls, path: Path) -> Scheduling:
        s = unit_settings(path)
        return cls(
            cpu_weight=int(s.get("CPUWeight", DEFAULT_WEIGHT)),
            nice=int(s.get("Nice", 0)),
            io_class=s.get("IOSchedulingClass", ""),
            io_priority=s.get("IOSchedulingPriority", ""),
        )

    def describe(self) -> str:
        io = f"{self.io_class or 'default'}" + (f"/{self.io_priority}" if self.io_priority else "")
        return f"CPUWeight={self.cpu_weight} Nice={self.nice} I/O {io}"

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` under ``nice`` and ``ionice`` as set (each execs the next: the same PID)."""
        prefix = ["nice", "-n", str(self.nice)] if self.nice else []
        if self.io_class:
            prefix += ["ionice", "-c", IO_CLASSES[self.io_class]]
            if self.io_priority:
                prefix += ["-n", self.io_priority]
        return [*prefix, *cmd]


class CpuGroups:
    """Sibling CPU cgroups under one parent made for the bench, removed by :meth:`close`.

    cgroup v2 when the root offers the ``cpu`` controller, else the v1 ``cpu`` hierarchy
    (hybrid hosts such as this project's VMs).
    """

    def __init__(self, name: str) -> None:
        controllers = CGROUP_ROOT / "cgroup.controllers"
        self.v2 = controllers.exists() and "cpu" in controllers.read_text().split()
        base = CGROUP_ROOT if self.v2 else CGROUP_ROOT / "cpu"
        if not self.v2 and not (base / "cpu.shares").exists():
            raise SystemExit(f"bench/push.py --compete: no CPU cgroup controller under {base}")
        self.parent = base / name
        self.parent.mkdir()
        if self.v2:
            (self.parent / "cgroup.subtree_control").write_text("+cpu")
        self.children: list[Path] = []

    def group(self, name: str, weight: int) -> Path:
        """A child group with the CPU share systemd gives a unit of ``CPUWeight=weight``."""
        path = self.parent / name
        path.mkdir()
        if self.v2:
            (path / "cpu.weight").write_text(str(weight))
        else:
            shares = weight * V1_DEFAULT_SHARES // DEFAULT_WEIGHT
            (path / "cpu.shares").write_text(str(shares))
        self.children.append(path)
        return path

    def close(self) -> None:
        for path in [*self.children, self.parent]:
            with contextlib.suppress(OSError):
                path.rmdir()


@contextlib.contextmanager
def cpu_groups(name: str) -> Iterator[CpuGroups]:
    groups = CpuGroups(name)
    try:
        yield groups
    finally:
        groups.close()


@dataclass(frozen=True)
class Placement:
    """Where a bench child runs: one CPU, a CPU cgroup, and its scheduling."""

    cpu: int
    group: Path
    sched: Scheduling = Scheduling()

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` pinned to the CPU (``taskset`` execs it) under the scheduling's nice/ionice."""
        return ["taskset", "-c", str(self.cpu), *self.sched.wrap(cmd)]

    def join(self, pid: int) -> None:
        """Move the just-started child into the group (its threads, started later, follow)."""
        (self.group / "cgroup.procs").write_text(str(pid))
