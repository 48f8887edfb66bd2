"""A fault-injecting HTTP reverse proxy in front of a test registry (plain HTTP, stdlib only).

:class:`FaultProxy` listens on ``127.0.0.1`` on a free port and forwards every request to one
upstream ``host:port``, one request per connection (it answers ``Connection: close``, which
httpx handles by opening a new connection for the next request). Request bodies are streamed
upstream in pieces of at most 64 KiB, never buffered whole. ``Location`` headers that point at
the upstream are rewritten to point at the proxy; ``WWW-Authenticate`` (the token realm) is
left untouched.

Faults, chosen by the test (rules are checked in the order they were added; the first that
fires wins, and every rule counts the requests its filter matches even when another fires):

- :meth:`FaultProxy.reset_body`: forward only ``after`` bytes of the n-th matching request's
  body, then close the upstream connection (the registry sees a truncated request) and reset
  the client connection (TCP RST);
- :meth:`FaultProxy.reset_at_total`: the same cut, placed by the bodies of all matching
  requests together (``Content-Length``): "60 MiB into the upload", whatever its chunks;
- :meth:`FaultProxy.fail_randomly`: answer 500/502/503 to a fraction of requests, from a
  seeded RNG, without forwarding them;
- :meth:`FaultProxy.respond`: answer a fixed status (e.g. 429 with ``Retry-After``) to the
  first K or the n-th matching request, without forwarding it;
- :meth:`FaultProxy.unauthorized`: answer 401 with the registry's own last challenge;
- :meth:`FaultProxy.drop_answer`: forward a request whole, then reset the client instead of
  relaying the registry's answer (a lost response);
- :attr:`FaultProxy.latency` (seconds slept before forwarding each request) and
  :attr:`FaultProxy.bandwidth` (bytes per second for forwarded request bodies, shared by all
  connections).

If the upstream answers before the whole body was forwarded (a 401 from the auth layer, say),
the proxy stops forwarding, relays the answer, and reads the rest of the client's body without
forwarding it, so the client sees the answer rather than a reset.

Every request is recorded (:class:`ProxyRecord`): method, path, query, the status the client
got (0 for a reset), the request-body bytes forwarded upstream and received from the client,
the fault applied, and monotonic timestamps.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Literal, Self

PIECE = 64 << 10
MAX_HEAD = 64 << 10
SOCKET_TIMEOUT = 120.0

#: Hop-by-hop headers a proxy must not forward.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
)

_ERROR_CODES = {
    401: "UNAUTHORIZED",
    429: "TOOMANYREQUESTS",
    500: "UNKNOWN",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}

_REASONS = {
    401: "Unauthorized",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class ProxyRecord:
    """One request as the proxy saw and answered it."""

    method: str
    #: The path without the query string.
    path: str
    #: The query string without ``?`` (``""`` if none).
    query: str
    #: The status the client got; 0 when the client connection was reset.
    status: int
    #: Request-body bytes forwarded to the upstream.
    body_bytes: int
    #: Request-body bytes read from the client (forwarded or not).
    received_bytes: int
    #: ``None``, or what happened: ``"reset"``, ``"respond-503"``, ``"client-gone"``...
    fault: str | None
    #: Status the upstream answered (None if the request was not forwarded or got no answer).
    upstream_status: int | None
    #: ``time.monotonic()`` when the request head had been read.
    started: float
    #: ``time.monotonic()`` just before the first byte of the answer was sent to the client
    #: (or the connection was reset): the client cannot have seen the answer earlier.
    answered: float
    #: ``time.monotonic()`` when the answer had been sent (or the connection reset).
    ended: float

    @property
    def uri(self) -> str:
        """Path and query as requested."""
        return self.path + (f"?{self.query}" if self.query else "")


@dataclass
class Rule:
    """A fault and the requests it applies to (see the ``FaultProxy`` methods that add them)."""

    action: Literal["reset", "respond", "drop"]
    method: str | None = None
    #: Regex searched in the raw ``path?query`` (percent-encoded: ``digest=sha256%3A<hex>``).
    match: str | None = None
    #: Fire only on the n-th matching request (1-based).
    nth: int | None = None
    #: Fire on the first ``first`` matching requests.
    first: int | None = None
    #: Fire with this probability (from the proxy's seeded RNG).
    probability: float | None = None
    #: ``respond``: statuses to choose from (the RNG picks one if several).
    statuses: tuple[int, ...] = (503,)
    headers: dict[str, str] = field(default_factory=dict)
    #: ``respond`` with status 401: send the registry's last ``WWW-Authenticate`` challenge.
    challenge: bool = False
    #: ``reset``: body bytes to forward before resetting.
    after: int = 0
    #: ``reset`` once: at this many body bytes of all matching requests (sets ``after``).
    total: int | None = None
    #: Body bytes (``Content-Length``) of the matching requests seen so far.
    counted: int = 0
    #: Requests that matched the filter so far.
    seen: int = 0
    #: Times the rule fired.
    fired: int = 0

    def matches(self, method: str, uri: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.match is None or re.search(self.match, uri) is not None


@dataclass(frozen=True)
class _Start:
    method: str
    path: str
    query: str
    started: float


class _Head:
    """A parsed request or response head."""

    def __init__(self, start: str, headers: list[tuple[str, str]]) -> None:
        self.start = start
        self.headers = headers

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


def _read_head(stream: IO[bytes]) -> _Head | None:
    """Read a start line and headers; None on EOF before anything was read."""
    lines: list[str] = []
    total = 0
    while True:
        line = stream.readline(MAX_HEAD + 1)
        if not line:
            if not lines:
                return None
            raise ConnectionError("connection closed in the middle of a message head")
        total += len(line)
        if total > MAX_HEAD:
            raise ConnectionError("message head too large")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            if not lines:
                continue  # tolerate stray CRLF before a request line
            break
        lines.append(text)
    headers: list[tuple[str, str]] = []
    for text in lines[1:]:
        if text[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + " " + text.strip())
            continue
        name, _, value = text.partition(":")
        headers.append((name.strip(), value.strip()))
    return _Head(lines[0], headers)


def _body_pieces(stream: IO[bytes], head: _Head) -> Iterator[tuple[bytes, int]]:
    """The request body as ``(raw bytes to forward, payload bytes among them)`` pieces.

    Content-Length bodies come as payload pieces of up to 64 KiB; chunked bodies keep their
    framing (size lines and CRLFs count 0 payload bytes).
    """
    if (head.get("transfer-encoding") or "").lower().endswith("chunked"):
        while True:
            line = stream.readline(1024)
            if not line.endswith(b"\n"):
                raise ConnectionError("truncated chunk size line")
            yield line, 0
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = stream.readline(MAX_HEAD)
                    if not trailer:
                        raise ConnectionError("truncated chunked trailer")
                    yield trailer, 0
                    if trailer in (b"\r\n", b"\n"):
                        return
            remaining = size
            while remaining:
                data = stream.read(min(PIECE, remaining))
                if not data:
                    raise ConnectionError("truncated chunk")
                remaining -= len(data)
                yield data, len(data)
            crlf = stream.readline(8)
            yield crlf, 0
        return
    remaining = int(head.get("content-length") or 0)
    while remaining > 0:
        data = stream.read(min(PIECE, remaining))
        if not data:
            raise ConnectionError(f"client body ended {remaining} bytes early")
        remaining -= len(data)
        yield data, len(data)


def _relay_body(
    source: IO[bytes], conn: socket.socket, method: str, status: int, head: _Head
) -> None:
    """Copy a response body to ``conn``: Content-Length bytes if given, else up to EOF.

    Reading exactly Content-Length matters: an upstream that answered before reading the
    whole request may reset the connection right after its answer.
    """
    if method == "HEAD" or status in (204, 304) or status < 200:
        return
    length = head.get("content-length")
    remaining = int(length) if length is not None else -1
    while remaining != 0:
        data = source.read1(PIECE if remaining < 0 else min(PIECE, remaining))
        if not data:
            if remaining > 0:
                raise ConnectionError(f"upstream answer ended {remaining} bytes early")
            return
        conn.sendall(data)
        if remaining > 0:
            remaining -= len(data)


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def describe(records: Sequence[ProxyRecord]) -> str:
    """The proxy log in a readable form, oldest first (for assertion messages)."""
    return "\n".join(
        f"{r.started:10.3f} {r.method:6} {r.path[-44:]:44} {r.status} "
        f"fwd={r.body_bytes} {r.fault or ''}"
        for r in sorted(records, key=lambda r: r.started)
    )


class FaultProxy:
    """A threaded reverse proxy to ``upstream`` (``host:port``, plain HTTP) with faults.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``seed`` seeds the RNG used by
    :meth:`fail_randomly` (decisions are drawn in request arrival order, so a push with
    ``--concurrency 1`` sees the same faults on every run).
    """

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self.upstream = upstream
        self.latency = 0.0
        self.bandwidth: float | None = None
        self.rng = random.Random(seed)
        self._rules: list[Rule] = []
        self._records: list[ProxyRecord] = []
        self._lock = threading.Lock()
        # Requests whose outcome the client may already have seen but that are not recorded
        # yet: ``records`` waits for them, so a test reading it right after a push sees all.
        self._answering: set[int] = set()
        self._settled = threading.Condition(self._lock)
        self._bucket_lock = threading.Lock()
        self._next_send = 0.0
        self._challenge: str | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._stopping = threading.Event()
        #: Unexpected exceptions from connection threads (a test may assert it is empty).
        self.errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The listening port (while running)."""
        if self._listener is None:
            raise RuntimeError("fault proxy is not running")
        return int(self._listener.getsockname()[1])

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: use it as the registry host in image references."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Listen on a free port of 127.0.0.1 and accept in a background thread."""
        if self._listener is not None:
            return self
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="fault-proxy-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, abort open connections, join every thread (idempotent)."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(10)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets = list(self._sockets)
            threads = list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
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

    # ------------------------------------------------------------------ rules
    def add_rule(self, rule: Rule) -> Rule:
        """Add a rule (checked after the ones already added); return it (``fired`` counts)."""
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule (latency and bandwidth stay)."""
        with self._lock:
            self._rules.clear()

    def reset_body(
        self, *, nth: int = 1, after: int, method: str | None = "PATCH", match: str | None = None
    ) -> Rule:
        """Forward ``after`` body bytes of the n-th matching request, then reset both sides.

        A body of at most ``after`` bytes is forwarded whole and answered normally.
        """
        return self.add_rule(Rule("reset", method=method, match=match, nth=nth, after=after))

    def reset_at_total(
        self, total: int, *, method: str | None = "PATCH", match: str | None = None
    ) -> Rule:
        """Cut (as :meth:`reset_body`) the matching request during which the bodies of all
        matching requests so far pass ``total`` bytes; once."""
        return self.add_rule(Rule("reset", method=method, match=match, total=total))

    def fail_randomly(
        self,
        fraction: float,
        statuses: Sequence[int] = (500, 502, 503),
        *,
        method: str | None = None,
        match: str | None = None,
    ) -> Rule:
        """Answer one of ``statuses`` (without forwarding) to about ``fraction`` of requests."""
        return self.add_rule(
            Rule(
                "respond",
                method=method,
                match=match,
                probability=fraction,
                statuses=tuple(statuses),
            )
        )

    def respond(
        self,
        status: int,
        *,
        method: str | None = None,
        match: str | None = None,
        first: int | None = None,
        nth: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Rule:
        """Answer ``status`` (without forwarding) to the first K, or the n-th, matching request."""
        return self.add_rule(
            Rule(
                "respond",
                method=method,
                match=match,
                first=first,
                nth=nth,
                statuses=(status,),
                headers=dict(headers or {}),
            )
        )

    def drop_answer(
        self, *, method: str | None = None, match: str | None = None, nth: int = 1
    ) -> Rule:
        """Forward the n-th matching request whole, then reset the client instead of answering.

        The registry has done the work (a chunk stored, a blob committed); the client does
        not know.
        """
        return self.add_rule(Rule("drop", method=method, match=match, nth=nth))

    def unauthorized(
        self, *, method: str | None = None, match: str | None = None, nth: int = 1
    ) -> Rule:
        """Answer 401 with the registry's last challenge to the n-th matching request."""
        return self.add_rule(
            Rule("respond", method=method, match=match, nth=nth, statuses=(401,), challenge=True)
        )

    def _choose(self, method: str, uri: str, length: int) -> tuple[Rule | None, int]:
        """Count matches and pick the first rule that fires (and its status)."""
        chosen: Rule | None = None
        status = 0
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, uri):
                    continue
                rule.seen += 1
                counted, rule.counted = rule.counted, rule.counted + length
                if chosen is not None:
                    continue
                if rule.total is not None:
                    if rule.fired or counted + length <= rule.total:
                        continue
                    rule.after = rule.total - counted
                if rule.nth is not None and rule.seen != rule.nth:
                    continue
                if rule.first is not None and rule.seen > rule.first:
                    continue
                if rule.probability is not None and self.rng.random() >= rule.probability:
                    continue
                chosen = rule
                rule.fired += 1
                status = (
                    rule.statuses[0] if len(rule.statuses) == 1 else self.rng.choice(rule.statuses)
                )
        return chosen, status

    # ------------------------------------------------------------------ records
    @property
    def records(self) -> list[ProxyRecord]:
        """A copy of every request recorded so far, oldest first.

        Requests already answered to the client are waited for (up to 5 s), so the list is
        complete as soon as the client has finished.
        """
        with self._settled:
            self._settled.wait_for(lambda: not self._answering, timeout=5)
            return list(self._records)

    def requests(self, method: str | None = None, match: str | None = None) -> list[ProxyRecord]:
        """Recorded requests with ``method`` whose ``path?query`` contains regex ``match``."""
        return [
            r
            for r in self.records
            if (method is None or r.method == method)
            and (match is None or re.search(match, r.uri) is not None)
        ]

    def body_bytes(self, method: str | None = None, match: str | None = None) -> int:
        """Request-body bytes forwarded upstream for the requests :meth:`requests` selects."""
        return sum(r.body_bytes for r in self.requests(method, match))

    # ------------------------------------------------------------------ serving
    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            conn.settimeout(SOCKET_TIMEOUT)
            thread = threading.Thread(
                target=self._serve, args=(conn,), name="fault-proxy-conn", daemon=True
            )
            with self._lock:
                self._sockets.add(conn)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._handle(conn)
        except Exception as exc:  # never let a connection thread raise into pytest
            if not self._stopping.is_set():
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._sockets.discard(conn)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.close()

    def _throttle(self, size: int) -> None:
        rate = self.bandwidth
        if not rate:
            return
        with self._bucket_lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + size / rate
        delay = start + size / rate - now
        if delay > 0:
            time.sleep(delay)

    def _record(
        self,
        start: _Start,
        *,
        status: int,
        body_bytes: int,
        received_bytes: int,
        fault: str | None,
        upstream_status: int | None = None,
        answered: float | None = None,
        ended: float | None = None,
    ) -> None:
        now = time.monotonic()
        record = ProxyRecord(
            method=start.method,
            path=start.path,
            query=start.query,
            status=status,
            body_bytes=body_bytes,
            received_bytes=received_bytes,
            fault=fault,
            upstream_status=upstream_status,
            started=start.started,
            answered=now if answered is None else answered,
            ended=now if ended is None else ended,
        )
        with self._lock:
            self._records.append(record)

    def _answer(self, start: _Start) -> None:
        """Note that the client is about to see this request's outcome."""
        with self._lock:
            self._answering.add(id(start))

    def _handle(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        base: _Start | None = None
        try:
            try:
                head = _read_head(rfile)
            except OSError:  # the client went away before its request was whole: no request
                return
            if head is None:
                return
            started = time.monotonic()
            method, _, rest = head.start.partition(" ")
            target = rest.rsplit(" ", 1)[0]
            path, _, query = target.partition("?")
            length = head.get("content-length")
            rule, status = self._choose(method, target, int(length) if length else 0)
            base = _Start(method, path, query, started)
            if rule is not None and rule.action == "respond":
                answer = self._error_answer(method, status, rule)
                self._answer_here(conn, rfile, head, base, status, f"respond-{status}", answer)
                return
            if self.latency:
                time.sleep(self.latency)
            reset_after = rule.after if rule is not None and rule.action == "reset" else None
            drop = rule is not None and rule.action == "drop"
            self._forward(conn, rfile, head, method, target, reset_after, drop, base)
        finally:
            rfile.close()
            if base is not None:
                with self._settled:  # recorded by now (or never, when the proxy is stopping)
                    self._answering.discard(id(base))
                    self._settled.notify_all()

    def _answer_here(
        self,
        conn: socket.socket,
        rfile: IO[bytes],
        head: _Head,
        base: _Start,
        status: int,
        fault: str,
        answer: bytes,
    ) -> None:
        """Answer without forwarding: read the body, then send ``answer``.

        A client that goes away first (killed mid-body, say) is recorded as ``client-gone``.
        """
        received = 0
        try:
            for _, n in _body_pieces(rfile, head):
                received += n
            answered = time.monotonic()
            self._answer(base)
            conn.sendall(answer)
        except (OSError, ValueError):
            self._record(base, status=0, body_bytes=0, received_bytes=received, fault="client-gone")
            return
        self._record(
            base,
            status=status,
            body_bytes=0,
            received_bytes=received,
            fault=fault,
            answered=answered,
        )
        self._close_gracefully(conn)

    def _error_answer(self, method: str, status: int, rule: Rule) -> bytes:
        code = _ERROR_CODES.get(status, "UNKNOWN")
        body = json.dumps(
            {"errors": [{"code": code, "message": f"injected by the fault proxy ({status})"}]}
        ).encode()
        headers = {"Content-Type": "application/json", **rule.headers}
        if rule.challenge and self._challenge is not None:
            headers["WWW-Authenticate"] = self._challenge
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        data = "\r\n".join(lines).encode("latin-1")
        return data if method == "HEAD" else data + body

    @staticmethod
    def _close_gracefully(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

    def _upstream_head(self, head: _Head, method: str, target: str) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.upstream}"]
        for name, value in head.headers:
            lname = name.lower()
            if lname == "host" or lname in _HOP_BY_HOP:
                continue
            lines.append(f"{name}: {value}")
        lines += ["Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def _response_head(self, head: _Head) -> bytes:
        lines = [head.start]
        ours = f"http://{self.host}"
        theirs = f"http://{self.upstream}"
        for name, value in head.headers:
            lname = name.lower()
            if lname in _HOP_BY_HOP:
                continue
            if lname == "location" and value.startswith(theirs):
                lines.append(f"{name}: {ours}{value[len(theirs) :]}")
            else:
                lines.append(f"{name}: {value}")
        lines += ["Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def _forward(
        self,
        conn: socket.socket,
        rfile: IO[bytes],
        head: _Head,
        method: str,
        target: str,
        reset_after: int | None,
        drop: bool,
        base: _Start,
    ) -> None:
        host, _, port = self.upstream.rpartition(":")
        forwarded = received = 0
        try:
            upstream = socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT)
        except OSError:
            bad_gateway = (
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            self._answer_here(conn, rfile, head, base, 502, "upstream-error", bad_gateway)
            return
        with self._lock:
            self._sockets.add(upstream)
        ufile = upstream.makefile("rb")
        try:
            upstream.sendall(self._upstream_head(head, method, target))
            pieces = _body_pieces(rfile, head)
            early = False
            for raw, payload in pieces:
                received += payload
                if payload and reset_after is not None and forwarded + payload >= reset_after:
                    cut = max(0, reset_after - forwarded)
                    self._throttle(cut)
                    upstream.sendall(raw[:cut])
                    forwarded += cut
                    # The registry sees a request cut short: its body ends early, then EOF.
                    self._close_gracefully(upstream)
                    self._answer(base)
                    _abort(conn)
                    self._record(
                        base,
                        status=0,
                        body_bytes=forwarded,
                        received_bytes=received,
                        fault="reset",
                    )
                    return
                if select.select([upstream], [], [], 0)[0]:
                    early = True  # the upstream answers before the body is complete
                    break
                self._throttle(len(raw))
                try:
                    upstream.sendall(raw)
                except OSError:
                    early = True
                    break
                forwarded += payload
            response = _read_head(ufile)
            self._answer(base)
            if response is None:
                raise ConnectionError("upstream closed without an answer")
            upstream_status = int(response.start.split(" ", 2)[1])
            if drop:
                # The registry did the work; its answer never reaches the client.
                with contextlib.suppress(OSError):
                    ufile.read()
                _abort(conn)
                self._record(
                    base,
                    status=0,
                    body_bytes=forwarded,
                    received_bytes=received,
                    fault="dropped-answer",
                    upstream_status=upstream_status,
                )
                return
            if upstream_status == 401:
                challenge = response.get("www-authenticate")
                if challenge:
                    self._challenge = challenge
            answered = time.monotonic()
            conn.sendall(self._response_head(response))
            _relay_body(ufile, conn, method, upstream_status, response)
            ended = time.monotonic()
            if early:
                # Read (without forwarding) the rest of the body, so the client gets to read
                # the answer instead of a reset.
                with contextlib.suppress(OSError, ValueError):
                    received += sum(n for _, n in pieces)
            self._record(
                base,
                status=upstream_status,
                body_bytes=forwarded,
                received_bytes=received,
                fault="early-answer" if early else None,
                upstream_status=upstream_status,
                answered=answered,
                ended=ended,
            )
            self._close_gracefully(conn)
        except (OSError, ValueError) as exc:
            if self._stopping.is_set():
                return
            self._answer(base)
            _abort(conn)
            self._record(
                base,
                status=0,
                body_bytes=forwarded,
                received_bytes=received,
                fault=f"proxy-error: {type(exc).__name__}: {exc}",
            )
        finally:
            ufile.close()
            with self._lock:
                self._sockets.discard(upstream)
            upstream.close()
