"""The daemon's loop, driven in-process: a temporary containerd root, a fake registry, a fake clock.

meta.db is written with the test bbolt writer in containerd's layout (``v1/<ns>/images``,
``v1/<ns>/content/blob``); blobs go where containerd's content store keeps them. Each change is
written in place with a new txid and on other pages, as containerd's bbolt commits, which is
what wakes the loop. The
registry is :class:`FakeRegistry` with :class:`Manifests` behind ``httpx.MockTransport`` (see
tests/support/fakeregistry.py for what each of its habits follows). Nothing runs in a
subprocess; time bounds below are hang guards only.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagepushd.assembly import Daemon
from imagepushd.metrics import Metrics
from imagepushd.notify import Notifier
from tests.support.boltwriter import BoltWriter
from tests.support.daemon import render_config
from tests.support.fakeregistry import FakeRegistry, error
from tests.support.images import Blob, ImageBuilder
from tests.test_referrers import Manifests
from tests.versions import go_varint

HOST = "registry.test"
NAME = f"{HOST}/team/app:1"
HANG_GUARD = 60.0


class Clock:
    """The service's clock: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Readiness(Notifier):
    """A notifier that counts READY=1: after the first scan, and after each reload."""

    def __init__(self) -> None:
        super().__init__(None)
        self.count = 0

    def ready(self) -> bool:
        self.count += 1
        return super().ready()


class Scans(Metrics):
    """The daemon's metrics, counting its scans (to know one happened after a commit)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def scan_observe(self, seconds: float) -> None:
        self.count += 1
        super().scan_observe(seconds)


class Rig:
    """A containerd root, a fake registry, and the service running on a thread."""

    def __init__(self, tmp_path: Path, builder: ImageBuilder) -> None:
        self.base = tmp_path
        self.builder = builder
        self.root = tmp_path / "containerd"
        self.meta = self.root / "io.containerd.metadata.v1.bolt" / "meta.db"
        self.meta.parent.mkdir(parents=True)
        self.images: dict[str, Blob] = {}
        self.txid = 10
        self.commit()
        self.clock = Clock()
        self.fake = FakeRegistry(HOST)
        self.manifests = Manifests(self.fake, api=False)
        self.config = tmp_path / "config.toml"
        self.state = tmp_path / "state.db"
        self.service: Daemon | None = None
        self.thread: threading.Thread | None = None
        self.exit: list[int] = []
        self.notifier = Readiness()
        self.metrics = Scans()

    # ---- containerd --------------------------------------------------------------------

    def tag(self, name: str, image: Blob) -> None:
        """Tag ``name`` at ``image`` (its blobs written first, as a pull does)."""
        for blob in self.builder.blobs_of(image):
            path = self.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / blob.hex
            path.parent.mkdir(parents=True, exist_ok=True)
            with blob.open() as src:
                path.write_bytes(src.read())
        self.images[name] = image
        self.commit()

    def commit(self) -> None:
        """Write meta.db in place with a newer txid (containerd's commit)."""
        self.txid += 1
        images: dict[bytes, Any] = {}
        blobs: dict[bytes, Any] = {}
        for name, root in self.images.items():
            target = {
                b"digest": root.digest.encode(),
                b"mediatype": root.media_type.encode(),
                b"size": go_varint(root.size),
            }
            images[name.encode()] = {b"target": target}
            for blob in self.builder.blobs_of(root):
                blobs[blob.digest.encode()] = {b"size": go_varint(blob.size)}
        namespace = {b"images": images, b"content": {b"blob": blobs}}
        tree = {b"v1": {b"version": go_varint(3), b"default": namespace}}
        # bbolt never writes a commit's pages over the previous commit's (copy on write),
        # and the daemon's reader relies on it: alternate between two page ranges.
        writer = BoltWriter()
        writer.next_pgid = 2 + 64 * (self.txid % 2)
        data = writer.file(tree, txid=self.txid)
        with open(self.meta, "r+b" if self.meta.exists() else "wb") as f:
            f.write(data)
            f.truncate()

    # ---- the service -------------------------------------------------------------------

    def configure(self, rules: list[dict[str, Any]], **push: Any) -> None:
        self.config.write_text(
            render_config(
                root=self.root,
                state=self.state,
                push={"settle": "10s", "retry_attempts": 1, **push},
                rules=rules,
            )
        )

    def start(self) -> Daemon:
        service = Daemon(
            self.config,
            env={},
            home=self.base / "home",
            notifier=self.notifier,
            clock=self.clock,
            transport=httpx.MockTransport(self.fake),
            install_signals=False,
            metrics=self.metrics,
        )
        self.service = service
        self.thread = threading.Thread(target=lambda: self.exit.append(service.run()))
        self.thread.start()
        until(lambda: self.notifier.count == 1, "the first scan")
        return service

    def stop(self) -> int:
        assert self.service is not None and self.thread is not None
        self.service.stop()
        self.thread.join(HANG_GUARD)
        assert not self.thread.is_alive()
        return self.exit[0]

    def advance(self, seconds: float) -> None:
        """Move the clock, then commit so the loop wakes, and wait for its scan."""
        scans = self.metrics.count
        self.clock.now += seconds
        self.commit()
        until(lambda: self.metrics.count > scans, "a scan after the commit")

    def seen(self) -> list[str]:
        """The names the state has seen (each remembered with the clock's time then)."""
        conn = sqlite3.connect(self.state, timeout=10)
        try:
            return [name for (name,) in conn.execute("SELECT name FROM seen ORDER BY name")]
        finally:
            conn.close()

    def jobs(self) -> list[tuple[str, str, str]]:
        conn = sqlite3.connect(self.state, timeout=10)
        try:
            return list(conn.execute("SELECT name, digest, status FROM jobs ORDER BY id"))
        finally:
            conn.close()

    def holds(self, name: str, image: Blob) -> bool:
        """Whether the registry holds ``image``'s manifest under ``name``'s tag."""
        repo, _, tag = name.removeprefix(f"{HOST}/").rpartition(":")
        held = self.manifests.stored.get((repo, tag))
        return held is not None and held[1] == image.data


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


@pytest.fixture
def rig(tmp_path: Path, image_builder: ImageBuilder) -> Iterator[Rig]:
    made = Rig(tmp_path, image_builder)
    yield made
    if made.thread is not None and made.thread.is_alive():
        made.stop()


def rule(pattern: str = "team/**") -> list[dict[str, Any]]:
    return [{"match": [f"{HOST}/{pattern}"]}]


def test_a_new_tag_settles_then_is_pushed_and_stop_ends_the_loop(rig: Rig) -> None:
    rig.configure(rule(), on_start="all")
    rig.start()
    app = rig.builder.image([100, 200], "settle")
    rig.tag(NAME, app)
    until(lambda: rig.seen() == [NAME], "the tag is seen")
    rig.advance(5)  # half the settle time
    assert rig.jobs() == []
    rig.advance(6)
    until(lambda: rig.holds(NAME, app), "the image is pushed")
    until(lambda: rig.jobs() == [(NAME, app.digest, "done")], "the job is done")
    assert rig.stop() == 0


def test_a_failed_push_is_retried_after_its_backoff(rig: Rig) -> None:
    refusals = [1]

    def refuse_once(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PUT" and "/manifests/" in request.url.path and refusals:
            refusals.pop()
            return error(400, "MANIFEST_INVALID")
        return None

    rig.fake.hooks.insert(0, refuse_once)
    rig.configure(rule(), on_start="all", settle="0s", job_backoff_initial="1m")
    app = rig.builder.image([100], "retry")
    rig.tag(NAME, app)
    rig.start()
    until(lambda: [j[2] for j in rig.jobs()] == ["failed"], "the first attempt fails")
    rig.advance(10)  # well within the backoff: not tried again
    assert [j[2] for j in rig.jobs()] == ["failed"]
    rig.advance(120)
    until(lambda: rig.holds(NAME, app), "the retry pushes it")
    until(lambda: [j[2] for j in rig.jobs()] == ["done"], "the job is done")


def test_a_failing_job_is_cancelled_when_its_tag_moves(rig: Rig) -> None:
    rig.fake.hooks.insert(
        0,
        lambda r: error(400, "MANIFEST_INVALID") if r.method == "PUT" else None,
    )
    rig.configure(rule(), on_start="all", settle="0s", job_backoff_initial="1h")
    old = rig.builder.image([100], "old")
    rig.tag(NAME, old)
    rig.start()
    until(lambda: [j[2] for j in rig.jobs()] == ["failed"], "the push fails")
    new = rig.builder.image([100], "new")
    rig.tag(NAME, new)
    until(lambda: rig.jobs()[0][2] == "cancelled", "the old job is cancelled")
    assert rig.jobs()[0][:2] == (NAME, old.digest)


def test_reload_takes_the_new_rules(rig: Rig) -> None:
    rig.configure(rule("other/**"), on_start="all", settle="0s")
    app = rig.builder.image([100], "reload")
    rig.tag(NAME, app)
    service = rig.start()
    assert rig.jobs() == [] and not rig.holds(NAME, app)
    rig.configure(rule(), on_start="all", settle="0s")
    service.reload()
    until(lambda: rig.notifier.count == 2, "the reload")
    until(lambda: rig.holds(NAME, app), "the reloaded rule pushes it")
    assert rig.stop() == 0
