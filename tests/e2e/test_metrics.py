"""``[metrics]`` of a real ``imagepushd run``: scraped over HTTP while it pushes for real.

Real containerd, real docker-registry (and the fault proxy where a test needs retries and
resumes); the daemon is a subprocess (tests/support/daemon.py). Every pushed image is checked
at the registry with skopeo, then the counters are compared with what the test knows was sent.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_daemon import FAST_RETRY, configure, small, wait_served
from tests.e2e.test_referrers import SOURCE, cosign_signature, cosign_tag
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.faultproxy import FaultProxy, describe
from tests.support.images import Blob, ImageBuilder
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e

MiB = 1 << 20
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def with_metrics(daemon: Daemon, listen: str) -> None:
    """Add ``[metrics] listen`` to the configuration :func:`configure` wrote."""
    daemon.write_config(daemon.config_path.read_text() + f'\n[metrics]\nlisten = "{listen}"\n')


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def blob_bytes(b: ImageBuilder, manifest: Blob) -> int:
    """Bytes of the config and layers of a single-platform image (what a fresh push sends)."""
    return sum(child.size for child in b.children_of(manifest))


def pushes(got: Samples, rule: str, result: str) -> float:
    return got[("imagepushd_pushes_total", (("result", result), ("rule", rule)))]


def test_scrape_over_tcp_counts_the_pushes(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Two tags pushed by rule 0: its counter goes 0 → 2, bytes equal the blobs' sizes, the
    last-push time falls within the pushes, scans were timed, nothing is left queued."""
    b = image_builder
    host = registry.host
    images = {f"build/app:{i}": small(b, f"metrics/{i}") for i in (1, 2)}
    load(containerd, b, tmp_path, images)
    configure(daemon, containerd, host, [{"match": [f"{host}/team/**"]}, {"match": ["x/**"]}])
    port = free_port()
    with_metrics(daemon, f"127.0.0.1:{port}")
    daemon.start()

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        before = scrape(client)
        assert pushes(before, "0", "pushed") == 0
        assert pushes(before, "1", "pushed") == 0
        assert before[("imagepushd_scan_duration_seconds_count", ())] >= 1

        started_wall = time.time()
        for i in (1, 2):
            started = time.monotonic()
            containerd.tag(f"build/app:{i}", f"{host}/team/app:{i}")
            wait_served(
                registry, [f"team/app:{i}"], images[f"build/app:{i}"].digest, started=started
            )
        for i in (1, 2):
            registry.verify_image(f"team/app:{i}", images[f"build/app:{i}"].digest)
        daemon.wait_notify("STATUS", "idle · 2 pushed")
        after = scrape(client)
        ended_wall = time.time()

        # A reload takes a new rule (its series appear at 0) but not a new address.
        mark = daemon.log_mark()
        text = daemon.config_path.read_text().replace(str(port), str(free_port()))
        daemon.write_config(text + '\n[[rule]]\nmatch = ["y/**"]\n')
        daemon.reload()
        daemon.wait_log("reloaded", since=mark)
        assert "[metrics] changes take effect when the daemon restarts" in daemon.log_text(mark)
        reloaded = scrape(client)
        assert pushes(reloaded, "2", "pushed") == 0
        assert pushes(reloaded, "0", "pushed") == 2

    assert pushes(after, "0", "pushed") == 2
    assert pushes(after, "0", "failed") == 0
    assert pushes(after, "1", "pushed") == 0
    sent = after[("imagepushd_bytes_sent_total", (("rule", "0"),))]
    assert sent == sum(blob_bytes(b, m) for m in images.values())
    last = after[("imagepushd_last_push_timestamp_seconds", (("rule", "0"),))]
    assert started_wall <= last <= ended_wall
    assert ("imagepushd_last_push_timestamp_seconds", (("rule", "1"),)) not in after
    scans = after[("imagepushd_scan_duration_seconds_count", ())]
    assert scans > before[("imagepushd_scan_duration_seconds_count", ())]
    assert after[("imagepushd_scan_duration_seconds_sum", ())] > 0
    assert after[("imagepushd_queue_depth", ())] == 0
    assert not [
        k for k in after if k[0] in ("imagepushd_retries_total", "imagepushd_resumes_total")
    ]
    print(f"\nbytes sent {sent:.0f}, scans {scans:.0f}, last push {last - started_wall:.2f}s in")


def test_scrape_over_a_unix_socket_counts_a_retry_and_a_resume(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """A 503 on the second 4 MiB PATCH of a 12 MiB layer: one retry, one resume from the
    registry's offset, served on a unix socket; the socket file is gone after the stop."""
    b = image_builder
    root = b.manifest([b.layer(12 * MiB, "resume/big"), b.layer(900, "resume/small")])
    load(containerd, b, tmp_path, {"build/big:1": root})
    gate = proxy.respond(503, method="PATCH", nth=2)
    configure(
        daemon,
        containerd,
        proxy.host,
        [{"match": [f"{proxy.host}/big/**"]}],
        registry={"chunk_size": "4MiB"},
        **FAST_RETRY,
    )
    with tempfile.TemporaryDirectory(prefix="ipd-m-", dir="/tmp") as short:
        path = Path(short) / "metrics.sock"
        with_metrics(daemon, f"unix:{path}")
        daemon.start()
        assert path.is_socket()
        started = time.monotonic()
        containerd.tag("build/big:1", f"{proxy.host}/big/app:1")
        wait_served(registry, ["big/app:1"], root.digest, started=started, timeout=30)
        registry.verify_image("big/app:1", root.digest, tmp_path / "pull")
        daemon.wait_notify("STATUS", "idle · 1 pushed")
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, base_url="http://imagepushd", timeout=5) as client:
            got = scrape(client)
        assert gate.fired == 1, describe(proxy.records)
        assert daemon.stop() == 0
        assert not path.exists()

    labels = (("registry", proxy.host),)
    assert got[("imagepushd_retries_total", labels)] == 1, describe(proxy.records)
    assert got[("imagepushd_resumes_total", labels)] == 1, describe(proxy.records)
    assert pushes(got, "0", "pushed") == 1
    sent = got[("imagepushd_bytes_sent_total", (("rule", "0"),))]
    # The refused chunk was sent once more; resuming (not restarting) keeps it at that.
    assert blob_bytes(b, root) <= sent <= blob_bytes(b, root) + 4 * MiB
    print(f"\nbytes sent {sent:.0f} for {blob_bytes(b, root)} bytes of blobs")


def test_a_referrer_pushed_after_its_image_counts_as_a_push_of_the_rule(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    app = small(b, "metrics/signed")
    sig = cosign_signature(b, app, "example.com/team/app")
    load(containerd, b, tmp_path, {"build/app:1": app, "build/app:sig": sig})
    rule = {"match": [SOURCE], "target": f"{registry.host}/mirror/app:{{tag}}", "referrers": True}
    configure(daemon, containerd, registry.host, [rule])
    port = free_port()
    with_metrics(daemon, f"127.0.0.1:{port}")
    daemon.start()
    containerd.tag("build/app:sig", f"example.com/team/app:{cosign_tag(app)}")
    started = time.monotonic()
    containerd.tag("build/app:1", SOURCE)
    wait_served(registry, [f"mirror/app:{cosign_tag(app)}"], sig.digest, started=started)
    registry.verify_image("mirror/app:1", app.digest)
    registry.verify_image(f"mirror/app:{cosign_tag(app)}", sig.digest, tmp_path / "pull")
    daemon.wait_notify("STATUS", "idle · 2 pushed")

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        got = scrape(client)
    assert pushes(got, "0", "pushed") == 2
    sent = got[("imagepushd_bytes_sent_total", (("rule", "0"),))]
    assert sent == blob_bytes(b, app) + blob_bytes(b, sig)


def test_daemon_with_the_metrics_port_taken_exits_with_one_line(
    containerd: Containerd, registry: Registry, daemon: Daemon
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        configure(daemon, containerd, registry.host, [{"match": ["x/**"]}])
        with_metrics(daemon, f"127.0.0.1:{port}")
        mark = daemon.log_mark()
        daemon.start(wait_ready=False)
        assert daemon.wait() == 1
    lines = [line for line in daemon.log_text(mark).splitlines() if "error" in line]
    assert lines == [
        f"imagepushd: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], daemon.log_text(mark)
    assert not daemon.notifications()
