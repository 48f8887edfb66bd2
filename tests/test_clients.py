"""Registry clients per host, built from the daemon's configuration as it is at first use.

The registry side is ``httpx.MockTransport``: what is checked here is what the daemon's
connection does with the configuration (read when a host is first used, again after a reload
and whenever credentials are refused), not a registry's behaviour (tests/e2e covers that).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagepushd.config import LiveConfig
from imagepushd.errors import PushInterrupted
from imagepushd.metrics import Metrics
from imagepushd.push.clients import DaemonConnector, RegistryClients
from imagepushd.push.registry.health import RegistryHealth
from imagepushd.remember import State
from tests.support.daemon import render_config

HOST = "registry.test"


class Rig:
    """A configuration file, the state, and the daemon's clients over a mock registry."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.path = tmp_path / "config.toml"
        self.secret = tmp_path / "password"
        self.secret.write_text("first\n")
        self.write(chunk_size="1MiB")
        self.config = LiveConfig(self.path, {})
        self.state = State(tmp_path / "state.db")
        self.stop = threading.Event()
        self.requests: list[httpx.Request] = []
        self.answer = 200
        self.challenge = {"WWW-Authenticate": 'Basic realm="test"'}
        health = RegistryHealth(probe=lambda host: None)
        self.connector = DaemonConnector(
            self.config,
            env={},
            home=tmp_path,
            state=self.state,
            metrics=Metrics(),
            health=health,
            stop=self.stop,
        )
        self.clients = RegistryClients(self.connector, transport=httpx.MockTransport(self.serve))

    def write(self, *, chunk_size: str) -> None:
        self.path.write_text(
            render_config(
                root=self.tmp / "containerd",
                state=self.tmp / "state.db",
                push={"retry_attempts": 3, "retry_initial": "1s"},
                registries={
                    HOST: {
                        "chunk_size": chunk_size,
                        "username": "ci",
                        "password_file": self.secret,
                    }
                },
            )
        )

    def serve(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.answer, headers=self.challenge if self.answer == 401 else {})

    def close(self) -> None:
        self.clients.close()
        self.state.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def test_a_host_is_connected_once_and_again_after_a_reload(rig: Rig) -> None:
    first = rig.clients.get(HOST)
    assert rig.clients.get(HOST) is first
    assert rig.connector(HOST).chunk_size == 1 << 20

    rig.write(chunk_size="4MiB")
    rig.config.reload()
    assert rig.clients.get(HOST) is first  # pushes under way keep theirs
    rig.clients.forget()
    assert rig.clients.get(HOST) is not first
    assert rig.connector(HOST).chunk_size == 4 << 20


def test_credentials_are_read_at_first_use_and_again_when_refused(rig: Rig) -> None:
    credentials = rig.connector(HOST).credentials
    rig.secret.write_text("second\n")
    first = credentials.get()
    assert first.password == "second"  # nothing was read before this first use
    rig.secret.write_text("third\n")
    assert credentials.get().password == "second"  # kept while the registry takes them
    assert credentials.renew(first)
    assert credentials.get().password == "third"


def test_probe_sends_one_unretried_request(rig: Rig) -> None:
    rig.answer = 401  # answers: up, whatever it says
    rig.clients.probe(HOST)
    assert [(r.method, r.url.path) for r in rig.requests] == [("GET", "/v2/")]
    assert "authorization" not in rig.requests[0].headers


def test_a_stopping_daemon_abandons_a_retry_wait(rig: Rig) -> None:
    rig.answer = 503
    rig.stop.set()
    client = rig.clients.get(HOST).client
    with pytest.raises(PushInterrupted, match="stopping: retry abandoned"):
        client.ping()
    assert len(rig.requests) == 1  # the first 503's retry waited on the stop, which was set
