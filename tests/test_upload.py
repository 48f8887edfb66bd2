"""Blob upload against an in-memory registry: the protocol edge cases a real one won't produce.

Every upload here ends at the fake's closing PUT, which checks the digest of everything the
session received, so a test that passes also proves the bytes arrived whole and in order.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from imagepushd.blobs import BlobSource
from imagepushd.errors import (
    BlobCorruptError,
    ContainerdError,
    PushInterrupted,
    RegistryAuthError,
    RegistryError,
    StateError,
)
from imagepushd.oci import Descriptor
from imagepushd.push.registry.bodylimit import BodyLimit
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.credentials import Credentials
from imagepushd.push.registry.upload import BlobUploader, MiB, Outcome
from tests.support.fakeregistry import (
    OCTET_STREAM,
    FakeRegistry,
    FakeTokenServer,
    Network,
    Session,
    error,
    make_client,
)
from tests.support.images import sha256_digest

HOST = "registry.test"
REPO = "team/app"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def source_for(tmp_path: Path, data: bytes, digest: str | None = None) -> BlobSource:
    path = tmp_path / f"blob-{len(data)}-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return BlobSource(path, Descriptor(LAYER, digest or sha256_digest(data), len(data)))


class Rig:
    """A fake registry on a network, a client for it, and the sleeps its retrier asked for."""

    def __init__(
        self,
        host: str = HOST,
        *,
        auth: FakeTokenServer | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.fake = FakeRegistry(host, auth=auth)
        self.network = Network(self.fake, *([auth] if auth else []))
        self.sleeps: list[float] = []
        self.client: RegistryClient = make_client(
            self.network, host, sleeps=self.sleeps, credentials=credentials
        )

    def uploader(self, **kwargs: object) -> BlobUploader:
        return BlobUploader(self.client, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def rigs() -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(host: str = HOST, **kwargs: object) -> Rig:
        rig = Rig(host, **kwargs)  # type: ignore[arg-type]
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def rig(rigs: Callable[..., Rig]) -> Rig:
    return rigs()


def assert_streamed_with_length(rec_headers: httpx.Headers) -> None:
    assert "content-length" in rec_headers
    assert "transfer-encoding" not in rec_headers


def content_ranges(fake: FakeRegistry) -> list[str]:
    return [p.headers["content-range"] for p in fake.patches() if "content-range" in p.headers]


# ---- monolithic -------------------------------------------------------------------------


def test_monolithic_small_blob_is_one_post_and_one_put(rig: Rig, tmp_path: Path) -> None:
    data = data_of(1000)
    source = source_for(tmp_path, data)

    result = rig.uploader().upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert result.bytes_sent == len(data)
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert [r.method for r in rig.fake.calls()] == ["HEAD", "POST", "PUT"]
    post, put = rig.fake.calls()[1:]
    # The digest is merged into the session URL's own query, which is kept as it was.
    assert post.location is not None
    assert put.url.path == post.location.path
    assert put.url.params.get("_state") == post.location.params.get("_state")
    assert put.url.params.get("digest") == source.descriptor.digest
    assert put.url.query.decode().startswith(post.location.query.decode() + "&digest=")
    assert put.headers["content-length"] == "1000"
    assert put.headers["content-type"] == OCTET_STREAM
    assert_streamed_with_length(put.headers)
    assert put.received == len(data)


def test_zero_byte_blob(rig: Rig, tmp_path: Path) -> None:
    source = source_for(tmp_path, b"")

    result = rig.uploader().upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert source.descriptor.digest == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert rig.fake.repos[REPO] == {source.descriptor.digest: 0}
    (put,) = rig.fake.calls("PUT")
    assert put.headers["content-length"] == "0"
    assert not rig.fake.patches()


def test_monolithic_put_broken_midway_starts_a_new_session(rig: Rig, tmp_path: Path) -> None:
    data = data_of(600_000)
    source = source_for(tmp_path, data)
    rig.fake.breaks = [300_000]

    result = rig.uploader().upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 2


def test_closing_put_digest_invalid_restarts_the_session(rig: Rig, tmp_path: Path) -> None:
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)
    refused: list[str] = []

    def once(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT" and not refused:
            refused.append(str(request.url))
            return error(400, "DIGEST_INVALID")
        return None

    rig.fake.hooks.append(once)
    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 2
    # Between the sessions it asked whether someone else finished the blob meanwhile.
    methods = [r.method for r in rig.fake.calls()]
    assert methods.count("HEAD") == 2


def test_blob_finished_elsewhere_while_its_session_was_refused(rig: Rig, tmp_path: Path) -> None:
    """The HEAD after a refused session finds the blob (another pusher): no new session."""
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    def finished_elsewhere(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT":
            rig.fake.add_blob(REPO, data)
            return error(400, "DIGEST_INVALID")
        return None

    rig.fake.hooks.append(finished_elsewhere)
    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert result.bytes_sent == len(data)
    assert [r.method for r in rig.fake.calls() if r.method != "PATCH"] == [
        "HEAD",
        "POST",
        "PUT",
        "HEAD",
    ]


def test_missing_blob_file_is_named_before_any_session(rig: Rig, tmp_path: Path) -> None:
    source = source_for(tmp_path, data_of(1000))
    source.path.unlink()

    with pytest.raises(ContainerdError, match=r"^blob sha256:[0-9a-f]{64}: .* is missing$"):
        rig.uploader().upload(REPO, source)

    assert [r.method for r in rig.fake.calls()] == ["HEAD"]


# ---- chunked ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["path", "relative", "absolute"])
def test_chunked_large_blob(rig: Rig, tmp_path: Path, style: str) -> None:
    rig.fake.location_style = style
    data = data_of(3 * MiB + 12345)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert result.bytes_sent == len(data)
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert content_ranges(rig.fake) == [
        f"0-{MiB - 1}",
        f"{MiB}-{2 * MiB - 1}",
        f"{2 * MiB}-{3 * MiB - 1}",
        f"{3 * MiB}-{3 * MiB + 12344}",
    ]
    for patch in rig.fake.patches():
        assert patch.status == 202
        assert patch.headers["content-type"] == OCTET_STREAM
        assert_streamed_with_length(patch.headers)
        first, last = map(int, patch.headers["content-range"].split("-"))
        assert int(patch.headers["content-length"]) == last - first + 1 == patch.received
    # Each request goes to the Location of the answer before it, resolved against its URL.
    session_calls = rig.fake.calls()[1:]  # after the HEAD
    assert [r.method for r in session_calls] == ["POST", "PATCH", "PATCH", "PATCH", "PATCH", "PUT"]
    for before, after in itertools.pairwise(session_calls):
        assert before.location is not None
        assert after.url.copy_remove_param("digest") == before.location
    put = session_calls[-1]
    assert put.headers["content-length"] == "0"
    assert put.url.params.get("digest") == source.descriptor.digest


def test_newest_location_is_used_even_when_it_moves_host(
    rigs: Callable[..., Rig], tmp_path: Path
) -> None:
    # A session on another upload host: follow it, never sending the registry's credentials.
    tokens = FakeTokenServer(users={"alice": "pw"})
    rig = rigs(auth=tokens, credentials=Credentials("alice", "pw"))
    upload_host = FakeRegistry("uploads.registry.test")
    upload_host.sessions = rig.fake.sessions
    upload_host.repos = rig.fake.repos
    rig.network.route(upload_host.host, upload_host)

    def hop(request: httpx.Request) -> httpx.Response | None:
        if request.method == "POST":
            response = rig.fake.post(request, REPO)
            loc = response.headers["location"]
            response.headers["location"] = f"https://{upload_host.host}{loc}"
            return response
        return None

    rig.fake.hooks.append(hop)
    data = data_of(2 * MiB + 1)
    source = source_for(tmp_path, data)
    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert [r.method for r in upload_host.requests] == ["PATCH", "PATCH", "PATCH", "PUT"]
    assert all("authorization" not in r.headers for r in upload_host.requests)


def _stale_range(session: Session) -> str:
    # ECR-like: the answer shows where the session stood before this PATCH.
    return f"0-{session.before - 1}" if session.before else "0-0"


def _backwards_after_first(session: Session) -> str:
    return f"0-{session.size - 1}" if session.size <= MiB else "0-99"


@pytest.mark.parametrize(
    "patch_range",
    [
        pytest.param(lambda s: f"0-{s.size - 1}", id="plain"),
        pytest.param(lambda s: f"bytes=0-{s.size - 1}", id="bytes=-prefix"),
        pytest.param(lambda s: f"bytes 0-{s.size - 1}", id="bytes-space-prefix"),
        pytest.param(lambda s: None, id="missing: assume accepted"),
        pytest.param(_backwards_after_first, id="backwards: trust own count"),
        pytest.param(_stale_range, id="stale (not advancing): trust own count"),
    ],
)
def test_range_dialects_on_patch_answers(
    rig: Rig, tmp_path: Path, patch_range: Callable[[Session], str | None]
) -> None:
    rig.fake.patch_range = patch_range
    data = data_of(4 * MiB + 7)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert [p.status for p in rig.fake.patches()] == [202] * 5
    assert result.bytes_sent == len(data)
    assert len(rig.fake.calls("POST")) == 1


def test_zero_zero_after_one_byte_means_one_byte(rig: Rig, tmp_path: Path) -> None:
    # 1-byte chunks: the first answer is "0-0", which here means one byte received.
    data = b"abc"
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=1, monolithic_max=0).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert content_ranges(rig.fake) == ["0-0", "1-1", "2-2"]
    assert [p.response_headers["range"] for p in rig.fake.patches()] == ["0-0", "0-1", "0-2"]


@pytest.mark.parametrize("broken", [httpx.RemoteProtocolError, httpx.ReadError])
@pytest.mark.parametrize(
    ("breaks", "resume_at"),
    [
        pytest.param([None, 300_000], MiB + 300_000, id="second chunk, part kept"),
        pytest.param([0], 0, id="first chunk, nothing kept (status 0-0)"),
        pytest.param([MiB], MiB, id="whole chunk kept, answer lost"),
        pytest.param([None, None, 1], 2 * MiB + 1, id="third chunk, one byte kept"),
    ],
)
def test_broken_patch_resumes_where_the_registry_stands(
    rig: Rig,
    tmp_path: Path,
    broken: type[httpx.TransportError],
    breaks: list[int | None],
    resume_at: int,
) -> None:
    rig.fake.break_error = broken
    rig.fake.breaks = list(breaks)
    data = data_of(4 * MiB + 3)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    # The fake checked the digest of what it kept plus what came after: the hash state was
    # rebuilt for the bytes the registry kept, which were not sent again.
    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 1
    broken_at = next(i for i, r in enumerate(rig.fake.calls()) if not r.completed)
    status, resumed = rig.fake.calls()[broken_at + 1 : broken_at + 3]
    assert status.method == "GET"
    assert resumed.method == "PATCH"
    assert resumed.headers["content-range"].startswith(f"{resume_at}-")
    assert result.bytes_sent < 1.25 * len(data)
    assert sum(r.received for r in rig.fake.calls()) == len(data)
    assert len(rig.sleeps) == 1


def test_416_asks_status_and_resumes(rig: Rig, tmp_path: Path) -> None:
    answered: list[int] = []

    def second_patch_416(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            answered.append(1)
            if len(answered) == 2:
                return error(416, "RANGE_INVALID")
        return None

    rig.fake.hooks.append(second_patch_416)
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    methods = [r.method for r in rig.fake.calls()]
    assert methods == ["HEAD", "POST", "PATCH", "PATCH", "GET", "PATCH", "PATCH", "PUT"]
    assert content_ranges(rig.fake)[2] == f"{MiB}-{2 * MiB - 1}"


def test_repeated_416_starts_a_new_session(rig: Rig, tmp_path: Path) -> None:
    def first_session_416(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH" and request.url.path.endswith("/" + rig.fake.session_ids[0]):
            return error(416, "RANGE_INVALID")
        return None

    rig.fake.hooks.append(first_session_416)
    data = data_of(2 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 2
    first = rig.fake.session_ids[0]
    assert sum(1 for p in rig.fake.patches() if p.url.path.endswith("/" + first)) == 3


def test_blob_upload_unknown_starts_a_new_session(rig: Rig, tmp_path: Path) -> None:
    def forget_first_session(request: httpx.Request) -> httpx.Response | None:
        if request.method != "PATCH":
            return None
        first = rig.fake.session_ids[0]
        if first in rig.fake.sessions and rig.fake.sessions[first].size > 0:
            del rig.fake.sessions[first]
        return None

    rig.fake.hooks.append(forget_first_session)
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    statuses = [(r.method, r.status) for r in rig.fake.calls()]
    assert ("PATCH", 404) in statuses
    after = statuses[statuses.index(("PATCH", 404)) + 1 :]
    assert after[:2] == [("HEAD", 404), ("POST", 202)]


def test_413_steps_the_chunk_down_to_a_size_that_fits(rig: Rig, tmp_path: Path) -> None:
    rig.fake.max_body = MiB
    data = data_of(6 * MiB + 5)
    source = source_for(tmp_path, data)

    uploader = rig.uploader(chunk_size=4 * MiB, monolithic_max=0)
    result = uploader.upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    sizes = [(int(p.headers["content-length"]), p.status) for p in rig.fake.patches()]
    assert sizes[:3] == [(4 * MiB, 413), (2 * MiB, 413), (MiB, 202)]
    assert all(size <= MiB for size, status in sizes if status == 202)
    assert len(rig.fake.calls("POST")) == 1
    assert uploader.body_limit.limit == MiB


def test_413_on_a_whole_put_goes_chunked_in_the_same_session(rig: Rig, tmp_path: Path) -> None:
    """nginx's default 1 MiB limit in front of a registry: a 5 MiB blob's single PUT is
    refused; the same session takes it in chunks that fit, and later blobs never ask again."""
    rig.fake.max_body = MiB
    first, second = data_of(5 * MiB, 1), data_of(3 * MiB + 7, 2)
    uploader = rig.uploader()

    for data in (first, second):
        result = uploader.upload(REPO, source_for(tmp_path, data))
        assert result.outcome is Outcome.UPLOADED
        assert rig.fake.has_blob(REPO, sha256_digest(data))

    refused = [
        (r.method, int(r.headers["content-length"])) for r in rig.fake.calls() if r.status == 413
    ]
    # The 5 MiB PUT, then a first adaptive chunk (a quarter of the blob): two refusals teach
    # 1 MiB, once per registry.
    assert refused == [("PUT", 5 * MiB), ("PATCH", 5 * MiB // 4)]
    assert len(rig.fake.calls("POST")) == 2  # one session per blob: the refused PUT kept its own
    accepted = [r for r in rig.fake.calls() if r.status != 413 and r.method in ("PUT", "PATCH")]
    assert all(int(r.headers["content-length"]) <= MiB for r in accepted)
    assert uploader.body_limit.limit == MiB


def test_a_learned_limit_comes_from_its_store(rig: Rig, tmp_path: Path) -> None:
    """The daemon keeps the limit in its state: a restarted uploader refuses nothing."""

    class Store:
        def __init__(self) -> None:
            self.saved: list[int] = []

        def load(self) -> int | None:
            return self.saved[-1] if self.saved else None

        def save(self, limit: int) -> None:
            self.saved.append(limit)

    store = Store()
    rig.fake.max_body = MiB
    rig.uploader(body_limit=BodyLimit(HOST, store)).upload(
        REPO, source_for(tmp_path, data_of(3 * MiB))
    )
    assert store.saved == [2 * MiB]  # chunks of a quarter of the blob fit under 1 MiB
    before = len(rig.fake.calls())
    rig.uploader(body_limit=BodyLimit(HOST, store)).upload(
        REPO, source_for(tmp_path, data_of(3 * MiB, 9))
    )
    assert all(r.status != 413 for r in rig.fake.calls()[before:])


def test_a_limit_below_the_smallest_chunk_is_one_clear_error(rig: Rig, tmp_path: Path) -> None:
    rig.fake.max_body = 100 << 10
    with pytest.raises(RegistryError) as failure:
        rig.uploader().upload(REPO, source_for(tmp_path, data_of(2 * MiB)))
    message = str(failure.value)
    assert failure.value.status == 413
    assert "\n" not in message
    assert "must accept at least 256.0 KiB" in message and "client_max_body_size" in message


def test_ecr_201_on_patch_and_5_mib_minimum(rigs: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rigs("123456789012.dkr.ecr.us-east-1.amazonaws.com")
    rig.fake.patch_status = 201
    data = data_of(12 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB, monolithic_max=0).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert [int(p.headers["content-length"]) for p in rig.fake.patches()] == [
        5 * MiB,
        5 * MiB,
        2 * MiB,
    ]
    assert {p.status for p in rig.fake.patches()} == {201}


def test_ghcr_patches_stay_within_4_mib(rigs: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rigs("ghcr.io")
    rig.fake.max_chunk = 4 * MiB  # GHCR answers 416 "too large" above that
    data = data_of(9 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=8 * MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.patches()) == 3
    assert all(int(p.headers["content-length"]) <= 4 * MiB for p in rig.fake.patches())
    assert all(p.status == 202 for p in rig.fake.patches())


def test_oci_chunk_min_length_raises_the_chunk(rig: Rig, tmp_path: Path) -> None:
    rig.fake.chunk_min_length = 2 * MiB
    data = data_of(5 * MiB)
    source = source_for(tmp_path, data)

    rig.uploader(chunk_size=512 << 10, monolithic_max=0).upload(REPO, source)

    assert [int(p.headers["content-length"]) for p in rig.fake.patches()] == [
        2 * MiB,
        2 * MiB,
        MiB,
    ]
    assert rig.fake.has_blob(REPO, source.descriptor.digest)


@pytest.mark.parametrize("status", [400, 405])
def test_first_patch_refused_falls_back_to_one_put(rig: Rig, tmp_path: Path, status: int) -> None:
    """A registry that refuses chunks (Artifact Registry) may refuse any PATCH: one PUT."""
    rig.fake.chunked = False
    rig.fake.refuse_chunked_status = status
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    methods = [(r.method, r.status) for r in rig.fake.calls()]
    assert methods == [("HEAD", 404), ("POST", 202), ("PATCH", status), ("POST", 202), ("PUT", 201)]
    put = rig.fake.calls("PUT")[0]
    assert put.headers["content-length"] == str(len(data)) and put.received == len(data)
    assert_streamed_with_length(put.headers)


def test_artifact_registry_gets_no_patch(rigs: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rigs("europe-west1-docker.pkg.dev")
    rig.fake.chunked = False
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert rig.fake.patches() == []
    (put,) = rig.fake.calls("PUT")
    assert put.received == len(data)
    assert len(rig.fake.calls("POST")) == 1


def test_a_body_limit_on_a_registry_without_chunks_is_one_clear_error(
    rigs: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = rigs("europe-west1-docker.pkg.dev")
    rig.fake.chunked = False
    rig.fake.max_body = MiB
    with pytest.raises(RegistryError) as failure:
        rig.uploader(chunk_size=MiB).upload(REPO, source_for(tmp_path, data_of(3 * MiB)))
    assert failure.value.status == 413
    assert "no chunked uploads" in str(failure.value) and "3.0 MiB" in str(failure.value)
    assert len(rig.fake.calls("PUT")) == 1  # a 413 is not retried
    assert rig.fake.calls("PATCH") == []


# ---- existence and mounts ---------------------------------------------------------------


def test_existing_blob_is_not_uploaded(rig: Rig, tmp_path: Path) -> None:
    data = data_of(1000)
    rig.fake.add_blob(REPO, data)

    result = rig.uploader().upload(REPO, source_for(tmp_path, data))

    assert result.outcome is Outcome.EXISTS
    assert result.bytes_sent == 0
    assert [r.method for r in rig.fake.calls()] == ["HEAD"]


def test_mount_201_is_mounted_without_upload(rig: Rig, tmp_path: Path) -> None:
    data = data_of(1000)
    rig.fake.add_blob("team/base", data)
    source = source_for(tmp_path, data)

    result = rig.uploader().upload(REPO, source, mount_from=["team/base"])

    assert result.outcome is Outcome.MOUNTED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    (post,) = rig.fake.calls("POST")
    assert post.url.params.get("mount") == source.descriptor.digest
    assert post.url.params.get("from") == "team/base"
    assert [r.method for r in rig.fake.calls()] == ["HEAD", "POST"]


def test_mount_202_continues_in_that_session(rig: Rig, tmp_path: Path) -> None:
    data = data_of(2 * MiB + 10)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source, mount_from=["team/base"])

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    (post,) = rig.fake.calls("POST")
    assert post.url.params.get("mount") == source.descriptor.digest
    (session,) = rig.fake.session_ids
    assert all(r.url.path.endswith("/" + session) for r in rig.fake.calls()[2:])


@pytest.mark.parametrize("status", [401, 403, 500])
def test_mount_error_falls_back_to_a_plain_post(rig: Rig, tmp_path: Path, status: int) -> None:
    rig.fake.mount_status = status
    data = data_of(1000)
    source = source_for(tmp_path, data)

    result = rig.uploader().upload(REPO, source, mount_from=["team/base"])

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    posts = rig.fake.calls("POST")
    assert posts[-1].url.params.get("mount") is None
    assert posts[-1].status == 202
    assert all(p.url.params.get("mount") for p in posts[:-1])


def test_mount_refused_by_the_token_server_falls_back(
    rigs: Callable[..., Rig], tmp_path: Path
) -> None:
    # Docker Hub: the token request fails when the mount source repository does not exist.
    tokens = FakeTokenServer(users={"alice": "pw"})
    tokens.deny_repos.add("gone/base")
    rig = rigs(auth=tokens, credentials=Credentials("alice", "pw"))
    data = data_of(1000)
    source = source_for(tmp_path, data)

    result = rig.uploader().upload(REPO, source, mount_from=["gone/base"])

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    posts = rig.fake.calls("POST")
    assert [p.url.params.get("mount") for p in posts] == [None]


# ---- local corruption -------------------------------------------------------------------


def test_corrupt_blob_monolithic_is_aborted_before_the_last_byte(rig: Rig, tmp_path: Path) -> None:
    good, bad = data_of(700_000, seed=1), data_of(700_000, seed=2)
    source = source_for(tmp_path, bad, digest=sha256_digest(good))

    with pytest.raises(BlobCorruptError, match="corrupt"):
        rig.uploader().upload(REPO, source)

    digest = source.descriptor.digest
    assert rig.fake.closing_puts(digest) == []
    assert not rig.fake.has_blob(REPO, digest)
    (put,) = rig.fake.calls("PUT")
    assert put.received < len(bad)
    assert rig.fake.calls("DELETE")  # the session was cancelled


def test_corrupt_blob_chunked_gets_no_closing_put(rig: Rig, tmp_path: Path) -> None:
    good, bad = data_of(3 * MiB, seed=1), data_of(3 * MiB, seed=2)
    source = source_for(tmp_path, bad, digest=sha256_digest(good))

    with pytest.raises(BlobCorruptError, match="corrupt"):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert rig.fake.calls("PUT") == []
    assert not rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.patches()) == 3


def test_truncated_blob_is_corrupt(rig: Rig, tmp_path: Path) -> None:
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)
    source.path.write_bytes(data[: 2 * MiB])

    with pytest.raises(BlobCorruptError, match="truncated"):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert rig.fake.calls("PUT") == []


# ---- auth in the middle of an upload ----------------------------------------------------


def test_401_mid_upload_refetches_once_and_resends(
    rigs: Callable[..., Rig], tmp_path: Path
) -> None:
    tokens = FakeTokenServer(users={"alice": "pw"})
    rig = rigs(auth=tokens, credentials=Credentials("alice", "pw"))
    patches: list[int] = []

    def expire_after_first_patch(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            patches.append(1)
            if len(patches) == 2:
                tokens.revoke()
        return None

    rig.fake.hooks.append(expire_after_first_patch)
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    statuses = [(p.headers["content-range"], p.status) for p in rig.fake.patches()]
    assert statuses == [
        (f"0-{MiB - 1}", 202),
        (f"{MiB}-{2 * MiB - 1}", 401),
        (f"{MiB}-{2 * MiB - 1}", 202),
        (f"{2 * MiB}-{3 * MiB - 1}", 202),
    ]
    assert len(tokens.requests) == 2
    # The resent chunk went out whole (its body was rebuilt from the file).
    assert rig.fake.patches()[2].received == MiB


def test_second_401_is_final(rigs: Callable[..., Rig], tmp_path: Path) -> None:
    tokens = FakeTokenServer(users={"alice": "pw"})
    rig = rigs(auth=tokens, credentials=Credentials("alice", "pw"))

    def always_401(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            return error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": tokens.challenge()})
        return None

    rig.fake.hooks.append(always_401)
    source = source_for(tmp_path, data_of(2 * MiB))

    with pytest.raises(RegistryAuthError):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert len(rig.fake.patches()) == 2
    assert rig.sleeps == []


# ---- progress and memory ----------------------------------------------------------------


@pytest.mark.parametrize(("size", "chunk"), [(700_000, 16 * MiB), (3 * MiB + 1, MiB)])
def test_progress_is_monotonic_and_ends_at_size(
    rig: Rig, tmp_path: Path, size: int, chunk: int
) -> None:
    positions: list[int] = []
    source = source_for(tmp_path, data_of(size))

    rig.uploader(chunk_size=chunk).upload(REPO, source, progress=positions.append)

    assert positions
    assert positions == sorted(positions)
    assert positions[-1] == size


def test_memory_stays_bounded_for_a_64_mib_blob(rig: Rig, tmp_path: Path) -> None:
    size = 64 * MiB
    path = tmp_path / "sparse"
    with path.open("wb") as f:
        f.truncate(size)
    hasher = hashlib.sha256()
    zeros = bytes(MiB)
    for _ in range(size // MiB):
        hasher.update(zeros)
    del zeros
    source = BlobSource(path, Descriptor(LAYER, "sha256:" + hasher.hexdigest(), size))
    uploader = rig.uploader(chunk_size=16 * MiB)
    rig.client.ping()

    tracemalloc.start()
    try:
        result = uploader.upload(REPO, source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert sum(p.received for p in rig.fake.patches()) == size
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_registry_error_after_the_first_chunk_is_not_a_fallback(rig: Rig, tmp_path: Path) -> None:
    count: list[int] = []

    def second_patch_400(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            count.append(1)
            if len(count) == 2:
                return error(400, "BLOB_UPLOAD_INVALID")
        return None

    rig.fake.hooks.append(second_patch_400)
    source = source_for(tmp_path, data_of(3 * MiB))

    with pytest.raises(RegistryError) as caught:
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert caught.value.codes == ("BLOB_UPLOAD_INVALID",)
    assert len(rig.fake.calls("POST")) == 1


def test_last_chunk_kept_but_answer_lost_completes(rig: Rig, tmp_path: Path) -> None:
    rig.fake.breaks = [None, None, MiB]  # the registry keeps the whole last chunk
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 1
    assert result.bytes_sent == len(data)


def test_last_chunk_kept_registry_rejects_inverted_range(rig: Rig, tmp_path: Path) -> None:
    def inverted_is_400(request: httpx.Request) -> httpx.Response | None:
        first, _, last = request.headers.get("content-range", "").partition("-")
        if request.method == "PATCH" and last and int(last) < int(first):
            return error(400, "BLOB_UPLOAD_INVALID", "bad range")
        return None

    rig.fake.hooks.append(inverted_is_400)
    rig.fake.breaks = [None, None, MiB]
    source = source_for(tmp_path, data_of(3 * MiB))

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert [r.method for r in rig.fake.calls()][-2:] == ["GET", "PUT"]


# ---- adaptive chunks (the default) and what a cut costs on each kind of registry ----------


def patch_sizes(fake: FakeRegistry) -> list[int]:
    return [int(p.headers["content-length"]) for p in fake.patches()]


def test_default_is_one_put_up_to_16_mib(rig: Rig, tmp_path: Path) -> None:
    source = source_for(tmp_path, data_of(16 * MiB))

    rig.uploader().upload(REPO, source)

    assert [r.method for r in rig.fake.calls()] == ["HEAD", "POST", "PUT"]


def test_default_chunks_grow_to_a_quarter_of_the_blob(rig: Rig, tmp_path: Path) -> None:
    source = source_for(tmp_path, data_of(40 * MiB))

    rig.uploader(clock=lambda: 0.0).upload(REPO, source)  # an infinitely fast link

    assert patch_sizes(rig.fake) == [m * MiB for m in (8, 10, 10, 10, 2)]
    assert rig.fake.has_blob(REPO, source.descriptor.digest)


def test_default_chunks_follow_a_slow_link(rig: Rig, tmp_path: Path) -> None:
    # The clock says the registry receives 1 MiB/s: after the first 5 MiB chunk (a quarter of
    # the blob) took 5 s, chunks carry 2 s of transfer.
    def clock() -> float:
        return sum(r.received for r in rig.fake.requests) / MiB

    source = source_for(tmp_path, data_of(20 * MiB))

    rig.uploader(clock=clock).upload(REPO, source)

    assert patch_sizes(rig.fake) == [5 * MiB] + [2 * MiB] * 7 + [MiB]


def test_configured_chunk_size_is_not_adapted(rig: Rig, tmp_path: Path) -> None:
    source = source_for(tmp_path, data_of(20 * MiB))

    rig.uploader(chunk_size=4 * MiB, clock=lambda: 0.0).upload(REPO, source)

    assert patch_sizes(rig.fake) == [4 * MiB] * 5


@pytest.mark.parametrize(
    ("on_break", "resent", "sessions"),
    [
        # distribution 3.x: GET status reports the kept bytes; nothing is sent twice.
        pytest.param("keep", 0, 1, id="keeps the partial chunk"),
        # acknowledged chunks kept, the partial one dropped: at most one chunk is lost.
        pytest.param("drop", 7 * MiB, 1, id="drops the partial chunk"),
        # distribution 2.8: the session is refused from then on; all of it is lost.
        pytest.param("invalidate", 25 * MiB, 2, id="invalidates the session"),
    ],
)
def test_cut_at_five_eighths_of_the_blob(
    rig: Rig, tmp_path: Path, on_break: str, resent: int, sessions: int
) -> None:
    """Default chunks 8, 10, 10... MiB of a 40 MiB blob; the third is cut 7 MiB in (25 MiB)."""
    rig.fake.on_break = on_break
    rig.fake.breaks = [None, None, 7 * MiB]
    data = data_of(40 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(clock=lambda: 0.0).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    received = sum(r.received for r in rig.fake.calls())
    assert received == len(data) + resent
    assert result.bytes_sent == received
    assert len(rig.fake.calls("POST")) == sessions
    broken_at = next(i for i, r in enumerate(rig.fake.calls()) if not r.completed)
    after = [(r.method, r.status) for r in rig.fake.calls()[broken_at + 1 :]]
    if sessions == 1:
        assert after[0] == ("GET", 204)
        resumed = rig.fake.calls()[broken_at + 2]
        assert resumed.headers["content-range"].startswith(f"{25 * MiB - resent}-")
        assert received <= 1.25 * len(data)
    else:
        assert after[:3] == [("GET", 404), ("HEAD", 404), ("POST", 202)]


def test_status_beyond_the_blob_starts_a_new_session(rig: Rig, tmp_path: Path) -> None:
    rig.fake.breaks = [None, 1000]
    rig.fake.status_range = lambda session: f"0-{10 * MiB}"  # more than the 3 MiB blob
    source = source_for(tmp_path, data_of(3 * MiB))

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    assert len(rig.fake.calls("POST")) == 2


# ---- sessions saved across restarts, and stopping between chunks --------------------------


class MemorySessions:
    """An in-memory SessionStore that records what it was told."""

    def __init__(self) -> None:
        self.saved: dict[tuple[str, str], tuple[str, int]] = {}
        self.log: list[tuple[str, int]] = []

    def load(self, repository: str, digest: str) -> tuple[str, int] | None:
        return self.saved.get((repository, digest))

    def save(self, repository: str, digest: str, location: str, offset: int) -> None:
        self.saved[(repository, digest)] = (location, offset)
        self.log.append(("save", offset))

    def drop(self, repository: str, digest: str) -> None:
        self.saved.pop((repository, digest), None)
        self.log.append(("drop", -1))


def test_stop_between_chunks_then_resume_the_saved_session(rig: Rig, tmp_path: Path) -> None:
    sessions = MemorySessions()
    data = data_of(4 * MiB + 9)
    source = source_for(tmp_path, data)
    digest = source.descriptor.digest
    acked: list[int] = []
    stopping = rig.uploader(
        chunk_size=MiB, sessions=sessions, should_stop=lambda: len(rig.fake.patches()) == 2
    )

    with pytest.raises(PushInterrupted, match="paused at 2097152"):
        stopping.upload(REPO, source, progress=acked.append)

    location, offset = sessions.saved[(REPO, digest)]
    assert offset == 2 * MiB
    assert httpx.URL(location) == rig.fake.patches()[-1].location
    assert rig.fake.calls("PUT") == []
    before = len(rig.fake.calls())

    result = rig.uploader(chunk_size=MiB, sessions=sessions).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert result.bytes_sent == len(data) - 2 * MiB
    assert rig.fake.has_blob(REPO, digest)
    assert len(rig.fake.calls("POST")) == 1
    resumed = rig.fake.calls()[before:]
    assert [r.method for r in resumed] == ["HEAD", "GET", "PATCH", "PATCH", "PATCH", "PUT"]
    assert resumed[2].headers["content-range"].startswith(f"{2 * MiB}-")
    assert (REPO, digest) not in sessions.saved


def test_on_resume_counts_uploads_continued_from_the_registry_offset(
    rig: Rig, tmp_path: Path
) -> None:
    resumes: list[int] = []
    sessions = MemorySessions()
    source = source_for(tmp_path, data_of(4 * MiB + 9))

    def uploader(**kwargs: object) -> BlobUploader:
        return rig.uploader(chunk_size=MiB, on_resume=lambda: resumes.append(1), **kwargs)

    uploader().upload(REPO, source_for(tmp_path, data_of(3 * MiB, seed=2)))
    assert resumes == []
    rig.fake.breaks = [None, 300_000]
    uploader().upload(REPO, source_for(tmp_path, data_of(3 * MiB, seed=3)))
    assert len(resumes) == 1
    stop_at = len(rig.fake.patches()) + 2
    with pytest.raises(PushInterrupted):
        uploader(sessions=sessions, should_stop=lambda: len(rig.fake.patches()) == stop_at).upload(
            REPO, source
        )
    assert len(resumes) == 1
    uploader(sessions=sessions).upload(REPO, source)
    assert len(resumes) == 2
    assert rig.fake.has_blob(REPO, source.descriptor.digest)


def test_saved_session_gone_starts_a_new_one(rig: Rig, tmp_path: Path) -> None:
    sessions = MemorySessions()
    data = data_of(2 * MiB + 1)
    source = source_for(tmp_path, data)
    gone = f"https://{HOST}/v2/{REPO}/blobs/uploads/expired?_state=expired.5"
    sessions.saved[(REPO, source.descriptor.digest)] = (gone, MiB)

    result = rig.uploader(chunk_size=MiB, sessions=sessions).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    methods = [(r.method, r.status) for r in rig.fake.calls()]
    assert methods[:4] == [("HEAD", 404), ("GET", 404), ("HEAD", 404), ("POST", 202)]
    assert sessions.saved == {}


def test_session_store_failure_does_not_leak_the_blob_fd(rig: Rig, tmp_path: Path) -> None:
    class BrokenSessions(MemorySessions):
        def load(self, repository: str, digest: str) -> tuple[str, int] | None:
            raise StateError("state.db is locked")

    source = source_for(tmp_path, data_of(2 * MiB))
    uploader = rig.uploader(chunk_size=MiB, sessions=BrokenSessions())
    open_before = len(os.listdir("/proc/self/fd"))

    with pytest.raises(StateError):
        uploader.upload(REPO, source)

    assert len(os.listdir("/proc/self/fd")) == open_before


# ---- the request budget per blob and attempt (retry at exactly one layer) ---------------
#
# R = 5 tries of any one request, by the retrier alone; a new upload session (at most
# SESSION_ATTEMPTS = 3) only when the registry refuses the session itself (400, 404, 416).
# Statuses and codes as distribution documents them (docs/spec/api.md, "Errors"); a 503 on
# every request of one kind is what a failing storage backend or proxy gives.

R = 5


def answer(method: str, status: int, code: str, path_part: str = "") -> Callable[..., object]:
    """A hook answering every ``method`` request (whose path has ``path_part``) with ``status``."""

    def hook(request: httpx.Request) -> httpx.Response | None:
        if request.method == method and path_part in request.url.path:
            return error(status, code)
        return None

    return hook


def methods(rig: Rig) -> dict[str, int]:
    """Requests to blobs and upload sessions by method (``/v2/`` pings left out)."""
    counts: dict[str, int] = {}
    for call in rig.fake.calls():
        counts[call.method] = counts.get(call.method, 0) + 1
    return counts


def test_503_forever_on_the_put_costs_r_puts_in_one_session(rig: Rig, tmp_path: Path) -> None:
    """The issue's case: 15 PUTs (3 sessions x 5) before; now the retrier's 5, then the end."""
    rig.fake.hooks.append(answer("PUT", 503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(1000))

    with pytest.raises(RegistryError) as caught:
        rig.uploader().upload(REPO, source)

    assert caught.value.status == 503
    assert methods(rig) == {"HEAD": 1, "POST": 1, "PUT": R}
    assert len(rig.sleeps) == R - 1


def test_503_forever_on_everything_costs_r_requests(rig: Rig, tmp_path: Path) -> None:
    rig.fake.hooks.append(lambda request: error(503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(1000))

    with pytest.raises(RegistryError) as caught:
        rig.uploader().upload(REPO, source)

    assert caught.value.status == 503
    assert len(rig.network.log) == R  # the ping: nothing after it


def test_503_forever_on_patches_costs_r_tries_of_the_chunk(rig: Rig, tmp_path: Path) -> None:
    """A chunk's unit is a PATCH, preceded after a failure by GET status: R tries of that."""
    rig.fake.hooks.append(answer("PATCH", 503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(3 * MiB))

    with pytest.raises(RegistryError) as caught:
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert caught.value.status == 503
    assert methods(rig) == {"HEAD": 1, "POST": 1, "PATCH": R, "GET": R - 1}


def test_503_forever_on_the_closing_put_costs_r_puts(rig: Rig, tmp_path: Path) -> None:
    rig.fake.hooks.append(answer("PUT", 503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(2 * MiB))

    with pytest.raises(RegistryError):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert methods(rig) == {"HEAD": 1, "POST": 1, "PATCH": 2, "PUT": R}


def test_no_chunks_503_forever_costs_r_puts(rigs: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rigs("europe-docker.pkg.dev")  # takes no chunks: the whole blob in one PUT
    rig.fake.hooks.append(answer("PUT", 503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(2 * MiB))

    with pytest.raises(RegistryError):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert methods(rig) == {"HEAD": 1, "POST": 1, "PUT": R}


def test_unavailable_mount_ends_the_attempt(rig: Rig, tmp_path: Path) -> None:
    """A 503 on a mount is the registry's, not the source's: no other source, no plain POST."""
    rig.fake.hooks.append(answer("POST", 503, "UNAVAILABLE"))
    source = source_for(tmp_path, data_of(1000))

    with pytest.raises(RegistryError):
        rig.uploader().upload(REPO, source, mount_from=["team/a", "team/b", "team/c"])

    assert methods(rig) == {"HEAD": 1, "POST": R}
    assert {c.url.params.get("from") for c in rig.fake.calls("POST")} == {"team/a"}


def test_a_temporary_error_that_passes_needs_no_new_session(rig: Rig, tmp_path: Path) -> None:
    failures: list[int] = []

    def three_503s(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT" and len(failures) < 3:
            failures.append(1)
            return error(503, "UNAVAILABLE")
        return None

    rig.fake.hooks.append(three_503s)
    source = source_for(tmp_path, data_of(1000))

    result = rig.uploader().upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert methods(rig) == {"HEAD": 1, "POST": 1, "PUT": 4}


@pytest.mark.parametrize(
    ("status", "code"),
    [(404, "BLOB_UPLOAD_UNKNOWN"), (416, "RANGE_INVALID"), (400, "BLOB_UPLOAD_INVALID")],
)
def test_a_session_refused_every_time_costs_three_sessions(
    rig: Rig, tmp_path: Path, status: int, code: str
) -> None:
    """Each refusal is answered once, by a new session (and a HEAD: did it land anyway?)."""
    rig.fake.hooks.append(answer("PUT", status, code, "/blobs/uploads/"))
    source = source_for(tmp_path, data_of(1000))

    with pytest.raises(RegistryError, match="after 3 upload sessions") as caught:
        rig.uploader().upload(REPO, source)

    assert caught.value.status == status
    assert methods(rig) == {"HEAD": 4, "POST": 3, "PUT": 3}
    assert rig.sleeps == []


def test_chunked_session_unknown_every_time_costs_three_sessions(rig: Rig, tmp_path: Path) -> None:
    rig.fake.hooks.append(answer("PATCH", 404, "BLOB_UPLOAD_UNKNOWN"))
    source = source_for(tmp_path, data_of(3 * MiB))

    with pytest.raises(RegistryError, match="after 3 upload sessions"):
        rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert methods(rig) == {"HEAD": 4, "POST": 3, "PATCH": 3}


@pytest.mark.parametrize("on_break", ["keep", "drop"])
def test_quay_status_one_byte_ahead_costs_one_416(rig: Rig, tmp_path: Path, on_break: str) -> None:
    """Quay's GET status renders ``byte_count + 1`` as an inclusive end (quay/quay
    ``endpoints/v2/blob.py``): one byte more than it holds. Resuming there gets a 416 (Quay
    checks the start); the next status is read one byte lower, and the session goes on."""
    rig.fake.on_break = on_break
    rig.fake.breaks = [None, 300_000]
    rig.fake.status_range = lambda session: f"bytes=0-{session.size}"
    data = data_of(3 * MiB)
    source = source_for(tmp_path, data)

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert rig.fake.has_blob(REPO, source.descriptor.digest)
    held = MiB + (300_000 if on_break == "keep" else 0)
    patches = [(r.status, r.headers["content-range"]) for r in rig.fake.calls("PATCH")]
    assert patches[2:4] == [
        (416, f"{held + 1}-{held + MiB}"),
        (202, f"{held}-{held + MiB - 1}"),
    ]
    assert len(rig.fake.calls("POST")) == 1
    assert result.bytes_sent < 1.25 * len(data)


def test_a_416_after_resuming_at_our_own_count_learns_no_skew(rig: Rig, tmp_path: Path) -> None:
    """The one-byte correction is for a status that claimed more than was acknowledged."""
    answered: list[int] = []

    def second_and_third_patch_416(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            answered.append(1)
            if len(answered) in (2, 3):
                return error(416, "RANGE_INVALID")
        return None

    rig.fake.hooks.append(second_and_third_patch_416)
    source = source_for(tmp_path, data_of(3 * MiB))

    result = rig.uploader(chunk_size=MiB).upload(REPO, source)

    assert result.outcome is Outcome.UPLOADED
    assert content_ranges(rig.fake)[1:4] == [f"{MiB}-{2 * MiB - 1}"] * 3
