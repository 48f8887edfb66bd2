"""The daemon put together: every part built from the configuration, opened, and closed.

:class:`Daemon` is ``imagepushd run``. It finds containerd's root, opens its metadata and
content stores and the state file, builds the registry clients, registry health and the job
runner, starts the watcher and the metrics endpoint, installs the signal handlers, then hands
all of it to :class:`~imagepushd.service.Service`, whose loop is the daemon's work, and closes
everything in reverse order when that loop returns.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType

import httpx

from imagepushd.config import LiveConfig
from imagepushd.decide.platforms import host_platform
from imagepushd.errors import RootNotFoundError
from imagepushd.metrics import Metrics, MetricsServer
from imagepushd.notify import Notifier, watchdog_interval
from imagepushd.push.clients import DaemonConnector, RegistryClients
from imagepushd.push.publish import JobRunner, Publisher
from imagepushd.push.registry.health import RegistryHealth
from imagepushd.remember import State
from imagepushd.service import Parts, Service
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import META_DB, MetadataStore, TxidProbe
from imagepushd.watch.referrers import ReferrerFinder
from imagepushd.watch.roots import Found, discover_root, expected_root
from imagepushd.watch.watcher import MetaWatcher

log = logging.getLogger(__name__)


class Daemon:
    """``imagepushd run``: the :class:`Service` over parts built from ``config_path``.

    ``transport`` (httpx) and ``clock`` are injected for tests; ``once`` makes one pass;
    ``metrics`` collects what it does (``[metrics] listen`` serves them while it runs).
    A bad configuration raises here, before anything is opened.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        env: Mapping[str, str],
        home: Path,
        notifier: Notifier,
        once: bool = False,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
        install_signals: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = LiveConfig(config_path, env)
        self._env = env
        self._home = home
        self._notifier = notifier
        self._once = once
        self._clock = clock
        self._transport = transport
        self._install_signals = install_signals
        self._metrics = metrics or Metrics()
        self._service: Service | None = None
        self._stop_requested = False
        #: Pushes still running when the daemon gave up waiting for them at the stop.
        self.stuck = 0

    def run(self) -> int:
        """Build, run the loop until stopped (or one pass), close; the process exit code."""
        with contextlib.ExitStack() as stack:
            service = self._build(stack)
            self._service = service
            if self._stop_requested:
                service.stop()
            code = service.run()
            self.stuck = service.stuck
        return code

    def stop(self) -> None:
        """Stop the daemon, as SIGTERM does (takes no lock: safe from a signal handler)."""
        self._stop_requested = True
        if self._service is not None:
            self._service.stop()

    def reload(self) -> None:
        """Read the configuration again, as SIGHUP does (takes no lock)."""
        if self._service is not None:
            self._service.reload()

    def _build(self, stack: contextlib.ExitStack) -> Service:
        """Every part, opened on ``stack`` (closed in reverse order when it unwinds)."""
        config = self._config.current
        try:
            found = discover_root(None, config.containerd.root, self._env, self._home)
        except RootNotFoundError as exc:
            # containerd may simply not have started yet: watch where its root will be.
            found = Found(expected_root(config.containerd.root, self._env, self._home))
            log.warning("%s; waiting for containerd at %s", exc, found.place)
        root = found.path
        metadata = MetadataStore.at_root(root, reuse_buckets=True)
        stack.callback(metadata.close)
        content = ContentStore(root)
        state = stack.enter_context(State(config.state_path, clock=self._clock))
        listen = config.metrics.listen
        if listen is not None:
            stack.enter_context(MetricsServer(listen, self._metrics))
        # The watcher polls from its own thread: give it its own file descriptor.
        txid = TxidProbe(root)
        stack.callback(txid.close)
        watcher = MetaWatcher(root / META_DB, txid=txid)
        stop = threading.Event()
        health = RegistryHealth(
            # Bound late: ``clients`` (whose retriers consult this health) is built below; a
            # probe only runs after a job used them.
            probe=lambda host: clients.probe(host),  # noqa: PLW0108
            store=state.registries,
            waiting=state.jobs.open_on,
            clock=self._clock,
            wait=stop.wait,
            on_change=self._metrics.registry_up,
            wake=watcher.notify_external,
        )
        connector = DaemonConnector(
            self._config,
            env=self._env,
            home=self._home,
            state=state,
            metrics=self._metrics,
            health=health,
            stop=stop,
        )
        clients = RegistryClients(connector, transport=self._transport)
        stack.callback(clients.close)
        finder = ReferrerFinder(content)
        runner = JobRunner(
            Publisher(clients, host=host_platform()),
            config=self._config,
            metadata=metadata,
            content=content,
            finder=finder,
            state=state,
            health=health,
            metrics=self._metrics,
            clock=self._clock,
        )
        parts = Parts(
            config=self._config,
            metadata=metadata,
            content=content,
            finder=finder,
            state=state,
            health=health,
            clients=clients,
            runner=runner,
            watcher=watcher,
            notifier=self._notifier,
            metrics=self._metrics,
            stop=stop,
        )
        service = Service(
            parts,
            watching=found.describe(),
            watchdog=watchdog_interval(self._env),
            once=self._once,
            clock=self._clock,
        )
        if self._install_signals:
            stack.enter_context(_signals(service))
        watcher.start()
        stack.callback(watcher.stop)
        return service


@contextlib.contextmanager
def _signals(service: Service) -> Iterator[None]:
    """SIGTERM/SIGINT stop the loop and SIGHUP reloads while it runs; restored after."""

    # A handler runs on the main thread between two bytecodes, possibly while that thread
    # holds a lock (the watcher's, or the stop Event's own), so it takes none: it records
    # the signal and wakes the loop through the watcher's lock-free self-pipe.
    def stop(signum: int, frame: FrameType | None) -> None:
        service.stop()

    def reload(signum: int, frame: FrameType | None) -> None:
        service.reload()

    previous = {
        signum: signal.signal(signum, handler)
        for signum, handler in (
            (signal.SIGTERM, stop),
            (signal.SIGINT, stop),
            (signal.SIGHUP, reload),
        )
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
