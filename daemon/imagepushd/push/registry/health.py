"""Registry health: whether each registry answers, known once and shared by all its jobs.

Without it every job meets an outage on its own: each request retried with warnings, each job
failed with an error and put on its own backoff timer, so a registry that comes back waits for
the slowest timer. Here a job that fails because its registry does not answer (no connection,
502/503/504, see :meth:`RegistryError.is_unavailable`) asks one confirming probe; if that fails
too, the registry is down: one warning (with the number of jobs waiting for it), no more retries
of its requests, no new jobs dispatched to it, and one probe thread (``GET /v2/`` without
retries) asking again with capped, jittered backoff. When it answers, one line says so and the
service dispatches every waiting job at once. A job whose registry answers the probe failed for
its own reasons and backs off on its own.

A ``Retry-After`` (429 Too Many Requests, or 503 with one) holds every request to the registry
until the time it names, through the :class:`~imagepushd.push.registry.retry.Gate` each retrier
consults, and holds dispatching too; one line per hold.

Every change is written to a :class:`HealthStore` (the state file), where ``imagepushd
status``, another process, reads it. Clock, sleep and thread start are injected.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from imagepushd.errors import ImagepushdError, RegistryError

log = logging.getLogger(__name__)

#: First probe this long after a registry went down; each next one waits twice as long, up to
#: ``PROBE_MAX``, which bounds how late a return is noticed (jittered down to half of it).
PROBE_INITIAL = 1.0
PROBE_MAX = 5.0
#: The longest ``Retry-After`` honoured (the retry policy caps its own waits the same way).
MAX_HOLD = 300.0


class HealthStore(Protocol):
    """Where registry health is kept for other processes (``State.registries`` has this shape)."""

    def save(
        self,
        registry: str,
        *,
        up: bool,
        since: float,
        last_error: str | None,
        held_until: float | None,
    ) -> None:
        """Record the registry's health as it is now."""


@dataclass
class _Registry:
    """What is known of one registry."""

    up: bool
    since: float
    error: str | None = None
    held_until: float = 0.0
    probing: bool = False
    confirming: threading.Lock = field(default_factory=threading.Lock)


class RegistryHealth:
    """The health of every registry the daemon has talked to; thread-safe.

    ``probe(host)`` sends one ``GET /v2/`` and raises :class:`RegistryError` unless the
    registry answers. ``waiting(host)`` counts its open jobs (for the log line). ``wait(s)``
    sleeps and returns True when the daemon stops (``threading.Event.wait``); ``spawn`` starts
    a probe loop (default: a daemon thread); ``on_change(host, up)`` is called on every
    up/down change (the daemon sets a gauge), and ``wake()`` when one is back, so the loop
    dispatches its waiting jobs at once.
    """

    def __init__(
        self,
        *,
        probe: Callable[[str], None],
        store: HealthStore | None = None,
        waiting: Callable[[str], int] = lambda host: 0,
        clock: Callable[[], float] = time.time,
        wait: Callable[[float], bool] | None = None,
        spawn: Callable[[Callable[[], None]], None] | None = None,
        on_change: Callable[[str, bool], None] = lambda host, up: None,
        wake: Callable[[], None] = lambda: None,
        rand: Callable[[], float] = random.random,
        probe_initial: float = PROBE_INITIAL,
        probe_max: float = PROBE_MAX,
        max_hold: float = MAX_HOLD,
    ) -> None:
        self._probe = probe
        self._store = store
        self._waiting = waiting
        self._clock = clock
        self._wait = wait or threading.Event().wait
        self._spawn = spawn or _thread
        self._on_change = on_change
        self._wake = wake
        self._rand = rand
        self._probe_initial = probe_initial
        self._probe_max = probe_max
        self._max_hold = max_hold
        self._lock = threading.Lock()
        self._registries: dict[str, _Registry] = {}

    # ---- what dispatching asks -----------------------------------------------------------

    def blocked(self) -> set[str]:
        """Registries no job should be started for now: down, or held by a Retry-After."""
        now = self._clock()
        with self._lock:
            return {h for h, r in self._registries.items() if not r.up or r.held_until > now}

    def down(self) -> dict[str, str | None]:
        """Registries known to be down, with the error that says so."""
        with self._lock:
            return {h: r.error for h, r in self._registries.items() if not r.up}

    def next_release(self) -> float | None:
        """When the earliest hold ends (the service wakes then to dispatch), or None."""
        now = self._clock()
        with self._lock:
            ends = [r.held_until for r in self._registries.values() if r.held_until > now]
        return min(ends, default=None)

    def wait_time(self, host: str) -> float:
        """Seconds left of a hold on ``host`` (0 if none)."""
        with self._lock:
            entry = self._registries.get(host)
            held = entry.held_until if entry is not None else 0.0
        return max(0.0, held - self._clock())

    def is_down(self, host: str) -> bool:
        """Whether ``host`` is known to be down."""
        with self._lock:
            entry = self._registries.get(host)
            return entry is not None and not entry.up

    def gate(self, host: str) -> RegistryGate:
        """The view of ``host``'s health that its retrier consults before each request."""
        return RegistryGate(self, host)

    # ---- what jobs report ----------------------------------------------------------------

    def reached(self, host: str) -> None:
        """A job of ``host`` succeeded: the registry is up (recorded the first time)."""
        with self._lock:
            entry = self._registries.get(host)
            if entry is not None and entry.up:
                return
        self._back(host, how="a push went through")

    def job_failed(self, host: str, error: RegistryError) -> bool:
        """A job of ``host`` failed with ``error``: whether it waits for the registry.

        True when the registry is down (confirmed by one probe unless already known) or holds
        requests back: the job is due again as soon as the registry is. False when the
        failure is the job's own (the registry answers): it backs off by itself.
        """
        if error.retry_after and error.is_temporary():  # (a Retry-After of 0 holds nothing)
            self.hold(host, error)
            return True
        if not error.is_unavailable():
            return False
        entry = self._entry(host)
        with entry.confirming:  # jobs failing together probe once, not each
            if not entry.up:
                return True
            if self._ask(host) is None:
                return False
            self._mark_down(host, error)
            return True

    def hold(self, host: str, error: RegistryError) -> None:
        """Hold every request to ``host`` for the ``Retry-After`` of ``error`` (capped)."""
        seconds = min(error.retry_after or 0.0, self._max_hold)
        now = self._clock()
        until = now + seconds
        entry = self._entry(host)
        with self._lock:
            if until <= entry.held_until:
                return
            fresh = entry.held_until <= now
            entry.held_until = until
            entry.error = str(error)
            self._save(host, entry)
        if fresh:
            log.warning(
                "registry %s asks to wait %.0fs: every job of it waits (%s)", host, seconds, error
            )

    # ---- internals -----------------------------------------------------------------------

    def _entry(self, host: str) -> _Registry:
        with self._lock:
            entry = self._registries.get(host)
            if entry is None:
                entry = self._registries[host] = _Registry(up=True, since=self._clock())
                self._save(host, entry)
        return entry

    def _save(self, host: str, entry: _Registry) -> None:
        """Write ``entry`` to the store (called with the lock held: writes stay in order)."""
        if self._store is not None:
            self._store.save(
                host,
                up=entry.up,
                since=entry.since,
                last_error=entry.error,
                held_until=entry.held_until or None,
            )

    def _mark_down(self, host: str, error: RegistryError) -> None:
        with self._lock:
            entry = self._registries[host]
            if not entry.up:
                return
            entry.up, entry.since, entry.error = False, self._clock(), str(error)
            self._save(host, entry)
            start = not entry.probing
            entry.probing = True
        waiting = self._waiting(host)
        log.warning(
            "registry %s is unreachable; %d job(s) wait for it, probing it every %.0fs at most: %s",
            host,
            waiting,
            self._probe_max,
            error,
        )
        self._on_change(host, False)
        if start:
            self._spawn(lambda: self._probe_loop(host))

    def _back(self, host: str, *, how: str) -> None:
        now = self._clock()
        down_for: float | None = None
        with self._lock:
            entry = self._registries.get(host)
            if entry is None:
                entry = self._registries[host] = _Registry(up=True, since=now)
            elif not entry.up:
                down_for = now - entry.since
                entry.up, entry.since, entry.error = True, now, None
            else:
                return
            self._save(host, entry)
        if down_for is not None:
            log.info(
                "registry %s is reachable again after %.0fs (%s); %d job(s) go now",
                host,
                down_for,
                how,
                self._waiting(host),
            )
        self._on_change(host, True)
        self._wake()

    def _ask(self, host: str) -> RegistryError | None:
        """One probe: None if the registry answers (whatever it says), else why it does not."""
        try:
            self._probe(host)
        except RegistryError as exc:
            if exc.is_unavailable():
                return exc
            if exc.retry_after and exc.is_temporary():
                self.hold(host, exc)
        except ImagepushdError as exc:  # e.g. its settings: the jobs will say so themselves
            log.debug("registry %s: probe not sent: %s", host, exc)
        except Exception:  # a bug must not leave its jobs waiting for ever
            if not self._wait(0):  # (a stopping daemon closes the client under the probe)
                log.exception("registry %s: probe crashed", host)
        return None

    def _probe_loop(self, host: str) -> None:
        """Probe ``host`` until it answers or the daemon stops: the one retrier while down."""
        delay = self._probe_initial
        try:
            while True:
                with self._lock:
                    if self._registries[host].up:  # a job got through meanwhile
                        return
                if self._wait(delay * (0.5 + self._rand() / 2)):
                    return
                error = self._ask(host)
                if self._wait(0):  # stopped during the probe: its answer means nothing now
                    return
                if error is None:
                    self._back(host, how="it answers the probe")
                    return
                self._still_down(host, error)
                delay = min(delay * 2, self._probe_max)
        finally:
            with self._lock:
                self._registries[host].probing = False

    def _still_down(self, host: str, error: RegistryError) -> None:
        with self._lock:
            entry = self._registries[host]
            if entry.error != str(error):
                entry.error = str(error)
                self._save(host, entry)


class RegistryGate:
    """One registry's health as its :class:`~imagepushd.push.registry.retry.Retrier` sees it."""

    reporting = True

    def __init__(self, health: RegistryHealth, host: str) -> None:
        self._health = health
        self._host = host

    def wait_time(self) -> float:
        """Seconds left of a hold on the registry (0 if none)."""
        return self._health.wait_time(self._host)

    def closed(self) -> bool:
        """Whether the registry is known to be down."""
        return self._health.is_down(self._host)

    def hold(self, error: RegistryError) -> None:
        """Hold every request to the registry for ``error``'s ``Retry-After``."""
        self._health.hold(self._host, error)


def _thread(run: Callable[[], None]) -> None:
    """Start ``run`` on a daemon thread (a probe waiting on a hung registry never delays exit)."""
    threading.Thread(target=run, name="registry-probe", daemon=True).start()
