"""Pushes to make and where each stands (the ``jobs`` table)."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imagepushd.remember.database import Database

#: Longest ``last_error`` (and cancel reason) kept for a job, in characters.
MAX_ERROR_LENGTH = 1000

QUEUED = "queued"
RUNNING = "running"
FAILED = "failed"
DONE = "done"
CANCELLED = "cancelled"
#: Every job status, in the order a job usually passes through them.
JOB_STATUSES: tuple[str, ...] = (QUEUED, RUNNING, FAILED, DONE, CANCELLED)
#: Statuses of jobs that are not finished.
OPEN_STATUSES: tuple[str, ...] = (QUEUED, RUNNING, FAILED)


@dataclass(frozen=True)
class JobRecord:
    """One push of a source image's digest to one target, and where it stands.

    ``status`` is one of :data:`JOB_STATUSES`. ``attempts`` counts starts; ``next_attempt`` is
    when a queued or failed job becomes due.
    """

    id: int
    namespace: str
    name: str
    digest: str
    target: str
    rule: int
    status: str
    attempts: int
    next_attempt: float
    last_error: str | None
    created: float
    updated: float


_JOB_COLUMNS = (
    "id, namespace, name, digest, target, rule, status, attempts, next_attempt, last_error, "
    "created, updated"
)


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(
        id=int(row[0]),
        namespace=str(row[1]),
        name=str(row[2]),
        digest=str(row[3]),
        target=str(row[4]),
        rule=int(row[5]),
        status=str(row[6]),
        attempts=int(row[7]),
        next_attempt=float(row[8]),
        last_error=None if row[9] is None else str(row[9]),
        created=float(row[10]),
        updated=float(row[11]),
    )


def truncate(text: str) -> str:
    """``text`` cut to :data:`MAX_ERROR_LENGTH` characters, marked when cut."""
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def _check_statuses(statuses: Collection[str]) -> None:
    unknown = sorted(set(statuses).difference(JOB_STATUSES))
    if unknown:
        raise ValueError(f"unknown job status {', '.join(unknown)}; known: {JOB_STATUSES}")


def count_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    """How many jobs are in each status (every status present, zero included)."""
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, count in conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"):
        counts[str(status)] = int(count)
    return counts


def open_on(conn: sqlite3.Connection, registry: str) -> int:
    """How many queued, running or failed jobs push to ``registry``."""
    row = conn.execute(
        "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running', 'failed') "
        "AND substr(target, 1, ?) = ?",
        (len(registry) + 1, registry + "/"),
    ).fetchone()
    return int(row[0])


def failing(conn: sqlite3.Connection) -> list[JobRecord]:
    """The failed jobs, soonest due first."""
    return [
        _job(row)
        for row in conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'failed' ORDER BY next_attempt, id"
        )
    ]


class Jobs:
    """The ``jobs`` table: the queue the daemon's workers take pushes from."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def enqueue(
        self,
        namespace: str,
        name: str,
        digest: str,
        target: str,
        rule: int,
        *,
        reopen: bool = False,
        not_before: float | None = None,
    ) -> JobRecord:
        """The job pushing namespace/name@digest to ``target``, created queued if new.

        Idempotent: an existing job for the same (namespace, name, digest, target) is returned
        as it stands, except that a done or cancelled one is re-opened (queued, attempts and
        error cleared, ``rule`` updated) when ``reopen`` is true. A new or re-opened job is due
        at ``not_before`` (default: now).
        """
        now = self._db.clock()
        due = now if not_before is None else not_before
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO jobs (namespace, name, digest, target, rule, status, attempts, "
                "next_attempt, last_error, created, updated) "
                "VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, NULL, ?, ?) "
                "ON CONFLICT (namespace, name, digest, target) DO NOTHING",
                (namespace, name, digest, target, rule, due, now, now),
            )
            if reopen:
                conn.execute(
                    "UPDATE jobs SET status = 'queued', attempts = 0, last_error = NULL, "
                    "rule = ?, next_attempt = ?, updated = ? "
                    "WHERE namespace = ? AND name = ? AND digest = ? AND target = ? "
                    "AND status IN ('done', 'cancelled')",
                    (rule, due, now, namespace, name, digest, target),
                )
            row = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs "
                "WHERE namespace = ? AND name = ? AND digest = ? AND target = ?",
                (namespace, name, digest, target),
            ).fetchone()
        return _job(row)

    def get(self, id: int) -> JobRecord | None:
        """The job with this id, or None."""
        with self._db.transaction(write=False) as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone()
        return None if row is None else _job(row)

    def select(self, statuses: Collection[str] | None = None) -> list[JobRecord]:
        """Jobs in any of ``statuses`` (default: all), in creation order."""
        if statuses is not None:
            _check_statuses(statuses)
        with self._db.transaction(write=False) as conn:
            if statuses is None:
                rows = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY id").fetchall()
            else:
                wanted = sorted(set(statuses))
                marks = ", ".join("?" * len(wanted))
                rows = conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY id",
                    wanted,
                ).fetchall()
        return [_job(row) for row in rows]

    def next_attempt_after(self, now: float) -> float | None:
        """The earliest ``next_attempt`` later than ``now`` of a queued or failed job."""
        with self._db.transaction(write=False) as conn:
            row = conn.execute(
                "SELECT min(next_attempt) FROM jobs WHERE status IN ('queued', 'failed') "
                "AND next_attempt > ?",
                (now,),
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def due(self, now: float, limit: int, skip_registries: Collection[str] = ()) -> list[JobRecord]:
        """Up to ``limit`` queued or failed jobs whose ``next_attempt`` is at or before ``now``.

        Longest overdue first (``next_attempt``, then creation order). Jobs whose target is
        on one of ``skip_registries`` (down, or held back) are left out.
        """
        skip = sorted(set(skip_registries))
        clause = " AND substr(target, 1, ?) != ?" * len(skip)
        params = [p for host in skip for p in (len(host) + 1, host + "/")]
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'failed') "
                f"AND next_attempt <= ?{clause} ORDER BY next_attempt, id LIMIT ?",
                (now, *params, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def open_on(self, registry: str) -> int:
        """How many queued, running or failed jobs push to ``registry``."""
        with self._db.transaction(write=False) as conn:
            return open_on(conn, registry)

    def start(self, id: int) -> JobRecord | None:
        """Mark a queued or failed job running and count the attempt.

        Returns the updated job, or None if it is not startable (missing, or already running,
        done or cancelled; for example cancelled since ``due`` listed it).
        """
        now = self._db.clock()
        with self._db.transaction(write=True) as conn:
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, updated = ? "
                f"WHERE id = ? AND status IN ('queued', 'failed') RETURNING {_JOB_COLUMNS}",
                (now, id),
            ).fetchone()
        return None if row is None else _job(row)

    def finish(self, id: int) -> bool:
        """Mark a job done, whatever its status (the push did happen). False if no such job."""
        with self._db.transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'done', last_error = NULL, updated = ? WHERE id = ?",
                (self._db.clock(), id),
            )
            return cursor.rowcount > 0

    def fail(self, id: int, error: str, next_attempt: float) -> bool:
        """Mark an open (queued, running or failed) job failed, due again at ``next_attempt``.

        A done or cancelled job is left alone. ``error`` is kept up to
        :data:`MAX_ERROR_LENGTH` characters. Returns whether the job was updated.
        """
        with self._db.transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'failed', last_error = ?, next_attempt = ?, "
                "updated = ? WHERE id = ? AND status IN ('queued', 'running', 'failed')",
                (truncate(error), next_attempt, self._db.clock(), id),
            )
            return cursor.rowcount > 0

    def cancel(self, reasons: Mapping[int, str]) -> int:
        """Cancel the open jobs among ``reasons``' ids, keeping each one's reason as its last error.

        Done and cancelled jobs are left alone. Returns how many were cancelled.
        """
        now = self._db.clock()
        cancelled = 0
        with self._db.transaction(write=True) as conn:
            for id_, reason in reasons.items():
                cancelled += conn.execute(
                    "UPDATE jobs SET status = 'cancelled', last_error = ?, updated = ? "
                    "WHERE id = ? AND status IN ('queued', 'running', 'failed')",
                    (truncate(reason), now, id_),
                ).rowcount
        return cancelled

    def cancelled(self, limit: int) -> list[JobRecord]:
        """The ``limit`` most recently cancelled jobs, newest first, with their reasons."""
        with self._db.transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'cancelled' "
                "ORDER BY updated DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_job(row) for row in rows]

    def requeue_running(self) -> int:
        """At startup: jobs a killed daemon left running go back to queued, keeping attempts.

        Only call this while no worker of this state file is running. Returns how many.
        """
        with self._db.transaction(write=True) as conn:
            return conn.execute(
                "UPDATE jobs SET status = 'queued', updated = ? WHERE status = 'running'",
                (self._db.clock(),),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status (every status present, zero included)."""
        with self._db.transaction(write=False) as conn:
            return count_by_status(conn)

    def prune(self, older_than: float) -> int:
        """Delete done and cancelled jobs last updated more than ``older_than`` seconds ago.

        Returns how many. What was pushed stays recorded in the ``pushed`` table.
        """
        cutoff = self._db.clock() - older_than
        with self._db.transaction(write=True) as conn:
            return conn.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'cancelled') AND updated < ?",
                (cutoff,),
            ).rowcount
