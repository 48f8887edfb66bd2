"""The read path on meta.db files as containerd 1.6, 1.7, 2.0, 2.1 and 64 KiB-page hosts write them.

The files are built in tests/versions.py (its docstring cites the containerd and bbolt source
lines each transformation follows) from a real containerd 1.6.20 meta.db. For each one:
``imagepushd images`` lists what that version's ``ctr images ls`` lists, and one image pushes
to a real docker-registry and is verified with skopeo. Then one odd record on a 2.x file: a
target digest the reader cannot verify hides only its own image (one warning), every other
image is read and pushed, and the image whose ``containerd.io/gc.expire`` passed is not.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from pathlib import Path
from typing import Any

import pytest

from imagepushd.watch.bbolt import BoltFile
from imagepushd.watch.metadata import MetadataStore
from tests.support.boltwriter import NO_FREELIST, write_bolt
from tests.support.cli import run_cli
from tests.support.daemon import Daemon, render_config
from tests.support.registry import Registry
from tests.versions import (
    APP,
    EXPIRED,
    EXPIRY,
    LEASE,
    MULTI,
    RUNC,
    SANDBOX,
    VERSIONS,
    Fixture,
    as_1_7,
    as_2_0,
    fixtures_once,
    make_root,
    read_tree,
)

pytestmark = pytest.mark.e2e

SHA384 = "example.com/versions/sha384:1"
BLAKE3 = "example.com/versions/blake3:1"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    return fixtures_once(tmp_path_factory)


def meta_db(root: Path) -> Path:
    return root / "io.containerd.metadata.v1.bolt" / "meta.db"


def listing(root: Path, home: Path) -> tuple[dict[str, dict[str, str]], str]:
    """``imagepushd images -A --json`` as {namespace: {name: digest}}, and its stderr."""
    outcome = run_cli(["images", "--root", str(root), "-A", "--json"], home=home)
    assert outcome.code == 0, outcome.stderr
    out: dict[str, dict[str, str]] = {}
    for row in outcome.result:  # type: ignore[attr-defined]
        out.setdefault(row["namespace"], {})[row["name"]] = row["digest"]
    return out, outcome.stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_is_laid_out_as_its_sources_say(
    fixtures: dict[str, Fixture], version: str
) -> None:
    """Guards the fixtures: meta fields, file size and the buckets each version moved."""
    fixture = fixtures[version]
    path = meta_db(fixture.root)
    data = path.read_bytes()
    ps = fixture.page_size
    metas = [struct.unpack_from("<IIIIQQQQQ", data, slot * ps + 16) for slot in (0, 1)]
    newest = max(metas, key=lambda m: m[8])
    _magic, _version, page_size, _flags, _root, _seq, freelist, pgid, _txid = newest
    assert page_size == ps
    if version == "1.6":
        assert freelist < pgid  # containerd 1.6 persists bbolt's freelist
        assert struct.unpack_from("<H", data, freelist * ps + 8)[0] == 0x10
    else:
        assert freelist == NO_FREELIST  # NoFreelistSync
    if version == "2.1-nosync":
        assert len(data) == pgid * ps  # NoGrowSync: no ftruncate past the last page
    else:
        assert len(data) > pgid * ps
    tree = read_tree(path)
    v1 = tree[b"v1"]
    assert isinstance(v1, dict)
    k8s = v1[b"k8s.io"]
    assert isinstance(k8s, dict)
    if version == "1.6":
        assert set(tree) == {b"v1"}
        assert b"sandboxes" not in k8s
    elif version == "1.7":
        assert set(tree) == {b"v1", b"k8s.io"}
        assert b"sandboxes" not in k8s
        assert tree[b"k8s.io"][b"sandboxes"][SANDBOX.encode()][b"runtime"][b"name"] == (  # type: ignore[index]
            RUNC.encode()
        )
    else:
        assert set(tree) == {b"v1"}
        assert v1[b"version"] == b"\x08"  # zigzag varint 4
        assert k8s[b"sandboxes"][SANDBOX.encode()][b"runtime"][b"name"] == RUNC.encode()  # type: ignore[index]
        lease = v1[b"default"][b"leases"][LEASE.encode()]  # type: ignore[index]
        assert lease[b"images"] == {EXPIRED.encode(): b""}
    with BoltFile(path) as bolt:
        assert bolt.meta().page_size == ps
        assert MetadataStore(bolt).read().db_version == fixture.db_version


@pytest.mark.parametrize("version", VERSIONS)
def test_images_lists_what_ctr_lists(
    fixtures: dict[str, Fixture], version: str, tmp_path: Path
) -> None:
    fixture = fixtures[version]
    got, stderr = listing(fixture.root, tmp_path)
    assert got == fixture.listing
    assert stderr == ""
    assert len(got["default"]) > 40  # the images bucket spans leaf pages at 4 KiB


@pytest.mark.parametrize("version", VERSIONS)
def test_push_from_each_version(
    fixtures: dict[str, Fixture], version: str, registry: Registry, tmp_path: Path
) -> None:
    fixture = fixtures[version]
    for name in (APP, MULTI):
        repo = f"versions/{version}/{name.split('/')[-1]}"
        outcome = run_cli(
            [
                *("push", name, f"{registry.host}/{repo}"),
                *("--root", str(fixture.root), "--plain-http", "--json"),
            ],
            home=tmp_path,
        )
        assert outcome.code == 0, outcome.stderr
        registry.verify_image(repo, fixture.listing["default"][name], tmp_path / "pull")


# ---------------------------------------------------------------------- one odd record


def odd_root(fixtures: dict[str, Fixture], work: Path) -> Path:
    """The 2.0 file plus two images a client could create through containerd's images API.

    ``SHA384`` targets the app manifest by its sha384 digest (go-digest v1.0.0 accepts it; the
    local content store keeps only sha256 files, so its content is missing). ``BLAKE3`` targets
    a blake3 digest, which go-digest's main branch registers by default (blake3.go): a reader
    that cannot verify it must skip that image alone.
    """
    base = fixtures["1.6"]
    tree: dict[bytes, Any] = as_2_0(as_1_7(read_tree(meta_db(base.root))))
    images = tree[b"v1"][b"default"][b"images"]
    app = images[APP.encode()]
    manifest = (
        base.root
        / "io.containerd.content.v1.content/blobs/sha256"
        / base.app_digest.removeprefix("sha256:")
    ).read_bytes()
    sha384 = copy.deepcopy(app)
    sha384[b"target"][b"digest"] = b"sha384:" + hashlib.sha384(manifest).hexdigest().encode()
    images[SHA384.encode()] = sha384
    blake3 = copy.deepcopy(app)
    blake3[b"target"][b"digest"] = b"blake3:" + b"ab" * 32
    images[BLAKE3.encode()] = blake3
    return make_root(base.root, work, write_bolt(tree, freelist=False))


def test_an_odd_record_hides_only_itself(
    fixtures: dict[str, Fixture], registry: Registry, tmp_path: Path
) -> None:
    root = odd_root(fixtures, tmp_path / "odd")
    expected = copy.deepcopy(fixtures["2.0"].listing)
    got, stderr = listing(root, tmp_path)
    sha384 = got["default"].pop(SHA384)
    assert sha384.startswith("sha384:")
    assert got == expected
    [warning] = stderr.splitlines()
    assert f"image default/{BLAKE3}: invalid target digest" in warning

    host = registry.host
    daemon = Daemon(tmp_path / "daemon")
    try:
        names = [APP, MULTI, EXPIRED, SHA384, BLAKE3]
        daemon.write_config(
            render_config(
                root=root,
                state=tmp_path / "state.db",
                push={"on_start": "all", "settle": "0s"},
                rules=[
                    {
                        "match": names,
                        "target": f"{host}/odd/{{repository}}:{{tag}}",
                    }
                ],
                registries={host: {"plain_http": True}},
            )
        )
        plan = {row["name"]: row for row in daemon.plan()}
        assert BLAKE3 not in plan
        assert plan[EXPIRED]["action"] == "skip"
        assert plan[EXPIRED]["reason"].startswith(
            f"expired: containerd.io/gc.expire {EXPIRY.replace('Z', '+00:00')} has passed"
        )
        assert plan[SHA384]["action"] == "wait"
        assert "content incomplete" in plan[SHA384]["reason"]
        assert plan[APP]["action"] == plan[MULTI]["action"] == "push"

        result = daemon.cli("run", "--once", timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stderr.count(f"image default/{BLAKE3}: invalid target digest") == 1
        # The start-up line says which root and why.
        assert (
            f"watching containerd root {root} ([containerd] root in imagepushd's configuration)"
            in result.stderr
        )
        for name in (APP, MULTI):
            repo = "odd/" + name.removeprefix("example.com/")
            registry.verify_image(repo, expected["default"][name], tmp_path / "pull")
        pushed = {p["name"] for p in daemon.status()["recent"]}
        assert pushed == {APP, MULTI}, pushed
    finally:
        daemon.close()


def test_a_64k_file_whose_first_meta_is_torn_reads_the_second(
    fixtures: dict[str, Fixture], tmp_path: Path
) -> None:
    """With meta 0 unreadable the page size is unknown: meta 1 is probed for, as bbolt does."""
    fixture = fixtures["2.0-64k"]
    data = bytearray(meta_db(fixture.root).read_bytes())
    data[16:80] = bytes(64)
    path = tmp_path / "meta.db"
    path.write_bytes(bytes(data))
    with BoltFile(path) as bolt:
        meta = bolt.meta()
    assert (meta.page_size, meta.txid % 2) == (65536, 1)
    snap = MetadataStore(BoltFile(path)).read()
    assert {r.name: r.target.digest for r in snap.images if r.namespace == "default"} == (
        fixture.listing["default"]
    )
