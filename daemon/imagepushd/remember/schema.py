"""The state file's schema history: ``MIGRATIONS[i]`` turns version ``i`` into ``i + 1``.

The version lives in ``PRAGMA user_version``; :class:`~imagepushd.remember.database.Database` runs
each migration in its own transaction together with the version bump.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

#: A migration turns schema version ``n`` into ``n + 1``. It runs inside the transaction that
#: also bumps ``user_version``, so it must not commit (``Connection.executescript`` would).
Migration = Callable[[sqlite3.Connection], None]


def _v1_initial(conn: sqlite3.Connection) -> None:
    """Version 1: flags, seen images, pushed targets, jobs, upload sessions, blob locations."""
    for statement in (
        """CREATE TABLE meta (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE seen (
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            digest TEXT NOT NULL,
            since REAL NOT NULL,
            baseline INTEGER NOT NULL,
            PRIMARY KEY (namespace, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE pushed (
            target TEXT NOT NULL,
            digest TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            pushed_at REAL NOT NULL,
            bytes INTEGER NOT NULL,
            duration REAL NOT NULL,
            UNIQUE (target, digest)
        )""",
        "CREATE INDEX pushed_by_time ON pushed (pushed_at)",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            digest TEXT NOT NULL,
            target TEXT NOT NULL,
            rule INTEGER NOT NULL,
            status TEXT NOT NULL
                CHECK (status IN ('queued', 'running', 'failed', 'done', 'cancelled')),
            attempts INTEGER NOT NULL,
            next_attempt REAL NOT NULL,
            last_error TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            UNIQUE (namespace, name, digest, target)
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, next_attempt)",
        """CREATE TABLE uploads (
            registry TEXT NOT NULL,
            repository TEXT NOT NULL,
            digest TEXT NOT NULL,
            location TEXT NOT NULL,
            offset_bytes INTEGER NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (registry, repository, digest)
        ) WITHOUT ROWID""",
        """CREATE TABLE blobs (
            registry TEXT NOT NULL,
            digest TEXT NOT NULL,
            repository TEXT NOT NULL,
            seen REAL NOT NULL,
            PRIMARY KEY (registry, digest, repository)
        ) WITHOUT ROWID""",
    ):
        conn.execute(statement)


def _v2_body_limits(conn: sqlite3.Connection) -> None:
    """Version 2: request-body limits learned per registry from HTTP 413 answers."""
    conn.execute(
        """CREATE TABLE body_limits (
            registry TEXT PRIMARY KEY,
            max_body INTEGER NOT NULL,
            learned REAL NOT NULL
        ) WITHOUT ROWID"""
    )


def _v3_registries(conn: sqlite3.Connection) -> None:
    """Version 3: the health of each registry, as the running daemon last saw it."""
    conn.execute(
        """CREATE TABLE registries (
            registry TEXT PRIMARY KEY,
            up INTEGER NOT NULL,
            since REAL NOT NULL,
            last_error TEXT,
            held_until REAL
        ) WITHOUT ROWID"""
    )


#: Every schema version in order: version ``n`` is reached by running the first ``n``.
MIGRATIONS: tuple[Migration, ...] = (_v1_initial, _v2_body_limits, _v3_registries)
