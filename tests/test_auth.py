"""Authentication: challenges, scopes, token fetch and cache, 401 handling, secret hygiene."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from imagepushd.errors import RegistryAuthError, RegistryConnectionError, RegistryError
from imagepushd.oci import Descriptor
from imagepushd.push.registry.auth import (
    Authenticator,
    Challenge,
    RequestAuth,
    merge_scopes,
    parse_challenges,
    repository_scope,
)
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.credentials import Credentials, CredentialSource, CredentialStore
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
PASSWORD = "pa:ss-W0rd!-do-not-leak"
REFRESH = "refresh-token-do-not-leak"
PUSH = repository_scope(REPO, "pull", "push")
BLOB = Descriptor(LAYER, sha256_digest(b"x"), 1)


# ---- challenges ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            ['Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
             'scope="repository:samalba/my-app:pull,push"'],
            [Challenge("bearer", {"realm": "https://auth.docker.io/token",
                                  "service": "registry.docker.io",
                                  "scope": "repository:samalba/my-app:pull,push"})],
        ),
        (
            ['Basic realm="Registry Realm", Bearer realm="https://a.test/t",service="s"'],
            [Challenge("basic", {"realm": "Registry Realm"}),
             Challenge("bearer", {"realm": "https://a.test/t", "service": "s"})],
        ),
        (
            ['Bearer realm="x" , service="y" ,  Basic realm="z"'],
            [Challenge("bearer", {"realm": "x", "service": "y"}),
             Challenge("basic", {"realm": "z"})],
        ),
        (
            ['Basic realm="say \\"hi\\", then \\\\ go", charset="UTF-8"'],
            [Challenge("basic", {"realm": 'say "hi", then \\ go', "charset": "UTF-8"})],
        ),
        (
            ['Bearer realm="https://a.test/t",service="s",'
             'scope="repository:localhost:5000/foo/bar:pull,push repository:b:pull",'
             'error="insufficient_scope"'],
            [Challenge("bearer", {"realm": "https://a.test/t", "service": "s",
                                  "scope": "repository:localhost:5000/foo/bar:pull,push "
                                           "repository:b:pull",
                                  "error": "insufficient_scope"})],
        ),
        (
            ['BEARER Realm=token-realm, SERVICE="svc"'],
            [Challenge("bearer", {"realm": "token-realm", "service": "svc"})],
        ),
        (
            ['Basic realm="one"', 'Bearer realm="two"'],  # separate header lines
            [Challenge("basic", {"realm": "one"}), Challenge("bearer", {"realm": "two"})],
        ),
        (['Bearer realm=""'], [Challenge("bearer", {"realm": ""})]),
        ([""], []),
    ],
)  # fmt: skip
def test_parse_challenges(values: list[str], expected: list[Challenge]) -> None:
    assert parse_challenges(values) == expected


@pytest.mark.parametrize(
    "value",
    [
        'Negotiate, Bearer realm="https://a.test/t",service="s"',
        'Negotiate YIIBhgYGKwYBBQUC==, Bearer realm="https://a.test/t",service="s"',
    ],
)
def test_parse_challenges_after_a_bare_or_token68_challenge(value: str) -> None:
    challenges = parse_challenges([value])

    assert challenges[-1] == Challenge("bearer", {"realm": "https://a.test/t", "service": "s"})


def test_challenge_scopes_split_on_whitespace_only() -> None:
    challenge = parse_challenges(
        ['Bearer realm="r",scope="repository:host:5000/a/b:pull,push  registry:catalog:*"']
    )[0]

    assert challenge.scopes == ("repository:host:5000/a/b:pull,push", "registry:catalog:*")


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ([["repository:a:pull"], ["repository:a:push"]], ("repository:a:pull,push",)),
        (
            [["repository:a:push,pull", "repository:b:pull"], ["repository:b:pull"]],
            ("repository:a:pull,push", "repository:b:pull"),
        ),
        (
            [["repository:localhost:5000/x:pull"], ["repository:localhost:5000/x:push"]],
            ("repository:localhost:5000/x:pull,push",),
        ),
        ([["registry:catalog:*"], []], ("registry:catalog:*",)),
        ([["garbage", ":pull"], ["repository:a:pull"]], ("repository:a:pull",)),
        ([[], []], ()),
    ],
)
def test_merge_scopes(groups: list[list[str]], expected: tuple[str, ...]) -> None:
    assert merge_scopes(*groups) == expected


def test_merge_scopes_is_order_independent() -> None:
    a = ["repository:x:push", "repository:y:pull"]
    b = ["repository:x:pull", "repository:localhost:5000/z:pull"]

    assert merge_scopes(a, b) == merge_scopes(b, a) == merge_scopes(a + b)


def test_repository_scope() -> None:
    assert (
        repository_scope("localhost:5000/a", "pull", "push")
        == "repository:localhost:5000/a:pull,push"
    )


# ---- Authenticator on its own: the cache and the clock -------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


TokenHttp = Callable[..., httpx.Client]


@pytest.fixture
def token_http() -> Iterator[TokenHttp]:
    """An httpx client whose network holds ``server`` (a token server, or any handler)."""
    made: list[httpx.Client] = []

    def make(
        server: Callable[[httpx.Request], httpx.Response], host: str = "auth.test"
    ) -> httpx.Client:
        network = Network()
        network.route(host, server)
        client = httpx.Client(transport=network.transport())
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def authenticator(
    http: httpx.Client,
    tokens: FakeTokenServer,
    credentials: Credentials | None = None,
    clock: Clock | None = None,
) -> Authenticator:
    auth = Authenticator(
        http,
        HOST,
        CredentialSource.fixed(credentials),
        basic_allowed=lambda url: url.scheme == "https",
        clock=clock or Clock(),
    )
    auth.learn(httpx.Response(401, headers={"WWW-Authenticate": tokens.challenge()}))
    return auth


def test_token_is_cached_per_scope_set(token_http: TokenHttp) -> None:
    tokens = FakeTokenServer()
    auth = authenticator(token_http(tokens), tokens)
    url = httpx.URL(f"https://{HOST}/v2/")
    other = (repository_scope("team/other", "pull"),)

    first = auth.authorization(RequestAuth((PUSH,)), url)
    assert auth.authorization(RequestAuth((PUSH,)), url) == first
    third = auth.authorization(RequestAuth(other), url)
    assert auth.authorization(RequestAuth(other), url) == third

    assert first != third
    assert len(tokens.requests) == 2


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [(300, 300), (10, 60), (0, 60), (-5, 60), (None, 60), ("soon", 60), (59.5, 60), (3600, 3600)],
)
def test_token_refreshed_shortly_before_expiry(
    token_http: TokenHttp, expires_in: object, lifetime: float
) -> None:
    tokens = FakeTokenServer(expires_in=expires_in)
    clock = Clock(1000.0)
    auth = authenticator(token_http(tokens), tokens, clock=clock)
    url = httpx.URL(f"https://{HOST}/v2/")
    margin = 20.0  # REFRESH_MARGIN

    first = auth.authorization(RequestAuth((PUSH,)), url)
    clock.now = 1000.0 + lifetime - margin - 0.5
    assert auth.authorization(RequestAuth((PUSH,)), url) == first
    assert len(tokens.requests) == 1

    clock.now = 1000.0 + lifetime - margin + 0.5
    assert auth.authorization(RequestAuth((PUSH,)), url) != first
    assert len(tokens.requests) == 2


def test_access_token_field_is_accepted(token_http: TokenHttp) -> None:
    tokens = FakeTokenServer(token_field="access_token")
    auth = authenticator(token_http(tokens), tokens)

    assert (
        auth.authorization(RequestAuth((PUSH,)), httpx.URL(f"https://{HOST}/")) == "Bearer token-1"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(200, text="<html>"), "invalid JSON"),
        (httpx.Response(200, json={"expires_in": 300}), "no token"),
        (httpx.Response(200, json={"token": ""}), "no token"),
        (httpx.Response(200, json=["token"]), "no token"),
        (httpx.Response(500), "answered 500"),
    ],
)
def test_bad_token_server_answers(
    token_http: TokenHttp, answer: httpx.Response, message: str
) -> None:
    tokens = FakeTokenServer()
    auth = authenticator(token_http(lambda r: answer), tokens)

    with pytest.raises(RegistryAuthError, match=message):
        auth.authorization(RequestAuth((PUSH,)), httpx.URL(f"https://{HOST}/"))


def test_bearer_without_realm(token_http: TokenHttp) -> None:
    tokens = FakeTokenServer()
    auth = Authenticator(
        token_http(tokens), HOST, CredentialSource.fixed(None), basic_allowed=lambda url: True
    )
    auth.learn(httpx.Response(401, headers={"WWW-Authenticate": 'Bearer service="s"'}))

    with pytest.raises(RegistryAuthError, match="without a realm"):
        auth.authorization(RequestAuth((PUSH,)), httpx.URL(f"https://{HOST}/"))


def test_no_usable_challenge(token_http: TokenHttp) -> None:
    auth = Authenticator(
        token_http(FakeTokenServer()),
        HOST,
        CredentialSource.fixed(None),
        basic_allowed=lambda url: True,
    )

    with pytest.raises(RegistryAuthError, match="no usable challenge"):
        auth.learn(httpx.Response(401, headers={"WWW-Authenticate": 'Digest realm="x"'}))


# ---- through the client ---------------------------------------------------------------------


@pytest.fixture
def clients() -> Iterator[Callable[..., RegistryClient]]:
    made: list[RegistryClient] = []

    def make(network: Network, **kwargs: object) -> RegistryClient:
        client = make_client(network, HOST, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def token_rig(**kwargs: object) -> tuple[Network, FakeRegistry, FakeTokenServer]:
    tokens = FakeTokenServer(
        users={"alice": PASSWORD},
        refresh_tokens={REFRESH: "alice"},
        **kwargs,  # type: ignore[arg-type]
    )
    fake = FakeRegistry(HOST, auth=tokens)
    return Network(fake, tokens), fake, tokens


def basic_of(header: str) -> str:
    assert header.startswith("Basic ")
    return base64.b64decode(header[6:]).decode()


def test_bearer_get_flow(clients: Callable[..., RegistryClient]) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", PASSWORD))

    assert client.blob_exists(REPO, BLOB) is False
    client.upload_start(REPO, mount=BLOB.digest, source="team/base")

    ping = fake.requests[0]
    assert ping.url.path == "/v2/"
    assert "authorization" not in ping.headers
    first, second = tokens.requests
    assert first.method == "GET"
    assert str(first.url).startswith("https://auth.test/token?")
    assert first.url.params.get("service") == "registry.test"
    assert first.url.params.get_list("scope") == [PUSH]
    assert basic_of(first.headers["authorization"]) == f"alice:{PASSWORD}"
    # Several scopes: one repeated scope parameter each.
    assert second.url.params.get_list("scope") == [PUSH, "repository:team/base:pull"]
    head, post = fake.calls()
    assert head.headers["authorization"] == "Bearer token-1"
    assert post.headers["authorization"] == "Bearer token-2"
    assert post.status == 202


def test_anonymous_bearer_sends_no_credentials_to_the_realm(
    clients: Callable[..., RegistryClient],
) -> None:
    network, _fake, tokens = token_rig()
    client = clients(network)

    assert client.blob_exists(REPO, BLOB) is False  # anonymous pull is granted

    (fetch,) = tokens.requests
    assert "authorization" not in fetch.headers
    assert tokens.grants == [(None, ("repository:team/app:pull",))]


def test_identity_token_uses_the_oauth2_refresh_grant(
    clients: Callable[..., RegistryClient],
) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials(identity_token=REFRESH))
    form: list[dict[str, str]] = []

    original = network.servers[tokens.host]

    def capture(request: httpx.Request) -> httpx.Response:
        form.append(dict(urllib.parse.parse_qsl(request.read().decode())))
        return original(request)

    network.route(tokens.host, capture)

    client.upload_start(REPO, mount=BLOB.digest, source="team/base")

    (fetch,) = tokens.requests
    assert fetch.method == "POST"
    assert fetch.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "authorization" not in fetch.headers
    assert form == [
        {
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "service": "registry.test",
            "client_id": "imagepushd",
            "scope": f"{PUSH} repository:team/base:pull",
        }
    ]
    assert fake.calls("POST")[0].status == 202


def test_identity_token_post_404_falls_back_to_get(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    tokens.post_status = 404
    client = clients(network, credentials=Credentials("alice", PASSWORD, identity_token=REFRESH))

    assert client.blob_exists(REPO, BLOB) is False

    assert [r.method for r in tokens.requests] == ["POST", "GET"]


def test_registry_token_is_used_directly(clients: Callable[..., RegistryClient]) -> None:
    network, fake, tokens = token_rig()
    tokens.tokens["ready-made"] = (PUSH,)
    client = clients(network, credentials=Credentials(registry_token="ready-made"))

    assert client.blob_exists(REPO, BLOB) is False

    assert tokens.requests == []
    assert fake.calls("HEAD")[0].headers["authorization"] == "Bearer ready-made"


def test_401_with_a_fresh_token_refetches_once_and_resends(
    clients: Callable[..., RegistryClient],
) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", PASSWORD))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.revoke()  # e.g. the token server restarted with a new key

    assert client.blob_exists(REPO, BLOB) is False

    assert [r.status for r in fake.calls("HEAD")] == [404, 401, 404]
    assert len(tokens.requests) == 2


def test_second_401_is_final_without_a_loop(
    clients: Callable[..., RegistryClient],
) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", PASSWORD))
    client.ping()
    before = len(fake.requests)
    fake.hooks.append(
        lambda r: (
            error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": tokens.challenge(PUSH)})
            if r.method == "PUT"
            else None
        )
    )

    with pytest.raises(RegistryAuthError, match="credentials rejected") as caught:
        client.send(
            "PUT",
            client.url(f"/v2/{REPO}/manifests/v1"),
            scopes=(PUSH,),
            ok={201},
            body=b"{}",
            retry=True,
        )

    assert caught.value.status == 401
    assert len(fake.calls("PUT")) == 2
    assert len(tokens.requests) == 2
    assert len(fake.requests) - before == 2  # PUT, PUT (the ping came earlier)


def test_insufficient_scope_asks_for_the_merged_scopes(
    clients: Callable[..., RegistryClient],
) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", PASSWORD))
    extra = "repository:team/base:pull"
    state = {"asked": False}

    def want_more(request: httpx.Request) -> httpx.Response | None:
        granted = tokens.scopes_of(request.headers.get("authorization")) or ()
        if request.method == "POST" and extra not in granted:
            state["asked"] = True
            challenge = tokens.challenge(f"{PUSH} {extra}", "insufficient_scope")
            return error(401, "DENIED", headers={"WWW-Authenticate": challenge})
        return None

    fake.hooks.append(want_more)

    client.upload_start(REPO)

    assert state["asked"]
    assert [r.url.params.get_list("scope") for r in tokens.requests] == [
        [PUSH],
        [PUSH, extra],
    ]
    assert fake.calls("POST")[-1].status == 202


def test_insufficient_scope_twice_names_the_scope(clients: Callable[..., RegistryClient]) -> None:
    network, fake, tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", PASSWORD))
    challenge = tokens.challenge("repository:team/secret:pull", "insufficient_scope")
    fake.hooks.append(
        lambda r: (
            error(401, "DENIED", headers={"WWW-Authenticate": challenge})
            if r.method == "HEAD"
            else None
        )
    )

    with pytest.raises(RegistryAuthError, match="not allowed: repository:team/secret:pull"):
        client.blob_exists(REPO, BLOB)


def test_token_server_rejecting_credentials(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, _tokens = token_rig()
    client = clients(network, credentials=Credentials("alice", "wrong"))

    with pytest.raises(RegistryAuthError, match="credentials rejected"):
        client.blob_exists(REPO, BLOB)


def test_token_server_unreachable_is_temporary(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    del network.servers[tokens.host]
    sleeps: list[float] = []
    client = clients(network, credentials=Credentials("alice", PASSWORD), sleeps=sleeps)

    with pytest.raises(RegistryConnectionError, match=r"token server auth\.test") as caught:
        client.blob_exists(REPO, BLOB)

    assert caught.value.is_temporary()
    assert len(sleeps) == 4


# ---- Basic, and where credentials may go -----------------------------------------------------


def basic_registry(users: dict[str, str], host: str = HOST) -> tuple[Network, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if users.get(name) == password:
                return httpx.Response(404 if request.method == "HEAD" else 200)
        return error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": 'Basic realm="Registry"'})

    network = Network()
    network.route(host, handle)
    return network, seen


def test_basic_over_https(clients: Callable[..., RegistryClient]) -> None:
    network, seen = basic_registry({"alice": PASSWORD})
    client = clients(network, credentials=Credentials("alice", PASSWORD))

    assert client.blob_exists(REPO, BLOB) is False

    assert "authorization" not in seen[0].headers  # the ping only learns the challenge
    assert basic_of(seen[1].headers["authorization"]) == f"alice:{PASSWORD}"
    assert len(seen) == 2


def test_basic_over_plain_http_when_configured(clients: Callable[..., RegistryClient]) -> None:
    network, seen = basic_registry({"alice": PASSWORD})
    client = clients(network, credentials=Credentials("alice", PASSWORD), plain_http=True)

    assert client.blob_exists(REPO, BLOB) is False

    assert seen[1].url.scheme == "http"
    assert basic_of(seen[1].headers["authorization"]) == f"alice:{PASSWORD}"


def test_basic_rejected_twice_is_final(clients: Callable[..., RegistryClient]) -> None:
    network, seen = basic_registry({"alice": "other"})
    client = clients(network, credentials=Credentials("alice", PASSWORD))

    with pytest.raises(RegistryAuthError, match="credentials rejected"):
        client.blob_exists(REPO, BLOB)

    # The ping taught the Basic challenge already: the same password is not sent twice.
    assert len(seen) == 2  # ping, HEAD


def test_basic_challenge_without_credentials(clients: Callable[..., RegistryClient]) -> None:
    network, seen = basic_registry({"alice": PASSWORD})
    client = clients(network)

    with pytest.raises(RegistryAuthError, match="no credentials are configured"):
        client.blob_exists(REPO, BLOB)

    assert all("authorization" not in r.headers for r in seen)


def test_password_never_goes_to_a_plain_http_realm(clients: Callable[..., RegistryClient]) -> None:
    tokens = FakeTokenServer("auth.test", scheme="http", users={"alice": PASSWORD})
    network = Network(FakeRegistry(HOST, auth=tokens), tokens)
    client = clients(network, credentials=Credentials("alice", PASSWORD))

    with pytest.raises(RegistryAuthError, match="plain HTTP"):
        client.blob_exists(REPO, BLOB)

    assert tokens.requests == []


@pytest.mark.parametrize(
    ("realm_host", "plain_http"),
    [("auth.test", True), ("127.0.0.1:5001", False), ("localhost:5001", False)],
)
def test_password_to_a_plain_http_realm_when_allowed(
    clients: Callable[..., RegistryClient], realm_host: str, plain_http: bool
) -> None:
    tokens = FakeTokenServer(realm_host, scheme="http", users={"alice": PASSWORD})
    network = Network(FakeRegistry(HOST, auth=tokens), tokens)
    client = clients(network, credentials=Credentials("alice", PASSWORD), plain_http=plain_http)

    assert client.blob_exists(REPO, BLOB) is False

    (fetch,) = tokens.requests
    assert fetch.url.scheme == "http"
    assert basic_of(fetch.headers["authorization"]) == f"alice:{PASSWORD}"


# ---- credentials that rotate under a running client -------------------------------------------


class Helper:
    """``docker-credential-test`` as an injected runner: answers ``get`` from its fields.

    ``secret=None`` answers "credentials not found" (nobody logged in yet).
    """

    def __init__(self, username: str = "alice", secret: str | None = PASSWORD) -> None:
        self.username = username
        self.secret = secret
        self.runs = 0

    def __call__(self, argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        assert list(argv) == ["docker-credential-test", "get"]
        self.runs += 1
        if self.secret is None:
            return subprocess.CompletedProcess(argv, 1, "credentials not found in store\n", "")
        answer = {"ServerURL": stdin, "Username": self.username, "Secret": self.secret}
        return subprocess.CompletedProcess(argv, 0, json.dumps(answer), "")


def helper_source(home: Path, helper: Helper) -> CredentialSource:
    """What the daemon and the CLI build: a source over docker's config with ``credHelpers``."""
    config = home / ".docker/config.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps({"credHelpers": {HOST: "test"}}))
    store = CredentialStore({}, home, runner=helper)
    return CredentialSource(lambda: store.lookup(HOST))


def test_basic_rotated_password_is_resolved_again_and_resent(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    users = {"alice": PASSWORD}
    network, seen = basic_registry(users)
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 1

    users["alice"] = helper.secret = "rotated"

    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 2
    heads = [basic_of(r.headers["authorization"]) for r in seen if r.method == "HEAD"]
    assert heads == [f"alice:{PASSWORD}", f"alice:{PASSWORD}", "alice:rotated"]
    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 2  # cached again until the next rejection


def test_rejected_credentials_that_resolve_the_same_are_not_resent(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    users = {"alice": PASSWORD}
    network, seen = basic_registry(users)
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    users["alice"] = "rotated"  # the helper does not know yet

    with pytest.raises(RegistryAuthError, match="credentials rejected"):
        client.blob_exists(REPO, BLOB)

    assert helper.runs == 2
    assert len([r for r in seen if r.method == "HEAD"]) == 2  # one refused HEAD, not two
    helper.secret = "rotated"  # the helper catches up: the next push works, no reload

    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 3


def test_credentials_rejected_twice_are_a_failure(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    users = {"alice": PASSWORD}
    network, seen = basic_registry(users)
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    users["alice"] = "rotated"
    helper.secret = "still-wrong"

    with pytest.raises(RegistryAuthError, match="credentials rejected") as caught:
        client.blob_exists(REPO, BLOB)

    assert caught.value.status == 401
    assert helper.runs == 2
    heads = [basic_of(r.headers["authorization"]) for r in seen if r.method == "HEAD"]
    assert heads[1:] == [f"alice:{PASSWORD}", "alice:still-wrong"]


def test_requests_rejected_together_run_the_helper_once(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    users = {"alice": PASSWORD}
    network, _seen = basic_registry(users)
    registry = network.servers[HOST]
    refused_together = threading.Barrier(6, timeout=30)  # hang guard only

    def refuse_all_before_answering(request: httpx.Request) -> httpx.Response:
        response = registry(request)
        if request.method == "HEAD" and response.status_code == 401:
            refused_together.wait()  # every HEAD went out with the old password
        return response

    network.route(HOST, refuse_all_before_answering)
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    users["alice"] = helper.secret = "rotated"
    results: list[bool] = []

    def head() -> None:
        results.append(client.blob_exists(REPO, BLOB))

    threads = [threading.Thread(target=head) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [False] * 6
    assert helper.runs == 2


def test_credentials_appearing_after_start_are_found_on_rejection(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, _seen = basic_registry({"alice": PASSWORD})
    helper = Helper(secret=None)
    client = clients(network, credentials=helper_source(tmp_path, helper))

    with pytest.raises(RegistryAuthError, match="no credentials are configured"):
        client.blob_exists(REPO, BLOB)
    assert helper.runs == 1  # just asked for this request: asking again gives the same
    helper.secret = PASSWORD  # docker login, after the daemon started

    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 2


def test_anonymous_registry_never_runs_the_helper(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    helper = Helper()
    client = clients(Network(FakeRegistry(HOST)), credentials=helper_source(tmp_path, helper))

    assert client.blob_exists(REPO, BLOB) is False
    assert helper.runs == 0


def test_expired_token_is_fetched_again_without_running_the_helper(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, fake, tokens = token_rig()
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.revoke()  # the registry no longer takes the token (it expired)

    assert client.blob_exists(REPO, BLOB) is False

    assert [r.status for r in fake.calls("HEAD")] == [404, 401, 404]
    assert [r.status for r in tokens.requests] == [200, 200]
    assert helper.runs == 1


def test_token_server_refusing_rotated_credentials_runs_the_helper_once(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, fake, tokens = token_rig()
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.users["alice"] = helper.secret = "rotated"

    assert client.blob_exists(REPO, BLOB) is False  # the cached token is still good
    assert helper.runs == 1
    tokens.revoke()

    assert client.blob_exists(REPO, BLOB) is False

    assert helper.runs == 2
    assert [r.status for r in fake.calls("HEAD")] == [404, 404, 401, 404]
    fetches = [basic_of(r.headers["authorization"]) for r in tokens.requests]
    assert fetches == [f"alice:{PASSWORD}", f"alice:{PASSWORD}", "alice:rotated"]
    assert [r.status for r in tokens.requests] == [200, 401, 200]


def test_token_server_refusing_renewed_credentials_is_a_failure(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, fake, tokens = token_rig()
    helper = Helper()
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.users["alice"] = "rotated"
    helper.secret = "still-wrong"
    tokens.revoke()

    with pytest.raises(RegistryAuthError, match="credentials rejected"):
        client.blob_exists(REPO, BLOB)

    assert helper.runs == 2
    assert [r.status for r in tokens.requests] == [200, 401, 401]
    assert [r.status for r in fake.calls("HEAD")] == [404, 401]


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_credentials_resolved_for_the_refused_request_are_not_resolved_again(
    clients: Callable[..., RegistryClient], tmp_path: Path, kind: str
) -> None:
    """A fresh start (daemon or CLI) with wrong credentials: one helper run, one refusal."""
    if kind == "basic":
        network, seen = basic_registry({"alice": PASSWORD})
    else:
        network, _fake, tokens = token_rig()
    helper = Helper(secret="wrong")

    with pytest.raises(RegistryAuthError, match="credentials rejected"):
        clients(network, credentials=helper_source(tmp_path, helper)).blob_exists(REPO, BLOB)

    assert helper.runs == 1
    if kind == "basic":
        assert len([r for r in seen if r.method == "HEAD"]) == 1
    else:
        assert [r.status for r in tokens.requests] == [401]


def test_rotated_identity_token_from_the_helper(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, _fake, tokens = token_rig()
    helper = Helper("<token>", REFRESH)
    client = clients(network, credentials=helper_source(tmp_path, helper))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.refresh_tokens = {"refresh-2": "alice"}
    helper.secret = "refresh-2"
    tokens.revoke()

    assert client.blob_exists(REPO, BLOB) is False

    assert [r.method for r in tokens.requests] == ["POST", "POST", "POST"]
    assert [r.status for r in tokens.requests] == [200, 401, 200]
    assert helper.runs == 2


def test_rotated_registry_token_in_docker_config_is_read_again(
    clients: Callable[..., RegistryClient], tmp_path: Path
) -> None:
    network, fake, tokens = token_rig()
    tokens.tokens["ready-1"] = (PUSH,)
    config = tmp_path / ".docker/config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {HOST: {"registrytoken": "ready-1"}}}))
    store = CredentialStore({}, tmp_path, runner=no_helpers)
    client = clients(network, credentials=CredentialSource(lambda: store.lookup(HOST)))
    assert client.blob_exists(REPO, BLOB) is False
    tokens.revoke()
    tokens.tokens["ready-2"] = (PUSH,)
    config.write_text(json.dumps({"auths": {HOST: {"registrytoken": "ready-2"}}}))

    assert client.blob_exists(REPO, BLOB) is False

    sent = [r.headers["authorization"] for r in fake.calls("HEAD")]
    assert sent == ["Bearer ready-1", "Bearer ready-1", "Bearer ready-2"]
    assert tokens.requests == []


def no_helpers(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"no helper should run, ran {list(argv)}")


def test_token_refreshed_by_the_clock_does_not_resolve_credentials_again(
    token_http: TokenHttp,
) -> None:
    tokens = FakeTokenServer(users={"alice": PASSWORD})
    runs: list[int] = []

    def resolve() -> Credentials:
        runs.append(1)
        return Credentials("alice", PASSWORD)

    clock = Clock(1000.0)
    auth = Authenticator(
        token_http(tokens),
        HOST,
        CredentialSource(resolve),
        basic_allowed=lambda url: True,
        clock=clock,
    )
    auth.learn(httpx.Response(401, headers={"WWW-Authenticate": tokens.challenge()}))
    url = httpx.URL(f"https://{HOST}/")

    first = auth.authorization(RequestAuth((PUSH,)), url)
    clock.now += 3600
    second = auth.authorization(RequestAuth((PUSH,)), url)

    assert first != second
    assert len(tokens.requests) == 2
    assert len(runs) == 1


# ---- secrets stay secret ---------------------------------------------------------------------


def _fail_token_rejected(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    tokens.users["alice"] = "changed"
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


def _fail_refresh_rejected(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    tokens.refresh_tokens.clear()
    clients(network, credentials=Credentials(identity_token=REFRESH)).blob_exists(REPO, BLOB)


def _fail_registry_rejects(clients: Callable[..., RegistryClient]) -> None:
    network, fake, tokens = token_rig()
    fake.hooks.append(
        lambda r: (
            error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": tokens.challenge()})
            if r.method == "HEAD"
            else None
        )
    )
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


def _fail_basic_rejected(clients: Callable[..., RegistryClient]) -> None:
    network, _ = basic_registry({"alice": "other"})
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


def _fail_renewed_still_rejected(clients: Callable[..., RegistryClient]) -> None:
    network, _ = basic_registry({"alice": "other"})
    answers = iter([Credentials("alice", PASSWORD), Credentials("alice", PASSWORD + "-rotated")])
    source = CredentialSource(lambda: next(answers))
    clients(network, credentials=source).blob_exists(REPO, BLOB)


def _fail_plain_http_realm(clients: Callable[..., RegistryClient]) -> None:
    tokens = FakeTokenServer("auth.test", scheme="http", users={"alice": PASSWORD})
    network = Network(FakeRegistry(HOST, auth=tokens), tokens)
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


def _fail_token_server_down(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    del network.servers[tokens.host]
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


def _fail_token_server_500(clients: Callable[..., RegistryClient]) -> None:
    network, _fake, tokens = token_rig()
    network.route(tokens.host, lambda r: httpx.Response(500, text=f"echo {r.headers}"))
    clients(network, credentials=Credentials("alice", PASSWORD)).blob_exists(REPO, BLOB)


@pytest.mark.parametrize(
    "scenario",
    [
        _fail_token_rejected,
        _fail_refresh_rejected,
        _fail_registry_rejects,
        _fail_basic_rejected,
        _fail_renewed_still_rejected,
        _fail_plain_http_realm,
        _fail_token_server_down,
        _fail_token_server_500,
    ],
)
def test_credentials_never_appear_in_errors_or_logs(
    clients: Callable[..., RegistryClient],
    caplog: pytest.LogCaptureFixture,
    scenario: Callable[[Callable[..., RegistryClient]], None],
) -> None:
    secrets = [
        PASSWORD,
        REFRESH,
        base64.b64encode(f"alice:{PASSWORD}".encode()).decode(),
    ]
    with caplog.at_level(logging.DEBUG), pytest.raises(RegistryError) as caught:
        scenario(clients)

    texts = [str(caught.value), repr(caught.value), caplog.text]
    texts += [str(record.args) for record in caplog.records]
    seen: BaseException | None = caught.value
    while seen is not None:
        texts.append(str(seen))
        seen = seen.__cause__
    for secret in secrets:
        for text in texts:
            assert secret not in text


def test_credentials_repr_hides_secrets() -> None:
    creds = Credentials("alice", PASSWORD, identity_token=REFRESH, registry_token="tok-xyz")

    assert "alice" in repr(creds)
    for secret in (PASSWORD, REFRESH, "tok-xyz"):
        assert secret not in repr(creds)
        assert secret not in str(creds)
