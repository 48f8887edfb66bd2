"""Shared pytest fixtures: a private containerd, registries, an image builder, a fault proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.daemon import Daemon
from tests.support.faultproxy import FaultProxy
from tests.support.images import ImageBuilder
from tests.support.process import require_tools
from tests.support.prometheus import HINT as PROMETHEUS_HINT
from tests.support.prometheus import Prometheus
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A fresh private containerd (root, state, sockets, log under tmp_path/containerd)."""
    require_tools(
        "containerd",
        "ctr",
        hint="install the Debian package containerd (apt-get install -y containerd)",
    )
    instance = Containerd(tmp_path / "containerd")
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """An ``imagepushd run`` harness (not started); it must have stopped cleanly afterwards."""
    with Daemon(tmp_path / "daemon") as instance:
        yield instance
        assert not instance.running or instance.stop() == 0


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    """Debian's prometheus, not started (``start(targets, rule_files)``); stopped afterwards."""
    require_tools("prometheus", hint=PROMETHEUS_HINT)
    instance = Prometheus(tmp_path / "prometheus")
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def image_builder() -> ImageBuilder:
    """A fresh, empty ImageBuilder."""
    return ImageBuilder()


# ---------------------------------------------------------------------- real registry

#: Users of the ``token_registry`` fixture's token server.
TOKEN_USERS = {"alice": "secret", "bob": "hunter2"}
#: Grants of the ``token_registry`` fixture: alice pushes and pulls anything, bob only pulls,
#: anonymous gets nothing.
TOKEN_GRANTS = {"alice": {"*": ["pull", "push"]}, "bob": {"*": ["pull"]}}


def _require_registry_tools() -> None:
    require_tools(
        "docker-registry",
        "skopeo",
        hint="install the Debian packages docker-registry and skopeo "
        "(apt-get install -y docker-registry skopeo)",
    )


def _serve_registry(registry: Registry) -> Iterator[Registry]:
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A fresh private docker-registry on plain HTTP, no auth (files under tmp_path/registry)."""
    _require_registry_tools()
    yield from _serve_registry(Registry(tmp_path / "registry"))


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    """A fault proxy (seeded, so random faults repeat) in front of the ``registry`` fixture."""
    with FaultProxy(registry.host, seed=20240607) as instance:
        yield instance
        assert instance.errors == []


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[Registry]:
    """A private docker-registry on HTTPS; trust ``registry.ca_file`` (or ``cert_dir``)."""
    _require_registry_tools()
    yield from _serve_registry(Registry(tmp_path / "tls-registry", tls=True))


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[Registry]:
    """A private docker-registry on plain HTTP with Basic auth for alice/secret."""
    _require_registry_tools()
    yield from _serve_registry(
        Registry(tmp_path / "htpasswd-registry", htpasswd={"alice": "secret"})
    )


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[Registry]:
    """A private docker-registry with token auth; ``.token_server`` is its TokenServer.

    alice/secret may pull and push everything, bob/hunter2 only pull, anonymous nothing.
    """
    _require_registry_tools()
    server = TokenServer(users=TOKEN_USERS, grants=TOKEN_GRANTS)
    try:
        server.start()
        yield from _serve_registry(Registry(tmp_path / "token-registry", token=server))
    finally:
        server.stop()
