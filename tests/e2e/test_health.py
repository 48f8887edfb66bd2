"""Registry health with a real daemon, a real containerd and a real docker-registry.

The registry is stopped and started again on the same port and storage while matching images
are tagged: the daemon says so once each way, shows it in ``status`` and in the
``imagepushd_registry_up`` gauge, and pushes every waiting image as soon as the registry is
back. Through the fault proxy, one ``429`` with ``Retry-After`` holds every job of the
registry. Every pushed image is checked with skopeo (digest equal, every blob pulled).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_daemon import configure, small, wait_served
from tests.e2e.test_metrics import scrape, with_metrics
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.faultproxy import FaultProxy, describe
from tests.support.images import ImageBuilder
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e

#: Fewer, shorter retries than the defaults, so the outage is confirmed within a second.
QUICK_RETRY = {"retry_attempts": 2, "retry_initial": "100ms", "retry_max": "200ms"}
#: Hang guard for "every waiting image is served after the return" (the target is 10 s).
BACK_WITHIN = 60.0


def noisy(log: str) -> list[str]:
    """The daemon's WARNING and ERROR lines (stderr format ``imagepushd: LEVEL: ...``)."""
    return [line for line in log.splitlines() if ": WARNING: " in line or ": ERROR: " in line]


def test_an_outage_is_one_line_each_way_and_every_waiting_image_goes_when_it_is_back(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Registry stopped while 3 matching images are tagged: one warning naming it and the 3
    waiting jobs, nothing else while it is down; status and the gauge say down; restarted on
    the same port: one line, and all 3 are served within seconds (job backoff left at its
    30 s default, which no job waits for)."""
    b = image_builder
    host = registry.host
    images = {f"build/app:{i}": small(b, f"health/{i}") for i in range(4)}
    load(containerd, b, tmp_path, images)
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}], **QUICK_RETRY)
    port = free_port()
    with_metrics(daemon, f"127.0.0.1:{port}")
    daemon.start()
    metrics = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    up = ("imagepushd_registry_up", (("registry", host),))

    containerd.tag("build/app:0", f"{host}/team/app:0")
    wait_served(registry, ["team/app:0"], images["build/app:0"].digest, started=time.monotonic())
    daemon.wait_notify("STATUS", "idle · 1 pushed")
    assert scrape(metrics)[up] == 1

    registry.stop()
    mark = daemon.log_mark()
    notes = daemon.mark()
    containerd.tag("build/app:1", f"{host}/team/app:1")
    containerd.tag("build/app:2", f"{host}/team/app:2")
    containerd.tag("build/app:3", f"{host}/team/app:3")
    daemon.wait_log("is unreachable", since=mark, timeout=60)
    daemon.wait_notify("STATUS", lambda s: "1 registry down" in s, since=notes)
    status = daemon.status()
    [health] = status["registries"]
    assert health["registry"] == host
    assert health["up"] is False
    assert "Connection refused" in health["last_error"]
    text = daemon.cli("status").stdout
    assert f"registry {host}: DOWN since" in text, text
    assert scrape(metrics)[up] == 0
    time.sleep(8)  # several probes' worth (capped at 5 s): none of them may say anything
    assert daemon.status()["registries"][0]["waiting"] == 3

    registry.start()
    assert registry.host == host
    back = time.monotonic()
    took = max(
        wait_served(
            registry,
            [f"team/app:{i}"],
            images[f"build/app:{i}"].digest,
            started=back,
            timeout=BACK_WITHIN,
        )
        for i in (1, 2, 3)
    )
    print(f"\nall 3 served {took:.1f}s after the registry came back")
    daemon.wait_notify("STATUS", "idle · 4 pushed", since=notes, timeout=30)

    log = daemon.log_text(mark)
    [down] = [line for line in log.splitlines() if "is unreachable" in line]
    assert down.startswith(f"imagepushd: WARNING: registry {host} is unreachable; 3 job(s)"), log
    assert noisy(log) == [down], log
    [again] = [line for line in log.splitlines() if "is reachable again" in line]
    assert again.startswith(f"imagepushd: INFO: registry {host} is reachable again after"), log
    for i in range(4):
        registry.verify_image(f"team/app:{i}", images[f"build/app:{i}"].digest, tmp_path / "pull")
    status = daemon.status()
    [health] = status["registries"]
    assert (health["up"], health["last_error"], health["waiting"]) == (True, None, 0)
    assert status["failing"] == []
    assert status["jobs"]["done"] == 4
    assert scrape(metrics)[up] == 1
    metrics.close()


def test_retry_after_holds_every_job_of_the_registry(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Through the fault proxy, the first blob POST of app:1 gets 429 with Retry-After: 4.
    app:2, tagged right after that answer, is not pushed until the 4 s are up (its first
    request comes 3 s or more after the 429: 1 s of margin), and no request starts between
    1 s and 3 s after it; then both land. One line says so."""
    b = image_builder
    host = proxy.host
    images = {f"build/app:{i}": small(b, f"hold/{i}") for i in range(3)}
    load(containerd, b, tmp_path, images)
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}], parallel_images=2)
    daemon.start()
    containerd.tag("build/app:0", f"{host}/team/app:0")  # the client pings now, not later
    wait_served(registry, ["team/app:0"], images["build/app:0"].digest, started=time.monotonic())
    daemon.wait_notify("STATUS", "idle · 1 pushed")
    mark = daemon.log_mark()
    seen = len(proxy.records)
    rule = proxy.respond(429, method="POST", first=1, headers={"Retry-After": "4"})

    containerd.tag("build/app:1", f"{host}/team/app:1")
    deadline = time.monotonic() + 30
    while not rule.fired:
        assert time.monotonic() < deadline, describe(proxy.records[seen:])
        time.sleep(0.01)
    tagged = time.monotonic()
    containerd.tag("build/app:2", f"{host}/team/app:2")
    for i in (1, 2):
        wait_served(
            registry,
            [f"team/app:{i}"],
            images[f"build/app:{i}"].digest,
            started=time.monotonic(),
            timeout=60,
        )

    records = proxy.records[seen:]
    [refused] = [r for r in records if r.status == 429]
    # Requests already under way when the 429 came finish; none starts during the hold.
    held = [r for r in records if refused.answered + 1.0 <= r.started < refused.answered + 3.0]
    assert held == [], describe(records)
    first = min(r.started for r in records if r.path == "/v2/team/app/manifests/2")
    print(f"\napp:2's first request {first - refused.answered:.1f}s after the 429")
    assert tagged < refused.answered + 3.0 <= first, describe(records)
    log = daemon.log_text(mark)
    [line] = noisy(log)
    assert f"registry {host} asks to wait 4s: every job of it waits" in line, log
    for i in (1, 2):
        registry.verify_image(f"team/app:{i}", images[f"build/app:{i}"].digest, tmp_path / "pull")
