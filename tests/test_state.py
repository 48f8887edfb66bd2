"""The state file: schema, semantics of every record, concurrency, migrations, and refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagepushd.errors import ImagepushdError, StateError
from imagepushd.registry.upload import SessionStore
from imagepushd.state import (
    BODY_LIMIT_MEMORY,
    JOB_STATUSES,
    MAX_ERROR_LENGTH,
    MIGRATIONS,
    JobRecord,
    Pushed,
    Seen,
    State,
    UploadSession,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


class Clock:
    """A settable clock."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(tmp_path: Path, clock: Clock) -> Iterator[State]:
    with State(tmp_path / "state.db", clock=clock) as opened:
        yield opened


def pragma(path: Path, name: str) -> object:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def make_state_file(path: Path, rows: int = 0) -> None:
    """A real state file with ``rows`` jobs and pushes (enough to span many pages)."""
    with State(path) as s:
        for i in range(rows):
            job = s.jobs.enqueue("default", f"registry.example.com/team/app-{i}:v1", D1, f"t{i}", 0)
            s.jobs.fail(job.id, "registry said no " * 20, 0.0)
            s.pushed.record(
                f"mirror.example.com/app-{i}:v1", D1, "default", "app", bytes=i, duration=1
            )


def assert_refused(path: Path, exc: StateError, problem: str) -> None:
    message = str(exc)
    assert "\n" not in message
    assert str(path) in message
    assert problem in message
    assert f"mv {path} {path}.broken" in message


# ---------------------------------------------------------------------- the file itself


def test_new_file_is_0600_in_a_0700_directory_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "imagepushd" / "state.db"
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        with State(path) as s:
            s.flags.set("baseline_done", "1")
            assert s.path == path
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            wal = path.with_name("state.db-wal")
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert pragma(path, "journal_mode") == "wal"
    assert pragma(path, "user_version") == len(MIGRATIONS)


def test_existing_directory_mode_is_left_alone(tmp_path: Path) -> None:
    tmp_path.joinpath("d").mkdir(mode=0o755)
    State(tmp_path / "d" / "state.db").close()
    assert stat.S_IMODE(tmp_path.joinpath("d").stat().st_mode) == 0o755


def test_file_readable_by_others_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    make_state_file(path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="imagepushd.state"), State(path) as s:
        s.flags.set("x", "y")
    assert f"state file {path} is accessible to group or others (mode 0644)" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # warned, not changed


def test_private_file_is_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    make_state_file(path)
    with caplog.at_level(logging.WARNING, logger="imagepushd.state"):
        State(path).close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_empty_existing_file_becomes_a_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch(mode=0o600)
    with State(path) as s:
        assert s.jobs.counts() == dict.fromkeys(JOB_STATUSES, 0)
    assert pragma(path, "user_version") == len(MIGRATIONS)


def test_reopen_keeps_everything(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "state.db"
    with State(path, clock=clock) as s:
        s.flags.set("baseline_done", "1")
        s.seen.update({("default", "app:v1"): Seen(D1, 5.0, True)}, [])
        s.pushed.record("r.example.com/app:v1", D1, "default", "app:v1", bytes=10, duration=0.5)
        job = s.jobs.enqueue("default", "app:v1", D1, "r.example.com/app:v1", 2)
        s.jobs.start(job.id)
        s.jobs.fail(job.id, "boom", 2_000_000.0)
        s.uploads.save("r.example.com", "app", D2, "/v2/app/blobs/uploads/u1", 4096)
        s.blobs.record("r.example.com", "app", [D1, D2])
    with State(path, clock=clock) as s:
        assert s.flags.get("baseline_done") == "1"
        assert s.seen.load() == {("default", "app:v1"): Seen(D1, 5.0, True)}
        assert {(p.target, p.digest) for p in s.pushed.newest()} == {("r.example.com/app:v1", D1)}
        reopened = s.jobs.get(job.id)
        assert reopened is not None
        assert (reopened.status, reopened.attempts, reopened.last_error) == ("failed", 1, "boom")
        assert s.uploads.get("r.example.com", "app", D2) == UploadSession(
            "r.example.com", "app", D2, "/v2/app/blobs/uploads/u1", 4096, clock.now
        )
        assert s.blobs.repositories("r.example.com", D2) == ["app"]


def test_closed_state_refuses_and_close_is_idempotent(tmp_path: Path) -> None:
    s = State(tmp_path / "state.db")
    s.close()
    s.close()
    with pytest.raises(StateError, match="is closed"):
        s.flags.get("x")


def test_state_error_is_an_imagepushd_error() -> None:
    assert issubclass(StateError, ImagepushdError)
    assert StateError.exit_code == 1


# ---------------------------------------------------------------------- flags and seen


def test_flags(state: State) -> None:
    assert state.flags.get("baseline_done") is None
    state.flags.set("baseline_done", "1")
    state.flags.set("baseline_done", "2")
    state.flags.set("other", "")
    assert state.flags.get("baseline_done") == "2"
    assert state.flags.get("other") == ""


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


# ---------------------------------------------------------------------- pushed


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


# ---------------------------------------------------------------------- jobs


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


# ---------------------------------------------------------------------- uploads and blobs


def test_upload_sessions(state: State, clock: Clock) -> None:
    assert state.uploads.get("r", "app", D1) is None
    state.uploads.save("r", "app", D1, "https://r/v2/app/blobs/uploads/1", 0)
    clock.advance(5)
    state.uploads.save("r", "app", D1, "https://r/v2/app/blobs/uploads/1?state=2", 8192)
    state.uploads.save("r", "other", D1, "https://r/v2/other/blobs/uploads/9", 10)
    assert state.uploads.get("r", "app", D1) == UploadSession(
        "r", "app", D1, "https://r/v2/app/blobs/uploads/1?state=2", 8192, clock.now
    )
    state.uploads.drop("r", "app", D1)
    state.uploads.drop("r", "app", D1)
    assert state.uploads.get("r", "app", D1) is None
    assert state.uploads.get("r", "other", D1) is not None


def test_upload_sessions_serve_as_the_uploaders_session_store(state: State) -> None:
    store: SessionStore = state.uploads.sessions("r.example.com")
    assert store.load("app", D1) is None
    store.save("app", D1, "https://r.example.com/v2/app/blobs/uploads/1", 4096)
    assert store.load("app", D1) == ("https://r.example.com/v2/app/blobs/uploads/1", 4096)
    assert state.uploads.get("r.example.com", "app", D1) is not None
    assert state.uploads.sessions("other.example.com").load("app", D1) is None
    store.drop("app", D1)
    assert store.load("app", D1) is None


def test_drop_stale_uploads(state: State, clock: Clock) -> None:
    state.uploads.save("r", "old", D1, "u1", 1)
    clock.advance(3600)
    state.uploads.save("r", "new", D1, "u2", 2)
    clock.advance(60)
    assert state.uploads.drop_stale(older_than=600) == 1
    assert state.uploads.get("r", "old", D1) is None
    assert state.uploads.get("r", "new", D1) is not None


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


# ---------------------------------------------------------------------- summary


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


def test_a_version_2_file_gains_the_registries_table(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path, migrations=MIGRATIONS[:2]) as s:
        s.jobs.enqueue("ns", "a", D1, "r.example/a:1", 0)
    assert pragma(path, "user_version") == 2
    with State(path) as s:
        assert s.jobs.open_on("r.example") == 1
        s.registries.save("r.example", up=False, since=2.0, last_error="down", held_until=None)
        assert [r["registry"] for r in s.summary()["registries"]] == ["r.example"]
    assert pragma(path, "user_version") == len(MIGRATIONS) == 3


# ---------------------------------------------------------------------- concurrency


def test_concurrent_writers_stay_consistent(tmp_path: Path) -> None:
    """8 threads over two State objects (two connections) race to enqueue, start and finish.

    Threads 2k and 2k+1 work on the same jobs through different connections: each job is
    created once and started exactly once.
    """
    path = tmp_path / "state.db"
    per_thread = 40
    states = [State(path), State(path)]
    barrier = threading.Barrier(8)
    started = [0] * 8
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            s = states[k % 2]
            barrier.wait()
            for i in range(per_thread):
                job = s.jobs.enqueue("ns", f"img-{i}", D1, f"t{k // 2}", 0)
                if s.jobs.start(job.id) is not None:
                    started[k] += 1
                    s.pushed.record(job.target, f"{D1}-{i}", "ns", job.name, bytes=i, duration=0)
                    assert s.jobs.finish(job.id)
                s.uploads.save("r", f"repo{k}", f"{i}", "loc", i)
                s.blobs.record("r", f"repo{k}", [f"{i}"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        total = 4 * per_thread
        assert sum(started) == total
        s = states[0]
        jobs = s.jobs.select()
        assert len(jobs) == total
        assert all(j.status == "done" and j.attempts == 1 for j in jobs)
        assert s.jobs.counts()["done"] == total
        assert s.pushed.count() == total
        assert all(
            s.uploads.get("r", f"repo{k}", f"{per_thread - 1}") is not None for k in range(8)
        )
    finally:
        for s in states:
            s.close()


# ---------------------------------------------------------------------- migrations


def test_a_future_migration_runs_once_and_bumps_the_version(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path) as s:
        s.flags.set("kept", "yes")
    now = len(MIGRATIONS)
    assert pragma(path, "user_version") == now
    calls: list[int] = []

    def v2(conn: sqlite3.Connection) -> None:
        calls.append(int(conn.execute("PRAGMA user_version").fetchone()[0]))
        conn.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    migrations = (*MIGRATIONS, v2)
    with State(path, migrations=migrations) as s:
        assert s.flags.get("kept") == "yes"
        s.jobs.enqueue("ns", "a", D1, "t", 0)
    assert calls == [now]
    assert pragma(path, "user_version") == now + 1
    State(path, migrations=migrations).close()
    assert calls == [now]
    # a fresh file runs the whole history in order
    State(tmp_path / "fresh.db", migrations=migrations).close()
    assert calls == [now, now]
    assert pragma(tmp_path / "fresh.db", "user_version") == now + 1
    # and the older code refuses the migrated file
    with pytest.raises(StateError, match="newer imagepushd"):
        State(path)


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with State(path) as s:
        s.flags.set("kept", "yes")

    def v2(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE extra (x INTEGER)")
        conn.execute("CREATE TABLE meta (x INTEGER)")  # already exists

    with pytest.raises(StateError, match="already exists"):
        State(path, migrations=(*MIGRATIONS, v2))
    assert pragma(path, "user_version") == len(MIGRATIONS)
    with closing(sqlite3.connect(path)) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "extra" not in names
    with State(path) as s:
        assert s.flags.get("kept") == "yes"


# ---------------------------------------------------------------------- refusals


def test_newer_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_state_file(path, rows=3)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 7")
    before = path.read_bytes()
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, f"schema version 7, this one knows up to {len(MIGRATIONS)}")
    assert "upgrade imagepushd" in str(caught.value)
    assert path.read_bytes() == before


def test_foreign_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER)")
        conn.commit()
    before = path.read_bytes()
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, "is an SQLite database but not an imagepushd state file")
    assert path.read_bytes() == before


def test_random_bytes_are_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"not sqlite at all\n" + os.urandom(8192))
    before = path.read_bytes()
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, "is corrupt (file is not a database)")
    assert path.read_bytes() == before


@pytest.mark.parametrize("keep", [10, 99, 100, 4096, 0.5, 0.9])
def test_truncated_database_is_refused_untouched(tmp_path: Path, keep: float) -> None:
    whole = tmp_path / "whole.db"
    make_state_file(whole, rows=300)
    data = whole.read_bytes()
    assert len(data) > 20 * 4096
    path = tmp_path / "state.db"
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    path.chmod(0o600)
    before = path.read_bytes()
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, "is corrupt (")
    assert path.read_bytes() == before


def test_damaged_page_found_by_quick_check_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    make_state_file(path, rows=300)
    data = bytearray(path.read_bytes())
    page = 4096
    last = len(data) // page - 1
    data[last * page : last * page + 64] = b"\xff" * 64  # a b-tree page header, past page 1
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, "is corrupt (")
    assert path.read_bytes() == before


def test_directory_in_place_of_the_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.mkdir()
    (path / "inside").write_text("keep me")
    with pytest.raises(StateError) as caught:
        State(path)
    assert_refused(path, caught.value, "cannot be opened (is a directory)")
    assert (path / "inside").read_text() == "keep me"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that user nobody can traverse (tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="imagepushd-state-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


OPEN_AS_NOBODY = """
import sys
from pathlib import Path
from imagepushd.errors import StateError
from imagepushd.state import State
try:
    State(Path(sys.argv[1])).close()
except StateError as exc:
    print(exc)
    sys.exit(3)
print("opened")
"""


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_permission_denied_is_refused_untouched(shared_dir: Path, mode: int) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test switches to user nobody and must run as root", pytrace=False)
    path = shared_dir / "state.db"
    make_state_file(path, rows=3)
    path.chmod(mode)
    before = path.read_bytes()
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            OPEN_AS_NOBODY,
            str(path),
        ],
        cwd=shared_dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    message = result.stdout.strip()
    assert "\n" not in message
    assert f"state file {path} cannot be opened (permission denied)" in message
    assert f"mv {path} {path}.broken" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in shared_dir.iterdir()) == ["state.db"]


# ---------------------------------------------------------------------- body limits


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
