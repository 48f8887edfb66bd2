"""Registry health, kept for ``imagepushd status``."""

from __future__ import annotations

from imagepushd.remember import MAX_ERROR_LENGTH, State
from tests.remember.common import D1, Clock


def test_registry_health_is_kept_for_status(state: State, clock: Clock) -> None:
    state.registries.save("r.example", up=True, since=clock.now, last_error=None, held_until=None)
    state.registries.save("a.example", up=True, since=1.0, last_error=None, held_until=None)
    state.jobs.enqueue("ns", "x", D1, "r.example/x:1", 0)
    state.jobs.enqueue("ns", "y", D1, "r.example/y:1", 0)
    clock.advance(5)
    state.registries.save(
        "r.example", up=False, since=clock.now, last_error="x" * 2000, held_until=None
    )
    state.registries.save("a.example", up=True, since=1.0, last_error="429", held_until=99.0)
    down, held = state.summary()["registries"][::-1]
    assert down == {
        "registry": "r.example",
        "up": False,
        "since": clock.now,
        "last_error": "x" * (MAX_ERROR_LENGTH - 1) + "…",
        "held_until": None,
        "waiting": 2,
    }
    assert held == {
        "registry": "a.example",
        "up": True,
        "since": 1.0,
        "last_error": "429",
        "held_until": 99.0,
        "waiting": 0,
    }
    state.registries.forget()
    assert state.summary()["registries"] == []
