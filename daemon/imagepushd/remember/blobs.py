"""Which repositories of a registry hold which blobs: mount sources (the ``blobs`` table)."""

from __future__ import annotations

from collections.abc import Iterable

from imagepushd.remember.database import Database


class Blobs:
    """The ``blobs`` table: where a blob can be mounted from instead of uploaded."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(self, registry: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that registry/repository holds these blobs (mount sources for later)."""
        now = self._db.clock()
        with self._db.transaction(write=True) as conn:
            conn.executemany(
                "INSERT INTO blobs (registry, digest, repository, seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (registry, digest, repository) DO UPDATE SET seen = excluded.seen",
                [(registry, digest, repository, now) for digest in digests],
            )

    def repositories(self, registry: str, digest: str, limit: int = 3) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest``, most recently seen first."""
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT repository FROM blobs WHERE registry = ? AND digest = ? "
                "ORDER BY seen DESC, repository LIMIT ?",
                (registry, digest, limit),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def drop(self, registry: str, repository: str, digest: str) -> None:
        """Forget that registry/repository holds ``digest`` (a mount from it failed)."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "DELETE FROM blobs WHERE registry = ? AND digest = ? AND repository = ?",
                (registry, digest, repository),
            )
