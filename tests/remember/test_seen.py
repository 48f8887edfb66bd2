"""Seen images: upserts, removals, any seen-shaped record, one transaction."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagepushd.remember import Seen, State
from tests.remember.common import D1, D2, D3


def test_update_seen_upserts_and_removes(state: State) -> None:
    a, b, c = ("default", "a:1"), ("default", "b:1"), ("k8s.io", "a:1")
    state.seen.update({a: Seen(D1, 1.0, True), b: Seen(D2, 2.0, False)}, [])
    state.seen.update({a: Seen(D3, 3.0, False), c: Seen(D1, 4.0, False)}, [b, ("x", "absent")])
    assert state.seen.load() == {a: Seen(D3, 3.0, False), c: Seen(D1, 4.0, False)}


@dataclass(frozen=True)
class OtherSeen:
    """A record of another module with Seen's shape."""

    digest: str
    since: float
    baseline: bool = False


def test_update_seen_takes_any_seen_shaped_record(state: State) -> None:
    state.seen.update({("ns", "a"): OtherSeen(D1, 1.5)}, ())
    assert state.seen.load() == {("ns", "a"): Seen(D1, 1.5, False)}


def test_update_seen_is_one_transaction(state: State) -> None:
    a = ("default", "a:1")
    state.seen.update({a: Seen(D1, 1.0, False)}, [])

    def removed() -> Iterator[tuple[str, str]]:
        yield a
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        state.seen.update({("default", "b:1"): Seen(D2, 2.0, False)}, removed())
    assert state.seen.load() == {a: Seen(D1, 1.0, False)}


def test_seen_of_some_keys(state: State) -> None:
    """Only the keys asked for (absent ones are absent), looked up one by one or, past a few
    hundred, by one pass over the table: the same answer either way."""
    rows = {("default", f"app{i:04d}:1"): Seen(D1, float(i), i % 2 == 0) for i in range(600)}
    rows[("k8s.io", "app0001:1")] = Seen(D2, 1.0, False)
    state.seen.update(rows, [])
    few = {("default", "app0001:1"), ("k8s.io", "app0001:1"), ("default", "absent")}
    assert state.seen.load(few) == {k: rows[k] for k in few if k in rows}
    many = {k for k in rows if k[1] < "app0400"} | {("x", "absent")}
    assert len(many) > 300
    assert state.seen.load(many) == {k: rows[k] for k in many if k in rows}
    assert state.seen.load(set()) == {}
    assert state.seen.load() == rows


keys = st.tuples(st.sampled_from(["default", "k8s.io"]), st.sampled_from(["a", "b", "c", "d"]))


seens = st.builds(Seen, st.sampled_from([D1, D2, D3]), st.floats(0, 1e9), st.booleans())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(keys, seens), st.lists(keys)), max_size=6))
def test_seen_matches_a_dict_model(
    updates: list[tuple[dict[tuple[str, str], Seen], list[tuple[str, str]]]],
) -> None:
    model: dict[tuple[str, str], Seen] = {}
    with tempfile.TemporaryDirectory() as tmp, State(Path(tmp) / "state.db") as s:
        for changed, removed in updates:
            s.seen.update(changed, removed)
            model.update(changed)
            for key in removed:
                model.pop(key, None)
            assert s.seen.load() == model
