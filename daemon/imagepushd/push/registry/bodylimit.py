"""The largest request body one registry accepts, learned from its HTTP 413 answers.

A registry, or more often a proxy in front of it, refuses bodies over some size: nginx's
default ``client_max_body_size`` is 1 MiB, Cloudflare's plan limits start at 100 MB, some ACR
tiers refuse big single PUTs. The answer is HTTP 413 before the body is read, so nothing is
stored and the same bytes can go again in smaller requests. Each refusal lowers the limit to
the largest power of two below the refused size (5 MiB → 4, 2, 1 MiB: three refusals find
nginx's default), and uploads to that registry then send no body over it. The limit is kept
per registry, shared by every blob and job, and (through a :class:`LimitStore`) across
restarts, so a registry costs a few refused requests once, not per blob.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from imagepushd.errors import RegistryError
from imagepushd.units import human_size

log = logging.getLogger(__name__)

#: Below this, refusals are not worth chasing: the registry (or its proxy) is misconfigured.
SMALLEST_LIMIT = 256 << 10


class LimitStore(Protocol):
    """Where one registry's learned limit is kept (the daemon's state file)."""

    def load(self) -> int | None:
        """The limit learned earlier and still believed, if any."""

    def save(self, limit: int) -> None:
        """Remember a newly learned limit."""


def limit_below(size: int) -> int:
    """The largest power of two strictly below ``size`` (at least 1)."""
    return 1 << max(0, (size - 1).bit_length() - 1)


class BodyLimit:
    """One registry's request-body limit (None: none known); thread-safe."""

    def __init__(self, host: str, store: LimitStore | None = None) -> None:
        self.host = host
        self._store = store
        self._lock = threading.Lock()
        self._limit = store.load() if store is not None else None

    @property
    def limit(self) -> int | None:
        """The largest body to send, or None when no refusal has been seen."""
        return self._limit

    def fits(self, size: int) -> bool:
        """Whether a body of ``size`` bytes is within the known limit."""
        limit = self._limit
        return limit is None or size <= limit

    def refused(self, size: int, error: RegistryError) -> int:
        """A body of ``size`` bytes got HTTP 413: the limit to use from now on.

        Raises a :class:`RegistryError` naming the sizes tried when nothing smaller is worth
        trying (a limit under :data:`SMALLEST_LIMIT`).
        """
        with self._lock:
            known = self._limit
            if known is not None and known < size:
                return known  # another request already learned a lower one
            limit = limit_below(size)
            if limit < SMALLEST_LIMIT:
                raise RegistryError(
                    f"{error}: even a {human_size(size)} request body is refused; the "
                    f"registry or a proxy in front of it must accept at least "
                    f"{human_size(SMALLEST_LIMIT)} (nginx: client_max_body_size)",
                    status=error.status,
                    codes=error.codes,
                )
            self._limit = limit
        log.warning(
            "%s: a %s request body was refused (HTTP 413): the registry or a proxy in front "
            "of it limits request bodies; sending at most %s per request from now on",
            self.host,
            human_size(size),
            human_size(limit),
        )
        if self._store is not None:
            self._store.save(limit)
        return limit
