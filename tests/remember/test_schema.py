"""Schema migrations: each runs once, in its own transaction with the version bump."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from imagepushd.errors import StateError
from imagepushd.remember import MIGRATIONS, State
from tests.remember.common import D1, pragma


def test_a_version_2_file_gains_the_registries_table(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path, migrations=MIGRATIONS[:2]) as s:
        s.jobs.enqueue("ns", "a", D1, "r.example/a:1", 0)
    assert pragma(path, "user_version") == 2
    with State(path) as s:
        assert s.jobs.open_on("r.example") == 1
        s.registries.save("r.example", up=False, since=2.0, last_error="down", held_until=None)
        assert [r["registry"] for r in s.summary()["registries"]] == ["r.example"]
    assert pragma(path, "user_version") == len(MIGRATIONS) == 3


def test_a_future_migration_runs_once_and_bumps_the_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path) as s:
        s.flags.set("kept", "yes")
    now = len(MIGRATIONS)
    assert pragma(path, "user_version") == now
    calls: list[int] = []

    def v2(conn: sqlite3.Connection) -> None:
        calls.append(int(conn.execute("PRAGMA user_version").fetchone()[0]))
        conn.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    migrations = (*MIGRATIONS, v2)
    with State(path, migrations=migrations) as s:
        assert s.flags.get("kept") == "yes"
        s.jobs.enqueue("ns", "a", D1, "t", 0)
    assert calls == [now]
    assert pragma(path, "user_version") == now + 1
    State(path, migrations=migrations).close()
    assert calls == [now]
    # a fresh file runs the whole history in order
    State(tmp_path / "fresh.db", migrations=migrations).close()
    assert calls == [now, now]
    assert pragma(tmp_path / "fresh.db", "user_version") == now + 1
    # and the older code refuses the migrated file
    with pytest.raises(StateError, match="newer imagepushd"):
        State(path)


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path) as s:
        s.flags.set("kept", "yes")

    def v2(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE extra (x INTEGER)")
        conn.execute("CREATE TABLE meta (x INTEGER)")  # already exists

    with pytest.raises(StateError, match="already exists"):
        State(path, migrations=(*MIGRATIONS, v2))
    assert pragma(path, "user_version") == len(MIGRATIONS)
    with closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "extra" not in names
    with State(path) as s:
        assert s.flags.get("kept") == "yes"
