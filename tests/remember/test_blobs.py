"""Blob locations: mount sources, most recently seen first."""

from __future__ import annotations

from imagepushd.remember import State
from tests.remember.common import D1, D2, D3, Clock


def test_blob_repositories_most_recent_first(state: State, clock: Clock) -> None:
    state.blobs.record("r", "a", [D1, D2])
    clock.advance(1)
    state.blobs.record("r", "b", [D1])
    clock.advance(1)
    state.blobs.record("r", "c", iter([D1]))
    clock.advance(1)
    state.blobs.record("r", "d", [D1])
    state.blobs.record("other", "z", [D1])
    clock.advance(1)
    state.blobs.record("r", "a", [D1])  # seen again: most recent now
    assert state.blobs.repositories("r", D1) == ["a", "d", "c"]
    assert state.blobs.repositories("r", D1, limit=10) == ["a", "d", "c", "b"]
    assert state.blobs.repositories("r", D2) == ["a"]
    assert state.blobs.repositories("r", D3) == []
    assert state.blobs.repositories("other", D1) == ["z"]
    state.blobs.drop("r", "a", D1)
    assert state.blobs.repositories("r", D1, limit=1) == ["d"]
    state.blobs.record("r", "e", [])
