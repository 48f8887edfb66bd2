"""Registry clients, one per host, built in one place for ``imagepushd push`` and the daemon.

A host's client and uploader are built on first use from a :class:`Connection` (its settings,
credentials, retry policy, throttle, upload sessions, body limit) and kept: their HTTP
connections, tokens and learned limits outlive one push. The daemon's connections come from
its configuration (:class:`DaemonConnector`); ``imagepushd push`` builds one from its options.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from imagepushd.config import LiveConfig
from imagepushd.errors import PushInterrupted
from imagepushd.metrics import Metrics
from imagepushd.push.registry.bodylimit import BodyLimit
from imagepushd.push.registry.client import HostSettings, RegistryClient
from imagepushd.push.registry.credentials import (
    Credentials,
    CredentialSource,
    CredentialStore,
    read_secret_file,
    systemd_credential,
)
from imagepushd.push.registry.health import RegistryHealth
from imagepushd.push.registry.retry import Retrier, RetryPolicy
from imagepushd.push.registry.throttle import RequestThrottle
from imagepushd.push.registry.upload import BlobUploader, SessionStore
from imagepushd.remember import State


@dataclass(frozen=True)
class Connection:
    """What one host's client and uploader are built from (None: the component's default)."""

    settings: HostSettings
    credentials: CredentialSource
    chunk_size: int | None = None
    retrier: Retrier | None = None
    throttle: RequestThrottle | None = None
    sessions: SessionStore | None = None
    body_limit: BodyLimit | None = None
    should_stop: Callable[[], bool] | None = None
    on_resume: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Registry:
    """One host's client and the uploader that sends blobs through it."""

    client: RegistryClient
    uploader: BlobUploader


class RegistryClients:
    """Clients per host, built from ``connect(host)`` on first use; thread-safe.

    ``transport`` (httpx) is injected for tests.
    """

    def __init__(
        self,
        connect: Callable[[str], Connection],
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._connect = connect
        self._transport = transport
        self._registries: dict[str, Registry] = {}
        self._lock = threading.Lock()

    def get(self, host: str) -> Registry:
        """``host``'s client and uploader."""
        with self._lock:
            cached = self._registries.get(host)
            if cached is not None:
                return cached
            c = self._connect(host)
            client = RegistryClient(
                host,
                settings=c.settings,
                credentials=c.credentials,
                retrier=c.retrier,
                transport=self._transport,
                throttle=c.throttle,
            )
            uploader = BlobUploader(
                client,
                chunk_size=c.chunk_size,
                sessions=c.sessions,
                body_limit=c.body_limit,
                should_stop=c.should_stop,
                on_resume=c.on_resume,
            )
            self._registries[host] = Registry(client, uploader)
            return self._registries[host]

    def probe(self, host: str) -> None:
        """One ``GET /v2/`` to ``host`` without retries (:meth:`RegistryClient.probe`)."""
        self.get(host).client.probe()

    def forget(self) -> None:
        """Build new clients from now on: the configuration changed.

        Pushes under way keep the clients they have.
        """
        with self._lock:
            self._registries = {}

    def close(self) -> None:
        """Close the clients built since the last :meth:`forget`."""
        with self._lock:
            for registry in self._registries.values():
                registry.client.close()


class DaemonConnector:
    """The daemon's connections, from its configuration as it is when a host is first used.

    ``stop`` set cuts retry waits and uploads short (the job resumes after the restart).
    """

    def __init__(
        self,
        config: LiveConfig,
        *,
        env: Mapping[str, str],
        home: Path,
        state: State,
        metrics: Metrics,
        health: RegistryHealth,
        stop: threading.Event,
    ) -> None:
        self._config = config
        self._env = env
        self._home = home
        self._state = state
        self._metrics = metrics
        self._health = health
        self._stop = stop

    def __call__(self, host: str) -> Connection:
        """``host``'s connection (see :class:`RegistryClients`)."""
        config = self._config.current
        settings = config.registry(host)
        push = config.push
        state = self._state
        return Connection(
            settings=HostSettings(plain_http=settings.plain_http, ca_file=settings.ca_file),
            credentials=CredentialSource(functools.partial(self._credentials, host)),
            chunk_size=settings.chunk_size or push.chunk_size,
            retrier=Retrier(
                RetryPolicy(push.retry_attempts, push.retry_initial, push.retry_max),
                sleep=self._retry_sleep,
                on_retry=functools.partial(self._metrics.retry_count, host),
                gate=self._health.gate(host),
            ),
            throttle=RequestThrottle(
                rate=settings.requests_per_second,
                concurrency=settings.max_concurrent_requests,
            ),
            sessions=state.uploads.sessions(host),
            body_limit=BodyLimit(host, state.body_limits.of(host)),
            should_stop=self._stop.is_set,
            on_resume=functools.partial(self._metrics.resume_count, host),
        )

    def _credentials(self, host: str) -> Credentials | None:
        """``host``'s credentials, read now from the configuration as it is now.

        Called at first use and whenever the registry refuses them: a rotated password or a
        reloaded configuration is picked up by the next request.
        """
        settings = self._config.current.registry(host)
        if not settings.username:
            return CredentialStore(self._env, self._home).lookup(host)
        if settings.password_file is not None:
            secret = read_secret_file(settings.password_file, f'registries."{host}"')
        elif settings.password_credential is not None:
            secret = systemd_credential(settings.password_credential, self._env)
        else:
            secret = ""
        return Credentials(username=settings.username, password=secret)

    def _retry_sleep(self, seconds: float) -> None:
        # The retry policy's sleep, cut short (abandoning the push) when the daemon stops.
        if self._stop.wait(seconds):
            raise PushInterrupted("stopping: retry abandoned")
