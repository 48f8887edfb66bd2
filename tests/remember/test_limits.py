"""Request-body limits learned per registry."""

from __future__ import annotations

from pathlib import Path

from imagepushd.remember import BODY_LIMIT_MEMORY, State
from tests.remember.common import Clock


def test_body_limits_are_kept_per_registry_for_a_day(tmp_path: Path, clock: Clock) -> None:
    with State(tmp_path / "state.db", clock=clock) as s:
        store = s.body_limits.of("a.example")
        assert store.load() is None
        store.save(4 << 20)
        store.save(1 << 20)
        assert store.load() == 1 << 20
        assert s.body_limits.of("b.example").load() is None
    clock.advance(BODY_LIMIT_MEMORY - 1)
    with State(tmp_path / "state.db", clock=clock) as s:
        assert s.body_limits.of("a.example").load() == 1 << 20  # across restarts
        clock.advance(2)
        assert s.body_limits.of("a.example").load() is None  # learned again after a day
