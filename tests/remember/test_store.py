"""The whole state's summary, read from one snapshot."""

from __future__ import annotations

import json

from imagepushd.remember import JOB_STATUSES, State
from tests.remember.common import D1, D2, Clock


def test_summary(state: State, clock: Clock) -> None:
    empty = state.summary()
    assert empty == {
        "path": str(state.path),
        "jobs": dict.fromkeys(JOB_STATUSES, 0),
        "pushed_count": 0,
        "last_push": None,
        "failing": [],
        "registries": [],
    }
    state.pushed.record("r/a:1", D1, "ns", "a:1", bytes=1, duration=1)
    clock.advance(10)
    state.pushed.record("r/b:1", D1, "ns", "b:1", bytes=1, duration=1)
    ok = state.jobs.enqueue("ns", "a:1", D1, "r/a:1", 0)
    bad = state.jobs.enqueue("ns", "c:1", D2, "r/c:1", 0)
    state.jobs.start(bad.id)
    state.jobs.fail(bad.id, "503 Service Unavailable", clock.now + 30)
    summary = state.summary()
    assert summary["jobs"]["queued"] == 1
    assert summary["jobs"]["failed"] == 1
    assert summary["pushed_count"] == 2
    assert summary["last_push"] == clock.now
    assert summary["failing"] == [
        {
            "id": bad.id,
            "namespace": "ns",
            "name": "c:1",
            "digest": D2,
            "target": "r/c:1",
            "attempts": 1,
            "last_error": "503 Service Unavailable",
            "next_attempt": clock.now + 30,
        }
    ]
    assert ok.id not in [f["id"] for f in summary["failing"]]
    assert json.loads(json.dumps(summary)) == summary
