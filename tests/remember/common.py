"""What the state tests share: digests, a settable clock, and a look at a file's pragmas."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def pragma(path: Path, name: str) -> object:
    """PRAGMA ``name`` of the SQLite file at ``path``, read on a connection of its own."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
