"""The one retry policy for registry requests (tenacity), aware of ``Retry-After``.

Each unit of work (one request, or one chunk of an upload including its resume query) is
retried here and nowhere else. Whether an error is worth retrying is the error's own
:meth:`RegistryError.is_temporary`; this module only decides how long to wait and how often.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TypeVar

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


class Retrier:
    """Runs a callable under the policy; ``sleep`` and ``rand`` are injected for tests.

    ``on_retry`` is called before each retry's wait (the daemon counts retries with it).
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        on_retry: Callable[[], None] = lambda: None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._rand = rand
        self._on_retry = on_retry

    def delay(self, attempt: int, error: BaseException | None) -> float:
        """The wait before attempt ``attempt + 1``: Retry-After wins, else jittered backoff."""
        if isinstance(error, RegistryError) and error.retry_after is not None:
            return min(error.retry_after, self.policy.max_retry_after)
        ceiling = min(self.policy.maximum, self.policy.initial * 2 ** (attempt - 1))
        return float(ceiling / 2 + self._rand() * ceiling / 2)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        return self.delay(state.attempt_number, error)

    def _before_sleep(self, what: str) -> Callable[[tenacity.RetryCallState], None]:
        def report(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
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

        The last error is re-raised as it is (never wrapped in tenacity's RetryError).
        """
        retrying = tenacity.Retrying(
            sleep=self._sleep,
            stop=tenacity.stop_after_attempt(self.policy.attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(_is_temporary),
            before_sleep=self._before_sleep(what),
            reraise=True,
        )
        return retrying(fn)
