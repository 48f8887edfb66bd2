"""``imagepushd run`` on a busy build machine: containerd commits all the time for reasons
that have nothing to do with images (BuildKit and the CRI create and delete leases for every
build step), and the daemon's work must follow what changed, not the size of the store.

Real containerd (``ctr leases create/delete`` as the unrelated writes), real docker-registry,
the daemon as a subprocess with ``[metrics]``: its counters of image records decoded and images
planned show what each scan did. Every pushed image is checked at the registry with skopeo.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from imagepushd.watch.bbolt import BoltFile
from tests.e2e.test_daemon import configure, small, wait_served
from tests.e2e.test_metrics import Samples, scrape, with_metrics
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.images import ImageBuilder
from tests.support.process import wait_until
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e

FILLERS = 300
BURST = 10_000
DECODED = ("imagepushd_image_records_decoded_total", ())
PLANNED = ("imagepushd_images_planned_total", ())
SCANS = ("imagepushd_scan_duration_seconds_count", ())
_LEASES = itertools.count()


def txid(containerd: Containerd) -> int:
    with BoltFile(containerd.meta_db) as bolt:
        return bolt.meta().txid


@contextmanager
def lease_churn(containerd: Containerd) -> Iterator[list[int]]:
    """Create and delete leases back to back in a thread; yields the count of commits made."""
    stop = threading.Event()
    made = [0]
    failures: list[str] = []

    def run() -> None:
        while not stop.is_set():
            lease = f"busy-{next(_LEASES)}"
            for args in (("create", "--id", lease), ("delete", lease)):
                result = containerd.ctr("leases", *args, check=False)
                if result.returncode != 0:
                    failures.append(result.stderr)
                    return
                made[0] += 1

    thread = threading.Thread(target=run, name="churn", daemon=True)
    thread.start()
    try:
        yield made
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures


def settled(client: httpx.Client) -> Samples:
    """The counters once the daemon has scanned everything committed so far (no scan for 1 s)."""
    last = scrape(client)
    while True:
        time.sleep(1.0)
        now = scrape(client)
        if now[SCANS] == last[SCANS]:
            return now
        last = now


def test_unrelated_commits_decode_and_plan_no_image_and_a_tag_among_them_is_pushed(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    host = registry.host
    app = small(b, "busy/app")
    load(containerd, b, tmp_path, {"build/app:1": app})
    containerd.tag("build/app:1", *(f"build/filler{i:03d}:1" for i in range(FILLERS)))
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}], settle="0s")
    port = free_port()
    with_metrics(daemon, f"127.0.0.1:{port}")
    daemon.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        before = settled(client)
        # The first scan read every image and planned each once.
        assert before[DECODED] >= FILLERS + 1
        assert before[PLANNED] >= FILLERS + 1
        start = txid(containerd)
        with lease_churn(containerd) as made:
            assert wait_until(lambda: made[0] >= 60, timeout=60), "60 lease commits"
        during = settled(client)
        assert txid(containerd) - start >= 60
        assert during[SCANS] > before[SCANS], "the daemon did not look at the commits"
        assert during[DECODED] == before[DECODED]
        assert during[PLANNED] == before[PLANNED]

        # A matching tag made while containerd keeps committing is still pushed, promptly.
        with lease_churn(containerd) as made:
            assert wait_until(lambda: made[0] >= 10, timeout=60), "10 lease commits"
            started = time.monotonic()
            containerd.tag("build/app:1", f"{host}/team/app:1")
            wait_served(registry, ["team/app:1"], app.digest, started=started)
        registry.verify_image("team/app:1", app.digest, tmp_path / "pull")
        after = settled(client)
        # The new name was decoded and planned; the fillers were not, not even once more.
        assert 1 <= after[DECODED] - during[DECODED] < FILLERS
        assert 1 <= after[PLANNED] - during[PLANNED] < FILLERS


def test_a_burst_of_thousands_of_tags_is_no_error(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Tagging 10,000 names in a burst (100 per ctr call) keeps meta.db moving under the
    daemon's reads: a snapshot that cannot be taken for a moment is retried quietly, not
    logged (before issue 13: four to five "changed during each of 10 snapshot attempts"
    errors), and a matching tag made at the end of the burst is pushed."""
    b = image_builder
    host = registry.host
    app = small(b, "busy/burst")
    load(containerd, b, tmp_path, {"build/burst:1": app})
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}], settle="0s")
    daemon.start()
    mark = daemon.log_mark()
    names = [f"build/burst{i:05d}:1" for i in range(BURST)]
    for i in range(0, len(names), 100):
        containerd.tag("build/burst:1", *names[i : i + 100])
    started = time.monotonic()
    containerd.tag("build/burst:1", f"{host}/team/burst:1")
    wait_served(registry, ["team/burst:1"], app.digest, started=started, timeout=30)
    registry.verify_image("team/burst:1", app.digest, tmp_path / "pull")
    log = daemon.log_text(mark)
    assert "imagepushd: ERROR" not in log, log[-3000:]
    assert "imagepushd: WARNING" not in log, log[-3000:]
