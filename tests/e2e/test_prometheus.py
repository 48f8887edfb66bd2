"""A real Prometheus in the loop: Debian's ``prometheus`` scrapes a real ``imagepushd run``
that pushes to a real docker-registry, with the shipped alert rules loaded.

The push is checked at the registry with skopeo (digest, every blob pulled); the pushed count
is then read back through Prometheus' HTTP API, the rules must be loaded and evaluate without
error (and none fires for a healthy daemon), and every dashboard query must evaluate. When
the daemon stops, ImagepushdDown goes pending for its real scrape target.
"""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_daemon import FAST_RETRY, configure, small, wait_served
from tests.e2e.test_metrics import with_metrics
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.images import ImageBuilder
from tests.support.prometheus import JOB, RULES, Prometheus, dashboard_queries
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e


def value(prometheus: Prometheus, expr: str) -> float | None:
    """The single value of an instant query, None while it has no result."""
    result = prometheus.query(expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def unix(rfc3339: str) -> float:
    """Prometheus' timestamps (nanoseconds, ``Z``) as unix time; fromisoformat takes micro."""
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(trimmed).timestamp()


def test_prometheus_scrapes_a_pushing_daemon_and_loads_the_rules(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    prometheus: Prometheus,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    host = registry.host
    image = small(b, "prometheus/1")
    load(containerd, b, tmp_path, {"build/app:1": image})
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}])
    port = free_port()
    target = f"127.0.0.1:{port}"
    with_metrics(daemon, target)
    daemon.start()
    prometheus.start([target], [RULES])

    pushed = f'imagepushd_pushes_total{{job="{JOB}", rule="0", result="pushed"}}'
    # The daemon's series exist at 0 from its start, so Prometheus sees the count go 0 -> 1.
    prometheus.wait_for("a scrape of the idle daemon", lambda: value(prometheus, pushed) == 0)
    assert value(prometheus, f'up{{job="{JOB}", instance="{target}"}}') == 1

    tagged = time.time()
    started = time.monotonic()
    containerd.tag("build/app:1", f"{host}/team/app:1")
    wait_served(registry, ["team/app:1"], image.digest, started=started)
    registry.verify_image("team/app:1", image.digest, tmp_path / "pull")
    daemon.wait_notify("STATUS", "idle · 1 pushed")

    prometheus.wait_for("the push counted", lambda: value(prometheus, pushed) == 1)
    counted = time.time()
    last = value(prometheus, 'imagepushd_last_push_timestamp_seconds{rule="0"}')
    assert last is not None and tagged <= last <= counted
    assert value(prometheus, f'imagepushd_queue_depth{{job="{JOB}"}}') == 0

    # The shipped rules: all loaded, each evaluated since the push was scraped, no errors.
    def evaluated() -> list[dict[str, Any]]:
        [group] = prometheus.api("rules")["groups"]
        rules: list[dict[str, Any]] = group["rules"]
        return rules if all(unix(r["lastEvaluation"]) > counted for r in rules) else []

    rules = prometheus.wait_for("every rule evaluated after the push", evaluated)
    assert {rule["name"] for rule in rules} == {
        "ImagepushdDown",
        "ImagepushdRegistryDown",
        "ImagepushdPushesFailing",
        "ImagepushdQueueGrowing",
        "ImagepushdNoRecentPush",
    }
    assert [(r["name"], r["health"], r.get("lastError", "")) for r in rules] == [
        (r["name"], "ok", "") for r in rules
    ]
    # A healthy daemon that just pushed: nothing pending, nothing firing.
    assert prometheus.api("alerts")["alerts"] == []

    # Every dashboard query evaluates (an error answer raises), and has data except the
    # retries panel: nothing was retried, so those counters have no series yet.
    empty = {
        title
        for title, expr in dashboard_queries(instance=target, rate_interval="1m", range_="5m")
        if not prometheus.query(expr)
    }
    assert empty == {"Retries and resumes by registry"}
    assert value(prometheus, "sum(imagepushd_bytes_sent_total)") == sum(
        child.size for child in b.children_of(image)
    )

    # The daemon stops: its scrape fails and ImagepushdDown goes pending (it fires after 5
    # minutes), so the rule's selector matches what a real scrape of the daemon is labelled.
    assert daemon.stop() == 0

    def down() -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = prometheus.api("alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "ImagepushdDown"]

    [alert] = prometheus.wait_for("ImagepushdDown pending", down)
    assert alert["state"] == "pending"
    assert alert["labels"] == {
        "alertname": "ImagepushdDown",
        "job": JOB,
        "instance": target,
        "severity": "critical",
    }


def test_registry_down_alert_goes_pending_and_clears_when_it_returns(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    prometheus: Prometheus,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """The registry stops while an image waits: the daemon's gauge goes 0 and
    ImagepushdRegistryDown goes pending with the registry's host; when it is back the image is
    pushed, the gauge is 1 and the alert is gone."""
    b = image_builder
    host = registry.host
    image = small(b, "prometheus/down")
    load(containerd, b, tmp_path, {"build/app:1": image})
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}], **FAST_RETRY)
    target = f"127.0.0.1:{free_port()}"
    with_metrics(daemon, target)
    daemon.start()
    prometheus.start([target], [RULES])
    prometheus.wait_for("a scrape", lambda: value(prometheus, f'up{{job="{JOB}"}}') == 1)

    registry.stop()
    containerd.tag("build/app:1", f"{host}/team/app:1")
    gauge = f'imagepushd_registry_up{{job="{JOB}", registry="{host}"}}'
    prometheus.wait_for("the registry seen down", lambda: value(prometheus, gauge) == 0)

    def registry_down() -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = prometheus.api("alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "ImagepushdRegistryDown"]

    [alert] = prometheus.wait_for("ImagepushdRegistryDown pending", registry_down)
    assert alert["state"] == "pending"
    assert alert["labels"] == {
        "alertname": "ImagepushdRegistryDown",
        "job": JOB,
        "instance": target,
        "registry": host,
        "severity": "warning",
    }

    registry.start()
    started = time.monotonic()
    wait_served(registry, ["team/app:1"], image.digest, started=started, timeout=30)
    registry.verify_image("team/app:1", image.digest, tmp_path / "pull")
    prometheus.wait_for("the registry seen up", lambda: value(prometheus, gauge) == 1)
    prometheus.wait_for("the alert gone", lambda: not registry_down())
