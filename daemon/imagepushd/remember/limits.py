"""Request-body limits learned per registry from HTTP 413 answers (the ``body_limits`` table)."""

from __future__ import annotations

from imagepushd.remember.database import Database

#: How long a learned request-body limit is believed: a proxy's limit may be raised, and
#: learning it again costs a few refused requests.
BODY_LIMIT_MEMORY = 86400.0


class BodyLimits:
    """The ``body_limits`` table: the request-body limit each registry enforces, from its 413s."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def load(self, registry: str) -> int | None:
        """The body limit learned for ``registry`` within :data:`BODY_LIMIT_MEMORY`, if any."""
        cutoff = self._db.clock() - BODY_LIMIT_MEMORY
        with self._db.transaction(write=False) as conn:
            row = conn.execute(
                "SELECT max_body FROM body_limits WHERE registry = ? AND learned >= ?",
                (registry, cutoff),
            ).fetchone()
        return None if row is None else int(row[0])

    def save(self, registry: str, limit: int) -> None:
        """Remember ``registry``'s newly learned body limit."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO body_limits (registry, max_body, learned) VALUES (?, ?, ?) "
                "ON CONFLICT (registry) DO UPDATE SET max_body = excluded.max_body, "
                "learned = excluded.learned",
                (registry, limit, self._db.clock()),
            )

    def of(self, registry: str) -> RegistryBodyLimit:
        """``registry``'s learned request-body limit, shaped as the uploader's ``LimitStore``."""
        return RegistryBodyLimit(self, registry)


class RegistryBodyLimit:
    """One registry's learned body limit in :class:`BodyLimits`.

    Has the shape of ``imagepushd.push.registry.bodylimit.LimitStore`` (structurally, like
    :class:`~imagepushd.remember.uploads.RegistrySessions`).
    """

    def __init__(self, limits: BodyLimits, registry: str) -> None:
        self.limits = limits
        self.registry = registry

    def load(self) -> int | None:
        """The limit learned within the last :data:`BODY_LIMIT_MEMORY` seconds, if any."""
        return self.limits.load(self.registry)

    def save(self, limit: int) -> None:
        """Remember a newly learned limit."""
        self.limits.save(self.registry, limit)
