"""A small Docker token server (the ``Bearer`` realm of a registry) for tests.

It speaks the Docker registry token protocol on ``127.0.0.1``:

- ``GET /token?service=S&scope=A&scope=B`` with optional ``Authorization: Basic``; with
  ``offline_token=true`` a ``refresh_token`` is returned too;
- ``POST /token`` with an OAuth2 form: ``grant_type=password`` (``username``, ``password``) or
  ``grant_type=refresh_token`` (``refresh_token``), plus ``service``, ``scope`` (space-separated),
  ``client_id``; ``access_type=offline`` returns a ``refresh_token``.

Tokens are ES256 JWTs whose header carries ``x5c`` (the base64 DER of a self-signed certificate);
:attr:`TokenServer.cert_pem` is that certificate, to be used as the registry's
``auth.token.rootcertbundle``. Each requested ``repository`` scope is granted with the actions
that the user's grants (glob patterns on the repository name, see :class:`TokenServer`) allow;
anything else is left out of the token's ``access`` claim, as real token servers do.

CNCF distribution 2.8 accepts an expired token for 60 more seconds (and a not-yet-valid one 60
seconds early): pass ``strict_expiry=True`` to back-date the JWT time claims by that leeway, so
that the registry rejects a token right when ``expires_in`` says it ends.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import fnmatch
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

#: How far distribution 2.8 stretches ``exp`` and ``nbf`` (``token.Leeway``).
DISTRIBUTION_LEEWAY = 60

#: ``grants`` key for requests without credentials (also added to every user's grants).
ANONYMOUS = ""


def b64url(data: bytes) -> str:
    """Base64url without padding (JOSE encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(header, claims)`` of a JWT without checking its signature."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


@dataclass(frozen=True)
class Scope:
    """One requested resource scope, e.g. ``repository:app/web:pull,push``."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse ``type[(class)]:name:actions``; the name may contain ``:`` (``host:port/x``).

        Returns None for malformed scopes (ignored, like distribution's own token server).
        """
        rtype, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not rtype or not name:
            return None
        rtype = rtype.split("(", 1)[0]  # "repository(plugin)" -> "repository"
        return cls(rtype, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass(frozen=True)
class TokenRequest:
    """What the token server saw and answered for one request."""

    method: str
    #: ``"password"``, ``"refresh_token"`` or ``""`` for GET.
    grant_type: str
    #: The authenticated user, ``""`` for anonymous, or the name that failed to authenticate.
    user: str
    service: str
    scopes: tuple[str, ...]
    status: int
    client_id: str = ""
    offline: bool = False
    #: The ``access`` claim of the issued token (empty when none was issued).
    access: tuple[dict[str, Any], ...] = ()
    #: Whether the request carried an ``Authorization`` header.
    had_authorization: bool = False


@dataclass
class _Issued:
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user


def self_signed_ca(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    path_length: int | None = None,
    crl_sign: bool = False,
) -> x509.Certificate:
    """A self-signed CA certificate for ``key``, valid from yesterday for 30 days.

    The token server's signing certificate takes the defaults; the test registry's TLS CA
    (:func:`tests.support.registry.make_tls_files`) limits the chain (``path_length=0``) and
    may sign CRLs.
    """
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


class TokenServer:
    """A threaded Docker token server on ``127.0.0.1`` signing ES256 JWTs.

    ``users`` maps user name to password. ``grants`` maps a user name (``""`` = anonymous) to
    ``{repository glob: [actions]}``; globs use :func:`fnmatch.fnmatchcase` (``*`` also matches
    ``/``) and the action ``"*"`` grants every requested action. Anonymous grants apply to every
    user too. Requested actions that are not granted are dropped; a scope with no granted action
    is left out of the token.

    ``expires_in`` (seconds) is what responses announce and how long tokens live; it may be
    changed between requests. ``allow_post=False`` answers ``POST /token`` with 404 (to test a
    client's fallback to GET). Every request is recorded in :attr:`requests`.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        grants: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
        *,
        service: str = "test-registry",
        issuer: str = "test-issuer",
        expires_in: int = 300,
        strict_expiry: bool = False,
        allow_post: bool = True,
    ) -> None:
        self.users: dict[str, str] = dict(users or {})
        self.grants: dict[str, dict[str, list[str]]] = {
            user: {pattern: list(actions) for pattern, actions in rules.items()}
            for user, rules in (grants or {}).items()
        }
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.strict_expiry = strict_expiry
        self.allow_post = allow_post
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self_signed_ca(self._key, "imagepushd test token signer")
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._issued = _Issued()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def cert_pem(self) -> bytes:
        """The signing certificate (PEM): the registry's ``rootcertbundle``."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def running(self) -> bool:
        """Whether the HTTP server is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port (only while running)."""
        if self._server is None:
            raise RuntimeError("token server is not running")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        """The token endpoint URL, ``http://127.0.0.1:PORT/token``."""
        return f"http://127.0.0.1:{self.port}/token"

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-token-server",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
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

    # ------------------------------------------------------------------ records
    @property
    def requests(self) -> list[TokenRequest]:
        """A copy of every request recorded so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # ------------------------------------------------------------------ tokens
    def granted_actions(self, user: str, repository: str) -> set[str]:
        """Return the actions ``user`` (``""`` = anonymous) may take on ``repository``."""
        out: set[str] = set()
        for who in {ANONYMOUS, user}:
            for pattern, actions in self.grants.get(who, {}).items():
                if fnmatch.fnmatchcase(repository, pattern):
                    out.update(actions)
        return out

    def access_for(self, user: str, scopes: Sequence[Scope]) -> list[dict[str, Any]]:
        """The ``access`` claim for ``scopes`` requested by ``user`` (merged per resource)."""
        merged: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            if scope.type != "repository":
                continue
            allowed = self.granted_actions(user, scope.name)
            wanted = [a for a in scope.actions if "*" in allowed or a in allowed]
            if not wanted:
                continue
            actions = merged.setdefault((scope.type, scope.name), [])
            actions.extend(a for a in wanted if a not in actions)
        return [
            {"type": rtype, "name": name, "actions": actions}
            for (rtype, name), actions in merged.items()
        ]

    def issue(self, user: str, service: str, access: Sequence[Mapping[str, Any]]) -> str:
        """Sign and return a JWT for ``user`` with the given ``access`` claim."""
        now = int(time.time())
        shift = DISTRIBUTION_LEEWAY if self.strict_expiry else 0
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": service,
            "exp": now + self.expires_in - shift,
            "nbf": now - shift,
            "iat": now - shift,
            "jti": secrets.token_hex(16),
            "access": [dict(a) for a in access],
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # JWS: raw r || s
        return signing_input + "." + b64url(signature)

    def new_refresh_token(self, user: str) -> str:
        """Create a refresh token for ``user``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._issued.refresh_tokens[token] = user
        return token

    def refresh_token_user(self, token: str) -> str | None:
        """The user a refresh token belongs to, or None if unknown."""
        with self._lock:
            return self._issued.refresh_tokens.get(token)

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``user`` exists with ``password``."""
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected, password)


def _make_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "imagepushd-test-token/1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # requests are recorded in TokenServer.requests

        def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", 'Basic realm="test-token-server"')
            self.end_headers()
            self.wfile.write(data)

        def _basic_user(self) -> tuple[str, str | None]:
            """Return (user, error): ("", None) anonymous, (name, None) ok, (name, msg) bad."""
            header = self.headers.get("Authorization")
            if not header:
                return "", None
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "basic":
                return "", f"unsupported authorization scheme {scheme!r}"
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except ValueError:
                return "", "malformed basic credentials"
            if not server.check_password(user, password):
                return user, "invalid username or password"
            return user, None

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/token":
                self._send_json(404, {"error": "not found"})
                return
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            service = query.get("service", [""])[0]
            raw_scopes = [s for value in query.get("scope", []) for s in value.split()]
            offline = query.get("offline_token", [""])[0].lower() == "true"
            user, error = self._basic_user()
            self._answer(
                method="GET",
                grant_type="",
                user=user,
                error=error,
                service=service,
                raw_scopes=raw_scopes,
                offline=offline,
                client_id=query.get("client_id", [""])[0],
            )

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            if url.path != "/token" or not server.allow_post:
                self._send_json(404, {"error": "not found"})
                return
            form = urllib.parse.parse_qs(body, keep_blank_values=True)

            def field(name: str) -> str:
                return form.get(name, [""])[0]

            grant_type = field("grant_type")
            raw_scopes = [s for value in form.get("scope", []) for s in value.split()]
            user, error = "", None
            if grant_type == "password":
                user = field("username")
                if not server.check_password(user, field("password")):
                    error = "invalid username or password"
            elif grant_type == "refresh_token":
                owner = server.refresh_token_user(field("refresh_token"))
                if owner is None:
                    error = "invalid refresh token"
                else:
                    user = owner
            else:
                self._record_and_send(
                    TokenRequest(
                        method="POST",
                        grant_type=grant_type,
                        user="",
                        service=field("service"),
                        scopes=tuple(raw_scopes),
                        status=400,
                        client_id=field("client_id"),
                        had_authorization="Authorization" in self.headers,
                    ),
                    {"error": "unsupported_grant_type"},
                )
                return
            self._answer(
                method="POST",
                grant_type=grant_type,
                user=user,
                error=error,
                service=field("service"),
                raw_scopes=raw_scopes,
                offline=field("access_type") == "offline" or grant_type == "refresh_token",
                client_id=field("client_id"),
                refresh_token=field("refresh_token") if grant_type == "refresh_token" else "",
            )

        def _record_and_send(self, req: TokenRequest, body: Mapping[str, Any]) -> None:
            server._record(req)
            self._send_json(req.status, body)

        def _answer(
            self,
            *,
            method: str,
            grant_type: str,
            user: str,
            error: str | None,
            service: str,
            raw_scopes: list[str],
            offline: bool,
            client_id: str,
            refresh_token: str = "",
        ) -> None:
            base = TokenRequest(
                method=method,
                grant_type=grant_type,
                user=user,
                service=service,
                scopes=tuple(raw_scopes),
                status=200,
                client_id=client_id,
                offline=offline,
                had_authorization="Authorization" in self.headers,
            )
            if error is not None:
                self._record_and_send(
                    dataclasses.replace(base, status=401),
                    {"errors": [{"code": "UNAUTHORIZED", "message": error}]},
                )
                return
            if service and service != server.service:
                self._record_and_send(
                    dataclasses.replace(base, status=400),
                    {"errors": [{"code": "INVALID", "message": f"unknown service {service}"}]},
                )
                return
            scopes = [s for s in (Scope.parse(raw) for raw in raw_scopes) if s is not None]
            access = server.access_for(user, scopes)
            token = server.issue(user, service or server.service, access)
            body: dict[str, Any] = {
                "token": token,
                "access_token": token,
                "expires_in": server.expires_in,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z"),
            }
            if offline and user:
                body["refresh_token"] = refresh_token or server.new_refresh_token(user)
            self._record_and_send(dataclasses.replace(base, access=tuple(access)), body)

    return Handler
