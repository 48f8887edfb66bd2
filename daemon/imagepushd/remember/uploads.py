"""Upload sessions to resume after a restart (the ``uploads`` table)."""

from __future__ import annotations

from dataclasses import dataclass

from imagepushd.remember.database import Database


@dataclass(frozen=True)
class UploadSession:
    """A registry upload session to resume after a restart: its URL and the bytes sent."""

    registry: str
    repository: str
    digest: str
    location: str
    offset: int
    updated: float


class Uploads:
    """The ``uploads`` table: where each half-done blob upload stands."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def save(self, registry: str, repository: str, digest: str, location: str, offset: int) -> None:
        """Remember where the upload of ``digest`` to registry/repository stands."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO uploads (registry, repository, digest, location, offset_bytes, "
                "updated) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (registry, repository, digest) DO UPDATE SET "
                "location = excluded.location, offset_bytes = excluded.offset_bytes, "
                "updated = excluded.updated",
                (registry, repository, digest, location, offset, self._db.clock()),
            )

    def get(self, registry: str, repository: str, digest: str) -> UploadSession | None:
        """The saved upload session for ``digest`` in registry/repository, or None."""
        with self._db.transaction(write=False) as conn:
            row = conn.execute(
                "SELECT location, offset_bytes, updated FROM uploads "
                "WHERE registry = ? AND repository = ? AND digest = ?",
                (registry, repository, digest),
            ).fetchone()
        if row is None:
            return None
        return UploadSession(registry, repository, digest, str(row[0]), int(row[1]), float(row[2]))

    def drop(self, registry: str, repository: str, digest: str) -> None:
        """Forget an upload session (finished, or refused by the registry)."""
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "DELETE FROM uploads WHERE registry = ? AND repository = ? AND digest = ?",
                (registry, repository, digest),
            )

    def sessions(self, registry: str) -> RegistrySessions:
        """Upload sessions of ``registry``, shaped as the uploader's ``SessionStore``."""
        return RegistrySessions(self, registry)

    def drop_stale(self, older_than: float) -> int:
        """Forget upload sessions not updated for more than ``older_than`` seconds.

        Registries expire idle sessions; resuming one that has gone costs a failed request.
        Returns how many were dropped.
        """
        cutoff = self._db.clock() - older_than
        with self._db.transaction(write=True) as conn:
            return conn.execute("DELETE FROM uploads WHERE updated < ?", (cutoff,)).rowcount


class RegistrySessions:
    """One registry's upload sessions in :class:`Uploads`.

    Has the shape of ``imagepushd.push.registry.upload.SessionStore`` (structurally: the state does
    not import the registry layer), so a ``BlobUploader`` for that registry can persist its
    chunked sessions here.
    """

    def __init__(self, uploads: Uploads, registry: str) -> None:
        self.uploads = uploads
        self.registry = registry

    def load(self, repository: str, digest: str) -> tuple[str, int] | None:
        """The saved (location, acknowledged offset) for this blob, if any."""
        session = self.uploads.get(self.registry, repository, digest)
        return None if session is None else (session.location, session.offset)

    def save(self, repository: str, digest: str, location: str, offset: int) -> None:
        """Remember the newest location and acknowledged offset."""
        self.uploads.save(self.registry, repository, digest, location, offset)

    def drop(self, repository: str, digest: str) -> None:
        """Forget the session (finished or unusable)."""
        self.uploads.drop(self.registry, repository, digest)
