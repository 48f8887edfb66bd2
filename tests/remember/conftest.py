"""Fixtures of the state tests: a settable clock and a fresh state file stamped by it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepushd.remember import State
from tests.remember.common import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> Iterator[State]:
    with State(tmp_path / "state.db", clock=clock) as opened:
        yield opened
