"""Upload sessions to resume, and their shape as the uploader's session store."""

from __future__ import annotations

from imagepushd.push.registry.upload import SessionStore
from imagepushd.remember import State, UploadSession
from tests.remember.common import D1, Clock


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
