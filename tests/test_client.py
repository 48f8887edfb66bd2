"""RegistryClient: error translation, TLS classification, scheme choice, manifests, redirects."""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Callable, Iterator

import httpx
import pytest

from imagepushd.errors import (
    ManifestError,
    RegistryAuthError,
    RegistryConnectionError,
    RegistryError,
)
from imagepushd.oci import OCI_INDEX, OCI_MANIFEST, Descriptor
from imagepushd.push.registry.client import PROBE_TIMEOUT, RegistryClient, is_loopback
from imagepushd.push.registry.credentials import Credentials
from imagepushd.push.registry.retry import RetryPolicy
from tests.support.fakeregistry import (
    FakeRegistry,
    FakeTokenServer,
    Network,
    error,
    make_client,
)
from tests.support.images import sha256_digest

HOST = "registry.test"
REPO = "team/app"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def clients() -> Iterator[Callable[..., RegistryClient]]:
    made: list[RegistryClient] = []

    def make(handler: Handler | Network, host: str = HOST, **kwargs: object) -> RegistryClient:
        network = handler if isinstance(handler, Network) else Network()
        if not isinstance(handler, Network):
            network.route(host, handler)
        client = make_client(network, host, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def ping_ok(then: Handler) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200)
        return then(request)

    return handle


# ---- error translation -------------------------------------------------------------------


NAME_UNKNOWN = {"errors": [{"code": "NAME_UNKNOWN", "message": "no such repo"}]}
TWO_CODES = {"errors": [{"code": "MANIFEST_INVALID"}, {"code": "SIZE_INVALID"}]}
TOO_MANY = {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}


@pytest.mark.parametrize(
    ("status", "body", "codes", "temporary"),
    [
        (404, NAME_UNKNOWN, ("NAME_UNKNOWN",), False),
        (400, TWO_CODES, ("MANIFEST_INVALID", "SIZE_INVALID"), False),
        (400, TOO_MANY, ("TOOMANYREQUESTS",), True),
        (503, {"errors": [{"code": "UNAVAILABLE"}]}, ("UNAVAILABLE",), True),
        (500, "<html>oops</html>", (), True),
        (405, {"errors": [{"code": "UNSUPPORTED", "message": "nope"}]}, ("UNSUPPORTED",), False),
        (502, ["not", "a", "dict"], (), True),
        (404, {"errors": ["not-a-dict", {"code": "BLOB_UNKNOWN"}]}, ("BLOB_UNKNOWN",), False),
        (500, {"errors": {"code": "X"}}, (), True),
    ],
)
def test_error_responses_become_classified_registry_errors(
    clients: Callable[..., RegistryClient],
    status: int,
    body: object,
    codes: tuple[str, ...],
    temporary: bool,
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    client = clients(ping_ok(lambda r: httpx.Response(status, text=content)))

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200})

    exc = caught.value
    assert type(exc) is RegistryError
    assert exc.status == status
    assert exc.codes == codes
    assert exc.is_temporary() is temporary
    assert str(status) in str(exc)
    assert HOST in str(exc)
    for code in codes:
        assert code in str(exc)


def test_error_without_json_names_the_reason_phrase(clients: Callable[..., RegistryClient]) -> None:
    client = clients(ping_ok(lambda r: httpx.Response(502, text="bad gateway from nginx")))

    with pytest.raises(RegistryError, match="HTTP 502 Bad Gateway"):
        client.send("GET", client.url("/v2/x"), scopes=(), ok={200})


@pytest.mark.parametrize("body", ['{"errors": null}', '{"errors": 5}'])
def test_errors_member_that_is_not_a_list(
    clients: Callable[..., RegistryClient], body: str
) -> None:
    client = clients(ping_ok(lambda r: httpx.Response(500, text=body)))

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x"), scopes=(), ok={200})

    assert caught.value.status == 500


def test_403_is_an_auth_error_never_retried(clients: Callable[..., RegistryClient]) -> None:
    sleeps: list[float] = []
    client = clients(
        ping_ok(lambda r: error(403, "DENIED", "requested access is denied")), sleeps=sleeps
    )

    with pytest.raises(RegistryAuthError, match="DENIED") as caught:
        client.send("GET", client.url("/v2/x"), scopes=(), ok={200}, retry=True)

    assert caught.value.status == 403
    assert not caught.value.is_temporary()
    assert sleeps == []


def test_retry_after_header_is_kept_on_the_error(clients: Callable[..., RegistryClient]) -> None:
    client = clients(ping_ok(lambda r: httpx.Response(429, headers={"Retry-After": "12"})))

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x"), scopes=(), ok={200})

    assert caught.value.retry_after == 12.0


def test_docker_hub_plain_text_429_says_why(clients: Callable[..., RegistryClient]) -> None:
    """Docker Hub's pull limit answers text, not the OCI errors JSON (docker/hub-feedback#1907)."""
    text = "toomanyrequests: You have reached your pull rate limit.\nmore"
    client = clients(
        ping_ok(lambda r: httpx.Response(429, text=text, headers={"Retry-After": "3"}))
    )

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x/manifests/1"), scopes=(), ok={200})

    assert str(caught.value).endswith(
        "HTTP 429 Too Many Requests: toomanyrequests: You have reached your pull rate limit."
    )
    assert caught.value.is_temporary() and caught.value.retry_after == 3.0


NAME_UNKNOWN = "The repository with name 'team/app' does not exist in the registry with id '1'"


@pytest.mark.parametrize(
    ("host", "hint"),
    [
        (
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "`aws ecr create-repository --repository-name team/app`, or add a repository "
            "creation template applied for CREATE_ON_PUSH)",
        ),
        ("public.ecr.aws", "CREATE_ON_PUSH"),
        (HOST, f"(repository team/app does not exist and {HOST} does not create it on push: "),
    ],
)
def test_name_unknown_on_push_says_to_create_the_repository(
    clients: Callable[..., RegistryClient], host: str, hint: str
) -> None:
    client = clients(ping_ok(lambda r: error(404, "NAME_UNKNOWN", NAME_UNKNOWN)), host=host)

    with pytest.raises(RegistryError) as caught:
        client.upload_start(REPO)

    assert hint in str(caught.value)
    assert NAME_UNKNOWN in str(caught.value)
    assert not caught.value.is_temporary()


@pytest.mark.parametrize(
    ("tags_list", "attempts"),
    [(lambda: error(404, "NAME_UNKNOWN", NAME_UNKNOWN), 1), (lambda: httpx.Response(200), 3)],
)
def test_upload_start_hung_up_asks_whether_the_repository_exists(
    clients: Callable[..., RegistryClient],
    tags_list: Callable[[], httpx.Response],
    attempts: int,
) -> None:
    """ECR hangs up on an upload to a repository it does not have (aws/containers-roadmap#1970):
    NAME_UNKNOWN from tags/list makes that one clear, permanent error; otherwise the hang-up is
    an ordinary connection failure, retried."""
    posts: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        assert request.url.path == f"/v2/{REPO}/tags/list"
        return tags_list()

    client = clients(
        ping_ok(handle),
        host="123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        policy=RetryPolicy(attempts=3),
    )

    with pytest.raises(RegistryError) as caught:
        client.upload_start(REPO)

    assert len(posts) == attempts
    if attempts == 1:
        assert caught.value.codes == ("NAME_UNKNOWN",) and not caught.value.is_temporary()
        assert "no answer; GET tags/list: HTTP 404 NAME_UNKNOWN" in str(caught.value)
        assert "aws ecr create-repository --repository-name team/app" in str(caught.value)
    else:
        assert isinstance(caught.value, RegistryConnectionError)


def test_missing_location_is_a_registry_error(clients: Callable[..., RegistryClient]) -> None:
    client = clients(ping_ok(lambda r: httpx.Response(202)))

    response = client.upload_start(REPO)
    with pytest.raises(RegistryError, match="without a Location"):
        client.session_url(response)


def test_first_ping_503_is_retried(clients: Callable[..., RegistryClient]) -> None:
    answers = iter([503, 200])
    sleeps: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(next(answers))
        return httpx.Response(404)

    client = clients(handle, sleeps=sleeps)

    assert client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"x"), 1)) is False
    assert len(sleeps) == 1


@pytest.mark.parametrize(("status", "answers"), [(200, True), (401, True), (503, False)])
def test_probe_is_one_get_without_retries_and_a_short_timeout(
    clients: Callable[..., RegistryClient], status: int, answers: bool
) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, headers={"WWW-Authenticate": 'Basic realm="r"'})

    sleeps: list[float] = []
    client = clients(handle, sleeps=sleeps)

    if answers:
        client.probe()
    else:
        with pytest.raises(RegistryError) as caught:
            client.probe()
        assert caught.value.is_unavailable()

    assert [(r.method, r.url.path) for r in seen] == [("GET", "/v2/")]
    assert seen[0].extensions["timeout"]["read"] == PROBE_TIMEOUT
    assert sleeps == []


def test_probe_of_a_registry_not_listening(clients: Callable[..., RegistryClient]) -> None:
    sleeps: list[float] = []
    client = clients(Network(), sleeps=sleeps)  # nothing routed: connection refused

    with pytest.raises(RegistryConnectionError) as caught:
        client.probe()

    assert caught.value.is_unavailable()
    assert sleeps == []


# ---- TLS and connections -------------------------------------------------------------------


def _raising(
    cause: BaseException, *, only_https: bool = True, log: list[str] | None = None
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if log is not None:
            log.append(str(request.url))
        if request.url.scheme == "https" or not only_https:
            try:
                raise cause
            except BaseException as exc:
                raise httpx.ConnectError(str(exc), request=request) from exc
        return httpx.Response(200)

    return handle


def test_tls_verification_failure_is_permanent_and_says_what_to_do(
    clients: Callable[..., RegistryClient],
) -> None:
    sleeps: list[float] = []
    tried: list[str] = []
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] self-signed")
    client = clients(_raising(cause, log=tried), sleeps=sleeps)

    with pytest.raises(RegistryConnectionError, match="verification failed") as caught:
        client.ping()

    assert not caught.value.is_temporary()
    assert "ca_file" in str(caught.value)
    assert tried == ["https://registry.test/v2/"]
    assert sleeps == []


def test_tls_handshake_failure_on_a_remote_host_does_not_fall_back_to_http(
    clients: Callable[..., RegistryClient],
) -> None:
    tried: list[str] = []
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    client = clients(_raising(cause, log=tried))

    with pytest.raises(RegistryConnectionError) as caught:
        client.ping()

    assert caught.value.tls_handshake
    assert not caught.value.is_temporary()
    assert tried == ["https://registry.test/v2/"]


@pytest.mark.parametrize("host", ["127.0.0.1:5000", "localhost:5000", "[::1]:5000"])
def test_loopback_falls_back_to_http_after_a_tls_handshake_error(
    clients: Callable[..., RegistryClient], host: str
) -> None:
    tried: list[str] = []
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    client = clients(_raising(cause, log=tried), host=host)

    client.ping()

    assert client.scheme == "http"
    assert [u.split("://")[0] for u in tried] == ["https", "http"]
    assert str(client.url("/v2/x/blobs/uploads/")).startswith(f"http://{host}/")


def test_loopback_tls_verification_failure_does_not_fall_back(
    clients: Callable[..., RegistryClient],
) -> None:
    tried: list[str] = []
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    client = clients(_raising(cause, log=tried), host="127.0.0.1:5000")

    with pytest.raises(RegistryConnectionError, match="verification failed"):
        client.ping()

    assert len(tried) == 1


def test_connection_refused_is_temporary_and_retried(
    clients: Callable[..., RegistryClient],
) -> None:
    sleeps: list[float] = []
    client = clients(Network(), sleeps=sleeps)  # nothing listens anywhere

    with pytest.raises(RegistryConnectionError) as caught:
        client.ping()

    assert caught.value.is_temporary()
    assert len(sleeps) == 4  # five attempts


def test_plain_http_setting_uses_http_only(clients: Callable[..., RegistryClient]) -> None:
    tried: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        tried.append(str(request.url))
        return httpx.Response(200)

    client = clients(handle, plain_http=True)
    client.ping()

    assert tried == ["http://registry.test/v2/"]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("localhost:5000", True),
        ("registry.localhost:5000", True),
        ("127.0.0.1", True),
        ("127.1.2.3:5000", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("registry.test", False),
        ("localhost.example.com", False),
        ("[2001:db8::1]:443", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_docker_io_talks_to_registry_1(clients: Callable[..., RegistryClient]) -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    network = Network()
    network.route("registry-1.docker.io", handle)
    client = clients(network, host="docker.io")
    client.ping()

    assert seen == ["https://registry-1.docker.io/v2/"]


# ---- cookies -------------------------------------------------------------------------------


def test_cookies_are_never_sent_back(clients: Callable[..., RegistryClient]) -> None:
    seen: list[httpx.Headers] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(
            200,
            headers=[
                ("Set-Cookie", "sid=abc123; Path=/"),
                ("Set-Cookie", "_gorilla_csrf=xyz; Path=/; HttpOnly"),
            ],
        )

    client = clients(handle)
    client.ping()
    client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200})
    client.send("HEAD", client.url(f"/v2/x/blobs/{sha256_digest(b'')}"), scopes=(), ok={200})

    assert len(seen) == 3
    assert all("cookie" not in headers for headers in seen)


# ---- manifests -------------------------------------------------------------------------------


def _manifest_server(
    digest_header: Callable[[bytes], str | None], got: list[httpx.Request]
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        got.append(request)
        if request.method == "PUT":
            body = request.read()
            value = digest_header(body)
            return httpx.Response(201, headers={"Docker-Content-Digest": value} if value else {})
        return httpx.Response(404)

    return ping_ok(handle)


MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}, indent=3
).encode()


def test_manifest_put_sends_exact_bytes_and_media_type(
    clients: Callable[..., RegistryClient],
) -> None:
    got: list[httpx.Request] = []
    client = clients(_manifest_server(sha256_digest, got))

    digest = client.manifest_put(REPO, "v1", OCI_MANIFEST, MANIFEST)

    assert digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
    (put,) = got
    assert put.url.path == f"/v2/{REPO}/manifests/v1"
    assert put.headers["content-type"] == OCI_MANIFEST
    assert put.content == MANIFEST
    assert put.headers["content-length"] == str(len(MANIFEST))


def test_manifest_put_accepts_a_missing_digest_header(
    clients: Callable[..., RegistryClient],
) -> None:
    client = clients(_manifest_server(lambda b: None, []))

    assert client.manifest_put(REPO, "v1", OCI_MANIFEST, MANIFEST) == sha256_digest(MANIFEST)


def test_manifest_put_rejects_a_different_reported_digest(
    clients: Callable[..., RegistryClient],
) -> None:
    # A registry that canonicalised (re-serialised) the manifest: its digest is not ours.
    client = clients(
        _manifest_server(lambda b: sha256_digest(json.dumps(json.loads(b)).encode()), [])
    )

    with pytest.raises(RegistryError, match="registry reports digest") as caught:
        client.manifest_put(REPO, "v1", OCI_MANIFEST, MANIFEST)

    assert sha256_digest(MANIFEST) in str(caught.value)


def test_manifest_over_4_mib_is_refused_before_sending(
    clients: Callable[..., RegistryClient],
) -> None:
    got: list[httpx.Request] = []
    client = clients(_manifest_server(sha256_digest, got))

    with pytest.raises(ManifestError, match="4 MiB"):
        client.manifest_put(REPO, "v1", OCI_MANIFEST, b" " * ((4 << 20) + 1))

    assert got == []


def test_manifest_put_error_codes(clients: Callable[..., RegistryClient]) -> None:
    client = clients(ping_ok(lambda r: error(400, "MANIFEST_BLOB_UNKNOWN", "blob unknown")))

    with pytest.raises(RegistryError) as caught:
        client.manifest_put(REPO, "v1", OCI_MANIFEST, MANIFEST)

    assert caught.value.codes == ("MANIFEST_BLOB_UNKNOWN",)
    assert not caught.value.is_temporary()


def test_manifest_digest_head(clients: Callable[..., RegistryClient]) -> None:
    digest = sha256_digest(MANIFEST)

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == "HEAD"
        assert OCI_MANIFEST in request.headers["accept"]
        if request.url.path.endswith("/v1"):
            return httpx.Response(200, headers={"Docker-Content-Digest": digest})
        return httpx.Response(404)

    client = clients(ping_ok(handle))

    assert client.manifest_digest(REPO, "v1", [OCI_MANIFEST]) == digest
    assert client.manifest_digest(REPO, "v2", [OCI_MANIFEST]) is None


def test_manifest_digest_403_is_absent(clients: Callable[..., RegistryClient]) -> None:
    """Artifactory answers 403 for an absent tag (google/go-containerregistry#1691)."""
    client = clients(ping_ok(lambda r: error(403, "DENIED")))

    assert client.manifest_digest(REPO, "v1", [OCI_MANIFEST]) is None


def test_manifests_follow_redirects_and_hash_what_storage_serves(
    clients: Callable[..., RegistryClient],
) -> None:
    storage: list[httpx.Request] = []

    tokens = FakeTokenServer(users={"alice": "pw"})
    fake = FakeRegistry(HOST, auth=tokens)

    def registry(request: httpx.Request) -> httpx.Response | None:
        if "/manifests/" not in request.url.path:
            return None
        denied = fake.denied(request, (f"repository:{REPO}:pull",))
        return denied or httpx.Response(302, headers={"Location": "https://storage.test/m?s=1"})

    def store(request: httpx.Request) -> httpx.Response:
        storage.append(request)
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})

    fake.hooks.append(registry)
    network = Network(fake, tokens)
    network.route("storage.test", store)
    client = clients(network, credentials=Credentials("alice", "pw"))

    assert client.manifest_digest(REPO, "v1", [OCI_MANIFEST]) == sha256_digest(MANIFEST)
    assert client.manifest_get(REPO, "v1", [OCI_MANIFEST]) == (OCI_MANIFEST, MANIFEST)

    assert [r.method for r in storage] == ["HEAD", "GET", "GET"]
    assert all("authorization" not in r.headers for r in storage)


def test_manifest_get_returns_media_type_and_exact_bytes(
    clients: Callable[..., RegistryClient],
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.method == "GET"
        assert request.headers["accept"] == OCI_INDEX
        if request.url.path.endswith("/v1"):
            return httpx.Response(
                200, content=MANIFEST, headers={"Content-Type": f"{OCI_INDEX}; charset=utf-8"}
            )
        return error(404, "MANIFEST_UNKNOWN")

    client = clients(ping_ok(handle))

    assert client.manifest_get(REPO, "v1", [OCI_INDEX]) == (OCI_INDEX, MANIFEST)
    assert client.manifest_get(REPO, "v2", [OCI_INDEX]) is None


SUBJECT = "sha256:" + "a" * 64
LISTED = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(MANIFEST), "size": 3}


def referrers_client(
    clients: Callable[..., RegistryClient], answer: Callable[[], httpx.Response], **kw: object
) -> tuple[RegistryClient, list[httpx.Request]]:
    asked: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith(f"/referrers/{SUBJECT}")
        assert request.headers["accept"] == OCI_INDEX
        asked.append(request)
        return answer()

    return clients(ping_ok(handle), **kw), asked


def test_referrers_get_with_the_api(clients: Callable[..., RegistryClient]) -> None:
    """Harbor answers its index as application/json (goharbor/harbor#19690): the body counts."""
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [LISTED]}
    client, asked = referrers_client(
        clients,
        lambda: httpx.Response(200, json=body, headers={"Content-Type": "application/json"}),
    )

    for _ in range(2):
        assert client.referrers_get(REPO, SUBJECT) == (
            Descriptor(OCI_MANIFEST, LISTED["digest"], 3),
        )
    assert len(asked) == 2


NO_API = {
    "404 distribution 2.8": lambda: httpx.Response(404, text="404 page not found"),
    "404 GHCR": lambda: error(404, "MANIFEST_UNKNOWN"),
    "303 GHCR web UI": lambda: httpx.Response(303, headers={"Location": "https://github.com/-/v2"}),
    "301": lambda: httpx.Response(301, headers={"Location": "/elsewhere"}),
    "400 Quay": lambda: error(400, "MANIFEST_INVALID"),
    "405": lambda: error(405, "UNSUPPORTED"),
    "406 Artifactory": lambda: httpx.Response(406),
    "HTML 200": lambda: httpx.Response(
        200, text="<!DOCTYPE html><html>Not Found</html>", headers={"Content-Type": "text/html"}
    ),
    "200 without manifests": lambda: httpx.Response(200, json={"schemaVersion": 2}),
    "200 a manifest": lambda: httpx.Response(
        200, json={"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}
    ),
}


@pytest.mark.parametrize("answer", list(NO_API.values()), ids=list(NO_API))
def test_referrers_get_without_the_api_is_asked_once_per_repository(
    clients: Callable[..., RegistryClient], answer: Callable[[], httpx.Response]
) -> None:
    client, asked = referrers_client(clients, answer)

    assert client.referrers_get(REPO, SUBJECT) is None
    assert client.referrers_get(REPO, SUBJECT) is None

    assert len(asked) == 1
    assert not any(r.url.host == "github.com" for r in asked)


def test_referrers_get_429_after_the_retries_means_no_api(
    clients: Callable[..., RegistryClient],
) -> None:
    """GHCR's redirect target is rate limited (artifacthub/hub#4785)."""
    sleeps: list[float] = []
    client, asked = referrers_client(
        clients,
        lambda: error(429, "TOOMANYREQUESTS", headers={"Retry-After": "2"}),
        policy=RetryPolicy(attempts=3),
        sleeps=sleeps,
    )

    assert client.referrers_get(REPO, SUBJECT) is None

    assert len(asked) == 3 and sleeps == [2.0, 2.0]


@pytest.mark.parametrize(
    ("answer", "status"),
    [(lambda: error(503, "UNAVAILABLE"), 503), (lambda: error(403, "DENIED"), 403)],
)
def test_referrers_get_failures_still_raise(
    clients: Callable[..., RegistryClient], answer: Callable[[], httpx.Response], status: int
) -> None:
    client, asked = referrers_client(clients, answer, policy=RetryPolicy(attempts=1))

    with pytest.raises(RegistryError) as exc:
        client.referrers_get(REPO, SUBJECT)
    assert exc.value.status == status
    # Not remembered as "no API": the next push asks again.
    with pytest.raises(RegistryError):
        client.referrers_get(REPO, SUBJECT)
    assert len(asked) == 2


# ---- blob existence and redirects ---------------------------------------------------------


def _redirecting_rig(
    storage_answer: Callable[[httpx.Request], httpx.Response], location: str
) -> tuple[Network, FakeRegistry, list[httpx.Request]]:
    tokens = FakeTokenServer(users={"alice": "pw"})
    fake = FakeRegistry(HOST, auth=tokens)
    storage: list[httpx.Request] = []

    def redirect(request: httpx.Request) -> httpx.Response | None:
        if (
            request.method == "HEAD"
            and "/blobs/" in request.url.path
            and fake.denied(request, (f"repository:{REPO}:pull",)) is None
        ):
            return httpx.Response(307, headers={"Location": location})
        return None

    fake.hooks.append(redirect)

    def store(request: httpx.Request) -> httpx.Response:
        storage.append(request)
        return storage_answer(request)

    network = Network(fake, tokens)
    network.route("storage.test", store)
    return network, fake, storage


@pytest.mark.parametrize(("length", "expected"), [("1234", True), ("99", False), (None, True)])
def test_blob_exists_follows_307_to_storage_without_authorization(
    clients: Callable[..., RegistryClient], length: str | None, expected: bool
) -> None:
    headers = {"Content-Length": length} if length else {}
    network, fake, storage = _redirecting_rig(
        lambda r: httpx.Response(200, headers=headers),
        "https://storage.test/bucket/blob?X-Amz-Signature=abc",
    )
    client = clients(network, credentials=Credentials("alice", "pw"))

    assert client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"x"), 1234)) is expected

    (head,) = storage
    assert head.method == "HEAD"
    assert head.url.params.get("X-Amz-Signature") == "abc"
    assert "authorization" not in head.headers
    assert fake.calls("HEAD")[-1].headers["authorization"].startswith("Bearer ")


@pytest.mark.parametrize("status", [301, 302, 303, 308])
def test_blob_exists_follows_every_redirect(
    clients: Callable[..., RegistryClient], status: int
) -> None:
    network, fake, storage = _redirecting_rig(
        lambda r: httpx.Response(200, headers={"Content-Length": "1"}),
        "https://storage.test/bucket/blob",
    )
    fake.hooks.insert(
        0,
        lambda r: (
            httpx.Response(status, headers={"Location": "https://storage.test/b"})
            if r.method == "HEAD" and "/blobs/" in r.url.path and "authorization" in r.headers
            else None
        ),
    )
    client = clients(network, credentials=Credentials("alice", "pw"))

    assert client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"x"), 1)) is True
    assert [str(r.url) for r in storage] == ["https://storage.test/b"]
    assert "authorization" not in storage[0].headers


def test_blob_exists_relative_redirect_stays_on_the_registry(
    clients: Callable[..., RegistryClient],
) -> None:
    answers: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        answers.append(request.url.path)
        if request.url.path.startswith("/v2/team/app/blobs/"):
            return httpx.Response(307, headers={"Location": "/mirror/blob"})
        return httpx.Response(200, headers={"Content-Length": "5"})

    client = clients(ping_ok(handle))

    assert client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"hello"), 5)) is True
    assert answers[-1] == "/mirror/blob"


def test_blob_exists_redirect_loop_is_bounded(clients: Callable[..., RegistryClient]) -> None:
    count: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        count.append(1)
        return httpx.Response(307, headers={"Location": request.url.path})

    client = clients(ping_ok(handle))

    with pytest.raises(RegistryError, match="too many redirects"):
        client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"x"), 1))

    assert len(count) == 4


def test_blob_exists_404_is_false(clients: Callable[..., RegistryClient]) -> None:
    client = clients(ping_ok(lambda r: httpx.Response(404)))

    assert client.blob_exists(REPO, Descriptor(LAYER, sha256_digest(b"x"), 1)) is False


def test_upload_cancel_ignores_failures(clients: Callable[..., RegistryClient]) -> None:
    sleeps: list[float] = []
    client = clients(ping_ok(lambda r: error(403, "DENIED")), sleeps=sleeps)

    client.upload_cancel(REPO, client.url("/v2/team/app/blobs/uploads/u1"))

    assert sleeps == []
