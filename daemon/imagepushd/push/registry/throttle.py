"""A per-registry request budget: at most N requests a second, at most M at once.

Registries rate-limit by account or address (Docker Hub's pull limits, Quay's and Harbor's
per-IP limits, corporate proxies), and regsync offers ``reqPerSec`` and ``reqConcurrent`` for
the same reason. The daemon shares one client per registry host between all of its jobs and
targets, so a throttle on that client bounds everything imagepushd sends there. Request
starts are spaced at least ``1 / rate`` seconds apart (no bursts: a limit of 5 a second is
never 6 in any second), and a request holds one of ``concurrency`` slots until its answer has
been read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class RequestThrottle:
    """Spacing and concurrency limits for one registry's requests; thread-safe.

    ``rate`` is requests per second and ``concurrency`` requests in flight (None: no limit);
    ``clock`` and ``sleep`` are injected for tests.
    """

    def __init__(
        self,
        *,
        rate: float | None = None,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._interval = 0.0 if rate is None else 1.0 / rate
        self._slots = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Wait for a slot and for this request's turn; hold the slot while the body runs."""
        if self._slots is not None:
            self._slots.acquire()
        try:
            if self._interval:
                with self._lock:
                    now = self._clock()
                    start = max(now, self._next)
                    self._next = start + self._interval
                if start > now:
                    self._sleep(start - now)
            yield
        finally:
            if self._slots is not None:
                self._slots.release()
