"""Pushed targets: upserts, newest first, holdings."""

from __future__ import annotations

from imagepushd.remember import Pushed, State
from tests.remember.common import D1, D2, D3, Clock


def test_record_push_upserts_and_lists_newest_first(state: State, clock: Clock) -> None:
    first = state.pushed.record("r/a:1", D1, "default", "a:1", bytes=100, duration=1.5)
    assert first == Pushed("r/a:1", D1, "default", "a:1", clock.now, 100, 1.5)
    clock.advance(10)
    state.pushed.record("r/b:1", D2, "default", "b:1", bytes=200, duration=2.0)
    clock.advance(10)
    state.pushed.record("r/a:1", D2, "default", "a:1", bytes=300, duration=3.0)
    clock.advance(10)
    again = state.pushed.record("r/a:1", D1, "k8s.io", "a:1", bytes=111, duration=0.1)
    assert state.pushed.count() == 3
    listed = state.pushed.newest()
    assert {(p.target, p.digest) for p in listed} == {("r/a:1", D1), ("r/b:1", D2), ("r/a:1", D2)}
    assert listed[0] == again
    assert [(p.target, p.digest) for p in listed] == [
        ("r/a:1", D1),
        ("r/a:1", D2),
        ("r/b:1", D2),
    ]
    assert state.pushed.newest(limit=2) == listed[:2]
    assert state.pushed.newest(limit=0) == []


def test_holdings_are_the_newest_push_per_target(state: State, clock: Clock) -> None:
    """A → B → A on one tag: the target holds A again; ties on time go to the later row."""
    assert state.pushed.holdings() == set()
    state.pushed.record("r/a:1", D1, "ns", "a:1", bytes=1, duration=0)
    clock.advance(10)
    state.pushed.record("r/a:1", D2, "ns", "a:1", bytes=1, duration=0)
    state.pushed.record("r/b:1", D2, "ns", "b:1", bytes=1, duration=0)
    assert state.pushed.holdings() == {("r/a:1", D2), ("r/b:1", D2)}
    clock.advance(10)
    state.pushed.record("r/a:1", D1, "ns", "a:1", bytes=1, duration=0)
    assert state.pushed.holdings() == {("r/a:1", D1), ("r/b:1", D2)}
    state.pushed.record("r/b:1", D1, "ns", "b:1", bytes=1, duration=0, pushed_at=clock.now)
    state.pushed.record("r/b:1", D3, "ns", "b:1", bytes=1, duration=0, pushed_at=clock.now)
    assert state.pushed.holdings() == {("r/a:1", D1), ("r/b:1", D3)}


def test_record_push_takes_an_explicit_time(state: State) -> None:
    record = state.pushed.record("r/a:1", D1, "ns", "a", bytes=1, duration=0, pushed_at=42.0)
    assert record.pushed_at == 42.0
    assert state.pushed.newest() == [record]
