"""An in-memory fake registry and token server behind an httpx transport.

The e2e tests push to a real CNCF distribution registry; this fake exists for the protocol
edge cases a real registry can't be made to produce on demand: a PATCH broken midway after the
registry kept part of it, 416s and 413s, ``Range`` headers in every dialect, ECR's 201 on PATCH,
registries that refuse chunks, mount outcomes, expiring tokens.

Request bodies are consumed as streams (see :class:`StreamingMockTransport`), hashed on the fly
and never stored, so a 64 MiB upload does not sit in memory, and the closing PUT is checked
against the digest of everything the session received, as a real registry does.

Usage::

    fake = FakeRegistry("registry.test")
    network = Network(fake)
    client = RegistryClient("registry.test", transport=network.transport(), ...)

Quirks are plain attributes, set before or during a test (see :class:`FakeRegistry`);
``hooks`` take a request and may answer it instead of the fake.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from imagepushd.push.registry.client import HostSettings, RegistryClient
from imagepushd.push.registry.credentials import Credentials
from imagepushd.push.registry.retry import Retrier, RetryPolicy
from tests.support.images import sha256_digest

OCTET_STREAM = "application/octet-stream"

Hook = Callable[[httpx.Request], "httpx.Response | None"]
Server = Callable[[httpx.Request], httpx.Response]


class StreamingMockTransport(httpx.MockTransport):
    """``httpx.MockTransport`` whose handler consumes the request body itself.

    ``MockTransport`` reads the whole body before calling its handler. This one does not, so a
    handler sees the body as the client streams it: it can break the connection midway, answer
    before reading, and memory stays bounded whatever the body's size.
    """

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.handler(request)
        assert isinstance(response, httpx.Response)
        return response


def error(
    status: int, code: str, message: str = "", headers: dict[str, str] | None = None
) -> httpx.Response:
    """A registry error response with an OCI ``errors`` body."""
    body = {"errors": [{"code": code, "message": message or code.lower().replace("_", " ")}]}
    return httpx.Response(status, json=body, headers=headers)


@dataclass
class Recorded:
    """One request as the fake saw it, and how it ended."""

    method: str
    url: httpx.URL
    headers: httpx.Headers
    received: int = 0  # body bytes the fake read
    status: int | None = None  # None: the handler raised (broken connection, aborted body)
    response_headers: httpx.Headers = field(default_factory=httpx.Headers)

    @property
    def completed(self) -> bool:
        return self.status is not None

    @property
    def location(self) -> httpx.URL | None:
        """The response's Location, resolved against this request's URL."""
        value = self.response_headers.get("location")
        return self.url.join(value) if value else None


class Network:
    """Routes requests by ``host[:port]`` to fake servers; unknown hosts refuse to connect."""

    def __init__(self, *servers: Any) -> None:
        self.servers: dict[str, Server] = {}
        self.log: list[httpx.Request] = []
        for server in servers:
            self.route(server.host, server)

    def route(self, host: str, server: Server) -> None:
        self.servers[host] = server

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.log.append(request)
        server = self.servers.get(request.url.netloc.decode())
        if server is None:
            raise httpx.ConnectError(f"connection refused: {request.url.netloc.decode()}")
        return server(request)

    def transport(self) -> StreamingMockTransport:
        return StreamingMockTransport(self)


def _read_form(request: httpx.Request) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(request.read().decode(), keep_blank_values=True))


class FakeTokenServer:
    """A Docker token server: GET with optional Basic auth, POST with an OAuth2 form.

    Known users get every action they ask for; anonymous requests get ``pull`` only. Scopes
    naming a repository in ``deny_repos`` make the whole request fail with 401 (Docker Hub does
    that when a mount source does not exist).
    """

    def __init__(
        self,
        host: str = "auth.test",
        *,
        scheme: str = "https",
        service: str = "registry.test",
        users: dict[str, str] | None = None,
        refresh_tokens: dict[str, str] | None = None,
        expires_in: Any = 300,
        token_field: str = "token",
    ) -> None:
        self.host = host
        self.realm = f"{scheme}://{host}/token"
        self.service = service
        self.users = dict(users or {})
        self.refresh_tokens = dict(refresh_tokens or {})
        self.expires_in = expires_in
        self.token_field = token_field
        self.deny_repos: set[str] = set()
        self.post_status: int | None = None  # answer POSTs with this status instead
        self.tokens: dict[str, tuple[str, ...]] = {}
        self.requests: list[Recorded] = []
        self.grants: list[tuple[str | None, tuple[str, ...]]] = []
        self._serial = itertools.count(1)

    def challenge(self, scope: str = "", error_code: str = "") -> str:
        value = f'Bearer realm="{self.realm}",service="{self.service}"'
        if scope:
            value += f',scope="{scope}"'
        if error_code:
            value += f',error="{error_code}"'
        return value

    def revoke(self) -> None:
        """Forget every token issued so far (they expired, or the server restarted)."""
        self.tokens.clear()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        rec = Recorded(request.method, request.url, httpx.Headers(request.headers))
        self.requests.append(rec)
        response = self._handle(request)
        rec.status = response.status_code
        return response

    def _handle(self, request: httpx.Request) -> httpx.Response:
        user: str | None = None
        if request.method == "POST":
            if self.post_status is not None:
                return httpx.Response(self.post_status)
            form = _read_form(request)
            if form.get("grant_type") == "refresh_token":
                user = self.refresh_tokens.get(form.get("refresh_token", ""))
            elif form.get("grant_type") == "password" and self.users.get(
                form.get("username", "")
            ) == form.get("password"):
                user = form["username"]
            if user is None:
                return httpx.Response(401, json={"details": "invalid grant"})
            scopes = tuple(form.get("scope", "").split())
        elif request.method == "GET":
            header = request.headers.get("authorization", "")
            if header.startswith("Basic "):
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                if self.users.get(name) != password:
                    return httpx.Response(401, json={"details": "incorrect username or password"})
                user = name
            scopes = tuple(request.url.params.get_list("scope"))
        else:
            return httpx.Response(405)
        for scope in scopes:
            if _scope_resource(scope)[1] in self.deny_repos:
                return httpx.Response(401, json={"details": "access to the resource is denied"})
        granted = tuple(
            scope if user is not None else _restrict(scope, {"pull"}) for scope in scopes
        )
        token = f"token-{next(self._serial)}"
        self.tokens[token] = granted
        self.grants.append((user, granted))
        body: dict[str, Any] = {self.token_field: token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)

    def scopes_of(self, authorization: str | None) -> tuple[str, ...] | None:
        """The scopes of a valid ``Bearer`` token, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        return self.tokens.get(authorization[7:])


def _scope_resource(scope: str) -> tuple[str, str, set[str]]:
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, {a for a in actions.split(",") if a}


def _restrict(scope: str, allowed: set[str]) -> str:
    kind, name, actions = _scope_resource(scope)
    return f"{kind}:{name}:{','.join(sorted(actions & allowed))}"


def _covers(granted: Iterable[str], needed: str) -> bool:
    kind, name, actions = _scope_resource(needed)
    have: set[str] = set()
    for scope in granted:
        g_kind, g_name, g_actions = _scope_resource(scope)
        if (g_kind, g_name) == (kind, name):
            have |= g_actions
    return actions <= have


@dataclass
class Session:
    """An upload session: what it received so far (hashed, not kept)."""

    uuid: str
    repository: str
    hasher: Any = field(default_factory=hashlib.sha256)
    size: int = 0
    before: int = 0  # size before the last PATCH
    invalid: bool = False  # distribution 2.8 after a cut: every request is refused

    def append(self, data: bytes) -> None:
        self.hasher.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + str(self.hasher.hexdigest())


def _default_range(session: Session) -> str | None:
    return f"0-{session.size - 1}" if session.size else "0-0"


_UPLOAD = re.compile(r"/v2/(?P<repo>.+)/blobs/uploads/(?P<uuid>[^/]*)")
_BLOB = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>[^/]+)")


class FakeRegistry:
    """A registry that keeps blob digests and sizes (never bytes) per repository.

    It behaves like CNCF distribution unless told otherwise: ``Location`` carries a ``_state``
    with the session's offset and a PATCH or PUT with a stale one gets 416; a PATCH must carry a
    ``Content-Range`` starting where the session stands and a ``Content-Length`` matching both the
    range and the body; chunked transfer encoding is refused (ACR); the closing PUT is checked
    against the digest of everything the session received (400 ``DIGEST_INVALID`` cancels it).

    Quirks (attributes):

    - ``location_style``: ``"path"`` (``/v2/...``), ``"relative"`` (``<uuid>?_state=...``,
      relative to the request URL), or ``"absolute"`` (``https://host/v2/...``);
    - ``patch_status``: the status of an accepted PATCH (ECR: 201);
    - ``patch_range`` / ``status_range``: ``Range`` of a PATCH answer / of GET status, from the
      session (None: no header);
    - ``chunk_min_length``: ``OCI-Chunk-Min-Length`` on the POST answer;
    - ``max_chunk`` and ``max_chunk_status``: a PATCH with ``Content-Range`` above that size is
      refused (GHCR answers 416);
    - ``max_body``: any PATCH or PUT body above that size gets 413 (a proxy limit);
    - ``chunked`` and ``refuse_chunked_status``: False refuses any ``Content-Range`` PATCH;
    - ``breaks``: for each next PATCH or PUT with a body, None or the number of its bytes to keep
      before the connection breaks with ``break_error``;
    - ``on_break``: what the session makes of those bytes: ``"keep"`` (distribution 3.x: they
      count, GET status reports them), ``"drop"`` (discarded: the session stays at its last
      acknowledged size), ``"invalidate"`` (distribution 2.8: kept on disk but out of step with
      the signed state, so every later request on the session gets 404 BLOB_UPLOAD_INVALID);
    - ``mount_status``: answer mount attempts with this error status;
    - ``auth``: a :class:`FakeTokenServer` whose tokens are required (Bearer);
    - ``hooks``: called with each request first; a response they return is the answer.
    """

    def __init__(
        self,
        host: str = "registry.test",
        *,
        auth: FakeTokenServer | None = None,
    ) -> None:
        self.host = host
        self.auth = auth
        self.repos: dict[str, dict[str, int]] = {}
        self.sessions: dict[str, Session] = {}
        self.session_ids: list[str] = []
        self.requests: list[Recorded] = []
        self.hooks: list[Hook] = []
        self.location_style = "path"
        self.patch_status = 202
        self.patch_range: Callable[[Session], str | None] = _default_range
        self.status_range: Callable[[Session], str | None] = _default_range
        self.chunk_min_length: int | None = None
        self.max_chunk: int | None = None
        self.max_chunk_status = 416
        self.max_body: int | None = None
        self.chunked = True
        self.refuse_chunked_status = 405
        self.breaks: list[int | None] = []
        self.break_error: type[httpx.TransportError] = httpx.ReadError
        self.on_break = "keep"
        self.mount_status: int | None = None
        self.ping_headers: dict[str, str] = {}
        self._serial = itertools.count(1)

    # ---- test-side helpers -------------------------------------------------------------

    def add_blob(self, repository: str, data: bytes) -> str:
        digest = sha256_digest(data)
        self.repos.setdefault(repository, {})[digest] = len(data)
        return digest

    def has_blob(self, repository: str, digest: str) -> bool:
        return digest in self.repos.get(repository, {})

    def calls(self, method: str | None = None) -> list[Recorded]:
        """Requests to upload sessions and blobs (not ``/v2/``), optionally of one method."""
        return [
            r
            for r in self.requests
            if r.url.path != "/v2/" and (method is None or r.method == method)
        ]

    def patches(self) -> list[Recorded]:
        return self.calls("PATCH")

    def closing_puts(self, digest: str) -> list[Recorded]:
        """PUTs carrying ``digest`` whose body the fake received in full and answered."""
        return [
            r for r in self.calls("PUT") if r.url.params.get("digest") == digest and r.completed
        ]

    # ---- the server --------------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        rec = Recorded(request.method, request.url, httpx.Headers(request.headers))
        self.requests.append(rec)
        response = self._handle(request, rec)
        rec.status = response.status_code
        rec.response_headers = httpx.Headers(response.headers)
        return response

    def _handle(self, request: httpx.Request, rec: Recorded) -> httpx.Response:
        for hook in list(self.hooks):
            answer = hook(request)
            if answer is not None:
                return answer
        path = request.url.path
        if path == "/v2/":
            return self.denied(request, ()) or httpx.Response(
                200, json={}, headers=self.ping_headers
            )
        upload = _UPLOAD.fullmatch(path)
        if upload is not None:
            repo, uuid = upload["repo"], upload["uuid"]
            if request.method == "POST" and not uuid:
                return self.post(request, repo)
            denied = self.denied(request, (f"repository:{repo}:pull,push",))
            if denied is not None:
                return denied
            session = self.sessions.get(uuid)
            if session is None or session.repository != repo:
                return error(404, "BLOB_UPLOAD_UNKNOWN")
            if session.invalid:
                return error(404, "BLOB_UPLOAD_INVALID")
            if request.method == "PATCH":
                return self._patch(request, rec, session)
            if request.method == "PUT":
                return self._put(request, rec, session)
            if request.method == "GET":
                return self._status(request, session)
            if request.method == "DELETE":
                del self.sessions[uuid]
                return httpx.Response(204)
            return error(405, "UNSUPPORTED")
        blob = _BLOB.fullmatch(path)
        if blob is not None and request.method in ("HEAD", "GET"):
            repo, digest = blob["repo"], blob["digest"]
            denied = self.denied(request, (f"repository:{repo}:pull",))
            if denied is not None:
                return denied
            size = self.repos.get(repo, {}).get(digest)
            if size is None:
                if request.method == "HEAD":
                    return httpx.Response(404)
                return error(404, "BLOB_UNKNOWN")
            return httpx.Response(
                200,
                headers={"Content-Length": str(size), "Docker-Content-Digest": digest},
            )
        return error(404, "NOT_FOUND", f"no route for {request.method} {path}")

    def denied(self, request: httpx.Request, needed: tuple[str, ...]) -> httpx.Response | None:
        if self.auth is None:
            return None
        granted = self.auth.scopes_of(request.headers.get("authorization"))
        if granted is not None and all(_covers(granted, scope) for scope in needed):
            return None
        challenge = self.auth.challenge(
            " ".join(needed), "insufficient_scope" if granted is not None else ""
        )
        return error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": challenge})

    def _location(self, request: httpx.Request, session: Session) -> str:
        query = f"_state={session.uuid}.{session.size}"
        if self.location_style == "relative":
            return f"{session.uuid}?{query}"
        path = f"/v2/{session.repository}/blobs/uploads/{session.uuid}?{query}"
        if self.location_style == "absolute":
            return f"{request.url.scheme}://{self.host}{path}"
        return path

    def _session_headers(self, request: httpx.Request, session: Session) -> dict[str, str]:
        return {"Location": self._location(request, session), "Docker-Upload-UUID": session.uuid}

    def _stale(self, request: httpx.Request, session: Session) -> bool:
        return bool(request.url.params.get("_state") != f"{session.uuid}.{session.size}")

    def post(self, request: httpx.Request, repo: str) -> httpx.Response:
        mount, source = request.url.params.get("mount"), request.url.params.get("from")
        needed = [f"repository:{repo}:pull,push"]
        if mount and source:
            needed.append(f"repository:{source}:pull")
        denied = self.denied(request, tuple(needed))
        if denied is not None:
            return denied
        if mount and source:
            if self.mount_status == 401:
                return error(401, "UNAUTHORIZED", headers={"WWW-Authenticate": 'Basic realm="x"'})
            if self.mount_status is not None:
                return error(self.mount_status, "DENIED", "mount refused")
            if self.has_blob(source, mount):
                self.repos.setdefault(repo, {})[mount] = self.repos[source][mount]
                return httpx.Response(
                    201,
                    headers={
                        "Location": f"/v2/{repo}/blobs/{mount}",
                        "Docker-Content-Digest": mount,
                    },
                )
        uuid = f"u{next(self._serial)}"
        session = Session(uuid, repo)
        self.sessions[uuid] = session
        self.session_ids.append(uuid)
        headers = self._session_headers(request, session) | {"Range": "0-0"}
        if self.chunk_min_length is not None:
            headers["OCI-Chunk-Min-Length"] = str(self.chunk_min_length)
        return httpx.Response(202, headers=headers)

    def _body_problem(self, request: httpx.Request) -> httpx.Response | None:
        content_type = request.headers.get("content-type")
        if content_type not in (None, OCTET_STREAM):
            return error(400, "BLOB_UPLOAD_INVALID", f"content type {content_type}")
        if "transfer-encoding" in request.headers:
            return error(400, "BLOB_UPLOAD_INVALID", "chunked transfer encoding")
        if "content-length" not in request.headers:
            return error(411, "SIZE_INVALID", "Content-Length required")
        length = int(request.headers["content-length"])
        if self.max_body is not None and length > self.max_body:
            return httpx.Response(413, text="request entity too large")
        return None

    def _receive(self, request: httpx.Request, rec: Recorded, session: Session) -> int:
        """Read the body into the session; maybe break the connection midway."""
        keep = self.breaks.pop(0) if self.breaks else None
        received = 0
        stream = request.stream
        assert isinstance(stream, Iterable)
        acknowledged = (session.hasher.copy(), session.size)
        for piece in stream:
            if keep is not None and received + len(piece) >= keep:
                part = piece[: keep - received]
                session.append(part)
                rec.received += len(part)
                if self.on_break == "drop":
                    session.hasher, session.size = acknowledged
                elif self.on_break == "invalidate":
                    session.invalid = True
                raise self.break_error(f"connection reset after {keep} body bytes")
            session.append(piece)
            received += len(piece)
            rec.received += len(piece)
        return received

    def _patch(self, request: httpx.Request, rec: Recorded, session: Session) -> httpx.Response:
        problem = self._body_problem(request)
        if problem is not None:
            return problem
        length = int(request.headers["content-length"])
        content_range = request.headers.get("content-range")
        if content_range is not None:
            if not self.chunked:
                return error(self.refuse_chunked_status, "UNSUPPORTED", "chunked upload")
            if self.max_chunk is not None and length > self.max_chunk:
                return error(self.max_chunk_status, "RANGE_INVALID", "chunk too large")
            match = re.fullmatch(r"(\d+)-(\d+)", content_range)
            if match is None:
                return error(400, "RANGE_INVALID", f"bad Content-Range {content_range!r}")
            start, end = int(match[1]), int(match[2])
            if start != session.size or end < start or self._stale(request, session):
                return error(416, "RANGE_INVALID")
            if end - start + 1 != length:
                return error(400, "SIZE_INVALID", "Content-Range and Content-Length differ")
        elif self._stale(request, session):
            return error(416, "RANGE_INVALID")
        session.before = session.size
        received = self._receive(request, rec, session)
        if received != length:
            return error(400, "SIZE_INVALID", f"received {received} of {length}")
        headers = self._session_headers(request, session)
        value = self.patch_range(session)
        if value is not None:
            headers["Range"] = value
        return httpx.Response(self.patch_status, headers=headers)

    def _put(self, request: httpx.Request, rec: Recorded, session: Session) -> httpx.Response:
        problem = self._body_problem(request)
        if problem is not None:
            return problem
        if self._stale(request, session):
            return error(416, "RANGE_INVALID")
        length = int(request.headers["content-length"])
        received = self._receive(request, rec, session) if length else 0
        if received != length:
            return error(400, "SIZE_INVALID", f"received {received} of {length}")
        digest = request.url.params.get("digest")
        if digest != session.digest:
            del self.sessions[session.uuid]
            return error(400, "DIGEST_INVALID", f"{digest} does not match the content")
        del self.sessions[session.uuid]
        self.repos.setdefault(session.repository, {})[digest] = session.size
        return httpx.Response(
            201,
            headers={
                "Location": f"/v2/{session.repository}/blobs/{digest}",
                "Docker-Content-Digest": digest,
            },
        )

    def _status(self, request: httpx.Request, session: Session) -> httpx.Response:
        headers = self._session_headers(request, session)
        value = self.status_range(session)
        if value is not None:
            headers["Range"] = value
        return httpx.Response(204, headers=headers)


def make_client(
    network: Network,
    host: str = "registry.test",
    *,
    sleeps: list[float] | None = None,
    credentials: Credentials | None = None,
    plain_http: bool = False,
    policy: RetryPolicy | None = None,
) -> RegistryClient:
    """A client for ``host`` on ``network``: no real sleeps, mid-range jitter, no certs.d."""
    recorded = sleeps if sleeps is not None else []
    return RegistryClient(
        host,
        settings=HostSettings(plain_http=plain_http, certs_dirs=()),
        credentials=credentials,
        retrier=Retrier(policy, sleep=recorded.append, rand=lambda: 0.5),
        transport=network.transport(),
    )
