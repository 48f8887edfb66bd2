"""Prometheus metrics of the daemon, and the small HTTP endpoint that serves them.

:class:`Metrics` owns a private ``CollectorRegistry`` (nothing is registered globally, so
every Service, and every test, has its own counters). :class:`MetricsServer` serves it on a
TCP address or a unix socket with one stdlib ``ThreadingHTTPServer`` code path, so bind errors
surface as one-line :class:`~imagepushd.errors.ListenError` at daemon start.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import stat
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, Self
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from imagepushd.errors import ListenError
from imagepushd.listen import Listen

log = logging.getLogger(__name__)

#: How a push job the daemon ran ended (the ``result`` label).
PushOutcome = Literal["pushed", "up_to_date", "failed", "cancelled", "interrupted"]
PUSH_OUTCOMES: tuple[PushOutcome, ...] = (
    "pushed",
    "up_to_date",
    "failed",
    "cancelled",
    "interrupted",
)
SCAN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's metrics in a registry of their own; thread-safe (prometheus_client locks)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._pushes = Counter(
            "imagepushd_pushes",
            "Pushes run, by rule (index in the config) and how they ended; referrers included.",
            ["rule", "result"],
            registry=reg,
        )
        self._bytes = Counter(
            "imagepushd_bytes_sent",
            "Blob bytes sent to registries by completed pushes (resent bytes included).",
            ["rule"],
            registry=reg,
        )
        self._retries = Counter(
            "imagepushd_retries",
            "Registry requests and upload chunks retried after a temporary failure.",
            ["registry"],
            registry=reg,
        )
        self._resumes = Counter(
            "imagepushd_resumes",
            "Chunked uploads continued from the offset the registry reported.",
            ["registry"],
            registry=reg,
        )
        self._queue = Gauge(
            "imagepushd_queue_depth",
            "Push jobs waiting: queued, or failed and waiting for their next attempt.",
            registry=reg,
        )
        self._scan = Histogram(
            "imagepushd_scan_duration_seconds",
            "Time to read containerd's metadata and plan the pushes.",
            buckets=SCAN_BUCKETS,
            registry=reg,
        )
        self._decoded = Counter(
            "imagepushd_image_records_decoded",
            "Image records decoded from containerd's metadata (new or changed ones).",
            registry=reg,
        )
        self._planned = Counter(
            "imagepushd_images_planned",
            "Images the planner decided on (new, moved or removed names, and waiting ones).",
            registry=reg,
        )
        self._last_push = Gauge(
            "imagepushd_last_push_timestamp_seconds",
            "When a push of the rule last succeeded (unix time).",
            ["rule"],
            registry=reg,
        )
        self._registry_up = Gauge(
            "imagepushd_registry_up",
            "Whether the registry answers (1) or is unreachable (0), per registry pushed to.",
            ["registry"],
            registry=reg,
        )

    def rules_known(self, rules: Iterable[int]) -> None:
        """Create every rule's push series at zero, so rates work from the first push."""
        for rule in rules:
            for result in PUSH_OUTCOMES:
                self._pushes.labels(str(rule), result)
            self._bytes.labels(str(rule))

    def push_count(
        self, rule: int, result: PushOutcome, *, bytes_sent: int = 0, at: float | None = None
    ) -> None:
        """Count one job's end; a successful one (``at``, unix seconds) sets the timestamp."""
        self._pushes.labels(str(rule), result).inc()
        if bytes_sent:
            self._bytes.labels(str(rule)).inc(bytes_sent)
        if at is not None:
            self._last_push.labels(str(rule)).set(at)

    def retry_count(self, registry: str) -> None:
        """One request or chunk to ``registry`` is about to be retried."""
        self._retries.labels(registry).inc()

    def resume_count(self, registry: str) -> None:
        """One upload to ``registry`` continues from the registry's offset."""
        self._resumes.labels(registry).inc()

    def registry_up(self, registry: str, up: bool) -> None:
        """``registry`` was found answering (``up``) or unreachable."""
        self._registry_up.labels(registry).set(1 if up else 0)

    def queue_set(self, depth: int) -> None:
        """Jobs now waiting to be pushed."""
        self._queue.set(depth)

    def scan_observe(self, seconds: float) -> None:
        """One scan took ``seconds``."""
        self._scan.observe(seconds)

    def scan_work(self, decoded: int, planned: int) -> None:
        """One scan decoded ``decoded`` image records and planned ``planned`` images."""
        self._decoded.inc(decoded)
        self._planned.inc(planned)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from the ``Accept`` header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _Handler(BaseHTTPRequestHandler):
    """``GET /metrics``; everything else is 404."""

    server_version = "imagepushd"
    timeout = 10.0  # a client that sends nothing does not hold its thread for ever

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        assert isinstance(self.server, _Server)
        body, content_type = self.server.metrics.exposition(self.headers.get("Accept", ""))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # The base writes to stderr and names the client by address, which a unix socket lacks.
        log.debug("metrics request: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: Listen, metrics: Metrics) -> None:
        self.address_family = listen.family
        self.metrics = metrics
        if listen.path is None:
            super().__init__((listen.host, listen.port), _Handler)
        else:  # typeshed types TCPServer's address as (host, port); AF_UNIX takes a path
            super().__init__(str(listen.path), _Handler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        # HTTPServer's own also looks up the host's FQDN (DNS) and fails on a unix address.
        socketserver.TCPServer.server_bind(self)


class MetricsServer:
    """Serves ``metrics`` on ``listen`` from a daemon thread until :meth:`close`.

    Binding happens here, so a taken port or an unusable path fails the daemon's start with a
    :class:`ListenError`. A unix socket left behind by a daemon that died is replaced; one that
    still answers, or a path that is not a socket, is left alone.
    """

    def __init__(self, listen: Listen, metrics: Metrics) -> None:
        self.listen = listen
        if listen.path is not None:
            _clear_stale_socket(listen)
        try:
            self._server = _Server(listen, metrics)
        except OSError as exc:
            raise ListenError(f"metrics: cannot listen on {listen}: {exc.strerror}") from None
        self._inode = listen.path.stat().st_ino if listen.path is not None else None
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        log.info("serving metrics on %s", self.url)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` (the bound port), or ``unix:PATH``."""
        if self.listen.path is not None:
            return str(self.listen)
        host, port = self._server.server_address[:2]
        bound = Listen(host=str(host), port=int(port))
        return f"http://{bound}/metrics"

    def close(self) -> None:
        """Stop serving, close the socket and remove the unix socket file if it is still ours."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        path = self.listen.path
        if path is not None:
            try:
                if path.stat().st_ino == self._inode:
                    path.unlink()
            except OSError:
                log.debug("metrics socket %s already gone", path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _clear_stale_socket(listen: Listen) -> None:
    """Remove a socket nobody answers on; refuse to take over a live one or a non-socket."""
    assert listen.path is not None
    path = listen.path
    try:
        mode = path.lstat().st_mode
    except OSError:
        return  # absent, or unreachable: bind reports it
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"metrics: cannot listen on {listen}: exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink(missing_ok=True)
            log.info("removed the stale metrics socket %s", path)
            return
        except OSError:
            return  # e.g. permission denied: bind reports it
    raise ListenError(f"metrics: cannot listen on {listen}: another process serves it")
