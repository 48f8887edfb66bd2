"""Big registries' documented habits, reproduced in front of the real docker-registry 2.8.

:class:`ProfileProxy` is a reverse proxy (plain HTTP on 127.0.0.1) to a real distribution 2.8
registry, which stays the reference: a :class:`Profile` only changes what a named registry is
documented to answer differently, answering a request itself (:meth:`Habit.before`) or
rewriting the registry's answer (:meth:`Habit.after`).
Each habit's docstring names its source; docs/registries.md has the whole table.

Two parts of the proxy stand in for services distribution 2.8 lacks:

- the OCI 1.1 referrers API (``Profile.referrers_api``): manifests with a ``subject`` that go
  through the proxy are listed at ``/v2/<repo>/referrers/<digest>``, as registries that have
  the API list them;
- a storage host (``StorageRedirect``): blobs answered with a 307 to a second listener on
  ``localhost`` (another host name than ``127.0.0.1``, so credentials must not follow), which
  serves them from the registry with its own credentials and, as S3 does for a presigned URL,
  refuses a request that carries an ``Authorization`` header too.

Requests are recorded (:attr:`ProfileProxy.records`), with the habits that answered or
rewrote them.
Request bodies are streamed to the registry in 64 KiB pieces; answers are read whole (the
client under test reads manifests and small error bodies from here; skopeo verifies against
the registry itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, quote

PIECE = 64 << 10
MiB = 1 << 20
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: distribution 2.8 hides an OCI index from a HEAD whose Accept does not name it.
MANIFEST_TYPES = ", ".join(
    (
        OCI_INDEX,
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
)
_REPO = re.compile(r"^/v2/(?P<repo>.+?)/(?P<kind>blobs/uploads|blobs|manifests|tags|referrers)")
_MANIFEST = re.compile(r"^/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)$")
_REFERRERS = re.compile(r"^/v2/(?P<repo>.+)/referrers/(?P<digest>[^/]+)$")
_BLOB = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")


@dataclass
class Answer:
    """An HTTP answer: status, headers (name → value, case kept), body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def set_header(self, name: str, value: str | None) -> None:
        for key in [k for k in self.headers if k.lower() == name.lower()]:
            del self.headers[key]
        if value is not None:
            self.headers[name] = value


#: Not an answer: the connection is closed without one.
HANG_UP = Answer(0)


def oci_error(status: int, code: str, message: str, **headers: str) -> Answer:
    """An answer with the OCI ``errors`` JSON body."""
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    return Answer(status, {"Content-Type": "application/json", **headers}, body)


@dataclass
class Exchange:
    """One request as the proxy saw it (the body is streamed separately)."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]

    @property
    def params(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.query).items()}

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    @property
    def repository(self) -> str | None:
        found = _REPO.match(self.path)
        return found["repo"] if found else None

    @property
    def length(self) -> int:
        return int(self.header("content-length") or 0)


@dataclass(frozen=True)
class Record:
    """One request and what the client got."""

    method: str
    path: str
    query: str
    status: int
    #: The habits that answered or rewrote it (class names), in order.
    habits: tuple[str, ...]
    authorization: bool


class Habit:
    """One documented difference from distribution 2.8. Subclasses cite their source."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        """Answer ``ex`` without asking the registry, or None to forward it."""
        return None

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        """A changed registry answer, or None to keep it."""
        return None


# ---------------------------------------------------------------------- the habits


@dataclass
class PlainTextRateLimit(Habit):
    """Docker Hub's overall (anti-abuse) limit: a 429 whose body is only the text "Too Many
    Requests (HAP429)" (docker/hub-feedback#1907), here for the first ``times`` HEADs or GETs
    of manifests. (The pull limit answers the OCI JSON ``TOOMANYREQUESTS`` instead,
    apache/incubator-kie-kogito-runtimes#2854; ``Retry-After`` is documented only for the Hub
    API, docker/docs#22916, so none is sent.)"""

    times: int = 1
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if ex.method not in ("HEAD", "GET") or _MANIFEST.match(ex.path) is None:
            return None
        with self.lock:
            self.seen += 1
            if self.seen > self.times:
                return None
        return Answer(429, {"Content-Type": "text/plain"}, b"Too Many Requests (HAP429).\n")


class MountNeedsSourcePull(Habit):
    """Docker Hub: a cross-repository mount needs ``pull`` on the source in the same token
    (oras-project/rust-oci-client#235), and a source nobody pushed to is not granted (the
    protocol notes: "401 from Docker Hub's token step when the source repo is missing"):
    401 with an ``insufficient_scope`` challenge."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        source = _mount_source(ex)
        if source is None or ex.header("authorization") is None:
            return None
        granted = _token_access(ex.header("authorization") or "")
        if source in proxy.repositories and "pull" in granted.get(source, ()):
            return None
        challenge = proxy.challenge(
            f"repository:{source}:pull repository:{ex.repository}:pull,push", "insufficient_scope"
        )
        return oci_error(
            401, "UNAUTHORIZED", "authentication required", **{"WWW-Authenticate": challenge}
        )


class MountFromMissingProject(Habit):
    """Harbor: a mount whose source project does not exist gets 401 ``UNAUTHORIZED: project X
    not found`` instead of a 202 upload session (goharbor/harbor#17097). Projects are the
    first path components of repositories pushed to through this proxy."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        source = _mount_source(ex)
        if source is None:
            return None
        project = source.split("/", 1)[0]
        if any(r.split("/", 1)[0] == project for r in proxy.repositories):
            return None
        message = f"project {project} not found: project {project} not found"
        challenge = proxy.challenge(f"repository:{source}:pull")
        return oci_error(401, "UNAUTHORIZED", message, **{"WWW-Authenticate": challenge})


class CsrfCookie(Habit):
    """Harbor sets a CSRF cookie on its answers and refuses a write that sends a session cookie
    back without the matching token: 403 FORBIDDEN "CSRF token invalid" (goharbor/harbor#11682,
    openai/tart#295; clients stopped keeping cookies, dotnet/sdk#37221)."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if ex.method in ("GET", "HEAD") or "__csrf=" not in (ex.header("cookie") or ""):
            return None
        return oci_error(403, "FORBIDDEN", "CSRF token invalid")

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        # Harbor marks it Secure; not here, where the proxy speaks plain HTTP.
        answer.set_header("Set-Cookie", "__csrf=c2lnbmVk; Path=/; SameSite=Strict")
        return answer


@dataclass
class ChunkTooLarge(Habit):
    """GHCR: a PATCH body over 4 MiB gets 416 "the request body is too large and exceeds the
    maximum permissible limit of 4.00MiB" (ocx-sh/ocx#237)."""

    limit: int = 4 * MiB

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if ex.method != "PATCH" or ex.length <= self.limit:
            return None
        return oci_error(
            416,
            "REQUESTED_RANGE_NOT_SATISFIABLE",
            "the request body is too large and exceeds the maximum permissible limit of 4.00MiB",
        )


@dataclass
class NoReferrersApi(Habit):
    """A registry without the referrers API, answering its own way (see the profiles)."""

    answer: Callable[[Exchange], Answer]

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        return self.answer(ex) if _REFERRERS.match(ex.path) else None


class Patch201(Habit):
    """ECR answers a PATCH with 201 Created instead of 202 (jdx/mise#11376;
    aws/containers-roadmap#2831)."""

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        if ex.method == "PATCH" and answer.status == 202:
            answer.status = 201
            return answer
        return None


class StaleRange(Habit):
    """ECR: the ``Range`` of a PATCH answer does not advance past the chunk before
    (aws/containers-roadmap#2831). Only the header is reproduced: that report also has ECR
    discarding those chunks, which no client could survive."""

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        if ex.method != "PATCH" or answer.status not in (201, 202):
            return None
        start = int((ex.header("content-range") or "0-0").split("-", 1)[0] or 0)
        answer.set_header("Range", f"0-{max(start - 1, 0)}")
        return answer


@dataclass
class PartTooSmall(Habit):
    """ECR: "All layer parts except the last part should be at least 5MB"
    (LayerPartTooSmallException, dotnet/sdk-container-builds#424, #279), found when the upload
    is completed. The HTTP status and code are not documented: 400 BLOB_UPLOAD_INVALID here."""

    minimum: int = 5 * MiB
    parts: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if "/blobs/uploads/" not in ex.path or ex.path.endswith("/uploads/"):
            return None
        session = ex.path.rsplit("/", 1)[1]
        with self.lock:
            if ex.method == "PATCH":
                self.parts.setdefault(session, []).append(ex.length)
                return None
            if ex.method != "PUT":
                return None
            sizes = [size for size in [*self.parts.pop(session, []), ex.length] if size]
        if any(size < self.minimum for size in sizes[:-1]):
            message = "All layer parts except the last part should be at least 5MB"
            return oci_error(400, "BLOB_UPLOAD_INVALID", message)
        return None


@dataclass
class RepositoryMustExist(Habit):
    """ECR does not create repositories on push (unless a repository creation template applies
    for CREATE_ON_PUSH): its upload endpoint hangs up without an answer
    (aws/containers-roadmap#1970, open; dotnet/sdk-container-builds#279; moby/moby#24473),
    and other requests get 404 NAME_UNKNOWN "The repository with name 'X' does not exist in
    the registry with id 'N'" (plexsystems/sinker#55)."""

    created: set[str] = field(default_factory=set)
    create_on_push: bool = False
    account: str = "123456789012"

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        repository = ex.repository
        if repository is None or repository in self.created or self.create_on_push:
            return None
        if ex.method == "POST" and ex.path.endswith("/blobs/uploads/"):
            return HANG_UP
        message = (
            f"The repository with name '{repository}' does not exist in the registry with id "
            f"'{self.account}'"
        )
        return oci_error(404, "NAME_UNKNOWN", message)


class NoPatch(Habit):
    """Artifact Registry takes no PATCH: "Artifact Registry does not support Docker chunked
    uploads ... You must use monolithic uploads" (its Docker API reference, quoted in
    dotnet/sdk-container-builds#287); even a single streamed PATCH failed (skopeo#1101). The
    status is not documented: 405 UNSUPPORTED here."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if ex.method != "PATCH":
            return None
        return oci_error(405, "UNSUPPORTED", "chunked uploads are not supported")


@dataclass
class StrictUploads(Habit):
    """ACR: a ``Content-Range`` other than ``<start>-<end>`` is refused ("the Content-Range
    header format is invalid", dotnet/sdk-container-builds#258); a chunked transfer-encoded
    body is 400 CONTENT_LENGTH_INVALID and a monolithic PUT over about 20 MB is 413
    (goharbor/harbor#23016, #23015)."""

    put_limit: int = 20_000_000

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        if ex.method not in ("PATCH", "PUT") or "/blobs/uploads/" not in ex.path:
            return None
        if "chunked" in (ex.header("transfer-encoding") or "").lower():
            return oci_error(400, "CONTENT_LENGTH_INVALID", "Content-Length is required")
        content_range = ex.header("content-range")
        if content_range is not None and re.fullmatch(r"\d+-\d+", content_range) is None:
            body = {
                "errors": [
                    {
                        "code": "BLOB_UPLOAD_INVALID",
                        "message": "the Content-Range header format is invalid",
                        "detail": {"Range": content_range},
                    }
                ]
            }
            return Answer(400, {"Content-Type": "application/json"}, json.dumps(body).encode())
        if ex.method == "PUT" and ex.length > self.put_limit:
            return Answer(413, {"Content-Type": "text/html"}, b"<html>413 Too Large</html>")
        return None


class OffByOneStatus(Habit):
    """Quay's upload ``Range`` headers (quay/quay ``endpoints/v2/blob.py``, ``_render_range``):
    a new session says ``bytes=0--1``; GET status says ``bytes=0-<bytes held>``, one byte more
    than it holds (``byte_count + 1`` rendered as an inclusive end); PATCH answers are right."""

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        if "/blobs/uploads/" not in ex.path:
            return None
        if ex.method == "POST" and answer.status == 202:
            answer.set_header("Range", "bytes=0--1")
            return answer
        if ex.method == "GET" and answer.status == 204:
            held = int((answer.header("range") or "0-0").rsplit("-", 1)[1]) + 1
            answer.set_header("Range", f"bytes=0-{held}")
            return answer
        return None


class ForbiddenAbsentManifest(Habit):
    """Artifactory: 403 instead of 404 on a HEAD of an absent manifest (virtual repositories;
    google/go-containerregistry#1691, "first reported in 2017")."""

    def after(self, ex: Exchange, answer: Answer, proxy: ProfileProxy) -> Answer | None:
        if ex.method == "HEAD" and _MANIFEST.match(ex.path) and answer.status == 404:
            return Answer(403, {"Content-Type": "application/json"})
        return None


class DigestTagAlias(Habit):
    """GitLab reads the tag ``sha256-<hex>`` as the digest ``sha256:<hex>`` and serves the
    subject there (oras-project/oras-go#1396, #1403). Writes to it are rewritten the same
    way (not documented; distribution then refuses bytes of another digest)."""

    def rewrite(self, ex: Exchange) -> None:
        found = _MANIFEST.match(ex.path)
        if found and re.fullmatch(r"sha256-[0-9a-f]{64}", found["ref"]):
            ex.path = f"/v2/{found['repo']}/manifests/{found['ref'].replace('-', ':', 1)}"


@dataclass
class StorageRedirect(Habit):
    """Blob HEADs and GETs answered with a 307 to a storage host, as ECR does with S3 presigned
    URLs (open-policy-agent/opa#6728) and distribution with its redirecting storage drivers."""

    def before(self, ex: Exchange, proxy: ProfileProxy) -> Answer | None:
        found = _BLOB.match(ex.path)
        if ex.method not in ("HEAD", "GET") or found is None or proxy.storage is None:
            return None
        if proxy.upstream_request("HEAD", ex.path, proxy.auth_of(ex), None).status != 200:
            return None  # absent, or unauthorized: the registry answers that itself
        return Answer(307, {"Location": proxy.storage.url_for(found["repo"], found["digest"])})


# ---------------------------------------------------------------------- helpers


def _mount_source(ex: Exchange) -> str | None:
    if ex.method != "POST" or not ex.path.endswith("/blobs/uploads/"):
        return None
    params = ex.params
    return params.get("from") if "mount" in params else None


def _token_access(authorization: str) -> dict[str, set[str]]:
    """The ``access`` claim of a Bearer JWT (not verified: the registry does that)."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return {}
    access: dict[str, set[str]] = {}
    for item in claims.get("access", []):
        access.setdefault(item.get("name", ""), set()).update(item.get("actions", []))
    return access


def _referrer_entry(data: bytes) -> tuple[str, dict[str, Any]] | None:
    """(subject digest, index entry) of a manifest with a ``subject``, else None."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    if not isinstance(subject, dict) or "digest" not in subject:
        return None
    entry: dict[str, Any] = {
        "mediaType": doc.get("mediaType"),
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    artifact_type = doc.get("artifactType") or doc.get("config", {}).get("mediaType")
    if artifact_type:
        entry["artifactType"] = artifact_type
    if doc.get("annotations"):
        entry["annotations"] = doc["annotations"]
    return subject["digest"], entry


# ---------------------------------------------------------------------- profiles


@dataclass
class Profile:
    """A registry's habits; ``referrers_api`` emulates the API (``api_content_type`` is what
    its answer is labelled: Harbor says application/json, goharbor/harbor#19690)."""

    name: str
    habits: Sequence[Habit] = ()
    referrers_api: bool = False
    api_content_type: str = OCI_INDEX
    #: Quay answers 400 for a subject it does not hold (quay/quay#3071).
    api_unknown_subject: int | None = None


def _html_404(ex: Exchange) -> Answer:
    page = b"<!DOCTYPE html>\n<html><head><title>Not Found (404)</title></head><body></body></html>"
    return Answer(404, {"Content-Type": "text/html; charset=utf-8"}, page)


def _ghcr_303(ex: Exchange) -> Answer:
    # GHCR sends the referrers path to its web UI, cutting the digest at the colon
    # (artifacthub/hub#4785); that host is rate limited and unreachable from tests.
    where = quote(ex.path.removeprefix("/v2/").split(":", 1)[0], safe="")
    return Answer(303, {"Location": f"https://github.com/-/v2/packages/container/package/{where}"})


def profiles() -> dict[str, Callable[[], Profile]]:
    """Every profile by name, each a fresh factory (habits keep counters)."""
    return {
        "distribution": lambda: Profile("distribution"),
        "dockerhub": lambda: Profile("dockerhub", [PlainTextRateLimit(), MountNeedsSourcePull()]),
        "ghcr": lambda: Profile("ghcr", [ChunkTooLarge(), NoReferrersApi(_ghcr_303)]),
        "ecr": lambda: Profile(
            "ecr",
            [RepositoryMustExist(), PartTooSmall(), Patch201(), StaleRange(), StorageRedirect()],
            referrers_api=True,
        ),
        "gar": lambda: Profile("gar", [NoPatch()], referrers_api=True),
        "acr": lambda: Profile("acr", [StrictUploads()], referrers_api=True),
        "quay": lambda: Profile(
            "quay", [OffByOneStatus()], referrers_api=True, api_unknown_subject=400
        ),
        "harbor": lambda: Profile(
            "harbor",
            [MountFromMissingProject(), CsrfCookie()],
            referrers_api=True,
            api_content_type="application/json; charset=utf-8",
        ),
        "artifactory": lambda: Profile(
            "artifactory",
            [ForbiddenAbsentManifest(), NoReferrersApi(lambda ex: Answer(406))],
        ),
        "gitlab": lambda: Profile("gitlab", [DigestTagAlias(), NoReferrersApi(_html_404)]),
        "cdn": lambda: Profile("cdn", [StorageRedirect()]),
    }


# ---------------------------------------------------------------------- the proxy


class Storage:
    """The storage host blobs are redirected to: signed URLs, no second auth mechanism."""

    def __init__(self, proxy: ProfileProxy, auth: Callable[[str], Mapping[str, str]]) -> None:
        self._proxy = proxy
        self._auth = auth
        self._key = os.urandom(16)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _storage_handler(self))
        self.server.daemon_threads = True
        self.requests: list[tuple[str, str, bool]] = []

    @property
    def host(self) -> str:
        return f"localhost:{self.server.server_address[1]}"

    def _signature(self, repo: str, digest: str) -> str:
        return hmac.new(self._key, f"{repo}@{digest}".encode(), "sha256").hexdigest()

    def url_for(self, repo: str, digest: str) -> str:
        return f"http://{self.host}/{repo}/{digest}?X-Amz-Signature={self._signature(repo, digest)}"

    def serve(self, method: str, path: str, query: str, authorization: bool) -> Answer:
        self.requests.append((method, path, authorization))
        if authorization:
            # S3: "Only one auth mechanism allowed" (penpot/penpot#10776).
            body = (
                b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; "
                b"only the X-Amz-Algorithm query parameter, Signature query string parameter "
                b"or the Authorization header should be specified</Message></Error>"
            )
            return Answer(400, {"Content-Type": "application/xml"}, body)
        repo, _, digest = path.lstrip("/").rpartition("/")
        signature = parse_qs(query).get("X-Amz-Signature", [""])[0]
        if not hmac.compare_digest(signature, self._signature(repo, digest)):
            return Answer(
                403, {"Content-Type": "application/xml"}, b"<Error>SignatureDoesNotMatch</Error>"
            )
        answer = self._proxy.upstream_request(
            method, f"/v2/{repo}/blobs/{digest}", dict(self._auth(repo)), None
        )
        headers = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() in ("content-length", "content-type", "etag")
        }
        return Answer(answer.status, headers, answer.body)


def _storage_handler(storage: Storage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            path, _, query = self.path.partition("?")
            answer = storage.serve(
                self.command, path, query, self.headers.get("Authorization") is not None
            )
            _send(self, answer, self.command == "HEAD")

        do_GET = do_HEAD = _serve

    return Handler


def _send(handler: BaseHTTPRequestHandler, answer: Answer, head: bool) -> None:
    handler.send_response(answer.status)
    length_sent = False
    for name, value in answer.headers.items():
        if name.lower() in _HOP_BY_HOP or name.lower() == "transfer-encoding":
            continue
        if name.lower() == "content-length":
            if not head:
                continue
            length_sent = True
        handler.send_header(name, value)
    if not head:
        handler.send_header("Content-Length", str(len(answer.body)))
    elif not length_sent:
        handler.send_header("Content-Length", "0")
    handler.send_header("Connection", "close")
    handler.end_headers()
    if not head and answer.body:
        handler.wfile.write(answer.body)
    handler.close_connection = True


class ProfileProxy:
    """A reverse proxy to the registry at ``upstream`` (``host:port``) behaving as ``profile``.

    ``storage_auth(repo)`` gives the headers the storage host pulls a blob with (needed only
    by profiles with :class:`StorageRedirect`).
    """

    def __init__(
        self,
        upstream: str,
        profile: Profile,
        *,
        storage_auth: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self.upstream = upstream
        self.profile = profile
        self.records: list[Record] = []
        #: Repositories a manifest was pushed to through this proxy.
        self.repositories: set[str] = set()
        #: (repository, subject digest) → index entries of referrers pushed through here.
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._challenge: str | None = None
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(self))
        self.server.daemon_threads = True
        needs_storage = any(isinstance(h, StorageRedirect) for h in profile.habits)
        self.storage = Storage(self, storage_auth or (lambda repo: {})) if needs_storage else None
        self._threads: list[threading.Thread] = []
        #: Unexpected exceptions in handler threads (a test asserts it stays empty).
        self.errors: list[str] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Self:
        servers = [self.server] + ([self.storage.server] if self.storage else [])
        for server in servers:
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        servers = [self.server] + ([self.storage.server] if self.storage else [])
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- what habits ask

    def challenge(self, scope: str, error: str = "") -> str:
        """The registry's Bearer challenge (learned from its 401s) for ``scope``."""
        base = self._challenge or 'Bearer realm="unknown"'
        base = re.sub(r',?\s*(scope|error)="[^"]*"', "", base)
        return f'{base},scope="{scope}"' + (f',error="{error}"' if error else "")

    @staticmethod
    def auth_of(ex: Exchange) -> dict[str, str]:
        """The request's credentials, to ask the registry something in its name."""
        return {k: v for k, v in ex.headers.items() if k.lower() == "authorization"}

    def records_of(self, habit: type[Habit]) -> list[Record]:
        with self._lock:
            return [r for r in self.records if habit.__name__ in r.habits]

    # ---- the registry

    def upstream_request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Iterator[bytes] | None,
    ) -> Answer:
        host, _, port = self.upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        try:
            conn.request(method, target, body=body, headers={**headers, "Host": self.upstream})
            response = conn.getresponse()
            data = response.read()
            answer = Answer(response.status, {k: v for k, v in response.getheaders()}, data)
        finally:
            conn.close()
        if answer.status == 401 and answer.header("www-authenticate"):
            self._challenge = answer.header("www-authenticate")
        location = answer.header("location")
        if location and location.startswith(f"http://{self.upstream}"):
            answer.set_header("Location", f"http://{self.host}{location[len(self.upstream) + 7 :]}")
        return answer

    def handle(self, ex: Exchange, body: Iterator[bytes]) -> Answer:
        profile = self.profile
        for habit in profile.habits:
            if isinstance(habit, DigestTagAlias):
                habit.rewrite(ex)
        answered_by: list[str] = []
        answer: Answer | None = None
        for habit in profile.habits:
            answer = habit.before(ex, self)
            if answer is not None:
                answered_by.append(type(habit).__name__)
                break
        if answer is None and profile.referrers_api and _REFERRERS.match(ex.path):
            answer = self._referrers(ex)
            answered_by.append("ReferrersApi")
        if answer is None:
            skip = _HOP_BY_HOP | {"host", "transfer-encoding"}
            headers = {k: v for k, v in ex.headers.items() if k.lower() not in skip}
            chunked = "chunked" in (ex.header("transfer-encoding") or "").lower()
            pieces: list[bytes] = []
            wants_body = ex.method == "PUT" and _MANIFEST.match(ex.path) is not None

            def stream() -> Iterator[bytes]:
                for piece in body:
                    if wants_body:
                        pieces.append(piece)
                    yield piece

            target = ex.path + (f"?{ex.query}" if ex.query else "")
            answer = self.upstream_request(
                ex.method, target, headers, stream() if ex.length or chunked else None
            )
            if wants_body and answer.status == 201:
                self._pushed(ex, b"".join(pieces), answer)
            for habit in profile.habits:
                changed = habit.after(ex, answer, self)
                if changed is not None:
                    answer = changed
                    answered_by.append(type(habit).__name__)
        else:
            for _ in body:
                pass  # read what was sent, so the client reads the answer
        with self._lock:
            self.records.append(
                Record(
                    ex.method,
                    ex.path,
                    ex.query,
                    answer.status,
                    tuple(answered_by),
                    ex.header("authorization") is not None,
                )
            )
        return answer

    def _pushed(self, ex: Exchange, data: bytes, answer: Answer) -> None:
        found = _MANIFEST.match(ex.path)
        assert found is not None
        with self._lock:
            self.repositories.add(found["repo"])
        if not self.profile.referrers_api:
            return
        referrer = _referrer_entry(data)
        if referrer is None:
            return
        subject, entry = referrer
        with self._lock:
            listed = self.referrers.setdefault((found["repo"], subject), [])
            if entry["digest"] not in [e["digest"] for e in listed]:
                listed.append(entry)
        answer.set_header("OCI-Subject", subject)

    def _referrers(self, ex: Exchange) -> Answer:
        found = _REFERRERS.match(ex.path)
        assert found is not None
        key = (found["repo"], found["digest"])
        subject = self.upstream_request(
            "HEAD",
            f"/v2/{found['repo']}/manifests/{found['digest']}",
            {**self.auth_of(ex), "Accept": MANIFEST_TYPES},
            None,
        )
        if subject.status == 401:
            return subject  # the registry's challenge, for the repository's pull scope
        if subject.status == 404 and self.profile.api_unknown_subject is not None:
            return oci_error(
                self.profile.api_unknown_subject, "MANIFEST_INVALID", "unknown subject"
            )
        with self._lock:
            listed = list(self.referrers.get(key, []))
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed})
        return Answer(200, {"Content-Type": self.profile.api_content_type}, body.encode())


def _proxy_handler(proxy: ProfileProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _body(self) -> Iterator[bytes]:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return
                    yield self.rfile.read(size)
                    self.rfile.readline()
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                piece = self.rfile.read(min(PIECE, remaining))
                if not piece:
                    raise ConnectionError("client body ended early")
                remaining -= len(piece)
                yield piece

        def _handle(self) -> None:
            path, _, query = self.path.partition("?")
            ex = Exchange(self.command, path, query, dict(self.headers.items()))
            try:
                answer = proxy.handle(ex, self._body())
            except Exception as exc:  # keep serving; the test asserts errors stay empty
                proxy.errors.append(f"{self.command} {self.path}: {type(exc).__name__}: {exc}")
                answer = Answer(502, {"Content-Type": "text/plain"}, b"proxy error")
            if answer is HANG_UP:
                self.close_connection = True
                return
            _send(self, answer, self.command == "HEAD")

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    return Handler
