"""The daemon's memory: an SQLite file of what was seen, pushed, queued and half-uploaded.

:class:`State` opens the file once (:mod:`~imagepushd.state.database`, the one place
transactions are made; :mod:`~imagepushd.state.schema` holds its history) and offers one
object per table: ``flags``, ``seen``, ``pushed``, ``jobs``, ``uploads``, ``body_limits``,
``blobs`` and ``registries``, each in the module of that name.
"""

from imagepushd.state.database import BUSY_TIMEOUT
from imagepushd.state.jobs import (
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
from imagepushd.state.limits import BODY_LIMIT_MEMORY, RegistryBodyLimit
from imagepushd.state.pushed import Pushed
from imagepushd.state.registries import RegistryStatus
from imagepushd.state.schema import MIGRATIONS, Migration
from imagepushd.state.seen import Seen, SeenLike
from imagepushd.state.store import FailingJob, State, Summary
from imagepushd.state.uploads import RegistrySessions, UploadSession

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
