"""The health of each registry as the running daemon last saw it (the ``registries`` table)."""

from __future__ import annotations

import sqlite3
from typing import TypedDict

from imagepushd.remember.database import Database
from imagepushd.remember.jobs import open_on, truncate


class RegistryStatus(TypedDict):
    """A registry's health as the daemon last saw it (``summary()``, ``status --json``).

    ``up`` False means unreachable ``since`` then; ``held_until`` is the end of a
    ``Retry-After`` every job of it waits for; ``waiting`` counts its open jobs.
    """

    registry: str
    up: bool
    since: float
    last_error: str | None
    held_until: float | None
    waiting: int


def statuses(conn: sqlite3.Connection) -> list[RegistryStatus]:
    """Every registry's health and open job count, inside a caller's transaction."""
    return [
        RegistryStatus(
            registry=str(host),
            up=bool(up),
            since=float(since),
            last_error=None if error is None else str(error),
            held_until=None if held is None else float(held),
            waiting=open_on(conn, str(host)),
        )
        for host, up, since, error, held in conn.execute(
            "SELECT registry, up, since, last_error, held_until FROM registries ORDER BY registry"
        ).fetchall()
    ]


class Registries:
    """The ``registries`` table: what ``imagepushd status`` shows of each registry."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def save(
        self,
        registry: str,
        *,
        up: bool,
        since: float,
        last_error: str | None,
        held_until: float | None,
    ) -> None:
        """Record ``registry``'s health (``imagepushd.push.registry.health.HealthStore``)."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO registries (registry, up, since, last_error, held_until) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (registry) DO UPDATE SET "
                "up = excluded.up, since = excluded.since, last_error = excluded.last_error, "
                "held_until = excluded.held_until",
                (
                    registry,
                    int(up),
                    since,
                    None if last_error is None else truncate(last_error),
                    held_until,
                ),
            )

    def forget(self) -> None:
        """Forget every registry's health (a starting daemon has not seen any yet)."""
        with self._db.transaction(write=True) as conn:
            conn.execute("DELETE FROM registries")
