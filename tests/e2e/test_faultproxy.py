"""The fault proxy itself: its record of requests is complete and its own failures are real."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.process import wait_until
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def test_records_are_complete_as_soon_as_the_client_has_its_answers(
    registry: Registry, proxy: FaultProxy
) -> None:
    """Each answer is read by the client before the proxy thread records it: ``records``
    waits for those, so a count taken right after the last answer is never one short."""
    proxy.respond(503, match="/v2/nothing/", first=10)
    with httpx.Client(base_url=f"http://{proxy.host}", timeout=10) as client:
        for i in range(1, 41):
            path = "/v2/" if i % 2 else "/v2/nothing/tags/list"
            client.get(path)
            assert len(proxy.records) == i


def test_a_client_gone_mid_body_is_recorded_not_raised(
    registry: Registry, proxy: FaultProxy
) -> None:
    """A client killed while sending a body the proxy answers itself (a 503 rule) is a
    ``client-gone`` record; the proxy's error list (checked by the fixture) stays empty."""
    rule = proxy.respond(503, method="PATCH")
    head = (
        "PATCH /v2/x/blobs/uploads/1 HTTP/1.1\r\n"
        f"Host: {proxy.host}\r\nContent-Length: 4194304\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(head + b"\0" * 65536)
        # Once the rule has matched, the proxy is reading the body.
        assert wait_until(lambda: rule.fired, timeout=5, interval=0.01)
    patches = wait_until(lambda: proxy.requests("PATCH"), timeout=5, interval=0.01)
    assert patches, "the cut request was never recorded"
    [record] = patches
    assert (record.status, record.fault, record.received_bytes) == (0, "client-gone", 65536)


def test_reset_at_total_cuts_where_the_bodies_add_up(registry: Registry, proxy: FaultProxy) -> None:
    """Two 4 MiB PATCHes and a cut at 6 MiB: the second is cut 2 MiB in, once."""
    rule = proxy.reset_at_total(6 * MiB)
    body = bytes(4 * MiB)
    with httpx.Client(base_url=f"http://{proxy.host}", timeout=30) as client:
        started = client.post("/v2/cut/blobs/uploads/", headers={"Content-Length": "0"})
        first = client.patch(started.headers["location"], content=body)
        assert first.status_code == 202
        with pytest.raises(httpx.TransportError):
            client.patch(first.headers["location"], content=body)
        again = client.post("/v2/cut/blobs/uploads/", headers={"Content-Length": "0"})
        assert client.patch(again.headers["location"], content=body).status_code == 202
    patches = proxy.requests("PATCH")
    assert [(r.status, r.body_bytes, r.fault) for r in patches] == [
        (202, 4 * MiB, None),
        (0, 2 * MiB, "reset"),
        (202, 4 * MiB, None),
    ]
    assert (rule.fired, rule.counted) == (1, 12 * MiB)
