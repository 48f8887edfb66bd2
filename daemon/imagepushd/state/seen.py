"""The digest each (namespace, name) pointed at when last looked at (the ``seen`` table)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from imagepushd.state.database import Database


@dataclass(frozen=True)
class Seen:
    """The digest a (namespace, name) pointed at when last looked at.

    ``since`` is when that digest was first seen there (what ``settle`` measures); ``baseline``
    marks digests recorded on the first start with ``on_start = "new-only"``, not to be pushed.
    """

    digest: str
    since: float
    baseline: bool


class SeenLike(Protocol):
    """Anything shaped like :class:`Seen` (the planner's own record, for instance)."""

    @property
    def digest(self) -> str:
        """The digest last seen."""

    @property
    def since(self) -> float:
        """When that digest was first seen."""

    @property
    def baseline(self) -> bool:
        """Whether it was recorded as the first start's baseline."""


class SeenImages:
    """The ``seen`` table: what the planner compares containerd's names against."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def load(self) -> dict[tuple[str, str], Seen]:
        """Every (namespace, name) last seen and the digest it pointed at."""
        with self._db.transaction(write=False) as conn:
            rows = conn.execute("SELECT namespace, name, digest, since, baseline FROM seen")
            return {
                (str(ns), str(name)): Seen(str(digest), float(since), bool(baseline))
                for ns, name, digest, since, baseline in rows
            }

    def update(
        self, changed: Mapping[tuple[str, str], SeenLike], removed: Iterable[tuple[str, str]]
    ) -> None:
        """Record new or moved names and forget deleted ones, all in one transaction."""
        with self._db.transaction(write=True) as conn:
            conn.executemany(
                "INSERT INTO seen (namespace, name, digest, since, baseline) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, name) DO UPDATE SET "
                "digest = excluded.digest, since = excluded.since, baseline = excluded.baseline",
                [
                    (ns, name, s.digest, s.since, int(s.baseline))
                    for (ns, name), s in changed.items()
                ],
            )
            conn.executemany("DELETE FROM seen WHERE namespace = ? AND name = ?", list(removed))
