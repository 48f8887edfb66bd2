"""Lock-free snapshots of meta.db while a real containerd is committing as fast as ``ctr`` can.

A writer thread runs ``ctr images tag`` (new names), ``ctr images tag --force`` (moving names
between targets) and ``ctr images rm`` in a tight loop in two namespaces; every target of a
``tag`` and every name of an ``rm`` is its own bolt transaction inside containerd. The main thread
keeps taking :meth:`MetadataStore.read` snapshots and checks each one for internal consistency:
only the known source descriptors can appear as targets (no half-read target bucket), names are
unique, the untouched source names are always there, txids never go backwards, and two
snapshots of the same txid are identical. The only error allowed is :class:`SnapshotBusyError`.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from imagepushd.errors import ImagepushdError, SnapshotBusyError
from imagepushd.oci import Descriptor
from imagepushd.watch.bbolt import BoltFile, Meta, Tx, fnv1a64
from imagepushd.watch.metadata import MetadataSnapshot, MetadataStore
from tests.support.containerd import Containerd
from tests.support.images import Blob, ImageBuilder

NAMESPACES = ("default", "team-b")
#: Metadata transactions the writer performs (counted from its own operations; the meta txid
#: delta must be at least this, and at least 1,000).
TARGET_TXNS = 2500
#: Snapshots to take before the writer may stop (it also stops at MAX_SECONDS).
TARGET_SNAPSHOTS = 2000
MAX_SECONDS = 60.0
#: Live writer-managed tags per namespace are kept within [LOW, HIGH].
LOW, HIGH = 25, 70


def _sources(b: ImageBuilder) -> dict[str, Blob]:
    """Four small images: an OCI manifest, a multi-platform OCI index, Docker list and manifest."""
    single = b.manifest([b.layer(700, "conc/single/0"), b.layer(0, "conc/single/empty")])
    amd = b.manifest([b.layer(300, "conc/idx/amd")])
    arm = b.manifest([b.layer(300, "conc/idx/arm")], architecture="arm64", variant="v8")
    index = b.index([amd, arm])
    d_amd = b.manifest([b.layer(200, "conc/dl/amd", docker=True)], docker=True)
    d_arm = b.manifest(
        [b.layer(200, "conc/dl/arm", docker=True)], architecture="arm", variant="v7", docker=True
    )
    docker_list = b.index([d_amd, d_arm], docker=True)
    docker_manifest = b.manifest([b.layer(123, "conc/dm/0", docker=True)], docker=True)
    return {
        "example.com/src/single:1": single,
        "example.com/src/index:1": index,
        "example.com/src/docker-list:1": docker_list,
        "example.com/src/docker-manifest:1": docker_manifest,
    }


@dataclass
class Writer:
    """The ``ctr`` loop: a model of the tags it manages and the transactions it caused."""

    containerd: Containerd
    sources: dict[str, Blob]
    seed: int = 20240601
    stop: threading.Event = field(default_factory=threading.Event)
    model: dict[str, dict[str, str]] = field(default_factory=dict)  # ns -> name -> source name
    txns: int = 0
    calls: int = 0
    ops: dict[str, int] = field(default_factory=lambda: {"tag": 0, "force": 0, "rm": 0})
    error: BaseException | None = None
    _serial: int = 0

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _fresh(self, k: int) -> list[str]:
        names = []
        for _ in range(k):
            self._serial += 1
            names.append(f"example.com/conc/t{self._serial}:v{self._serial % 7}")
        return names

    def _loop(self) -> None:
        rng = random.Random(self.seed)
        src_names = list(self.sources)
        for ns in NAMESPACES:
            self.model.setdefault(ns, {})
        while not self.stop.is_set():
            ns = NAMESPACES[self.calls % len(NAMESPACES)]
            live = self.model[ns]
            src = rng.choice(src_names)
            # Mostly short bursts of commits, so the gaps while the next ctr process starts
            # leave room for snapshots; now and then a long burst that forces retries.
            k = rng.randint(10, 25) if rng.random() < 0.15 else rng.randint(1, 6)
            roll = rng.random()
            if len(live) < LOW or (len(live) < HIGH and roll < 0.45):
                names = self._fresh(k)
                self.containerd.tag(src, *names, namespace=ns)
                self.txns += k + 2  # one Create per target, plus ctr's lease create/delete
                self.ops["tag"] += 1
                for name in names:
                    live[name] = src
            elif roll < 0.75 and len(live) < HIGH:
                # Move existing names (and create a couple of new ones) with --force: an
                # existing name is Create (fails, rolled back) + Delete + Create.
                names = rng.sample(sorted(live), min(k, len(live))) + self._fresh(2)
                self.containerd.tag(src, *names, namespace=ns, force=True)
                self.txns += sum(2 if n in live else 1 for n in names) + 2
                self.ops["force"] += 1
                for name in names:
                    live[name] = src
            else:
                names = rng.sample(sorted(live), min(k, len(live)))
                self.containerd.rm(*names, namespace=ns)
                self.txns += len(names)
                self.ops["rm"] += 1
                for name in names:
                    del live[name]
            self.calls += 1


@dataclass
class Checker:
    """Checks every snapshot against the known sources and against earlier snapshots."""

    sources: dict[str, Blob]
    targets: dict[str, Descriptor] = field(init=False)
    by_txid: dict[int, int] = field(default_factory=dict)
    last_txid: int = 0

    def __post_init__(self) -> None:
        self.targets = {
            b.digest: Descriptor(b.media_type, b.digest, b.size) for b in self.sources.values()
        }

    def check(self, snap: MetadataSnapshot) -> None:
        assert snap.txid >= self.last_txid, f"txid went back: {snap.txid} < {self.last_txid}"
        self.last_txid = snap.txid
        assert set(NAMESPACES) <= set(snap.namespaces), snap.namespaces
        keys = [(r.namespace, r.name) for r in snap.images]
        assert len(keys) == len(set(keys)), f"txid {snap.txid}: duplicate image names"
        for record in snap.images:
            want = self.targets.get(record.target.digest)
            assert want is not None, f"txid {snap.txid}: {record} has an unknown target digest"
            assert record.target == want, f"txid {snap.txid}: half-read target {record}"
        names = set(keys)
        for ns in NAMESPACES:
            for name, blob in self.sources.items():
                assert (ns, name) in names, f"txid {snap.txid}: source {ns}/{name} missing"
                record = snap.image(ns, name)
                assert record is not None
                assert record.target.digest == blob.digest
        fingerprint = hash(frozenset((r.namespace, r.name, r.target) for r in snap.images))
        seen = self.by_txid.setdefault(snap.txid, fingerprint)
        assert seen == fingerprint, f"two different snapshots claim txid {snap.txid}"


def _txid(path: Path) -> int:
    with BoltFile(path) as bolt:
        return bolt.meta().txid


def _wait_idle(path: Path, quiet: float = 0.3, limit: float = 5.0) -> int:
    """Wait until containerd has not committed for ``quiet`` seconds (background GC, leases)."""
    deadline = time.monotonic() + limit
    txid = _txid(path)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = _txid(path)
        if now == txid:
            return txid
        txid = now
    return txid


@pytest.mark.e2e
def test_snapshots_stay_consistent_under_a_busy_writer(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    sources = _sources(image_builder)
    archive = tmp_path / "sources.tar"
    image_builder.write_oci_archive(archive, sources)
    containerd.create_namespace("team-b")
    for ns in NAMESPACES:
        containerd.import_archive(archive, namespace=ns)
        assert containerd.images(ns) == {n: b.digest for n, b in sources.items()}
    db = containerd.meta_db

    # The claim the operation count relies on: ctr commits each tag target separately.
    before = _wait_idle(db)
    calib = [f"example.com/calib/c:{i}" for i in range(40)]
    containerd.tag("example.com/src/single:1", *calib)
    after = _txid(db)
    assert len(calib) + 2 <= after - before <= len(calib) + 5, (before, after)
    containerd.rm(*calib)
    start_txid = _wait_idle(db)

    writer = Writer(containerd, sources)
    checker = Checker(sources)
    shared = MetadataStore.at_root(containerd.root)
    snapshots = busy = 0
    latencies: list[float] = []
    # Any other error from read() is a reader bug (a conclusion drawn from a torn walk that
    # escaped the txid re-check); collect them so the failure reports how often it happens.
    errors: dict[str, list[str]] = {}
    thread = threading.Thread(target=writer.run, name="ctr-writer", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        while thread.is_alive():
            # Mostly one long-lived store; every tenth snapshot from a freshly opened one.
            fresh = snapshots % 10 == 9
            store = MetadataStore.at_root(containerd.root) if fresh else shared
            begun = time.perf_counter()
            try:
                snap = store.read()
            except SnapshotBusyError:
                busy += 1
                continue
            except ImagepushdError as exc:
                errors.setdefault(type(exc).__name__, []).append(str(exc))
                continue
            finally:
                if fresh:
                    store.close()
            latencies.append(time.perf_counter() - begun)
            checker.check(snap)
            snapshots += 1
            elapsed = time.monotonic() - started
            if (writer.txns >= TARGET_TXNS and snapshots >= TARGET_SNAPSHOTS) or (
                elapsed > MAX_SECONDS
            ):
                writer.stop.set()
    finally:
        writer.stop.set()
        thread.join(timeout=60)
    loop_seconds = time.monotonic() - started
    assert writer.error is None, f"writer failed: {writer.error!r}"
    end_txid = _txid(db)
    delta = end_txid - start_txid
    distinct = len(checker.by_txid)
    report = (
        f"snapshots={snapshots} busy={busy} distinct_txids={distinct} txid_delta={delta} "
        f"writer_txns={writer.txns} ctr_calls={writer.calls} ops={writer.ops} "
        f"loop={loop_seconds:.1f}s read_ms(median/p95/max)="
        f"{statistics.median(latencies) * 1e3:.1f}/"
        f"{statistics.quantiles(latencies, n=20)[-1] * 1e3:.1f}/{max(latencies) * 1e3:.0f} "
        f"other_errors={ {k: len(v) for k, v in errors.items()} }"
    )
    print(report)
    assert not errors, (
        "read() raised errors other than SnapshotBusyError: "
        + "; ".join(f"{k} x{len(v)} (first: {v[0]})" for k, v in errors.items())
        + f"\n{report}"
    )

    assert delta >= 1000, report
    # Each target/name is its own transaction: the txid moved at least as often as the writer's
    # per-target count (containerd's GC adds a few transactions of its own).
    assert delta >= writer.txns, report
    assert snapshots >= 500, report
    assert distinct >= 100, report  # the snapshots really saw the database moving

    final = shared.read()
    checker.check(final)
    shared.close()
    for ns in NAMESPACES:
        got = {r.name: r.target.digest for r in final.images if r.namespace == ns}
        assert got == containerd.images(ns), ns
        model = {n: sources[s].digest for n, s in writer.model[ns].items()}
        assert got == {**{n: b.digest for n, b in sources.items()}, **model}, ns


T = TypeVar("T")


def _commit_reusing_root(path: Path, meta: Meta) -> None:
    """Play containerd on a copied meta.db: tx N+1 rewrites the root page to a new page (as every
    commit does), and the old root page, now free, is reused (here: an empty leaf, no ``v1``)."""
    order, ps, old, new = meta.layout.order, meta.page_size, meta.root, meta.pgid
    fd = os.open(path, os.O_RDWR)
    try:
        page = bytearray(os.pread(fd, ps, old * ps))
        struct.pack_into(order + "Q", page, 0, new)
        os.pwrite(fd, bytes(page), new * ps)
        raw = bytearray(meta.raw)
        struct.pack_into(order + "QQ", raw, 16, new, 0)  # root bucket {root pgid, sequence}
        struct.pack_into(order + "QQ", raw, 40, new + 1, meta.txid + 1)  # pgid, txid
        struct.pack_into(order + "Q", raw, 56, fnv1a64(bytes(raw[:56])))
        os.pwrite(fd, bytes(raw), ((meta.txid + 1) % 2) * ps + 16)
        os.pwrite(fd, struct.pack(order + "QHHI", old, 0x02, 0, 0), old * ps)
    finally:
        os.close(fd)


class _RacingBolt(BoltFile):
    """A BoltFile whose first walk starts just before containerd commits and reuses the root."""

    def view(self, fn: Callable[[Tx], T]) -> T:
        pending = [True]

        def racing(tx: Tx) -> T:
            if pending:
                pending.clear()
                _commit_reusing_root(self.path, tx.meta)
            return fn(tx)

        return super().view(racing)


@pytest.mark.e2e
def test_commit_reusing_the_root_page_during_a_walk_is_retried(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    """Deterministic form of the race the busy-writer test hits now and then: the walk of tree N
    finds no ``v1`` bucket because the root page was reused, so the snapshot must be retried on
    N+1, not reported as an unsupported schema."""
    sources = _sources(image_builder)
    archive = tmp_path / "sources.tar"
    image_builder.write_oci_archive(archive, sources)
    containerd.import_archive(archive)
    containerd.tag("example.com/src/index:1", *[f"example.com/race/r:{i}" for i in range(60)])
    containerd.stop()
    db = tmp_path / "meta.db"
    shutil.copyfile(containerd.meta_db, db)
    expected = MetadataStore(BoltFile(db)).read()
    assert len(expected.images) == len(sources) + 60

    snap = MetadataStore(_RacingBolt(db)).read()

    assert snap.txid == expected.txid + 1
    assert snap.images == expected.images
