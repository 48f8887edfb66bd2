"""The daemon's memory: an SQLite file of what was seen, pushed, queued and half-uploaded.

:class:`State` opens the file once (:mod:`~imagepushd.remember.database`, the one place
transactions are made; :mod:`~imagepushd.remember.schema` holds its history) and offers one
object per table: ``flags``, ``seen``, ``pushed``, ``jobs``, ``uploads``, ``body_limits``,
``blobs`` and ``registries``, each in the module of that name.
"""

from imagepushd.remember.database import BUSY_TIMEOUT
from imagepushd.remember.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    JOB_STATUSES,
    MAX_ERROR_LENGTH,
    OPEN_STATUSES,
    QUEUED,
    RUNNING,
    JobRecord,
)
from imagepushd.remember.limits import BODY_LIMIT_MEMORY, RegistryBodyLimit
from imagepushd.remember.pushed import Pushed
from imagepushd.remember.registries import RegistryStatus
from imagepushd.remember.schema import MIGRATIONS, Migration
from imagepushd.remember.seen import Seen, SeenLike
from imagepushd.remember.store import FailingJob, State, Summary
from imagepushd.remember.uploads import RegistrySessions, UploadSession

__all__ = [
    "BODY_LIMIT_MEMORY",
    "BUSY_TIMEOUT",
    "CANCELLED",
    "DONE",
    "FAILED",
    "JOB_STATUSES",
    "MAX_ERROR_LENGTH",
    "MIGRATIONS",
    "OPEN_STATUSES",
    "QUEUED",
    "RUNNING",
    "FailingJob",
    "JobRecord",
    "Migration",
    "Pushed",
    "RegistryBodyLimit",
    "RegistrySessions",
    "RegistryStatus",
    "Seen",
    "SeenLike",
    "State",
    "Summary",
    "UploadSession",
]
