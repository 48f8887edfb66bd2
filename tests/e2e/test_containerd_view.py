"""The reader's view of a real containerd must equal ``ctr images ls`` in every case."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from imagepushd.cli import Context, run
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import MetadataStore
from tests.support.containerd import Containerd
from tests.support.images import ImageBuilder

pytestmark = pytest.mark.e2e


def reader_view(containerd: Containerd) -> dict[str, dict[str, str]]:
    store = MetadataStore.at_root(containerd.root)
    try:
        snap = store.read()
    finally:
        store.close()
    view: dict[str, dict[str, str]] = {ns: {} for ns in snap.namespaces}
    for image in snap.images:
        view[image.namespace][image.name] = image.target.digest
    return view


def ctr_view(containerd: Containerd) -> dict[str, dict[str, str]]:
    return {ns: containerd.images(ns) for ns in containerd.namespaces()}


def assert_same_view(containerd: Containerd) -> dict[str, dict[str, str]]:
    view = reader_view(containerd)
    assert view == ctr_view(containerd)
    return view


def cli_images(containerd: Containerd, *args: str) -> list[dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env={}, home=Path("/nonexistent"), stdout=out)
    code = run(["images", "--root", str(containerd.root), "--json", *args], ctx, err)
    assert code == 0, err.getvalue()
    rows = json.loads(out.getvalue())
    assert isinstance(rows, list)
    return rows


def test_every_kind_of_image(containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path):
    b = image_builder
    plain = b.image([100, 2000], seed="plain")
    amd = b.manifest([b.layer(300, "amd")])
    arm = b.manifest([b.layer(300, "arm")], architecture="arm64", variant="v8")
    index = b.index([amd, arm])
    docker = b.manifest([b.layer(50, "d1", docker=True)], docker=True)
    docker_list = b.index(
        [docker, b.manifest([b.layer(60, "d2", docker=True)], architecture="arm", docker=True)],
        docker=True,
    )
    nested = b.index([index, b.manifest([b.layer(10, "ppc")], architecture="ppc64le")])
    images = {
        "example.com/plain:1": plain,
        "example.com/multi:1": index,
        "example.com/docker:1": docker,
        "example.com/dockerlist:1": docker_list,
        "example.com/nested:1": nested,
    }
    archive = tmp_path / "images.tar"
    b.write_oci_archive(archive, images)
    containerd.import_archive(archive)
    containerd.create_namespace("other")
    containerd.import_archive(archive, namespace="other")
    containerd.create_namespace("empty")

    view = assert_same_view(containerd)
    assert view["empty"] == {}
    assert view["default"] == {name: root.digest for name, root in images.items()}

    rows = {
        row["name"]: row for row in cli_images(containerd, "-A") if row["namespace"] == "default"
    }
    assert rows["example.com/plain:1"]["platforms"] == ["linux/amd64"]
    assert rows["example.com/multi:1"]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert rows["example.com/dockerlist:1"]["platforms"] == ["linux/amd64", "linux/arm"]
    assert rows["example.com/dockerlist:1"]["media_type"] == (
        "application/vnd.docker.distribution.manifest.list.v2+json"
    )
    assert rows["example.com/nested:1"]["platforms"] == [
        "linux/amd64",
        "linux/arm64/v8",
        "linux/ppc64le",
    ]
    for name, root in images.items():
        row = rows[name]
        assert row["complete"] is True and row["missing"] == []
        assert row["digest"] == root.digest
        assert row["size"] == sum(blob.size for blob in b.blobs_of(root))


def test_missing_platform_content_is_reported(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
):
    b = image_builder
    amd = b.manifest([b.layer(100, "amd")])
    arm_layer = b.layer(100, "arm")
    arm = b.manifest([arm_layer], architecture="arm64")
    s390 = b.manifest([b.layer(100, "s390")], architecture="s390x")
    index = b.index([amd, arm, s390])
    b.write_oci_archive(tmp_path / "a.tar", {"example.com/partial:1": index})
    containerd.import_archive(tmp_path / "a.tar")
    containerd.content_rm(arm_layer.digest, s390.digest)

    assert_same_view(containerd)
    [row] = cli_images(containerd)
    assert row["complete"] is False
    assert sorted(row["missing"]) == sorted([arm_layer.digest, s390.digest])
    # The absent s390x manifest still names its platform through the index.
    assert row["platforms"] == ["linux/amd64", "linux/arm64", "linux/s390x"]

    # A blob file present on disk but unknown to the namespace's metadata is missing there.
    store = MetadataStore.at_root(containerd.root)
    snap = store.read(blobs=True)
    store.close()
    graph = ContentStore(containerd.root).walk(snap.images[0].target, set())
    assert graph.missing and graph.missing[0].digest == index.digest


def test_hundreds_of_tags_deletes_and_moves(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
):
    b = image_builder
    one, two = b.image([64], seed=1), b.image([64], seed=2)
    b.write_oci_archive(tmp_path / "a.tar", {"example.com/one:1": one, "example.com/two:1": two})
    containerd.import_archive(tmp_path / "a.tar")
    names = [f"example.com/many/app-{i:04d}:v{i}" for i in range(600)]
    for start in range(0, len(names), 200):
        containerd.tag("example.com/one:1", *names[start : start + 200])
    view = assert_same_view(containerd)
    assert len(view["default"]) == 602

    containerd.rm(*names[::3])
    for name in names[1::3][:50]:
        containerd.tag("example.com/two:1", name, force=True)
    view = assert_same_view(containerd)
    assert len(view["default"]) == 602 - 200
    assert view["default"][names[1]] == two.digest

    containerd.rm(*view["default"])
    assert assert_same_view(containerd)["default"] == {}


def test_overflow_pages_and_page_backed_buckets(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
):
    b = image_builder
    root = b.image([10], seed="labels")
    other = b.image([10], seed="small")
    b.write_oci_archive(
        tmp_path / "a.tar", {"example.com/labels:1": root, "example.com/small:1": other}
    )
    containerd.import_archive(tmp_path / "a.tar")
    # Three 4,000-byte labels: a page-backed labels bucket whose leaf overflows a 4 KiB page.
    big = {f"big{i}": chr(ord("a") + i) * 4000 for i in range(3)}
    containerd.label("example.com/labels:1", **big)
    # Small labels stay an inline bucket.
    containerd.label("example.com/small:1", team="builds")
    assert_same_view(containerd)

    store = MetadataStore.at_root(containerd.root)
    snap = store.read(blobs=True)
    store.close()
    labelled = snap.image("default", "example.com/labels:1")
    small = snap.image("default", "example.com/small:1")
    assert labelled is not None and small is not None
    assert dict(labelled.labels) == big
    assert dict(small.labels) == {"team": "builds"}
    assert labelled.created_at is not None and labelled.updated_at is not None
    assert labelled.updated_at >= labelled.created_at
    # Blob records carry containerd's labels (gc references from the index to its children).
    record = snap.blobs["default"][root.digest]
    assert record.size == root.size
    assert any(key.startswith("containerd.io/gc.ref.content") for key in record.labels)
