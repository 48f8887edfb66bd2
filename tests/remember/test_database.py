"""The state file itself: creation, modes, reopening, concurrency and refusals."""

from __future__ import annotations

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
from pathlib import Path

import pytest

from imagepushd.errors import ImagepushdError, StateError
from imagepushd.remember import JOB_STATUSES, MIGRATIONS, Seen, State, UploadSession
from tests.remember.common import D1, D2, Clock, pragma


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
    with caplog.at_level(logging.WARNING, logger="imagepushd.remember"), State(path) as s:
        s.flags.set("x", "y")
    assert f"state file {path} is accessible to group or others (mode 0644)" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # warned, not changed


def test_private_file_is_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    make_state_file(path)
    with caplog.at_level(logging.WARNING, logger="imagepushd.remember"):
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
from imagepushd.remember import State
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
