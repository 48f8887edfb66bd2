"""meta.db files as containerd 1.6, 1.7, 2.0 and 2.1 write them, and one with 64 KiB pages.

Only containerd 1.6.20 runs here. A private one (``tests.support``) writes the base: images in
``default`` (a manifest, an index, 40 tags so the images bucket spans leaf pages, an image
labelled ``containerd.io/gc.expire`` in the past), ``k8s.io`` (the three names CRI gives one
pull) and ``moby`` (Docker's name and its ``moby-dangling@`` name), and a lease. Its ``ctr
images ls`` is recorded, then it stops. The meta.db is read into a tree and each newer version's
file is built from that tree as that version's code would change it, then written with that
version's bbolt options by ``tests/support/boltwriter.py`` (sources: containerd tags v1.7.34,
v2.0.11, v2.1.9; bbolt v1.3.10 and v1.4.0):

- ``1.6``: the file containerd 1.6.20 wrote, unchanged (freelist persisted: bbolt's default).
- ``1.7``: sandboxes live in root-level ``<ns>/sandboxes/<id>`` buckets, beside ``v1``
  (metadata/buckets.go:284-290 ``createSandboxBucket``), each written by
  metadata/sandbox.go:257-311 (timestamps, labels, ``spec`` as a protobuf Any, ``runtime``
  bucket with ``name`` and ``options``); db version stays 3 (metadata/db.go:52); bbolt opened
  with ``NoFreelistSync`` (metadata/plugin/plugin.go:145): the meta's freelist id is all ones and
  no freelist page is written.
- ``2.0``: the 1.7 tree after ``migrateSandboxes`` (core/metadata/migrations.go:173-252: every
  root-level namespace's sandboxes copied into ``v1/<ns>/sandboxes``, one level of sub-buckets,
  then every root-level bucket but ``v1`` deleted) and db version 4 (core/metadata/db.go:53,
  written by ``Init`` at :213); the lease holds the expiring image in ``leases/<id>/images/<name>``
  with an empty value (core/metadata/leases.go:478-509 ``addImageLease``: only images with
  ``containerd.io/gc.expire``); ``NoFreelistSync`` (plugins/metadata/plugin.go:137 in v2.1.9).
- ``2.1-nosync``: the 2.0 tree with ``no_sync = true``: ``NoSync`` and ``NoGrowSync``
  (plugins/metadata/plugin.go:155-157, v2.1.9); without the grow ``ftruncate`` (bbolt v1.4.0
  db.go:1181-1225) the file ends at its last written page.
- ``2.0-64k``: the 2.0 tree on a host whose page size is 64 KiB (bbolt's default page size is
  the OS page size: bbolt v1.4.0 db.go:257-260, internal/common/types.go:37).

Nothing here changes an image record, so each version's ``ctr images ls`` lists exactly what
1.6.20's did (``listing``); 2.x's collector would remove the expired image at its next run.
"""

from __future__ import annotations

import copy
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from imagepushd.watch.bbolt import BoltFile, Bucket, Tx
from tests.support.boltwriter import write_bolt
from tests.support.containerd import Containerd
from tests.support.images import ImageBuilder
from tests.support.process import require_tools

APP = "example.com/versions/app:1"
MULTI = "example.com/versions/multi:1"
EXPIRED = "example.com/versions/expired:1"
EXPIRY = "2001-02-03T04:05:06Z"
TAGS = tuple(f"example.com/versions/tag-{i:02d}:latest" for i in range(40))
PAUSE = "registry.k8s.io/pause:3.9"
MOBY = "docker.io/library/app:1"
LEASE = "build-1"
SANDBOX = "5a4d" * 16
RUNC = "io.containerd.runc.v2"
VERSIONS = ("1.6", "1.7", "2.0", "2.1-nosync", "2.0-64k")


@dataclass(frozen=True)
class Fixture:
    """A containerd root (meta.db and content store) as ``version`` writes it."""

    version: str
    root: Path
    #: What that version's ``ctr images ls`` lists: namespace -> image name -> target digest.
    listing: dict[str, dict[str, str]]
    app_digest: str
    page_size: int
    db_version: int


@dataclass(frozen=True)
class Base:
    """The stopped containerd 1.6.20 root and what its ``ctr`` said."""

    root: Path
    listing: dict[str, dict[str, str]]
    app_digest: str


def build_base(base: Path) -> Base:
    """Drive containerd 1.6.20 to write the base meta.db (see the module docstring)."""
    require_tools("containerd", "ctr", hint="install the Debian package containerd")
    b = ImageBuilder()
    app = b.image([1500, 300], seed="versions/app")
    multi = b.index(
        [
            b.image([400], seed="versions/amd"),
            b.image([400], seed="versions/arm", architecture="arm64", variant="v8"),
        ]
    )
    expired = b.image([200], seed="versions/expired")
    pause = b.image([100], seed="versions/pause")
    docker_app = b.image([100], seed="versions/moby")
    archive = base / "images.tar"
    ctrd = Containerd(base / "containerd")
    try:
        ctrd.start()
        b.write_oci_archive(archive, {APP: app, MULTI: multi, EXPIRED: expired})
        ctrd.import_archive(archive)
        ctrd.tag(APP, *TAGS)
        ctrd.label(EXPIRED, f"containerd.io/gc.expire={EXPIRY}")
        ctrd.ctr("leases", "create", "--id", LEASE)
        # CRI's three names for one pull: tag, repo@digest, config digest.
        config = b.children_of(pause)[0]
        b.write_oci_archive(archive, {PAUSE: pause})
        ctrd.import_archive(archive, namespace="k8s.io")
        ctrd.tag(PAUSE, f"registry.k8s.io/pause@{pause.digest}", config.digest, namespace="k8s.io")
        b.write_oci_archive(archive, {MOBY: docker_app})
        ctrd.import_archive(archive, namespace="moby")
        ctrd.tag(MOBY, f"moby-dangling@{docker_app.digest}", namespace="moby")
        listing = {ns: ctrd.images(ns) for ns in ("default", "k8s.io", "moby")}
        # Stop before copying: containerd's GC may commit at any moment while it runs.
        ctrd.stop()
    finally:
        ctrd.close()
    return Base(ctrd.root, listing, app.digest)


# ---------------------------------------------------------------------- the tree


def read_tree(path: Path) -> dict[bytes, object]:
    """Every bucket and value of a bbolt file, as nested dicts."""

    def dump(bucket: Bucket) -> dict[bytes, object]:
        return {k: dump(v) if isinstance(v, Bucket) else v for k, v in bucket.items()}

    def walk(tx: Tx) -> dict[bytes, object]:
        return dump(tx.root)

    with BoltFile(path) as bolt:
        return bolt.view(walk)


def go_time(when: datetime) -> bytes:
    """Go's ``time.Time.MarshalBinary`` (version 1, UTC) of ``when``."""
    seconds = int(when.timestamp()) + 62135596800
    return struct.pack(">BqiH", 1, seconds, when.microsecond * 1000, 0xFFFF)


def go_varint(value: int) -> bytes:
    """Go's ``binary.PutVarint``: zigzag, then LEB128."""
    return _uvarint(((value << 1) ^ (value >> 63)) & ((1 << 64) - 1))


def proto_any(type_url: str, value: bytes) -> bytes:
    """A marshalled ``google.protobuf.Any`` (field 1 type_url, field 2 value)."""

    def field(number: int, data: bytes) -> bytes:
        return bytes([number << 3 | 2]) + _uvarint(len(data)) + data

    return field(1, type_url.encode()) + field(2, value)


def _uvarint(value: int) -> bytes:
    """LEB128 (Go's ``binary.PutUvarint``, protobuf's varint)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def sandbox_record() -> dict[bytes, object]:
    """A sandbox as metadata/sandbox.go:257-311 (v1.7.34) writes it."""
    now = go_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    return {
        b"createdat": now,
        b"updatedat": now,
        b"labels": {b"io.cri-containerd.kind": b"sandbox"},
        b"spec": proto_any("types.containerd.io/opencontainers/runtime-spec/1/Spec", b"{}"),
        b"runtime": {
            b"name": RUNC.encode(),
            b"options": proto_any("containerd.runc.v1.Options", b""),
        },
    }


def as_1_7(tree: dict[bytes, object]) -> dict[bytes, object]:
    """containerd 1.7's layout: a CRI sandbox in root-level ``k8s.io/sandboxes``."""
    out = copy.deepcopy(tree)
    out[b"k8s.io"] = {b"sandboxes": {SANDBOX.encode(): sandbox_record()}}
    return out


def as_2_0(tree_1_7: dict[bytes, object]) -> dict[bytes, object]:
    """``migrateSandboxes`` to db version 4, then the lease on the expiring image."""
    out = copy.deepcopy(tree_1_7)
    v1 = out[b"v1"]
    assert isinstance(v1, dict)
    for ns in [k for k in out if k != b"v1"]:
        bucket = out.pop(ns)
        assert isinstance(bucket, dict)
        sandboxes = bucket.get(b"sandboxes")
        if not isinstance(sandboxes, dict):
            continue
        target = v1.setdefault(ns, {}).setdefault(b"sandboxes", {})
        for sandbox_id, record in sandboxes.items():
            assert isinstance(record, dict)
            copied = target.setdefault(sandbox_id, {})
            for key, value in record.items():
                copied[key] = dict(value) if isinstance(value, dict) else value
    v1[b"version"] = go_varint(4)
    lease = v1[b"default"][b"leases"][LEASE.encode()]  # type: ignore[index]
    lease[b"images"] = {EXPIRED.encode(): b""}
    return out


@dataclass(frozen=True)
class _Build:
    transform: Callable[[dict[bytes, object]], dict[bytes, object]]
    page_size: int
    freelist: bool
    grow: bool
    db_version: int


_BUILDS = {
    "1.7": _Build(as_1_7, 4096, freelist=False, grow=True, db_version=3),
    "2.0": _Build(lambda t: as_2_0(as_1_7(t)), 4096, freelist=False, grow=True, db_version=4),
    "2.1-nosync": _Build(
        lambda t: as_2_0(as_1_7(t)), 4096, freelist=False, grow=False, db_version=4
    ),
    "2.0-64k": _Build(lambda t: as_2_0(as_1_7(t)), 65536, freelist=False, grow=True, db_version=4),
}


def make_root(source: Path, dest: Path, meta_db: bytes) -> Path:
    """A containerd root at ``dest``: the content store of root ``source`` and ``meta_db``."""
    content = "io.containerd.content.v1.content"
    shutil.copytree(source / content, dest / content)
    (dest / "io.containerd.metadata.v1.bolt").mkdir(parents=True)
    (dest / "io.containerd.metadata.v1.bolt" / "meta.db").write_bytes(meta_db)
    return dest


def build_fixtures(work: Path) -> dict[str, Fixture]:
    """Every version's root under ``work``."""
    base = build_base(work / "base")
    meta_db = base.root / "io.containerd.metadata.v1.bolt" / "meta.db"
    tree = read_tree(meta_db)
    out = {
        "1.6": Fixture(
            "1.6",
            make_root(base.root, work / "1.6", meta_db.read_bytes()),
            base.listing,
            base.app_digest,
            4096,
            3,
        )
    }
    for version, build in _BUILDS.items():
        data = write_bolt(
            build.transform(tree),  # type: ignore[arg-type]
            page_size=build.page_size,
            freelist=build.freelist,
            grow=build.grow,
        )
        root = make_root(base.root, work / version, data)
        out[version] = Fixture(
            version, root, base.listing, base.app_digest, build.page_size, build.db_version
        )
    return out


_CACHE: dict[str, dict[str, Fixture]] = {}


def fixtures_once(factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    """Build the fixtures at most once per test process."""
    if "fixtures" not in _CACHE:
        _CACHE["fixtures"] = build_fixtures(factory.mktemp("versions"))
    return _CACHE["fixtures"]
