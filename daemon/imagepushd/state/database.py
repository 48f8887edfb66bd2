"""The daemon's memory: an SQLite file of what was seen, pushed, queued and half-uploaded.

One connection serves every thread; a lock serialises its use and every write is one
``BEGIN IMMEDIATE`` transaction, so other processes (``imagepushd status``) can read the file at
any time under WAL and writers from several processes wait on the busy timeout instead of
failing. ``synchronous=NORMAL`` is the WAL setting that never corrupts the file: a power cut may
lose the last transactions, and everything here is safe to redo (a push finds its target
already holding the digest; an upload asks the registry where it stands).

The schema is versioned through ``PRAGMA user_version``: ``MIGRATIONS[i]`` turns version ``i``
into version ``i + 1``, each in its own transaction together with the version bump. A file from
a newer imagepushd, a corrupt file and an unreadable file are all a :class:`StateError` whose
message names the file, the problem and the recovery command. The file is never reset, deleted
or rewritten to get past a problem: it may hold the only record of what was pushed.
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypedDict
from urllib.parse import quote

from imagepushd.errors import StateError

log = logging.getLogger(__name__)

#: Seconds a write waits for another process's transaction before failing.
BUSY_TIMEOUT = 10.0
#: How long a learned request-body limit is believed: a proxy's limit may be raised, and
#: learning it again costs a few refused requests.
BODY_LIMIT_MEMORY = 86400.0
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

#: A migration turns schema version ``n`` into ``n + 1``. It runs inside the transaction that
#: also bumps ``user_version``, so it must not commit (``Connection.executescript`` would).
Migration = Callable[[sqlite3.Connection], None]

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


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


@dataclass(frozen=True)
class UploadSession:
    """A registry upload session to resume after a restart: its URL and the bytes sent."""

    registry: str
    repository: str
    digest: str
    location: str
    offset: int
    updated: float


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


class FailingJob(TypedDict):
    """A failed job as ``summary()`` shows it."""

    id: int
    namespace: str
    name: str
    digest: str
    target: str
    attempts: int
    last_error: str | None
    next_attempt: float


class Summary(TypedDict):
    """What ``imagepushd status --json`` reports from the state file."""

    path: str
    jobs: dict[str, int]
    pushed_count: int
    last_push: float | None
    failing: list[FailingJob]
    registries: list[RegistryStatus]


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


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def _check_statuses(statuses: Collection[str]) -> None:
    unknown = sorted(set(statuses).difference(JOB_STATUSES))
    if unknown:
        raise ValueError(f"unknown job status {', '.join(unknown)}; known: {JOB_STATUSES}")


class State:
    """The state file at ``path``, opened (created if missing) and migrated to the latest schema.

    Safe to share between threads. ``clock`` stamps every record; ``migrations`` is the schema
    history (tests pass a longer one to exercise a future version).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        self._migrations = tuple(migrations)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._open()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the file; further calls raise :class:`StateError`. Closing twice is harmless."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _recovery(self) -> str:
        quoted = shlex.quote(str(self.path))
        broken = shlex.quote(f"{self.path}.broken")
        return f"move it aside to start afresh: mv {quoted} {broken}"

    def _unusable(self, problem: str, hint: str = "") -> StateError:
        """The error for a file that cannot serve as the state file as it stands."""
        hint = f"{hint}, or " if hint else ""
        return StateError(f"state file {self.path} {problem}; {hint}{self._recovery()}")

    def _translate(self, exc: sqlite3.Error) -> StateError:
        """Classify an SQLite error once, naming the file and what to do about it."""
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc) or type(exc).__name__
        if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return self._unusable(f"is corrupt ({text})")
        if primary in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
            return self._unusable(
                f"cannot be opened for writing ({text})",
                "check the owner and mode of the file and its directory",
            )
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return StateError(
                f"state file {self.path} stayed locked by another process for "
                f"{BUSY_TIMEOUT:g}s ({text}); is another imagepushd writing to it?"
            )
        if primary == _SQLITE_FULL:
            return StateError(f"state file {self.path} cannot grow ({text}); free some space")
        return StateError(f"state file {self.path}: {text}")

    def _prepare_file(self) -> None:
        """Create the directory (0700) and the file (0600) if missing; check an existing one."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create the directory of state file {self.path} "
                f"({(exc.strerror or str(exc)).lower()})"
            ) from exc
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StateError(
                f"cannot create state file {self.path} ({(exc.strerror or str(exc)).lower()})"
            ) from exc
        else:
            try:
                os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
            finally:
                os.close(fd)
            return
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            problem = (exc.strerror or str(exc)).lower()
            raise self._unusable(
                f"cannot be opened ({problem})",
                "check the owner and mode of the file and its directory"
                if isinstance(exc, PermissionError)
                else "",
            ) from exc
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if not stat.S_ISREG(mode):
            raise self._unusable("is not a regular file")
        if mode & 0o077:
            log.warning(
                "state file %s is accessible to group or others (mode %04o); chmod 600 %s",
                self.path,
                stat.S_IMODE(mode),
                shlex.quote(str(self.path)),
            )

    def _open(self) -> sqlite3.Connection:
        self._prepare_file()
        # mode=rw: SQLite must never create the file itself (with the umask's mode) should it
        # vanish between the check above and here.
        uri = "file:" + quote(str(self.path.absolute())) + "?mode=rw"
        try:
            conn = sqlite3.connect(
                uri,
                uri=True,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # transactions are explicit
                check_same_thread=False,  # self._lock serialises every use
            )
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        try:
            self._check(conn)
            journal = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if journal.lower() != "wal":
                log.warning(
                    "state file %s cannot use WAL (journal mode stays %s): readers will wait "
                    "for writers",
                    self.path,
                    journal,
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check(self, conn: sqlite3.Connection) -> None:
        """Refuse a damaged, foreign or too-new file before anything is written to it."""
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if [tuple(row) for row in rows] != [("ok",)]:
            first = str(rows[0][0]) if rows else "no answer"
            raise self._unusable(f"is corrupt (quick_check: {first.splitlines()[0]})")
        if version > len(self._migrations):
            raise self._unusable(
                f"was written by a newer imagepushd (schema version {version}, this one "
                f"knows up to {len(self._migrations)})",
                "upgrade imagepushd",
            )
        if version == 0 and tables:
            raise self._unusable("is an SQLite database but not an imagepushd state file")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        target = len(self._migrations)
        while True:
            with self._tx(conn, write=True):
                # Read under the write lock: another process may have migrated meanwhile.
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > target:
                    raise self._unusable(
                        f"was written by a newer imagepushd (schema version {version}, "
                        f"this one knows up to {target})",
                        "upgrade imagepushd",
                    )
                if version == target:
                    return
                self._migrations[version](conn)
                conn.execute(f"PRAGMA user_version = {version + 1:d}")
            log.info("state file %s migrated to schema version %d", self.path, version + 1)

    @contextmanager
    def _tx(self, conn: sqlite3.Connection, *, write: bool) -> Iterator[sqlite3.Connection]:
        """BEGIN, then COMMIT or ROLLBACK; SQLite errors leave as :class:`StateError`."""
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on the open connection, under the lock."""
        with self._lock:
            if self._conn is None:
                raise StateError(f"state file {self.path} is closed")
            with self._tx(self._conn, write=write) as conn:
                yield conn

    # ------------------------------------------------------------------ flags

    def get_flag(self, name: str) -> str | None:
        """The value of flag ``name`` (for example ``baseline_done``), or None if never set."""
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_flag(self, name: str, value: str) -> None:
        """Set flag ``name`` to ``value``."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # ------------------------------------------------------------------ seen images

    def seen(self) -> dict[tuple[str, str], Seen]:
        """Every (namespace, name) last seen and the digest it pointed at."""
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT namespace, name, digest, since, baseline FROM seen")
            return {
                (str(ns), str(name)): Seen(str(digest), float(since), bool(baseline))
                for ns, name, digest, since, baseline in rows
            }

    def update_seen(
        self, changed: Mapping[tuple[str, str], SeenLike], removed: Iterable[tuple[str, str]]
    ) -> None:
        """Record new or moved names and forget deleted ones, all in one transaction."""
        with self._transaction(write=True) as conn:
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

    # ------------------------------------------------------------------ pushed targets

    def record_push(
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
            pushed_at=self._clock() if pushed_at is None else pushed_at,
            bytes=bytes,
            duration=duration,
        )
        with self._transaction(write=True) as conn:
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
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT target, digest FROM (SELECT target, digest, row_number() OVER "
                "(PARTITION BY target ORDER BY pushed_at DESC, rowid DESC) AS newest FROM pushed) "
                "WHERE newest = 1"
            )
            return {(str(t), str(d)) for t, d in rows}

    def pushed(self, limit: int | None = None) -> list[Pushed]:
        """Pushed targets, newest first; at most ``limit`` of them."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT target, digest, namespace, name, pushed_at, bytes, duration FROM pushed "
                "ORDER BY pushed_at DESC, rowid DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
        return [
            Pushed(str(t), str(d), str(ns), str(n), float(at), int(b), float(dur))
            for t, d, ns, n, at, b, dur in rows
        ]

    def pushed_count(self) -> int:
        """How many (target, digest) pairs are recorded as pushed."""
        with self._transaction(write=False) as conn:
            return int(conn.execute("SELECT count(*) FROM pushed").fetchone()[0])

    # ------------------------------------------------------------------ jobs

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
        now = self._clock()
        due = now if not_before is None else not_before
        with self._transaction(write=True) as conn:
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

    def job(self, id: int) -> JobRecord | None:
        """The job with this id, or None."""
        with self._transaction(write=False) as conn:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (id,)).fetchone()
        return None if row is None else _job(row)

    def jobs(self, statuses: Collection[str] | None = None) -> list[JobRecord]:
        """Jobs in any of ``statuses`` (default: all), in creation order."""
        if statuses is not None:
            _check_statuses(statuses)
        with self._transaction(write=False) as conn:
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
        with self._transaction(write=False) as conn:
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
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'failed') "
                f"AND next_attempt <= ?{clause} ORDER BY next_attempt, id LIMIT ?",
                (now, *params, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def open_jobs_on(self, registry: str) -> int:
        """How many queued, running or failed jobs push to ``registry``."""
        with self._transaction(write=False) as conn:
            return self._open_on(conn, registry)

    @staticmethod
    def _open_on(conn: sqlite3.Connection, registry: str) -> int:
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running', 'failed') "
            "AND substr(target, 1, ?) = ?",
            (len(registry) + 1, registry + "/"),
        ).fetchone()
        return int(row[0])

    def start(self, id: int) -> JobRecord | None:
        """Mark a queued or failed job running and count the attempt.

        Returns the updated job, or None if it is not startable (missing, or already running,
        done or cancelled; for example cancelled since ``due`` listed it).
        """
        now = self._clock()
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, updated = ? "
                f"WHERE id = ? AND status IN ('queued', 'failed') RETURNING {_JOB_COLUMNS}",
                (now, id),
            ).fetchone()
        return None if row is None else _job(row)

    def finish(self, id: int) -> bool:
        """Mark a job done, whatever its status (the push did happen). False if no such job."""
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'done', last_error = NULL, updated = ? WHERE id = ?",
                (self._clock(), id),
            )
            return cursor.rowcount > 0

    def fail(self, id: int, error: str, next_attempt: float) -> bool:
        """Mark an open (queued, running or failed) job failed, due again at ``next_attempt``.

        A done or cancelled job is left alone. ``error`` is kept up to
        :data:`MAX_ERROR_LENGTH` characters. Returns whether the job was updated.
        """
        with self._transaction(write=True) as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'failed', last_error = ?, next_attempt = ?, "
                "updated = ? WHERE id = ? AND status IN ('queued', 'running', 'failed')",
                (_truncate(error), next_attempt, self._clock(), id),
            )
            return cursor.rowcount > 0

    def cancel(self, reasons: Mapping[int, str]) -> int:
        """Cancel the open jobs among ``reasons``' ids, keeping each one's reason as its last error.

        Done and cancelled jobs are left alone. Returns how many were cancelled.
        """
        now = self._clock()
        cancelled = 0
        with self._transaction(write=True) as conn:
            for id_, reason in reasons.items():
                cancelled += conn.execute(
                    "UPDATE jobs SET status = 'cancelled', last_error = ?, updated = ? "
                    "WHERE id = ? AND status IN ('queued', 'running', 'failed')",
                    (_truncate(reason), now, id_),
                ).rowcount
        return cancelled

    def cancelled(self, limit: int) -> list[JobRecord]:
        """The ``limit`` most recently cancelled jobs, newest first, with their reasons."""
        with self._transaction(write=False) as conn:
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
        with self._transaction(write=True) as conn:
            return conn.execute(
                "UPDATE jobs SET status = 'queued', updated = ? WHERE status = 'running'",
                (self._clock(),),
            ).rowcount

    def counts(self) -> dict[str, int]:
        """How many jobs are in each status (every status present, zero included)."""
        with self._transaction(write=False) as conn:
            return self._counts(conn)

    @staticmethod
    def _counts(conn: sqlite3.Connection) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for status, count in conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"):
            counts[str(status)] = int(count)
        return counts

    def prune_jobs(self, older_than: float) -> int:
        """Delete done and cancelled jobs last updated more than ``older_than`` seconds ago.

        Returns how many. What was pushed stays recorded in :meth:`pushed`.
        """
        cutoff = self._clock() - older_than
        with self._transaction(write=True) as conn:
            return conn.execute(
                "DELETE FROM jobs WHERE status IN ('done', 'cancelled') AND updated < ?",
                (cutoff,),
            ).rowcount

    # ------------------------------------------------------------------ upload sessions

    def save_upload(
        self, registry: str, repository: str, digest: str, location: str, offset: int
    ) -> None:
        """Remember where the upload of ``digest`` to registry/repository stands."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO uploads (registry, repository, digest, location, offset_bytes, "
                "updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (registry, repository, digest) DO UPDATE SET "
                "location = excluded.location, offset_bytes = excluded.offset_bytes, "
                "updated = excluded.updated",
                (registry, repository, digest, location, offset, self._clock()),
            )

    def upload(self, registry: str, repository: str, digest: str) -> UploadSession | None:
        """The saved upload session for ``digest`` in registry/repository, or None."""
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT location, offset_bytes, updated FROM uploads "
                "WHERE registry = ? AND repository = ? AND digest = ?",
                (registry, repository, digest),
            ).fetchone()
        if row is None:
            return None
        return UploadSession(registry, repository, digest, str(row[0]), int(row[1]), float(row[2]))

    def drop_upload(self, registry: str, repository: str, digest: str) -> None:
        """Forget an upload session (finished, or refused by the registry)."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "DELETE FROM uploads WHERE registry = ? AND repository = ? AND digest = ?",
                (registry, repository, digest),
            )

    def upload_sessions(self, registry: str) -> RegistrySessions:
        """Upload sessions of ``registry``, shaped as the uploader's ``SessionStore``."""
        return RegistrySessions(self, registry)

    def body_limit(self, registry: str) -> RegistryBodyLimit:
        """``registry``'s learned request-body limit, shaped as the uploader's ``LimitStore``."""
        return RegistryBodyLimit(self, registry)

    def load_body_limit(self, registry: str) -> int | None:
        """The body limit learned for ``registry`` within :data:`BODY_LIMIT_MEMORY`, if any."""
        cutoff = self._clock() - BODY_LIMIT_MEMORY
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT max_body FROM body_limits WHERE registry = ? AND learned >= ?",
                (registry, cutoff),
            ).fetchone()
        return None if row is None else int(row[0])

    def save_body_limit(self, registry: str, limit: int) -> None:
        """Remember ``registry``'s newly learned body limit."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO body_limits (registry, max_body, learned) VALUES (?, ?, ?) "
                "ON CONFLICT (registry) DO UPDATE SET max_body = excluded.max_body, "
                "learned = excluded.learned",
                (registry, limit, self._clock()),
            )

    def drop_stale_uploads(self, older_than: float) -> int:
        """Forget upload sessions not updated for more than ``older_than`` seconds.

        Registries expire idle sessions; resuming one that has gone costs a failed request.
        Returns how many were dropped.
        """
        cutoff = self._clock() - older_than
        with self._transaction(write=True) as conn:
            return conn.execute("DELETE FROM uploads WHERE updated < ?", (cutoff,)).rowcount

    # ------------------------------------------------------------------ blob locations

    def record_blobs(self, registry: str, repository: str, digests: Iterable[str]) -> None:
        """Remember that registry/repository holds these blobs (mount sources for later)."""
        now = self._clock()
        with self._transaction(write=True) as conn:
            conn.executemany(
                "INSERT INTO blobs (registry, digest, repository, seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (registry, digest, repository) DO UPDATE SET seen = excluded.seen",
                [(registry, digest, repository, now) for digest in digests],
            )

    def blob_repositories(self, registry: str, digest: str, limit: int = 3) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest``, most recently seen first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT repository FROM blobs WHERE registry = ? AND digest = ? "
                "ORDER BY seen DESC, repository LIMIT ?",
                (registry, digest, limit),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def drop_blob(self, registry: str, repository: str, digest: str) -> None:
        """Forget that registry/repository holds ``digest`` (a mount from it failed)."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "DELETE FROM blobs WHERE registry = ? AND digest = ? AND repository = ?",
                (registry, digest, repository),
            )

    # ------------------------------------------------------------------ registry health

    def save_registry(
        self,
        registry: str,
        *,
        up: bool,
        since: float,
        last_error: str | None,
        held_until: float | None,
    ) -> None:
        """Record ``registry``'s health (``imagepushd.registry.health.HealthStore``)."""
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO registries (registry, up, since, last_error, held_until) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (registry) DO UPDATE SET "
                "up = excluded.up, since = excluded.since, last_error = excluded.last_error, "
                "held_until = excluded.held_until",
                (
                    registry,
                    int(up),
                    since,
                    None if last_error is None else _truncate(last_error),
                    held_until,
                ),
            )

    def forget_registries(self) -> None:
        """Forget every registry's health (a starting daemon has not seen any yet)."""
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM registries")

    # ------------------------------------------------------------------ status

    def summary(self) -> Summary:
        """Job counts, pushes, and failing jobs with their last error, from one snapshot."""
        with self._transaction(write=False) as conn:
            counts = self._counts(conn)
            pushed_count, last_push = conn.execute(
                "SELECT count(*), max(pushed_at) FROM pushed"
            ).fetchone()
            failing = [
                _job(row)
                for row in conn.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'failed' "
                    "ORDER BY next_attempt, id"
                )
            ]
            registries = [
                RegistryStatus(
                    registry=str(host),
                    up=bool(up),
                    since=float(since),
                    last_error=None if error is None else str(error),
                    held_until=None if held is None else float(held),
                    waiting=self._open_on(conn, str(host)),
                )
                for host, up, since, error, held in conn.execute(
                    "SELECT registry, up, since, last_error, held_until FROM registries "
                    "ORDER BY registry"
                ).fetchall()
            ]
        return Summary(
            path=str(self.path),
            jobs=counts,
            pushed_count=int(pushed_count),
            last_push=None if last_push is None else float(last_push),
            failing=[
                FailingJob(
                    id=j.id,
                    namespace=j.namespace,
                    name=j.name,
                    digest=j.digest,
                    target=j.target,
                    attempts=j.attempts,
                    last_error=j.last_error,
                    next_attempt=j.next_attempt,
                )
                for j in failing
            ],
            registries=registries,
        )


class RegistryBodyLimit:
    """One registry's learned body limit in a :class:`State`.

    Has the shape of ``imagepushd.registry.bodylimit.LimitStore`` (structurally, like
    :class:`RegistrySessions`).
    """

    def __init__(self, state: State, registry: str) -> None:
        self.state = state
        self.registry = registry

    def load(self) -> int | None:
        """The limit learned within the last :data:`BODY_LIMIT_MEMORY` seconds, if any."""
        return self.state.load_body_limit(self.registry)

    def save(self, limit: int) -> None:
        """Remember a newly learned limit."""
        self.state.save_body_limit(self.registry, limit)


class RegistrySessions:
    """One registry's upload sessions in a :class:`State`.

    Has the shape of ``imagepushd.registry.upload.SessionStore`` (structurally: the state does
    not import the registry layer), so a ``BlobUploader`` for that registry can persist its
    chunked sessions here.
    """

    def __init__(self, state: State, registry: str) -> None:
        self.state = state
        self.registry = registry

    def load(self, repository: str, digest: str) -> tuple[str, int] | None:
        """The saved (location, acknowledged offset) for this blob, if any."""
        session = self.state.upload(self.registry, repository, digest)
        return None if session is None else (session.location, session.offset)

    def save(self, repository: str, digest: str, location: str, offset: int) -> None:
        """Remember the newest location and acknowledged offset."""
        self.state.save_upload(self.registry, repository, digest, location, offset)

    def drop(self, repository: str, digest: str) -> None:
        """Forget the session (finished or unusable)."""
        self.state.drop_upload(self.registry, repository, digest)
