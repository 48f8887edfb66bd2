"""``imagepushd login`` / ``logout``: verify credentials against a registry, then store them.

Verification is a real round trip (:meth:`RegistryClient.login`); only then are the credentials
written, through :class:`CredentialStore` (a ``docker-credential-*`` helper or docker's
config.json). Rejected credentials write nothing.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

import httpx

from imagepushd.errors import UsageError
from imagepushd.push.registry.client import HostSettings, RegistryClient
from imagepushd.push.registry.credentials import (
    DOCKER_HUB_HOSTS,
    Credentials,
    CredentialStore,
    Destination,
)

_HOST = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)


@dataclass(frozen=True)
class RegistryAddress:
    """A ``login`` argument: the registry host, and whether it was given as ``http://``."""

    #: ``host[:port]`` lower-cased, or ``docker.io`` for Docker Hub under any of its names.
    host: str
    plain_http: bool = False


def parse_registry(text: str) -> RegistryAddress:
    """``host[:port]``, ``docker.io``, or a URL (``https://host/``, ``https://index.docker.io/v1/``).

    A URL's path is ignored, as docker does; ``http://`` means plain HTTP.
    """
    raw = text.strip()
    plain_http = False
    if "://" in raw:
        url = urllib.parse.urlsplit(raw)
        if url.scheme not in ("http", "https"):
            raise UsageError(f"registry {text!r}: only http:// and https:// URLs")
        if url.username is not None or url.password is not None:
            raise UsageError(f"registry {text!r}: no credentials in the URL (use --username)")
        plain_http = url.scheme == "http"
        raw = url.netloc
    else:
        raw = raw.split("/", 1)[0]
    host = raw.lower()
    if not _HOST.fullmatch(host):
        raise UsageError(f"registry {text!r}: expected host[:port] or a URL like https://host/")
    if host in DOCKER_HUB_HOSTS:
        host = "docker.io"
    return RegistryAddress(host, plain_http)


@dataclass(frozen=True)
class LoginResult:
    """What :func:`login` did."""

    host: str
    username: str
    #: False when the registry asked for no authentication (stored unverified, as docker does).
    verified: bool
    destination: Destination


def login(
    host: str,
    credentials: Credentials,
    store: CredentialStore,
    *,
    settings: HostSettings | None = None,
    transport: httpx.BaseTransport | None = None,
) -> LoginResult:
    """Verify ``credentials`` against ``host``, then store them; nothing is written on failure.

    docker's config.json is read once, first (an unreadable one fails before any network
    traffic), then the registry round trip, then the write.
    """
    update = store.prepare(host)
    with RegistryClient(
        host, settings=settings, credentials=credentials, transport=transport
    ) as client:
        verified = client.login()
    destination = store.save(host, credentials, update)
    return LoginResult(host, credentials.username, verified, destination)


def logout(host: str, store: CredentialStore) -> list[str]:
    """Forget ``host``'s credentials; returns where they were removed (empty: none stored)."""
    return store.erase(host)
