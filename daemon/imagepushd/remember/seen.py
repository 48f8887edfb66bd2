"""The digest each (namespace, name) pointed at when last looked at (the ``seen`` table)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from imagepushd.remember.database import Database

#: Up to this many keys, ``SeenImages.load`` looks each up rather than reading the whole table.
_SEEN_LOOKUPS = 256


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

    def load(self, keys: Collection[tuple[str, str]] | None = None) -> dict[tuple[str, str], Seen]:
        """Every (namespace, name) last seen and the digest it pointed at; only ``keys``'s.

        A daemon re-planning what changed asks for a few keys out of thousands: each is looked
        up; past ``_SEEN_LOOKUPS`` keys one pass over the table is cheaper.
        """
        select = "SELECT namespace, name, digest, since, baseline FROM seen"
        with self._db.transaction(write=False) as conn:
            if keys is None or len(keys) > _SEEN_LOOKUPS:
                rows: Iterable[Sequence[Any]] = conn.execute(select)
            else:
                where = f"{select} WHERE namespace = ? AND name = ?"
                rows = [row for key in keys for row in conn.execute(where, key)]
            found = {
                (str(ns), str(name)): Seen(str(digest), float(since), bool(baseline))
                for ns, name, digest, since, baseline in rows
            }
        return found if keys is None else {k: v for k, v in found.items() if k in keys}

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
