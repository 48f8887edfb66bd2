"""The one retry policy for registry requests (tenacity), aware of ``Retry-After``.

Each unit of work (one request, or one chunk of an upload including its resume query) is
retried here and nowhere else. Whether an error is worth retrying is the error's own
:meth:`RegistryError.is_temporary`; this module only decides how long to wait and how often.

In the daemon a :class:`Gate` (the registry's health, ``push/registry/health.py``) is shared by
every job of a registry: a ``Retry-After`` one request got holds every request to that
registry, and once the registry is known to be down nothing retries (its one probe waits for
it). Failures the gate reports itself (the registry unavailable, or holding requests back)
are then logged here at debug level only, so an outage is one line, not one per retry.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Protocol, TypeVar

import tenacity

from imagepushd.errors import RegistryError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry temporary registry failures."""

    attempts: int = 5
    initial: float = 0.5
    maximum: float = 30.0
    max_retry_after: float = 300.0


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now())


def _is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, RegistryError) and exc.is_temporary()


class Gate(Protocol):
    """What a registry's shared health tells (and is told by) the retrier of each request."""

    def wait_time(self) -> float:
        """Seconds every request to the registry must still wait (a ``Retry-After``), or 0."""

    def closed(self) -> bool:
        """Whether the registry is known to be unreachable: retrying is the probe's job."""

    def hold(self, error: RegistryError) -> None:
        """``error`` carries a ``Retry-After``: hold every request to the registry that long."""

    @property
    def reporting(self) -> bool:
        """Whether the gate logs outages and holds itself (a real one does)."""


class _Open:
    """The gate of a retrier on its own (the CLI): never closed, holds nothing, reports nothing."""

    reporting = False

    def wait_time(self) -> float:
        return 0.0

    def closed(self) -> bool:
        return False

    def hold(self, error: RegistryError) -> None:
        pass


class Retrier:
    """Runs a callable under the policy; ``sleep`` and ``rand`` are injected for tests.

    ``on_retry`` is called before each retry's wait (the daemon counts retries with it);
    ``gate`` is the registry's shared health (default: a gate that is always open).
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        on_retry: Callable[[], None] = lambda: None,
        gate: Gate | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._on_retry = on_retry
        self._gate: Gate = gate or _Open()

    def delay(self, attempt: int, error: BaseException | None) -> float:
        """The wait before attempt ``attempt + 1``: Retry-After wins, else jittered backoff."""
        if isinstance(error, RegistryError) and error.retry_after is not None:
            return min(error.retry_after, self.policy.max_retry_after)
        ceiling = min(self.policy.maximum, self.policy.initial * 2 ** (attempt - 1))
        return float(ceiling / 2 + self._rand() * ceiling / 2)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, RegistryError) and error.retry_after is not None:
            self._gate.hold(error)
        return self.delay(state.attempt_number, error)

    def _retryable(self, exc: BaseException) -> bool:
        return _is_temporary(exc) and not self._gate.closed()

    def _level(self, error: BaseException | None) -> int:
        """Debug for what the gate reports itself (an outage, a hold); warning otherwise."""
        reported = isinstance(error, RegistryError) and (
            error.is_unavailable() or error.retry_after is not None
        )
        return logging.DEBUG if reported and self._gate.reporting else logging.WARNING

    def _before_sleep(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        def report(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.log(
                self._level(error),
                "%s: attempt %d of %d failed (%s); retrying in %.1fs",
                what,
                state.attempt_number,
                self.policy.attempts,
                error,
                wait,
            )
            self._on_retry()

        return report

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` until it succeeds, fails permanently, or attempts run out.

        Each attempt first waits out a hold on the registry; a registry known to be down
        ends the retries at once. The last error is re-raised as it is (never wrapped in
        tenacity's RetryError).
        """

        def attempt() -> T:
            held = self._gate.wait_time()
            if held > 0:
                self._sleep(held)
            return fn()

        retrying = tenacity.Retrying(
            sleep=self._sleep,
            stop=tenacity.stop_after_attempt(self.policy.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(self._retryable),
            before_sleep=self._before_sleep(what),
            reraise=True,
        )
        return retrying(attempt)
