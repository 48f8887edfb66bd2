"""The test-support layer itself, against a real private containerd."""

from __future__ import annotations

import fcntl
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import (
    DOCKER_LAYER_TAR,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Blob,
    ImageBuilder,
)


def _single(b: ImageBuilder) -> Blob:
    return b.manifest([b.layer(1000, "single/0"), b.layer(0, "single/empty")])


def _oci_index(b: ImageBuilder) -> Blob:
    amd = b.manifest([b.layer(500, "idx/amd")])
    arm = b.manifest([b.layer(500, "idx/arm")], architecture="arm64", variant="v8")
    return b.index([amd, arm])


def _docker_list(b: ImageBuilder) -> Blob:
    amd = b.manifest([b.layer(300, "dl/amd", docker=True)], docker=True)
    arm = b.manifest(
        [b.layer(300, "dl/arm", docker=True)], architecture="arm", variant="v7", docker=True
    )
    return b.index([amd, arm], docker=True)


def _nested(b: ImageBuilder) -> Blob:
    inner = _oci_index(b)
    s390 = b.manifest([b.layer(200, "nested/s390x")], architecture="s390x")
    return b.index([inner, s390], annotations={"org.example.kind": "nested"})


KINDS: dict[str, tuple[Callable[[ImageBuilder], Blob], str]] = {
    "single": (_single, OCI_MANIFEST),
    "oci-index": (_oci_index, OCI_INDEX),
    "docker-list": (_docker_list, DOCKER_MANIFEST_LIST),
    "nested-index": (_nested, OCI_INDEX),
}


# ---------------------------------------------------------------------- builder only


def test_builder_is_deterministic_and_typed() -> None:
    a, b = ImageBuilder(), ImageBuilder()
    assert _nested(a).digest == _nested(b).digest
    layer = a.layer(0, 1)
    assert layer.size == 0
    assert layer.digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert a.layer(10, 1).data == b.layer(10, 1).data
    assert a.layer(10, 1).data != a.layer(10, 2).data


def test_index_platforms_and_nesting() -> None:
    b = ImageBuilder()
    root = _nested(b)
    doc = root.json()
    inner_desc, s390_desc = doc["manifests"]
    assert "platform" not in inner_desc
    assert inner_desc["mediaType"] == OCI_INDEX
    assert s390_desc["platform"] == {"architecture": "s390x", "os": "linux"}
    inner = b.get(inner_desc["digest"])
    assert isinstance(inner, Blob)
    platforms = [m["platform"] for m in inner.json()["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    # root, inner index, 3 manifests, 3 configs, 3 layers
    assert len(b.blobs_of(root)) == 11
    config = b.get(s390_desc["digest"])
    assert isinstance(config, Blob)
    cfg_blob = b.get(config.json()["config"]["digest"])
    assert isinstance(cfg_blob, Blob)
    cfg = cfg_blob.json()
    assert cfg["architecture"] == "s390x"
    assert len(cfg["rootfs"]["diff_ids"]) == 1


def test_oci_archive_layout(tmp_path: Path, image_builder: ImageBuilder) -> None:
    root = _oci_index(image_builder)
    path = tmp_path / "a.tar"
    image_builder.write_oci_archive(path, {"example.com/a:1": root, "example.com/a:2": root})
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.loads(index_file.read())
    blobs = {n for n in names if n.startswith("blobs/sha256/") and n.count("/") == 2}
    assert blobs == {f"blobs/sha256/{b.digest.split(':')[1]}" for b in image_builder.blobs_of(root)}
    assert {"oci-layout", "index.json"} <= names
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [
        "example.com/a:1",
        "example.com/a:2",
    ]
    assert {m["digest"] for m in index["manifests"]} == {root.digest}


# ---------------------------------------------------------------------- real containerd


@pytest.mark.e2e
@pytest.mark.parametrize("kind", list(KINDS))
def test_import_oci_archive(
    kind: str, tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    build, media_type = KINDS[kind]
    root = build(image_builder)
    assert root.media_type == media_type
    name = f"registry.example.com/test/{kind}:v1"
    archive = tmp_path / "image.tar"
    image_builder.write_oci_archive(archive, {name: root})

    containerd.import_archive(archive)

    assert containerd.images("default") == {name: root.digest}
    # --all-platforms: every blob of every platform is in the content store and on disk.
    wanted = {b.digest for b in image_builder.blobs_of(root)}
    assert wanted <= containerd.content_digests("default")
    for digest in wanted:
        assert containerd.blob_path(digest).is_file(), digest
    assert containerd.meta_db.is_file()


@pytest.mark.e2e
def test_tag_and_rm(tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder) -> None:
    one, two = _single(image_builder), _oci_index(image_builder)
    archive = tmp_path / "images.tar"
    image_builder.write_oci_archive(archive, {"example.com/one:1": one, "example.com/two:1": two})
    containerd.import_archive(archive)

    tags = [f"example.com/many:{i}" for i in range(50)]
    containerd.tag("example.com/one:1", *tags)
    images = containerd.images()
    assert len(images) == 52
    assert all(images[t] == one.digest for t in tags)

    containerd.tag("example.com/two:1", "example.com/many:0", force=True)
    assert containerd.images()["example.com/many:0"] == two.digest

    containerd.rm(*tags[1:], "example.com/one:1")
    assert containerd.images() == {
        "example.com/two:1": two.digest,
        "example.com/many:0": two.digest,
    }


@pytest.mark.e2e
def test_content_rm_and_label(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    layer = image_builder.layer(4096, "to-remove")
    root = image_builder.manifest([layer, image_builder.layer(10, "kept")])
    archive = tmp_path / "image.tar"
    image_builder.write_oci_archive(archive, {"example.com/holey:1": root})
    containerd.import_archive(archive)
    assert layer.digest in containerd.content_digests()

    containerd.content_rm(layer.digest)

    # The layer's digest may still appear in the manifest's gc.ref labels; the DIGEST column
    # (content ls -q) must no longer list it.
    assert layer.digest not in containerd.content_digests()
    assert containerd.ctr("content", "get", layer.digest, check=False).returncode != 0
    assert containerd.images() == {"example.com/holey:1": root.digest}

    labels = containerd.label(
        "example.com/holey:1", "imagepushd.example/push=yes", "other.example/x=1", note="hi"
    )
    assert labels == {"imagepushd.example/push": "yes", "other.example/x": "1", "note": "hi"}
    assert containerd.labels("example.com/holey:1") == labels
    assert containerd.label("example.com/holey:1", "other.example/x=") == {
        "imagepushd.example/push": "yes",
        "note": "hi",
    }


@pytest.mark.e2e
def test_namespaces_are_separate(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    a, b = _single(image_builder), _docker_list(image_builder)
    archive_a, archive_b = tmp_path / "a.tar", tmp_path / "b.tar"
    image_builder.write_oci_archive(archive_a, {"example.com/img:1": a})
    image_builder.write_oci_archive(archive_b, {"example.com/img:1": b, "example.com/b:1": b})

    containerd.create_namespace("team-b")
    containerd.create_namespace("team-b")  # idempotent
    assert {"team-b"} <= containerd.namespaces()
    containerd.import_archive(archive_a)
    containerd.import_archive(archive_b, namespace="team-b")

    assert containerd.images("default") == {"example.com/img:1": a.digest}
    assert containerd.images("team-b") == {
        "example.com/img:1": b.digest,
        "example.com/b:1": b.digest,
    }
    assert containerd.namespaces() >= {"default", "team-b"}
    containerd.rm("example.com/img:1", namespace="team-b")
    assert containerd.images("default") == {"example.com/img:1": a.digest}
    assert containerd.images("team-b") == {"example.com/b:1": b.digest}


@pytest.mark.e2e
def test_docker_archive_import(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    layers = [
        image_builder.layer(100, "d/0", docker=True),
        image_builder.layer(200, "d/1", docker=True),
    ]
    root = image_builder.manifest(layers, docker=True)
    archive = tmp_path / "docker.tar"
    image_builder.write_docker_archive(archive, {"example.com/dock:1": root, "dock:latest": root})

    containerd.import_archive(archive)

    expected = image_builder.docker_import_manifest(root)
    assert expected.media_type == DOCKER_MANIFEST
    assert {d["mediaType"] for d in expected.json()["layers"]} == {DOCKER_LAYER_TAR}
    assert containerd.images() == {
        "example.com/dock:1": expected.digest,
        "docker.io/library/dock:latest": expected.digest,
    }
    stored = containerd.ctr("content", "get", expected.digest).stdout
    assert stored.encode() == expected.data
    assert {b.digest for b in image_builder.blobs_of(root)} - {root.digest} <= (
        containerd.content_digests()
    )


@pytest.mark.e2e
def test_large_file_layer_and_restart(
    tmp_path: Path, containerd: Containerd, image_builder: ImageBuilder
) -> None:
    size = 3 * (1 << 20) + 12345
    big = image_builder.layer_file(tmp_path / "big.layer", size, "big")
    assert big.size == size == (tmp_path / "big.layer").stat().st_size
    root = image_builder.manifest([big, image_builder.layer(10, "small")])
    archive = tmp_path / "big.tar"
    image_builder.write_oci_archive(archive, {"example.com/big:1": root})
    containerd.import_archive(archive)
    assert containerd.blob_path(big.digest).stat().st_size == size

    first_pid = containerd.pid
    containerd.restart()
    assert containerd.pid != first_pid
    assert containerd.images() == {"example.com/big:1": root.digest}

    # While running, containerd holds an exclusive flock on meta.db.
    with containerd.meta_db.open("rb") as f:
        with pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        containerd.stop()
        assert not containerd.running
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    containerd.start()
    assert containerd.images() == {"example.com/big:1": root.digest}
