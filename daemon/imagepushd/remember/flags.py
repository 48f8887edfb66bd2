"""Named flags that outlive a run (the ``meta`` table), such as ``baseline_done``."""

from __future__ import annotations

from imagepushd.remember.database import Database


class Flags:
    """The ``meta`` table: one text value per name."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, name: str) -> str | None:
        """The value of flag ``name`` (for example ``baseline_done``), or None if never set."""
        with self._db.transaction(write=False) as conn:
            row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, name: str, value: str) -> None:
        """Set flag ``name`` to ``value``."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )
