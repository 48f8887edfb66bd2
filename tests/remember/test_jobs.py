"""Jobs: enqueueing, due order, the status transitions, cancelling, pruning."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepushd.remember import MAX_ERROR_LENGTH, JobRecord, State
from tests.remember.common import D1, D2, Clock


def test_enqueue_creates_a_queued_job(state: State, clock: Clock) -> None:
    job = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 3)
    assert job == JobRecord(
        id=job.id,
        namespace="default",
        name="a:1",
        digest=D1,
        target="r/a:1",
        rule=3,
        status="queued",
        attempts=0,
        next_attempt=clock.now,
        last_error=None,
        created=clock.now,
        updated=clock.now,
    )
    assert state.jobs.get(job.id) == job
    assert state.jobs.get(job.id + 1000) is None


def test_enqueue_is_idempotent(state: State, clock: Clock) -> None:
    job = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 0)
    state.jobs.start(job.id)
    clock.advance(5)
    again = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 1, reopen=True)
    assert again == state.jobs.get(job.id)
    assert (again.status, again.rule, again.attempts) == ("running", 0, 1)
    other = state.jobs.enqueue("default", "a:1", D1, "r2/a:1", 0)
    moved = state.jobs.enqueue("default", "a:1", D2, "r/a:1", 0)
    assert len({job.id, other.id, moved.id}) == 3
    assert len(state.jobs.select()) == 3


@pytest.mark.parametrize("end", ["done", "cancelled"])
def test_enqueue_reopens_finished_jobs_only_when_asked(
    state: State, clock: Clock, end: str
) -> None:
    job = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 0)
    state.jobs.start(job.id)
    state.jobs.fail(job.id, "boom", 0.0)
    state.jobs.start(job.id)
    if end == "done":
        state.jobs.finish(job.id)
    else:
        state.jobs.cancel({job.id: "source deleted"})
    clock.advance(60)
    kept = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 0)
    assert kept.status == end
    reopened = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 4, reopen=True)
    assert reopened.id == job.id
    assert reopened.status == "queued"
    assert reopened.attempts == 0
    assert reopened.last_error is None
    assert reopened.rule == 4
    assert reopened.next_attempt == clock.now
    assert reopened.created == job.created
    assert state.jobs.due(clock.now, 10) == [reopened]


def test_enqueue_not_before(state: State, clock: Clock) -> None:
    job = state.jobs.enqueue("default", "a:1", D1, "r/a:1", 0, not_before=clock.now + 1)
    assert job.next_attempt == clock.now + 1
    assert state.jobs.due(clock.now, 10) == []
    assert state.jobs.due(clock.now + 1, 10) == [job]


def test_due_lists_queued_and_failed_jobs_longest_overdue_first(state: State, clock: Clock) -> None:
    a = state.jobs.enqueue("ns", "a", D1, "t", 0)
    clock.advance(1)
    b = state.jobs.enqueue("ns", "b", D1, "t", 0)
    clock.advance(1)
    c = state.jobs.enqueue("ns", "c", D1, "t", 0)
    d = state.jobs.enqueue("ns", "d", D1, "t", 0)
    e = state.jobs.enqueue("ns", "e", D1, "t", 0)
    f = state.jobs.enqueue("ns", "f", D1, "t", 0)
    state.jobs.start(a.id)
    state.jobs.fail(a.id, "later", clock.now + 100)  # failed, not yet due
    state.jobs.start(b.id)
    state.jobs.fail(b.id, "retry", clock.now - 10)  # failed and overdue
    state.jobs.start(d.id)  # running
    state.jobs.start(e.id)
    state.jobs.finish(e.id)  # done
    state.jobs.cancel({f.id: "gone"})  # cancelled
    assert [j.id for j in state.jobs.due(clock.now, 10)] == [b.id, c.id]
    assert [j.id for j in state.jobs.due(clock.now, 1)] == [b.id]
    assert [j.id for j in state.jobs.due(clock.now + 100, 10)] == [b.id, c.id, a.id]
    # What the daemon sleeps until: the next attempt still ahead (due ones are not counted).
    assert state.jobs.next_attempt_after(clock.now) == clock.now + 100
    assert state.jobs.next_attempt_after(clock.now + 100) is None


def test_due_skips_jobs_of_the_registries_asked(state: State, clock: Clock) -> None:
    """A down registry's jobs are left out by target host, exactly (not by string prefix)."""
    a = state.jobs.enqueue("ns", "a", D1, "reg.example:5000/team/a:1", 0)
    b = state.jobs.enqueue("ns", "b", D1, "reg.example/team/b:1", 0)
    c = state.jobs.enqueue("ns", "c", D1, "reg.example:5000/c:1", 0)
    d = state.jobs.enqueue("ns", "d", D1, "other.example/d:1", 0)
    assert state.jobs.due(clock.now, 10, ["reg.example:5000"]) == [b, d]
    assert state.jobs.due(clock.now, 1, ["reg.example:5000", "reg.example"]) == [d]
    assert state.jobs.due(clock.now, 10, ["reg.example"]) == [a, c, d]
    assert state.jobs.due(clock.now, 10, ()) == [a, b, c, d]
    state.jobs.start(c.id)
    state.jobs.cancel({d.id: "gone"})
    assert state.jobs.open_on("reg.example:5000") == 2  # queued and running count
    assert state.jobs.open_on("reg.example") == 1
    assert state.jobs.open_on("other.example") == 0


def test_start_counts_attempts_and_refuses_unstartable_jobs(state: State, clock: Clock) -> None:
    job = state.jobs.enqueue("ns", "a", D1, "t", 0)
    clock.advance(1)
    started = state.jobs.start(job.id)
    assert started is not None
    assert (started.status, started.attempts, started.updated) == ("running", 1, clock.now)
    assert state.jobs.start(job.id) is None  # already running
    state.jobs.fail(job.id, "x", 0)
    again = state.jobs.start(job.id)
    assert again is not None
    assert again.attempts == 2
    state.jobs.finish(job.id)
    assert state.jobs.start(job.id) is None  # done
    gone = state.jobs.enqueue("ns", "b", D1, "t", 0)
    state.jobs.cancel({gone.id: "deleted"})
    assert state.jobs.start(gone.id) is None  # cancelled since due() listed it
    assert state.jobs.start(9999) is None


def test_finish(state: State) -> None:
    job = state.jobs.enqueue("ns", "a", D1, "t", 0)
    state.jobs.start(job.id)
    state.jobs.fail(job.id, "boom", 0)
    state.jobs.start(job.id)
    assert state.jobs.finish(job.id)
    done = state.jobs.get(job.id)
    assert done is not None
    assert (done.status, done.attempts, done.last_error) == ("done", 2, None)
    assert not state.jobs.finish(9999)


def test_fail_truncates_and_leaves_finished_jobs_alone(state: State, clock: Clock) -> None:
    job = state.jobs.enqueue("ns", "a", D1, "t", 0)
    state.jobs.start(job.id)
    assert state.jobs.fail(job.id, "x" * 5000, clock.now + 30)
    failed = state.jobs.get(job.id)
    assert failed is not None
    assert failed.status == "failed"
    assert failed.next_attempt == clock.now + 30
    assert failed.last_error is not None
    assert len(failed.last_error) == MAX_ERROR_LENGTH
    assert failed.last_error.startswith("x" * 900)
    assert state.jobs.fail(job.id, "short", clock.now)  # a failed job can fail again
    state.jobs.finish(job.id)
    assert not state.jobs.fail(job.id, "late", clock.now)
    done = state.jobs.get(job.id)
    assert done is not None
    assert done.status == "done"


def test_cancel(state: State) -> None:
    jobs = [state.jobs.enqueue("ns", name, D1, "t", 0) for name in "abcd"]
    state.jobs.start(jobs[1].id)
    state.jobs.start(jobs[2].id)
    state.jobs.finish(jobs[2].id)
    reasons = {j.id: "source deleted " + "y" * 2000 for j in jobs}
    count = state.jobs.cancel({**reasons, 9999: "no such job"})
    assert count == 3  # queued, running and ... not the done one, not the missing one
    statuses = {j.name: j.status for j in state.jobs.select()}
    assert statuses == {"a": "cancelled", "b": "cancelled", "c": "done", "d": "cancelled"}
    cancelled = state.jobs.get(jobs[0].id)
    assert cancelled is not None
    assert cancelled.last_error is not None
    assert cancelled.last_error.startswith("source deleted ")
    assert len(cancelled.last_error) == MAX_ERROR_LENGTH
    assert state.jobs.cancel({}) == 0


def test_cancel_keeps_each_jobs_reason(state: State, clock: Clock) -> None:
    a = state.jobs.enqueue("ns", "a", D1, "t", 0)
    b = state.jobs.enqueue("ns", "b", D1, "t", 0)
    state.jobs.cancel({a.id: "ns/a was deleted"})
    clock.now += 5
    state.jobs.cancel({b.id: "ns/b moved to sha256:x"})
    assert [(j.name, j.last_error) for j in state.jobs.cancelled(limit=10)] == [
        ("b", "ns/b moved to sha256:x"),
        ("a", "ns/a was deleted"),
    ]
    assert [j.name for j in state.jobs.cancelled(limit=1)] == ["b"]


def test_requeue_running_keeps_attempts(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "state.db"
    with State(path, clock=clock) as s:
        a = s.jobs.enqueue("ns", "a", D1, "t", 0)
        b = s.jobs.enqueue("ns", "b", D1, "t", 0)
        s.jobs.start(a.id)
        s.jobs.fail(a.id, "boom", 0)
        s.jobs.start(a.id)
        s.jobs.start(b.id)
        s.jobs.finish(b.id)
    # the daemon was killed with a running; a new one starts
    with State(path, clock=clock) as s:
        assert s.jobs.requeue_running() == 1
        requeued = s.jobs.get(a.id)
        assert requeued is not None
        assert (requeued.status, requeued.attempts) == ("queued", 2)
        assert requeued.last_error == "boom"
        assert [j.id for j in s.jobs.due(clock.now, 10)] == [a.id]
        assert s.jobs.requeue_running() == 0


def test_jobs_and_counts(state: State) -> None:
    a = state.jobs.enqueue("ns", "a", D1, "t", 0)
    b = state.jobs.enqueue("ns", "b", D1, "t", 0)
    c = state.jobs.enqueue("ns", "c", D1, "t", 0)
    state.jobs.start(b.id)
    state.jobs.start(c.id)
    state.jobs.fail(c.id, "x", 0)
    assert [j.id for j in state.jobs.select()] == [a.id, b.id, c.id]
    assert [j.id for j in state.jobs.select({"queued", "failed"})] == [a.id, c.id]
    assert state.jobs.select([]) == []
    assert state.jobs.counts() == {
        "queued": 1,
        "running": 1,
        "failed": 1,
        "done": 0,
        "cancelled": 0,
    }
    with pytest.raises(ValueError, match="unknown job status bogus"):
        state.jobs.select(["bogus"])


def test_prune_jobs(state: State, clock: Clock) -> None:
    old_done = state.jobs.enqueue("ns", "a", D1, "t", 0)
    state.jobs.finish(old_done.id)
    old_queued = state.jobs.enqueue("ns", "b", D1, "t", 0)
    clock.advance(100)
    new_done = state.jobs.enqueue("ns", "c", D1, "t", 0)
    state.jobs.finish(new_done.id)
    assert state.jobs.prune(older_than=50) == 1
    assert [j.id for j in state.jobs.select()] == [old_queued.id, new_done.id]
