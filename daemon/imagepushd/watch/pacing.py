"""When the daemon reads containerd's metadata again, besides "it changed".

Two cases need pacing. containerd can be too busy to snapshot (it committed during every
attempt): :class:`BusyPatience` says when to try again and when that is worth a log line. And a
cheap snapshot can carry records over across several commits, which may hide a change (see
``MetadataSnapshot.unverified``): :class:`VerifyBudget` says when to settle that with a full
read, as soon as possible while full reads are rare, less often when they would add up.
Both are plain arithmetic on times the caller passes in.
"""

from __future__ import annotations

import math


class BusyPatience:
    """When to read again, and whether to say so, while containerd is too busy to snapshot.

    A snapshot fails with ``SnapshotBusyError`` when containerd committed during each attempt
    (thousands of tags in a burst). That is no error: the next read comes after ``first``
    seconds, doubling up to ``maximum``, and the failure is worth a line only once it has
    lasted ``patience`` seconds, and then once until a snapshot succeeds.
    """

    def __init__(self, first: float = 0.05, maximum: float = 2.0, patience: float = 30.0) -> None:
        self._first = first
        self._maximum = maximum
        self._patience = patience
        self._since: float | None = None
        self._failures = 0
        self._reported = False

    def failed(self, now: float) -> tuple[float, bool]:
        """One more busy snapshot at ``now``: seconds until the next try, and whether to say so."""
        if self._since is None:
            self._since, self._failures = now, 0
        delay = min(self._maximum, self._first * 2**self._failures)
        self._failures += 1
        report = not self._reported and now - self._since >= self._patience
        self._reported = self._reported or report
        return delay, report

    def succeeded(self) -> None:
        """A snapshot was taken: the next busy spell starts afresh."""
        self._since = None
        self._reported = False


class VerifyBudget:
    """When to take the full read that settles an unverified snapshot.

    Full reads may use ``share`` of the wall-clock time, saved up to ``burst`` reads (a token
    bucket of seconds, sized by the last read's cost): on a quiet host a change hidden by page
    reuse (a tag deleted and made again) is seen at once, while a containerd that commits all
    the time gets a full read of 10,000 images (30-60 ms) every 15-30 s, not after every commit
    (at most 0.12 s per minute, however many images).
    """

    def __init__(self, share: float = 0.002, burst: int = 2) -> None:
        self._share = share
        self._burst = burst
        self._tokens = math.inf  # full, whatever the first read costs
        self._at: float | None = None
        self._cost = 0.0

    def _refill(self, now: float) -> float:
        """Add what the time since the last call earned; the budget's time (never going back)."""
        if self._at is None or now > self._at:
            if self._at is not None:
                self._tokens += (now - self._at) * self._share
            self._at = now
        if self._cost:
            self._tokens = min(self._tokens, self._burst * self._cost)
        return self._at

    def spent(self, now: float, seconds: float) -> None:
        """A full read ending at ``now`` took ``seconds``: the expected cost of the next one."""
        self._cost = seconds
        self._refill(now)
        self._tokens -= seconds

    def due(self, now: float) -> float:
        """The earliest time from ``now`` at which a full read fits in the budget."""
        at = self._refill(now)
        missing = self._cost - self._tokens
        return now if missing <= 0 else at + missing / self._share
