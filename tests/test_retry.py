"""The retry policy: which failures repeat, how long it waits, how often, and what it logs."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagepushd.errors import (
    RegistryAuthError,
    RegistryConnectionError,
    RegistryError,
)
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.retry import Retrier, RetryPolicy, parse_retry_after
from tests.support.fakeregistry import Network, make_client

HOST = "registry.test"
NOW = 1_700_000_000.0


def failing(errors: list[BaseException], result: str = "done") -> Callable[[], str]:
    """A callable raising each of ``errors`` in turn, then returning ``result``."""
    pending = list(errors)
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


# ---- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0", 0.0),
        ("7", 7.0),
        (" 120 ", 120.0),
        (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
        (email.utils.formatdate(NOW - 30, usegmt=True), 0.0),  # in the past: no wait
        ("Sun, 06 Nov 1994 08:49:37", 0.0),  # no zone: taken as UTC
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=lambda: NOW) == expected


def test_retry_after_seconds_wins_over_backoff() -> None:
    sleeps: list[float] = []
    fn = failing([RegistryError("busy", status=429, retry_after=7.0)])

    assert Retrier(sleep=sleeps.append, rand=lambda: 0.0).call("x", fn) == "done"

    assert sleeps == [7.0]


def test_retry_after_is_capped() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(max_retry_after=60.0)
    fn = failing([RegistryError("busy", status=503, retry_after=3600.0)])

    Retrier(policy, sleep=sleeps.append).call("x", fn)

    assert sleeps == [60.0]


@pytest.fixture
def clients() -> Iterator[Callable[..., RegistryClient]]:
    made: list[RegistryClient] = []

    def make(
        handler: Callable[[httpx.Request], httpx.Response], **kwargs: object
    ) -> RegistryClient:
        network = Network()
        network.route(HOST, handler)
        client = make_client(network, HOST, **kwargs)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def scripted(
    statuses: list[int], headers: dict[str, str] | None = None
) -> tuple[Callable[[httpx.Request], httpx.Response], list[httpx.Request]]:
    """A server answering ``/v2/`` with 200 and other requests with ``statuses`` in turn."""
    pending = list(statuses)
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200)
        seen.append(request)
        status = pending.pop(0) if pending else 200
        return httpx.Response(status, headers=headers if status != 200 else None)

    return handle, seen


@pytest.mark.parametrize(
    ("header", "expected"),
    [("9", 9.0), ("0", 0.0)],
)
def test_client_honours_retry_after_seconds(
    clients: Callable[..., RegistryClient], header: str, expected: float
) -> None:
    sleeps: list[float] = []
    handler, seen = scripted([429], {"Retry-After": header})
    client = clients(handler, sleeps=sleeps)

    client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    assert sleeps == [expected]
    assert len(seen) == 2


def test_client_honours_retry_after_http_date(clients: Callable[..., RegistryClient]) -> None:
    # The client reads the wall clock for HTTP-dates; a date two minutes ahead is ~120 s.
    sleeps: list[float] = []
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    handler, _ = scripted([503], {"Retry-After": when})
    client = clients(handler, sleeps=sleeps)

    client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    (slept,) = sleeps
    assert 115 <= slept <= 121


def test_client_caps_retry_after(clients: Callable[..., RegistryClient]) -> None:
    sleeps: list[float] = []
    handler, _ = scripted([429, 429], {"Retry-After": "86400"})
    client = clients(handler, sleeps=sleeps, policy=RetryPolicy(max_retry_after=90.0))

    client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    assert sleeps == [90.0, 90.0]


# ---- what is retried ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_temporary_statuses_are_retried(
    clients: Callable[..., RegistryClient], status: int
) -> None:
    sleeps: list[float] = []
    handler, seen = scripted([status, status])
    client = clients(handler, sleeps=sleeps)

    response = client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    assert response.status_code == 200
    assert len(seen) == 3
    assert len(sleeps) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 405, 413, 416])
def test_permanent_statuses_are_not_retried(
    clients: Callable[..., RegistryClient], status: int
) -> None:
    sleeps: list[float] = []
    handler, seen = scripted([status])
    client = clients(handler, sleeps=sleeps)

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    assert caught.value.status == status
    assert len(seen) == 1
    assert sleeps == []


def test_attempts_are_bounded_and_the_last_error_is_raised_as_is(
    clients: Callable[..., RegistryClient],
) -> None:
    sleeps: list[float] = []
    handler, seen = scripted([503] * 100)
    client = clients(handler, sleeps=sleeps, policy=RetryPolicy(attempts=4))

    with pytest.raises(RegistryError) as caught:
        client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    assert type(caught.value) is RegistryError  # not tenacity.RetryError
    assert caught.value.status == 503
    assert len(seen) == 4
    assert len(sleeps) == 3


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (RegistryConnectionError("reset"), True),
        (RegistryConnectionError("tls", temporary=False), False),
        (RegistryAuthError("denied", status=429), False),
        (RegistryError("codes", status=400, codes=["TOOMANYREQUESTS"]), True),
        (RegistryError("codes", status=400, codes=["UNAVAILABLE"]), True),
        (RegistryError("codes", status=400, codes=["DIGEST_INVALID"]), False),
        (ValueError("a bug"), False),
        (OSError("not ours"), False),
    ],
)
def test_only_temporary_registry_errors_are_retried(error: BaseException, retried: bool) -> None:
    sleeps: list[float] = []
    fn = failing([error])
    retrier = Retrier(sleep=sleeps.append)

    if retried:
        assert retrier.call("x", fn) == "done"
        assert len(sleeps) == 1
    else:
        with pytest.raises(type(error)) as caught:
            retrier.call("x", fn)
        assert caught.value is error
        assert sleeps == []


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (RegistryConnectionError("refused"), True),
        (RegistryConnectionError("TLS verification failed", temporary=False), False),
        (RegistryError("bad gateway", status=502), True),
        (RegistryError("unavailable", status=503), True),
        (RegistryError("gateway timeout", status=504), True),
        (RegistryError("codes", status=400, codes=["UNAVAILABLE"]), True),
        (RegistryError("internal", status=500), False),
        (RegistryError("slow down", status=429, retry_after=5.0), False),
        (RegistryError("unknown", status=404, codes=["BLOB_UPLOAD_UNKNOWN"]), False),
        (RegistryAuthError("denied", status=503), False),
    ],
)
def test_which_errors_speak_for_the_whole_registry(error: RegistryError, unavailable: bool) -> None:
    assert error.is_unavailable() is unavailable


def test_on_retry_is_called_before_each_retry_and_not_when_giving_up() -> None:
    retries: list[int] = []
    retrier = Retrier(
        RetryPolicy(attempts=3), sleep=lambda _: None, on_retry=lambda: retries.append(1)
    )

    assert retrier.call("x", failing([RegistryError("busy", status=503)])) == "done"
    assert len(retries) == 1
    with pytest.raises(RegistryError):
        retrier.call("x", failing([RegistryError("busy", status=503)] * 3))
    assert len(retries) == 3  # two more: the third failure is the last attempt
    with pytest.raises(RegistryError):
        retrier.call("x", failing([RegistryError("denied", status=403)]))
    assert len(retries) == 3


def test_each_attempt_is_logged_with_its_reason(
    clients: Callable[..., RegistryClient], caplog: pytest.LogCaptureFixture
) -> None:
    handler, _ = scripted([503, 429, 502])
    client = clients(handler)

    with caplog.at_level(logging.WARNING, logger="imagepushd"):
        client.send("GET", client.url("/v2/x/tags/list"), scopes=(), ok={200}, retry=True)

    records = [r for r in caplog.records if r.name == "imagepushd.push.registry.retry"]
    assert len(records) == 3
    for number, (record, status) in enumerate(zip(records, (503, 429, 502), strict=True), 1):
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert f"attempt {number} of 5" in message
        assert f"HTTP {status}" in message
        assert HOST in message
        assert "retrying in" in message


# ---- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(attempts=7, initial=0.5, maximum=3.0)
    low: list[float] = []
    high: list[float] = []
    fn_low = failing([RegistryError("x", status=503)] * 6)
    fn_high = failing([RegistryError("x", status=503)] * 6)

    Retrier(policy, sleep=low.append, rand=lambda: 0.0).call("x", fn_low)
    Retrier(policy, sleep=high.append, rand=lambda: 1.0).call("x", fn_high)

    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert low == [c / 2 for c in ceilings]
    assert high == ceilings


@given(
    attempt=st.integers(min_value=1, max_value=40),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    initial=st.floats(min_value=0.01, max_value=5.0),
    maximum=st.floats(min_value=0.01, max_value=120.0),
)
def test_jitter_stays_within_half_ceiling_and_ceiling(
    attempt: int, r: float, initial: float, maximum: float
) -> None:
    policy = RetryPolicy(initial=initial, maximum=maximum)
    retrier = Retrier(policy, sleep=lambda s: None, rand=lambda: r)
    ceiling = min(maximum, initial * 2 ** (attempt - 1))

    delay = retrier.delay(attempt, RegistryError("x", status=503))

    assert ceiling / 2 <= delay <= ceiling


def test_jitter_uses_the_injected_random_source() -> None:
    values = iter([0.0, 0.5, 0.999])
    sleeps: list[float] = []
    fn = failing([RegistryError("x", status=500)] * 3)

    Retrier(RetryPolicy(initial=1.0), sleep=sleeps.append, rand=lambda: next(values)).call("x", fn)

    assert sleeps == pytest.approx([0.5, 1.5, 3.998])
