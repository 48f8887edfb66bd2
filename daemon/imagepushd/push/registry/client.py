"""A client for one registry host.

Transport, TLS, auth, error translation, and the small requests (ping, blob HEAD, upload
sessions, manifests).

This is the boundary: httpx exceptions and error responses become :class:`RegistryError`
(classified once) here, and nothing above this package sees httpx's exception types.
"""

from __future__ import annotations

import hashlib
import http.cookiejar
import ipaddress
import logging
import re
import ssl
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from imagepushd.errors import (
    ManifestError,
    RegistryAuthError,
    RegistryConnectionError,
    RegistryError,
)
from imagepushd.oci import MAX_MANIFEST_SIZE, OCI_INDEX, Descriptor, load_object
from imagepushd.push.registry.auth import Authenticator, RequestAuth, repository_scope
from imagepushd.push.registry.credentials import Credentials, CredentialSource
from imagepushd.push.registry.hosts import is_ecr
from imagepushd.push.registry.retry import Retrier, parse_retry_after
from imagepushd.push.registry.throttle import RequestThrottle

log = logging.getLogger(__name__)

CERTS_DIRS = (Path("/etc/docker/certs.d"), Path("/etc/containers/certs.d"))
MAX_REDIRECTS = 3
#: Seconds a health probe waits for an answer (a hung registry is as good as down).
PROBE_TIMEOUT = 10.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: Answers to the referrers API that mean "no API here" (besides a body that is no index):
#: 404 (distribution 2.8, GHCR, GitLab), a redirect (GHCR's 303 to its web UI), 400, 405,
#: 406 (older Artifactory). See docs/registries.md.
NO_REFERRERS_API = frozenset({400, 404, 405, 406}) | REDIRECTS
_REPOSITORY_PATH = re.compile(r"/v2/(.+?)/(?:blobs|manifests|tags|referrers)/")
Body = Callable[[], Iterator[bytes]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]`` or ``[v6]:port``) names this machine."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostSettings:
    """Per-registry settings (from ``[registries."host"]`` or CLI flags)."""

    plain_http: bool = False
    ca_file: Path | None = None
    certs_dirs: tuple[Path, ...] = CERTS_DIRS


def ssl_context(host: str, settings: HostSettings) -> ssl.SSLContext:
    """System roots, plus ``ca_file`` and ``certs.d/<host>/*.crt``, plus client cert pairs."""
    context = ssl.create_default_context()
    try:
        if settings.ca_file is not None:
            context.load_verify_locations(cafile=str(settings.ca_file))
        for base in settings.certs_dirs:
            directory = base / host
            if not directory.is_dir():
                continue
            for crt in sorted(directory.glob("*.crt")):
                context.load_verify_locations(cafile=str(crt))
            for cert in sorted(directory.glob("*.cert")):
                key = cert.with_suffix(".key")
                if key.exists():
                    context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise RegistryConnectionError(
            f"{host}: cannot load TLS certificates: {exc}", temporary=False
        ) from None
    return context


def _no_cookies() -> http.cookiejar.CookieJar:
    """A jar that keeps nothing: Harbor rejects replayed session cookies (CSRF)."""
    return http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``exc`` or anything in its cause/context chain is a ``kind``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class RegistryClient:
    """One registry host. Thread-safe for concurrent blob uploads (httpx.Client is).

    ``throttle`` bounds the rate and concurrency of every request this client sends.
    """

    def __init__(
        self,
        host: str,
        *,
        settings: HostSettings | None = None,
        credentials: CredentialSource | Credentials | None = None,
        retrier: Retrier | None = None,
        transport: httpx.BaseTransport | None = None,
        throttle: RequestThrottle | None = None,
    ) -> None:
        self.host = host
        self.throttle = throttle or RequestThrottle()
        self.settings = settings or HostSettings()
        self.retrier = retrier or Retrier()
        self.api_host = "registry-1.docker.io" if host == "docker.io" else host
        self._http = httpx.Client(
            verify=ssl_context(self.api_host, self.settings),
            timeout=httpx.Timeout(300.0, connect=30.0),
            follow_redirects=False,
            cookies=_no_cookies(),
            transport=transport,
            headers={"User-Agent": "imagepushd"},
        )
        self._schemes = ["http"] if self.settings.plain_http else ["https"]
        if is_loopback(self.api_host) and not self.settings.plain_http:
            self._schemes.append("http")
        self.scheme = self._schemes[0]
        source = (
            credentials
            if isinstance(credentials, CredentialSource)
            else CredentialSource.fixed(credentials)
        )
        self.auth = Authenticator(self._http, host, source, basic_allowed=self._basic_allowed)
        self._pinged = False
        # Repositories whose registry answered that it has no referrers API (it will not grow
        # one during a push; a reload builds a new client).
        self._no_referrers_api: set[str] = set()
        self._referrers_lock = threading.Lock()

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _basic_allowed(self, url: httpx.URL) -> bool:
        return url.scheme == "https" or self.settings.plain_http or is_loopback(url.netloc.decode())

    def url(self, path: str) -> httpx.URL:
        """An absolute URL on this registry (pinging first, which settles the scheme)."""
        self.ping()
        return self._url(path)

    def _url(self, path: str) -> httpx.URL:
        return httpx.URL(f"{self.scheme}://{self.api_host}{path}")

    def ping(self) -> None:
        """``GET /v2/``: choose the scheme (loopback may be plain HTTP) and learn the challenge."""
        if self._pinged:
            return
        self._ping(lambda: self.retrier.call(f"{self.host}: GET /v2/", self._ping_once))

    def probe(self) -> None:
        """One ``GET /v2/``, not retried, with a short timeout: whether the registry answers.

        The health check of a registry that is down (``push/registry/health.py``); raises the
        classified :class:`RegistryError` when it does not answer 200 or 401.
        """
        self._ping(lambda: self._ping_once(PROBE_TIMEOUT))

    def _ping(self, once: Callable[[], httpx.Response]) -> None:
        for scheme in self._schemes:
            self.scheme = scheme
            try:
                response = once()
            except RegistryConnectionError as exc:
                if scheme != self._schemes[-1] and exc.tls_handshake:
                    continue  # https to a loopback host that speaks plain HTTP: try http
                raise
            if response.status_code == 401:
                self.auth.learn(response)
            self._pinged = True
            return

    def login(self) -> bool:
        """Verify this client's credentials with one authenticated round trip, as docker login.

        Pings ``/v2/`` to learn the challenge, then ``GET /v2/`` with the credentials: Basic
        as they are; Bearer with a token fetched from the realm with the credentials and no
        scope (a 401 from the token server means bad credentials), which the registry must
        then accept. Returns False when the registry asks for no authentication at all, so
        there is nothing to verify. Rejected credentials raise :class:`RegistryAuthError`
        (``HOST: login failed: ...``, ``status`` 401).
        """
        self.ping()
        if self.auth.challenge is None:
            return False
        try:
            self.send("GET", self._url("/v2/"), scopes=(), ok={200}, what="GET /v2/", retry=True)
        except RegistryAuthError as exc:
            if exc.status != 401:
                raise
            detail = str(exc).removeprefix(f"{self.host}: ")
            raise RegistryAuthError(f"{self.host}: login failed: {detail}", status=401) from None
        return True

    def _ping_once(self, timeout: float | None = None) -> httpx.Response:
        response = self._transport_send("GET", self._url("/v2/"), timeout=timeout)
        if response.status_code not in (200, 401):
            raise self._error(response, "GET /v2/")
        return response

    def _transport_send(
        self,
        method: str,
        url: httpx.URL,
        *,
        headers: dict[str, str] | None = None,
        body: Body | bytes | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        content = body() if callable(body) else body
        request = self._http.build_request(
            method,
            url,
            headers=headers,
            content=content,
            timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
        )
        try:
            with self.throttle.slot():
                return self._http.send(request)
        except httpx.HTTPError as exc:
            if _caused_by(exc, ssl.SSLCertVerificationError):
                raise RegistryConnectionError(
                    f"{self.host}: TLS certificate verification failed ({exc}); trust the "
                    "registry's CA with ca_file or /etc/docker/certs.d/<host>/ca.crt",
                    temporary=False,
                ) from None
            handshake = _caused_by(exc, ssl.SSLError)
            raise RegistryConnectionError(
                f"{self.host}: {method} {url.path}: {type(exc).__name__}: {exc or 'no details'}",
                temporary=not handshake,
                tls_handshake=handshake,
            ) from None

    def send(
        self,
        method: str,
        url: httpx.URL,
        *,
        scopes: tuple[str, ...],
        ok: Collection[int],
        headers: dict[str, str] | None = None,
        body: Body | bytes | None = None,
        what: str = "",
        retry: bool = False,
    ) -> httpx.Response:
        """One request with auth; a non-``ok`` status raises a classified error.

        ``body`` is a factory so the request can be rebuilt after a 401. With ``retry`` the
        request is the unit of work the retry policy repeats.
        """
        what = what or f"{method} {url.path}"
        if retry:
            return self.retrier.call(
                f"{self.host}: {what}",
                lambda: self.send(
                    method, url, scopes=scopes, ok=ok, headers=headers, body=body, what=what
                ),
            )
        self.ping()
        auth = RequestAuth(scopes)
        while True:
            request_headers = dict(headers or {})
            own = self._url("/")
            if (url.scheme, url.host, url.port) == (own.scheme, own.host, own.port):
                authorization = self.auth.authorization(auth, url)
                if authorization is not None:
                    request_headers["Authorization"] = authorization
            response = self._transport_send(method, url, headers=request_headers, body=body)
            if response.status_code != 401:
                break
            self.auth.unauthorized(auth, response)  # raises when nothing is left to try
        if response.status_code not in ok:
            raise self._error(response, what)
        return response

    def _error(self, response: httpx.Response, what: str) -> RegistryError:
        entries = _error_entries(response)
        codes = [code for code, _ in entries]
        message = f"{self.host}: {what}: HTTP {response.status_code} {_detail(response, entries)}"
        if response.status_code == 404 and "NAME_UNKNOWN" in codes:
            message += self._name_unknown_hint(response.request.url.path)
        cls = RegistryAuthError if response.status_code == 403 else RegistryError
        return cls(
            message,
            status=response.status_code,
            codes=codes,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )

    def _name_unknown_hint(self, path: str) -> str:
        """What to do when the registry does not know the repository (ECR: not created)."""
        found = _REPOSITORY_PATH.match(path)
        repository = found.group(1) if found else "the repository"
        hint = f" (repository {repository} does not exist and {self.host} does not create it"
        if is_ecr(self.api_host):
            return (
                f"{hint} on push: create it with `aws ecr create-repository --repository-name "
                f"{repository}`, or add a repository creation template applied for "
                "CREATE_ON_PUSH)"
            )
        return f"{hint} on push: create it first)"

    def _follow(
        self,
        method: str,
        url: httpx.URL,
        *,
        scopes: tuple[str, ...],
        ok: Collection[int],
        headers: dict[str, str] | None = None,
        what: str,
    ) -> httpx.Response:
        """A HEAD or GET that follows redirects (registries send blobs to storage hosts).

        :meth:`send` adds credentials only for this registry's own scheme, host and port, so
        a storage host (S3 rejects a second auth mechanism beside its signed URL) gets none.
        """
        for _ in range(MAX_REDIRECTS + 1):
            response = self.send(
                method,
                url,
                scopes=scopes,
                ok={*ok, *REDIRECTS},
                headers=headers,
                what=what,
                retry=True,
            )
            if response.status_code not in REDIRECTS:
                return response
            url = response.request.url.join(response.headers.get("location", ""))
        raise RegistryError(f"{self.host}: {what}: too many redirects")

    # ---- blobs -------------------------------------------------------------------------

    def blob_exists(self, repository: str, descriptor: Descriptor) -> bool:
        """HEAD the blob; a size mismatch counts as absent."""
        response = self._follow(
            "HEAD",
            self.url(f"/v2/{repository}/blobs/{descriptor.digest}"),
            scopes=(repository_scope(repository, "pull", "push"),),
            ok={200, 404},
            what=f"HEAD {descriptor.digest}",
        )
        if response.status_code == 404:
            return False
        length = response.headers.get("content-length")
        return length is None or int(length) == descriptor.size

    def upload_start(
        self, repository: str, *, mount: str | None = None, source: str | None = None
    ) -> httpx.Response:
        """POST a new upload session, or a cross-repo mount (201 mounted, 202 session)."""
        path = f"/v2/{repository}/blobs/uploads/"
        scopes = [repository_scope(repository, "pull", "push")]
        url = self.url(path)
        if mount is not None and source is not None:
            url = url.copy_merge_params({"mount": mount, "from": source})
            scopes.append(repository_scope(source, "pull"))
        what = f"POST {path}" + (f" (mount {mount} from {source})" if mount else "")

        def attempt() -> httpx.Response:
            try:
                return self.send(
                    "POST",
                    url,
                    scopes=tuple(scopes),
                    ok={201, 202},
                    headers={"Content-Length": "0"},
                    body=b"",
                    what=what,
                )
            except RegistryConnectionError:
                # ECR hangs up on an upload to a repository that does not exist instead of
                # answering NAME_UNKNOWN (aws/containers-roadmap#1970): ask the repository.
                self._raise_if_unknown(repository, what)
                raise

        return self.retrier.call(f"{self.host}: {what}", attempt)

    def _raise_if_unknown(self, repository: str, what: str) -> None:
        """Raise the registry's NAME_UNKNOWN for ``repository``, if it answers one."""
        try:
            response = self.send(
                "GET",
                self.url(f"/v2/{repository}/tags/list"),
                scopes=(repository_scope(repository, "pull"),),
                ok={200, 404},
            )
        except RegistryError:
            return  # no better answer than the failure being handled
        if response.status_code == 404:
            error = self._error(response, f"{what}: no answer; GET tags/list")
            if "NAME_UNKNOWN" in error.codes:
                raise error

    def session_url(self, response: httpx.Response) -> httpx.URL:
        """The absolute upload-session URL from a response's ``Location``."""
        location = response.headers.get("location")
        if not location:
            raise RegistryError(
                f"{self.host}: {response.request.method} {response.request.url.path}: "
                f"HTTP {response.status_code} without a Location header",
                status=response.status_code,
            )
        return response.request.url.join(location)

    def upload_cancel(self, repository: str, location: httpx.URL) -> None:
        """DELETE an upload session; failures are ignored (sessions expire anyway)."""
        try:
            self.send(
                "DELETE",
                location,
                scopes=(repository_scope(repository, "pull", "push"),),
                ok={200, 202, 204, 404},
            )
        except RegistryError as exc:
            log.debug("%s: cancelling upload session failed: %s", self.host, exc)

    # ---- manifests ---------------------------------------------------------------------

    def manifest_digest(
        self, repository: str, reference: str, media_types: Collection[str]
    ) -> str | None:
        """The digest the registry holds at ``reference`` (tag or digest), or None.

        Only decides whether a push can be skipped, so a 403 counts as nothing there:
        Artifactory answers 403 for an absent tag behind a virtual repository, and a real
        denial fails the push's first write with its own clear 403.
        """
        response = self._follow(
            "HEAD",
            self.url(f"/v2/{repository}/manifests/{reference}"),
            scopes=(repository_scope(repository, "pull", "push"),),
            ok={200, 403, 404},
            headers={"Accept": ", ".join(media_types)},
            what=f"HEAD manifest {repository}:{reference}",
        )
        if response.status_code in (403, 404):
            if response.status_code == 403:
                log.debug("%s: HEAD %s:%s: 403, taken as absent", self.host, repository, reference)
            return None
        digest: str | None = response.headers.get("docker-content-digest")
        if digest is None:
            # A storage host the manifest was redirected to says nothing of digests.
            held = self.manifest_get(repository, reference, media_types)
            return None if held is None else "sha256:" + hashlib.sha256(held[1]).hexdigest()
        return digest

    def manifest_put(self, repository: str, reference: str, media_type: str, data: bytes) -> str:
        """PUT manifest bytes exactly as given; check the digest the registry reports."""
        if len(data) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"manifest for {repository}:{reference} is over 4 MiB")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        response = self.send(
            "PUT",
            self.url(f"/v2/{repository}/manifests/{reference}"),
            scopes=(repository_scope(repository, "pull", "push"),),
            ok={200, 201, 202, 204},
            headers={"Content-Type": media_type},
            body=data,
            retry=True,
        )
        reported = response.headers.get("docker-content-digest")
        if reported and reported != digest:
            raise RegistryError(
                f"{self.host}: PUT manifest {repository}:{reference}: registry reports digest "
                f"{reported}, the bytes sent hash to {digest}"
            )
        return digest

    def manifest_get(
        self, repository: str, reference: str, media_types: Collection[str]
    ) -> tuple[str, bytes] | None:
        """The media type and exact bytes held at ``reference``, or None when there is none."""
        response = self._follow(
            "GET",
            self.url(f"/v2/{repository}/manifests/{reference}"),
            scopes=(repository_scope(repository, "pull", "push"),),
            ok={200, 404},
            headers={"Accept": ", ".join(media_types)},
            what=f"GET manifest {repository}:{reference}",
        )
        if response.status_code == 404:
            return None
        if len(response.content) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"manifest {repository}:{reference} is over 4 MiB")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        return media_type, response.content

    # ---- referrers ---------------------------------------------------------------------

    def referrers_get(self, repository: str, digest: str) -> tuple[Descriptor, ...] | None:
        """The referrers of ``digest`` from the OCI 1.1 referrers API; None if there is no API.

        Anything but an image index in a 200 means no API: 404 (distribution 2.8, GHCR,
        GitLab), a redirect (GHCR: 303 to its web UI), 400, 405, 406 (older Artifactory), an
        HTML page or another document, or 429 still after the retries (GHCR's redirect target
        is rate limited). Its clients then keep the ``sha256-<hex>`` tag-schema index. The
        answer is remembered per repository, so "no API" costs one request per repository
        and client. 401/403 and failures that outlast the retries (5xx, no answer) raise.
        Only the first page is read: callers ask whether the API exists.
        """
        with self._referrers_lock:
            if repository in self._no_referrers_api:
                return None
        what = f"GET /v2/{repository}/referrers/{digest}"
        try:
            response = self.send(
                "GET",
                self.url(f"/v2/{repository}/referrers/{digest}"),
                scopes=(repository_scope(repository, "pull", "push"),),
                ok={200, *NO_REFERRERS_API},
                headers={"Accept": OCI_INDEX},
                what=what,
                retry=True,
            )
        except RegistryError as exc:
            if exc.status != 429:
                raise
            response = None
        found = None if response is None else _referrers_index(response, f"{self.host}: {what}")
        if found is None:
            log.info(
                "%s: no referrers API for %s (%s); using the tag schema",
                self.host,
                repository,
                "HTTP 429 after retries" if response is None else f"HTTP {response.status_code}",
            )
            with self._referrers_lock:
                self._no_referrers_api.add(repository)
        return found


def _error_entries(response: httpx.Response) -> list[tuple[str, str]]:
    """``(code, message)`` of each entry of an error body; none when the body is no such JSON."""
    try:
        doc = response.json()
    except ValueError:
        return []
    items = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return []
    return [
        (str(item.get("code", "")), str(item.get("message", "")))
        for item in items
        if isinstance(item, dict)
    ]


def _detail(response: httpx.Response, entries: list[tuple[str, str]]) -> str:
    """The error entries as ``code: message``, else the reason phrase and any text body."""
    detail = "; ".join(f"{c}: {m}" if m else c for c, m in entries if c or m)
    return detail or response.reason_phrase + _text_detail(response)


def _text_detail(response: httpx.Response) -> str:
    """The first line of a short plain-text error body (Docker Hub's rate limit says why)."""
    if not response.headers.get("content-type", "").startswith("text/plain"):
        return ""
    line = response.text.strip().split("\n", 1)[0].strip()
    return f": {line[:200]}" if line else ""


def _referrers_index(response: httpx.Response, what: str) -> tuple[Descriptor, ...] | None:
    """The descriptors of a referrers answer, or None when it is no image index."""
    if response.status_code != 200:
        return None
    try:
        doc = load_object(response.content, what)
    except ManifestError:
        return None  # an HTML page (GitLab's Rails 404 behind a 200 proxy) or other text
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or doc.get("mediaType", OCI_INDEX) != OCI_INDEX:
        return None
    return tuple(Descriptor.from_json(m, f"{what} manifests[{i}]") for i, m in enumerate(manifests))
