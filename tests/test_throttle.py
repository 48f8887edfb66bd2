"""RequestThrottle: request starts spaced by the rate, in-flight requests bounded."""

from __future__ import annotations

import threading
import time

import pytest

from imagepushd.push.registry.throttle import RequestThrottle


class FakeTime:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_starts_are_spaced_by_the_rate() -> None:
    t = FakeTime()
    throttle = RequestThrottle(rate=4, clock=t.clock, sleep=t.sleep)
    starts = []
    for _ in range(5):
        with throttle.slot():
            starts.append(t.now)
    assert starts == [100.0, 100.25, 100.5, 100.75, 101.0]


def test_idle_time_is_not_saved_up_as_a_burst() -> None:
    t = FakeTime()
    throttle = RequestThrottle(rate=2, clock=t.clock, sleep=t.sleep)
    with throttle.slot():
        pass
    t.now += 10  # a long pause
    for _ in range(2):
        with throttle.slot():
            pass
    assert t.sleeps == [0.5]  # the second after the pause waits its turn


def test_without_limits_nothing_waits() -> None:
    t = FakeTime()
    throttle = RequestThrottle(clock=t.clock, sleep=t.sleep)
    for _ in range(100):
        with throttle.slot():
            pass
    assert t.sleeps == []


def test_concurrency_bounds_requests_in_flight() -> None:
    throttle = RequestThrottle(concurrency=2)
    lock = threading.Lock()
    inside = peak = 0

    def request() -> None:
        nonlocal inside, peak
        with throttle.slot():
            with lock:
                inside += 1
                peak = max(peak, inside)
            time.sleep(0.02)
            with lock:
                inside -= 1

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 2


def test_a_failed_request_gives_its_slot_back() -> None:
    throttle = RequestThrottle(concurrency=1)
    with pytest.raises(RuntimeError), throttle.slot():
        raise RuntimeError("connection reset")
    with throttle.slot():  # would block forever if the slot had leaked
        pass


@pytest.mark.parametrize(("rate", "concurrency"), [(0, None), (-1, None), (None, 0)])
def test_bad_limits_are_refused(rate: float | None, concurrency: int | None) -> None:
    with pytest.raises(ValueError):
        RequestThrottle(rate=rate, concurrency=concurrency)
