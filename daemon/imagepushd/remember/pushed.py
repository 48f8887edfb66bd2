"""Which target holds which digest, and the push that put it there (the ``pushed`` table)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from imagepushd.remember.database import Database


@dataclass(frozen=True)
class Pushed:
    """A target reference known to hold a digest, and the push that put it there."""

    target: str
    digest: str
    namespace: str
    name: str
    pushed_at: float
    bytes: int
    duration: float


def totals(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """How many pushes are recorded and when the newest was, inside a caller's transaction."""
    count, last = conn.execute("SELECT count(*), max(pushed_at) FROM pushed").fetchone()
    return int(count), None if last is None else float(last)


class PushedTargets:
    """The ``pushed`` table: what is already where, so it is not pushed again."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        target: str,
        digest: str,
        namespace: str,
        name: str,
        *,
        bytes: int,
        duration: float,
        pushed_at: float | None = None,
    ) -> Pushed:
        """Record that ``target`` holds ``digest`` (pushed from namespace/name); upserts."""
        record = Pushed(
            target=target,
            digest=digest,
            namespace=namespace,
            name=name,
            pushed_at=self._db.clock() if pushed_at is None else pushed_at,
            bytes=bytes,
            duration=duration,
        )
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO pushed (target, digest, namespace, name, pushed_at, bytes, duration) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (target, digest) DO UPDATE SET "
                "namespace = excluded.namespace, name = excluded.name, "
                "pushed_at = excluded.pushed_at, bytes = excluded.bytes, "
                "duration = excluded.duration",
                (target, digest, namespace, name, record.pushed_at, bytes, duration),
            )
        return record

    def holdings(self) -> set[tuple[str, str]]:
        """(target, digest) for the digest each target was last pushed with.

        A tag moved back (A → B → A) is due again, so only the newest push per target counts.
        """
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT target, digest FROM (SELECT target, digest, row_number() OVER "
                "(PARTITION BY target ORDER BY pushed_at DESC, rowid DESC) AS newest FROM pushed) "
                "WHERE newest = 1"
            )
            return {(str(t), str(d)) for t, d in rows}

    def newest(self, limit: int | None = None) -> list[Pushed]:
        """Pushed targets, newest first; at most ``limit`` of them."""
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT target, digest, namespace, name, pushed_at, bytes, duration FROM pushed "
                "ORDER BY pushed_at DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [
            Pushed(str(t), str(d), str(ns), str(n), float(at), int(b), float(dur))
            for t, d, ns, n, at, b, dur in rows
        ]

    def count(self) -> int:
        """How many (target, digest) pairs are recorded as pushed."""
        with self._db.transaction(write=False) as conn:
            return int(conn.execute("SELECT count(*) FROM pushed").fetchone()[0])
