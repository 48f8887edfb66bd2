"""The state file as one object: every table over one connection and its one transaction helper."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypedDict

from imagepushd.remember import jobs, pushed, registries
from imagepushd.remember.blobs import Blobs
from imagepushd.remember.database import Database
from imagepushd.remember.flags import Flags
from imagepushd.remember.jobs import Jobs
from imagepushd.remember.limits import BodyLimits
from imagepushd.remember.pushed import PushedTargets
from imagepushd.remember.registries import Registries, RegistryStatus
from imagepushd.remember.schema import MIGRATIONS, Migration
from imagepushd.remember.seen import SeenImages
from imagepushd.remember.uploads import Uploads


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


class State:
    """The state file at ``path``, opened (created if missing) and migrated to the latest schema.

    Safe to share between threads. Each table is an attribute (``state.jobs.enqueue(...)``);
    ``clock`` stamps every record; ``migrations`` is the schema history (tests pass a longer
    one to exercise a future version).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self._db = Database(path, clock=clock, migrations=migrations)
        self.path = self._db.path
        self.flags = Flags(self._db)
        self.seen = SeenImages(self._db)
        self.pushed = PushedTargets(self._db)
        self.jobs = Jobs(self._db)
        self.uploads = Uploads(self._db)
        self.body_limits = BodyLimits(self._db)
        self.blobs = Blobs(self._db)
        self.registries = Registries(self._db)

    def close(self) -> None:
        """Close the file; further calls raise ``StateError``. Closing twice is harmless."""
        self._db.close()

    def __enter__(self) -> State:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def summary(self) -> Summary:
        """Job counts, pushes, and failing jobs with their last error, from one snapshot."""
        with self._db.transaction(write=False) as conn:
            counts = jobs.count_by_status(conn)
            pushed_count, last_push = pushed.totals(conn)
            failing = jobs.failing(conn)
            health = registries.statuses(conn)
        return Summary(
            path=str(self.path),
            jobs=counts,
            pushed_count=pushed_count,
            last_push=last_push,
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
            registries=health,
        )
