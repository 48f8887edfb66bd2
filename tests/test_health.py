"""Registry health: one probe per registry while it is down, shared holds, one line each way.

A real :class:`RegistryClient` talks to the in-memory fake registry through httpx's
``MockTransport`` (tests/support/fakeregistry.py); the network refuses connections to a host
that has no server routed, which is how an unreachable registry looks to httpx (``ConnectError``).
Time is a fake clock that the injected sleeps advance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from imagepushd.errors import RegistryConnectionError, RegistryError
from imagepushd.oci import Descriptor
from imagepushd.push.registry.client import HostSettings, RegistryClient
from imagepushd.push.registry.health import PROBE_MAX, RegistryHealth
from imagepushd.push.registry.retry import Retrier
from tests.support.fakeregistry import FakeRegistry, Network, error

HOST = "registry.test"
REPO = "team/app"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
BLOB = Descriptor(LAYER, "sha256:" + "a" * 64, 10)
DOWN = RegistryConnectionError(f"{HOST}: HEAD /v2/: ConnectError: connection refused")


class Clock:
    """A fake wall clock; ``sleep`` and ``wait`` advance it and record what was asked."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def wait(self, seconds: float) -> bool:
        if seconds:  # wait(0) only asks whether the daemon stops
            self.sleep(seconds)
        return False


@dataclass
class Store:
    """The health store, in memory: every save in order."""

    saves: list[tuple[str, bool, float, str | None, float | None]] = field(default_factory=list)

    def save(
        self,
        registry: str,
        *,
        up: bool,
        since: float,
        last_error: str | None,
        held_until: float | None,
    ) -> None:
        self.saves.append((registry, up, since, last_error, held_until))


class Rig:
    """A fake registry that can be switched off, a client for it, and its health."""

    def __init__(self, *, background: bool = False) -> None:
        self.clock = Clock()
        self.fake = FakeRegistry(HOST)
        self.network = Network(self.fake)
        self.store = Store()
        self.changes: list[tuple[str, bool]] = []
        self.wakes = 0
        self.spawned: list[Callable[[], None]] = []
        # A probe loop runs inline unless ``background``: then the test runs it when it likes.
        spawn = self.spawned.append if background else (lambda run: run())
        self.health = RegistryHealth(
            probe=lambda host: self.client.probe(),
            store=self.store,
            waiting=lambda host: 3,
            clock=self.clock,
            wait=self.clock.wait,
            spawn=spawn,
            on_change=lambda host, up: self.changes.append((host, up)),
            wake=self.woken,
            rand=lambda: 1.0,  # no jitter: each wait is the full backoff
        )
        self.client = RegistryClient(
            HOST,
            settings=HostSettings(certs_dirs=()),
            retrier=Retrier(sleep=self.clock.sleep, gate=self.health.gate(HOST)),
            transport=self.network.transport(),
        )

    def woken(self) -> None:
        self.wakes += 1

    def stop_registry(self) -> None:
        del self.network.servers[HOST]

    def start_registry_after(self, probes: int) -> None:
        """Answer connections again once ``probes`` more requests have been refused."""
        self.stop_registry()
        refused = [0]

        def route(request: httpx.Request) -> httpx.Response:
            if refused[0] < probes:
                refused[0] += 1
                raise httpx.ConnectError("connection refused")
            return self.fake(request)

        self.network.route(HOST, route)

    def pings(self) -> int:
        return sum(1 for r in self.network.log if r.url.path == "/v2/")


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = Rig()
    yield made
    made.client.close()


def health_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "imagepushd.push.registry.health"
    ]


def test_an_outage_is_one_probe_loop_one_line_down_and_one_back(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.client.ping()
    rig.start_registry_after(probes=6)  # the confirming probe, then 5 of the loop
    caplog.set_level(logging.DEBUG, logger="imagepushd")

    assert rig.health.job_failed(HOST, DOWN) is True

    # Capped backoff: 1, 2, 4, then PROBE_MAX; the loop's 6th probe is answered.
    assert rig.clock.sleeps == [1.0, 2.0, 4.0, PROBE_MAX, PROBE_MAX, PROBE_MAX]
    assert rig.pings() == 1 + 1 + 6
    lines = health_lines(caplog)
    assert len(lines) == 2
    (down_level, down), (back_level, back) = lines
    assert down_level == logging.WARNING
    assert down.startswith(f"registry {HOST} is unreachable; 3 job(s) wait for it")
    assert "connection refused" in down
    assert back_level == logging.INFO
    assert back.startswith(f"registry {HOST} is reachable again after 22s")
    assert rig.changes == [(HOST, False), (HOST, True)]
    assert rig.wakes == 1  # the loop dispatches the waiting jobs at once
    start = 1_000_000.0
    # Saved for status: first seen, down (the job's error, then the probe's), back.
    probe_error = f"{HOST}: GET /v2/: ConnectError: connection refused"
    assert [save[1:4] for save in rig.store.saves] == [
        (True, start, None),
        (False, start, str(DOWN)),
        (False, start, probe_error),
        (True, start + 22, None),
    ]
    assert rig.health.blocked() == set()


def test_while_down_jobs_wait_without_probing_each(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(background=True)
    rig.client.ping()
    rig.stop_registry()

    assert rig.health.job_failed(HOST, DOWN) is True
    assert rig.pings() == 2  # the client's ping, then the one confirming probe
    for _ in range(5):
        assert rig.health.job_failed(HOST, DOWN) is True
    assert rig.pings() == 2
    assert rig.health.blocked() == {HOST}
    assert rig.health.down() == {HOST: str(DOWN)}
    assert len(rig.spawned) == 1

    # A job still running meets the outage: its retrier stops at once (the probe retries).
    with pytest.raises(RegistryConnectionError):
        rig.client.blob_exists(REPO, BLOB)
    assert rig.clock.sleeps == []

    rig.network.route(HOST, rig.fake)
    [loop] = rig.spawned
    loop()
    assert rig.pings() == 3
    assert rig.health.blocked() == set()
    assert rig.client.blob_exists(REPO, BLOB) is False
    rig.client.close()


def test_a_job_whose_registry_answers_the_probe_backs_off_on_its_own(rig: Rig) -> None:
    """A 503 on one request only (its backend, say): the registry is not down."""
    rig.client.ping()
    failure = RegistryError(f"{HOST}: PUT: HTTP 503", status=503, codes=["UNAVAILABLE"])

    assert rig.health.job_failed(HOST, failure) is False

    assert rig.pings() == 2
    assert rig.health.blocked() == set()
    assert rig.changes == []


@pytest.mark.parametrize(
    "failure",
    [
        RegistryError("HTTP 500", status=500),
        RegistryError("HTTP 404 MANIFEST_UNKNOWN", status=404, codes=["MANIFEST_UNKNOWN"]),
        RegistryConnectionError("TLS certificate verification failed", temporary=False),
        RegistryError("HTTP 429", status=429, retry_after=0.0),  # "now": its own backoff
    ],
)
def test_failures_that_are_not_the_registrys_do_not_probe(rig: Rig, failure: RegistryError) -> None:
    assert rig.health.job_failed(HOST, failure) is False
    assert rig.network.log == []


@pytest.mark.parametrize("status", [401, 404])
def test_any_answer_but_unavailable_means_back(status: int) -> None:
    """A registry answering its probe with an error is serving: its jobs say the rest."""
    rig = Rig(background=True)
    rig.stop_registry()
    assert rig.health.job_failed(HOST, DOWN) is True

    rig.network.route(HOST, lambda request: error(status, "DENIED"))
    [loop] = rig.spawned
    loop()

    assert rig.health.blocked() == set()
    assert rig.changes == [(HOST, False), (HOST, True)]
    rig.client.close()


def test_a_push_that_gets_through_ends_the_outage(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(background=True)
    rig.stop_registry()
    caplog.set_level(logging.INFO, logger="imagepushd")
    assert rig.health.job_failed(HOST, DOWN) is True

    rig.health.reached(HOST)
    rig.health.reached(HOST)

    assert rig.health.blocked() == set()
    assert rig.changes == [(HOST, False), (HOST, True)]
    assert [level for level, _ in health_lines(caplog)] == [logging.WARNING, logging.INFO]
    [loop] = rig.spawned
    loop()  # finds it up: no probe
    assert rig.pings() == 1
    rig.client.close()


def test_reached_records_a_registry_once(rig: Rig) -> None:
    rig.health.reached(HOST)
    rig.health.reached(HOST)
    assert rig.changes == [(HOST, True)]
    assert rig.store.saves == [(HOST, True, rig.clock.now, None, None)]


def test_the_probe_loop_ends_when_the_daemon_stops() -> None:
    rig = Rig(background=True)
    rig.stop_registry()
    assert rig.health.job_failed(HOST, DOWN) is True
    stopping = RegistryHealth(
        probe=lambda host: rig.client.probe(),
        wait=lambda seconds: True,  # the stop event is set
        spawn=lambda run: run(),
    )

    assert stopping.job_failed(HOST, DOWN) is True  # confirmed; its loop returned at once

    assert rig.pings() == 2  # one confirming probe each, no loop probe
    assert stopping.blocked() == {HOST}
    rig.client.close()


# ---- Retry-After holds every job of the registry ----------------------------------------


def test_retry_after_holds_every_request_to_the_registry(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """One job's 429 + Retry-After: 30 makes every other request to the registry wait too."""
    rig.client.ping()
    throttled = [0]

    def first_head_429(request: httpx.Request) -> httpx.Response | None:
        if request.method == "HEAD" and not throttled[0]:
            throttled[0] = rig.clock.now
            return error(429, "TOOMANYREQUESTS", headers={"Retry-After": "30"})
        return None

    rig.fake.hooks.append(first_head_429)
    caplog.set_level(logging.DEBUG, logger="imagepushd")

    assert rig.client.blob_exists(REPO, BLOB) is False  # job A: waits 30 s, then its answer
    assert rig.clock.sleeps == [30.0]
    assert rig.health.blocked() == set()  # the hold is over

    # Job B asks while a hold is on: it waits for the rest of it before sending.
    hold = RegistryError("HTTP 429", status=429, retry_after=20.0)
    assert rig.health.job_failed(HOST, hold) is True
    until = rig.clock.now + 20
    assert rig.health.blocked() == {HOST}
    assert rig.health.next_release() == until
    assert rig.store.saves[-1] == (HOST, True, 1_000_000.0, str(hold), until)  # for status
    rig.clock.now += 5
    sent_before = len(rig.network.log)
    assert rig.client.blob_exists(REPO, BLOB) is False
    assert rig.clock.sleeps == [30.0, 15.0]
    assert len(rig.network.log) == sent_before + 1

    warnings = [m for level, m in health_lines(caplog) if level == logging.WARNING]
    assert len(warnings) == 2  # one per hold
    assert warnings[0].startswith(f"registry {HOST} asks to wait 30s: every job of it waits")
    retries = [r for r in caplog.records if r.name == "imagepushd.push.registry.retry"]
    assert [r.levelno for r in retries] == [logging.DEBUG]  # the hold line says it already
    assert rig.health.next_release() is None


def test_a_hold_is_capped_and_never_shortened(rig: Rig) -> None:
    long = RegistryError("HTTP 429", status=429, retry_after=86400.0)
    short = RegistryError("HTTP 429", status=429, retry_after=10.0)
    rig.health.hold(HOST, long)
    rig.health.hold(HOST, short)
    assert rig.health.wait_time(HOST) == 300.0


def test_retries_of_other_temporary_errors_still_warn(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.client.ping()
    answers = [error(500, "UNKNOWN"), None]
    rig.fake.hooks.append(lambda request: answers.pop(0) if request.method == "HEAD" else None)
    caplog.set_level(logging.DEBUG, logger="imagepushd")

    assert rig.client.blob_exists(REPO, BLOB) is False

    retries = [r for r in caplog.records if r.name == "imagepushd.push.registry.retry"]
    assert [r.levelno for r in retries] == [logging.WARNING]
