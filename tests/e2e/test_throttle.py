"""``requests_per_second`` and ``max_concurrent_requests`` with a real daemon, registry and
containerd, through the fault proxy, which records when each request arrived and ended and
answers some with 429 + ``Retry-After`` the way rate-limiting registries do."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_daemon import FAST_RETRY, configure, wait_served
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.faultproxy import FaultProxy, ProxyRecord
from tests.support.images import ImageBuilder
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

RATE = 4.0
CONCURRENT = 2


def most_in_a_second(records: list[ProxyRecord]) -> int:
    """The most requests that arrived within any one-second window."""
    starts = sorted(r.started for r in records)
    return max(len([t for t in starts if s <= t < s + 1.0]) for s in starts)


def mean_rate(records: list[ProxyRecord]) -> float:
    """Requests a second from the first arrival to the last."""
    starts = sorted(r.started for r in records)
    return (len(starts) - 1) / (starts[-1] - starts[0])


def most_in_flight(records: list[ProxyRecord]) -> int:
    """The most requests the proxy was handling at one time."""
    events = sorted([(r.started, 1) for r in records] + [(r.ended, -1) for r in records])
    inside = peak = 0
    for _, step in events:
        inside += step
        peak = max(peak, inside)
    return peak


def test_daemon_stays_under_the_registry_request_limits(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    daemon: Daemon,
    image_builder: ImageBuilder,
) -> None:
    """Three images of five blobs pushed by three parallel jobs with 3 blobs in flight each;
    the registry rate-limits a few requests. Every request of the daemon, the 429'd ones and
    their retries included, stays within 4 a second and 2 at a time, and all images land."""
    b = image_builder
    tmp_path = daemon.base_dir
    images = {f"build/app:{i}": b.image([900, 1200, 1500, 1800], f"rate/{i}") for i in range(3)}
    load(containerd, b, tmp_path, images)
    proxy.respond(429, method="HEAD", first=3, headers={"Retry-After": "1"})
    configure(
        daemon,
        containerd,
        proxy.host,
        [{"match": [f"{proxy.host}/team/**"]}],
        registry={"requests_per_second": RATE, "max_concurrent_requests": CONCURRENT},
        parallel_images=3,
        concurrency=3,
        **FAST_RETRY,
    )
    daemon.start()
    started = time.monotonic()
    for i in range(3):
        containerd.tag(f"build/app:{i}", f"{proxy.host}/team/app:{i}")
    for i in range(3):
        digest = images[f"build/app:{i}"].digest
        wait_served(registry, [f"team/app:{i}"], digest, started=started, timeout=120)
        registry.verify_image(f"team/app:{i}", digest, tmp_path / "pull")
    records = proxy.records
    assert len([r for r in records if r.status == 429]) == 3
    assert len(records) > 30
    # The client spaces its request starts exactly; the proxy timestamps a request when it has
    # read its head, so on a loaded machine one late arrival can share a window with the next
    # four. Without the limit the same push sent 51 requests within one second.
    assert most_in_a_second(records) <= RATE + 1, sorted(r.started for r in records)
    assert mean_rate(records) <= RATE * 1.05
    assert most_in_flight(records) <= CONCURRENT
