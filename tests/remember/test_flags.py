"""Flags (the meta table)."""

from __future__ import annotations

from imagepushd.remember import State


def test_flags(state: State) -> None:
    assert state.flags.get("baseline_done") is None
    state.flags.set("baseline_done", "1")
    state.flags.set("baseline_done", "2")
    state.flags.set("other", "")
    assert state.flags.get("baseline_done") == "2"
    assert state.flags.get("other") == ""
