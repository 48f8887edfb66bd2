"""The state file itself: opening, checking and migrating it, and the one transaction helper.

One connection serves every thread; a lock serialises its use and every write is one
``BEGIN IMMEDIATE`` transaction, so other processes (``imagepushd status``) can read the file at
any time under WAL and writers from several processes wait on the busy timeout instead of
failing. ``synchronous=NORMAL`` is the WAL setting that never corrupts the file: a power cut may
lose the last transactions, and everything here is safe to redo (a push finds its target
already holding the digest; an upload asks the registry where it stands).

A file from a newer imagepushd, a corrupt file and an unreadable file are all a
:class:`StateError` whose message names the file, the problem and the recovery command. The file
is never reset, deleted or rewritten to get past a problem: it may hold the only record of what
was pushed.
"""

from __future__ import annotations

import logging
import os
import shlex
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from imagepushd.errors import StateError
from imagepushd.remember.schema import MIGRATIONS, Migration

log = logging.getLogger(__name__)

#: Seconds a write waits for another process's transaction before failing.
BUSY_TIMEOUT = 10.0

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC


class Database:
    """The state file at ``path``, opened (created if missing) and migrated to the latest schema.

    Safe to share between threads. ``clock`` stamps every record; ``migrations`` is the schema
    history (tests pass a longer one to exercise a future version). Every table's class reads
    and writes through :meth:`transaction`.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self._migrations = tuple(migrations)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = self._open()

    def close(self) -> None:
        """Close the file; further calls raise :class:`StateError`. Closing twice is harmless."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

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
                f"cannot create the directory of state file {self.path} ({_strerror(exc)})"
            ) from exc
        if not self._create_file():
            self._check_existing()

    def _create_file(self) -> bool:
        """Create the file with mode 0600; False if it exists already."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        except OSError as exc:
            raise StateError(f"cannot create state file {self.path} ({_strerror(exc)})") from exc
        try:
            os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        finally:
            os.close(fd)
        return True

    def _check_existing(self) -> None:
        """Refuse an existing path that cannot be the state file; warn if others may read it."""
        try:
            fd = os.open(self.path, _OPEN_FLAGS)
        except OSError as exc:
            raise self._unusable(
                f"cannot be opened ({_strerror(exc)})",
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
    def transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on the open connection, under the lock."""
        with self._lock:
            if self._conn is None:
                raise StateError(f"state file {self.path} is closed")
            with self._tx(self._conn, write=write) as conn:
                yield conn


def _strerror(exc: OSError) -> str:
    """The system's words for ``exc``, lower-case to sit inside a sentence."""
    return (exc.strerror or str(exc)).lower()
