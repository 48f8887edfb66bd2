"""Registry authentication: WWW-Authenticate challenges, Basic, and Bearer tokens with a cache.

This is not an ``httpx.Auth``: an httpx auth flow answers a 401 by re-sending the same request,
and an upload body streamed from a file cannot be replayed. Instead the client asks for an
``Authorization`` header before each request (refreshing tokens shortly before expiry, so a
long upload asks again before every chunk) and reports a 401 here; the client then rebuilds
the body itself and sends again. Each way out of a 401 (answer a challenge learned only now,
fetch a fresh token, resolve refused credentials again) is taken at most once per request,
so there are no loops.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from imagepushd.errors import RegistryAuthError, RegistryConnectionError
from imagepushd.push.registry.credentials import Credentials, CredentialSource

log = logging.getLogger(__name__)

MIN_TOKEN_LIFETIME = 60.0
REFRESH_MARGIN = 20.0
CLIENT_ID = "imagepushd"

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*(?:,|$)")
_SCHEME = re.compile(rf"\s*({_TOKEN})(?=[\s,]|$)\s*")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*\s*(?=,|$)")


@dataclass(frozen=True)
class Challenge:
    """One auth challenge: scheme (lower-case) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes a Bearer challenge asks for."""
        return tuple(self.params.get("scope", "").split())


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in ``WWW-Authenticate`` header values (RFC 7235)."""
    out: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            if value[pos] in ", \t":
                pos += 1
                continue
            scheme = _SCHEME.match(value, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            token68 = _TOKEN68.match(value, pos)
            if token68 is not None and _PARAM.match(value, pos) is None:
                pos = token68.end()
            while True:
                param = _PARAM.match(value, pos)
                if param is None:
                    break
                name, quoted, token = param.groups()
                params[name.lower()] = (
                    re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token
                )
                pos = param.end()
            out.append(Challenge(scheme.group(1).lower(), params))
    return out


def merge_scopes(*groups: Iterable[str]) -> tuple[str, ...]:
    """Union of scopes, merging actions per resource (``repository:a:pull`` + ``:push``)."""
    actions: dict[str, set[str]] = {}
    for group in groups:
        for scope in group:
            resource, sep, acts = scope.rpartition(":")
            if not sep or not resource:
                continue
            actions.setdefault(resource, set()).update(a for a in acts.split(",") if a)
    return tuple(f"{res}:{','.join(sorted(acts))}" for res, acts in sorted(actions.items()))


def repository_scope(repository: str, *actions: str) -> str:
    """The token scope for actions on a repository."""
    return f"repository:{repository}:{','.join(actions)}"


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class RequestAuth:
    """The authentication of one request across its re-sends after 401s.

    Each way out of a 401 is taken at most once per request (answer a newly learned
    challenge, fetch a fresh token, resolve the credentials again), so a request is sent a
    bounded number of times and runs a credential helper at most once.
    """

    scopes: tuple[str, ...]
    #: The credentials behind the last header sent; None when none were consulted (no
    #: challenge known yet, or a request to another host).
    credentials: Credentials | None = None
    learned: bool = False
    refetched: bool = False
    #: The credentials were resolved during this request: resolving them again after a
    #: refusal would only repeat the answer (and run the helper twice in a row).
    fresh: bool = False


class Authenticator:
    """Produces Authorization headers for one registry host and reacts to 401s."""

    def __init__(
        self,
        http: httpx.Client,
        host: str,
        credentials: CredentialSource,
        *,
        basic_allowed: Callable[[httpx.URL], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._host = host
        self._source = credentials
        self._basic_allowed = basic_allowed
        self._clock = clock
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, str, tuple[str, ...]], _Token] = {}
        # Concurrent blob uploads share tokens: fetch each one once.
        self._lock = threading.Lock()

    @property
    def challenge(self) -> Challenge | None:
        """The challenge learned from the registry, if any yet."""
        return self._challenge

    def learn(self, response: httpx.Response) -> None:
        """Remember the registry's challenge from a 401 response."""
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        preferred = [c for c in challenges if c.scheme == "bearer"] or [
            c for c in challenges if c.scheme == "basic"
        ]
        if not preferred:
            raise RegistryAuthError(
                f"{self._host}: authentication required but no usable challenge "
                f"({response.headers.get('www-authenticate', 'none')!r})",
                status=401,
            )
        self._challenge = preferred[0]

    def authorization(self, request: RequestAuth, url: httpx.URL) -> str | None:
        """The header value to send for ``request`` to ``url``, or None (anonymous)."""
        challenge = self._challenge
        request.credentials = None
        if challenge is None:
            return None
        resolutions = self._source.resolutions
        creds = request.credentials = self._source.get()
        if self._source.resolutions != resolutions:
            request.fresh = True
        if challenge.scheme == "basic":
            if not creds.username:
                return None
            if not self._basic_allowed(url):
                raise RegistryAuthError(
                    f"{self._host}: refusing to send a password over plain HTTP "
                    "(allow it for this registry in the configuration)"
                )
            return "Basic " + creds.basic()
        if creds.registry_token:
            return "Bearer " + creds.registry_token
        return "Bearer " + self._token(challenge, request).value

    def unauthorized(self, request: RequestAuth, response: httpx.Response) -> None:
        """Handle a 401 to ``request``: prepare the next send, or raise when none is left.

        A challenge learned only now is answered; a refused token is fetched afresh (with
        the merged scopes an ``insufficient_scope`` challenge asks for); refused credentials
        are resolved again, and sent again only if that changed them.
        """
        previous = self._challenge
        self.learn(response)
        challenge = self._challenge
        assert challenge is not None
        if challenge.scheme == "bearer":
            self._forget_token(request, challenge)
        if self._answer_learned(request, previous, challenge):
            return
        if challenge.scheme == "bearer" and self._fetch_again(request):
            return
        creds = request.credentials
        if creds is not None and not request.fresh and self._renew(request, creds):
            return
        raise self.denied(creds)

    def _forget_token(self, request: RequestAuth, challenge: Challenge) -> None:
        """Drop the refused token; the next one also covers the scopes the challenge asks for."""
        wanted = merge_scopes(request.scopes, challenge.scopes)
        with self._lock:
            self._tokens.pop(self._key(challenge, wanted), None)
            self._tokens.pop(self._key(challenge, request.scopes), None)
        request.scopes = wanted

    @staticmethod
    def _answer_learned(
        request: RequestAuth, previous: Challenge | None, challenge: Challenge
    ) -> bool:
        """Whether to send again to answer a challenge (or scheme) met only now; once a request."""
        creds = request.credentials
        if request.learned or not (
            creds is None or previous is None or previous.scheme != challenge.scheme
        ):
            return False
        request.learned = True
        return True

    def _fetch_again(self, request: RequestAuth) -> bool:
        """Whether to send again with a fresh Bearer token; once a request.

        Raises when the token server took the credentials of a refused fresh token.
        """
        creds = request.credentials
        if creds is not None and creds.registry_token:
            return False  # a token from the credentials themselves: no server to ask again
        if not request.refetched:
            request.refetched = True
            return True
        if creds is not None and not creds.anonymous:
            # The token server took these credentials: what they lack is permission.
            raise self.denied(creds)
        return False

    def denied(self, credentials: Credentials | None) -> RegistryAuthError:
        """The error for a request still unauthorized after fresh tokens or credentials."""
        challenge = self._challenge
        if challenge is not None and challenge.params.get("error") == "insufficient_scope":
            return RegistryAuthError(
                f"{self._host}: not allowed: {' '.join(challenge.scopes) or 'insufficient scope'}",
                status=401,
            )
        if credentials is None or credentials.anonymous:
            return RegistryAuthError(
                f"{self._host}: authentication required and no credentials are configured",
                status=401,
            )
        return RegistryAuthError(f"{self._host}: credentials rejected", status=401)

    def _renew(self, request: RequestAuth, rejected: Credentials) -> bool:
        """Resolve the credentials again after ``rejected`` was refused; whether they changed."""
        request.fresh = True
        resolutions = self._source.resolutions
        changed = self._source.renew(rejected)
        request.credentials = self._source.get()
        if self._source.resolutions != resolutions:
            log.info(
                "%s: credentials rejected; resolved them again: %s",
                self._host,
                "changed, sending again" if changed else "unchanged",
            )
        return changed

    @staticmethod
    def _key(challenge: Challenge, scopes: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]]:
        return (challenge.params.get("realm", ""), challenge.params.get("service", ""), scopes)

    def _token(self, challenge: Challenge, request: RequestAuth) -> _Token:
        """A cached token for the request's scopes, else one fetched with its credentials.

        The token server is where Bearer credentials are checked: refused there, they are
        resolved again (at most once per request) and the fetch is repeated if they changed.
        """
        key = self._key(challenge, request.scopes)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at - REFRESH_MARGIN > self._clock():
                return cached
            creds = request.credentials or Credentials()
            token = self._fetch(challenge, request.scopes, creds)
            if token is None and not request.fresh and self._renew(request, creds):
                creds = request.credentials or Credentials()
                token = self._fetch(challenge, request.scopes, creds)
            if token is None:
                raise self.denied(creds)
            self._tokens[key] = token
            return token

    def _fetch(
        self, challenge: Challenge, scopes: tuple[str, ...], creds: Credentials
    ) -> _Token | None:
        """A token from the challenge's realm; None when the token server refuses ``creds``."""
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryAuthError(f"{self._host}: Bearer challenge without a realm")
        url = httpx.URL(realm)
        service = challenge.params.get("service", "")
        started = self._clock()
        try:
            response = self._request_token(url, service, scopes, creds)
        except httpx.HTTPError as exc:
            raise RegistryConnectionError(
                f"{self._host}: token server {url.host}: {type(exc).__name__}: {exc}"
            ) from None
        if self._refused(url, response):
            return None
        value, lifetime = self._read_token(response)
        log.debug("%s: token for %s valid %ss", self._host, " ".join(scopes), lifetime)
        return _Token(value, started + float(lifetime))

    def _request_token(
        self, url: httpx.URL, service: str, scopes: tuple[str, ...], creds: Credentials
    ) -> httpx.Response:
        """The token server's answer: to an OAuth2 POST when holding an identity token, else GET."""
        if creds.identity_token:
            response = self._http.post(
                url,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "service": service,
                    "client_id": CLIENT_ID,
                    "scope": " ".join(scopes),
                },
            )
            # A token server without OAuth2 answers the POST 404: it still serves the GET.
            if response.status_code != 404:
                return response
        headers = self._token_headers(url, creds)
        params = httpx.QueryParams([("service", service)] if service else [])
        for scope in scopes:
            params = params.add("scope", scope)
        return self._http.get(url, params=params, headers=headers)

    def _token_headers(self, url: httpx.URL, creds: Credentials) -> dict[str, str]:
        """Basic credentials for a token GET, if any; never a password over plain HTTP."""
        if not creds.username:
            return {}
        if not self._basic_allowed(url):
            raise RegistryAuthError(
                f"{self._host}: refusing to send a password to token server "
                f"{url.host} over plain HTTP"
            )
        return {"Authorization": "Basic " + creds.basic()}

    def _refused(self, url: httpx.URL, response: httpx.Response) -> bool:
        """Whether the token server refused the credentials; any other answer but 200 raises."""
        if response.status_code in (401, 403):
            return True
        if response.status_code != 200:
            raise RegistryAuthError(
                f"{self._host}: token server {url.host} answered {response.status_code}",
                status=response.status_code,
            )
        return False

    def _read_token(self, response: httpx.Response) -> tuple[str, int | float]:
        """The token and its lifetime in seconds from the token server's JSON answer."""
        try:
            doc = response.json()
        except ValueError:
            raise RegistryAuthError(f"{self._host}: token server sent invalid JSON") from None
        value = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryAuthError(f"{self._host}: token server sent no token")
        return value, _lifetime(doc)


def _lifetime(doc: dict[str, object]) -> int | float:
    """``expires_in``, where an absent, malformed or shorter one counts as the minimum."""
    lifetime = doc.get("expires_in", MIN_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or lifetime < MIN_TOKEN_LIFETIME:
        return MIN_TOKEN_LIFETIME
    return lifetime
