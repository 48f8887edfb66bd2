"""The content store: verified reads, graph walks, completeness."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepushd.blobs import BlobSource
from imagepushd.errors import (
    BlobCorruptError,
    ContainerdError,
    ManifestError,
    MissingContentError,
)
from imagepushd.oci import OCI_INDEX, Descriptor, Platform
from imagepushd.watch.content import (
    BlobNode,
    ContentStore,
    IndexNode,
    ManifestNode,
    walk,
)
from tests.support.images import Blob, ImageBuilder


def store_with(tmp_path: Path, builder: ImageBuilder, *roots: Blob) -> ContentStore:
    store = ContentStore(tmp_path / "root")
    for root in roots:
        for blob in builder.blobs_of(root):
            path = store.path(blob.digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            with blob.open() as src:
                path.write_bytes(src.read())
    return store


def desc(blob: Blob) -> Descriptor:
    return Descriptor(blob.media_type, blob.digest, blob.size)


def test_path_refuses_digests_that_could_escape(tmp_path: Path):
    store = ContentStore(tmp_path)
    with pytest.raises(ContainerdError):
        store.path("sha256:../../../etc/passwd")
    assert store.path("sha256:" + "a" * 64).parent.name == "sha256"


def test_blob_reader_verifies(tmp_path: Path, image_builder: ImageBuilder):
    layer = image_builder.layer(1 << 20, "r")
    root = image_builder.manifest([layer])
    store = store_with(tmp_path, image_builder, root)
    with store.open(desc(layer)) as reader:
        assert b"".join(reader) == layer.data
    # Same size, different bytes: detected when the last byte is read.
    store.path(layer.digest).write_bytes(b"x" * layer.size)
    with store.open(desc(layer)) as reader, pytest.raises(BlobCorruptError, match="corrupt"):
        b"".join(reader)
    store.path(layer.digest).write_bytes(b"short")
    with pytest.raises(BlobCorruptError, match="5 bytes"):
        store.open(desc(layer))
    store.path(layer.digest).unlink()
    with pytest.raises(MissingContentError):
        store.open(desc(layer))


def test_walk_nested_index_with_missing_parts(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    amd_layer, arm_layer = b.layer(10, "amd"), b.layer(20, "arm")
    amd = b.manifest([amd_layer])
    arm = b.manifest([arm_layer], architecture="arm64", variant="v8")
    inner = b.index([amd, arm])
    riscv = b.manifest([b.layer(5, "rv")], architecture="riscv64")
    outer = b.index([inner, riscv])
    store = store_with(tmp_path, b, outer)
    graph = store.walk(desc(outer))
    assert graph.complete
    assert [str(p) for p in graph.platforms()] == ["linux/amd64", "linux/arm64/v8", "linux/riscv64"]
    order = [d.digest for d in graph.descriptors()]
    assert set(order) == {x.digest for x in b.blobs_of(outer)}
    # Children before the indexes that name them; the top index last.
    assert order[-1] == outer.digest and order.index(inner.digest) < order.index(outer.digest)
    assert order.index(amd.digest) < order.index(inner.digest)
    assert graph.size == sum(x.size for x in b.blobs_of(outer))

    store.path(arm_layer.digest).unlink()
    store.path(riscv.digest).unlink()
    graph = store.walk(desc(outer))
    assert not graph.complete
    assert {d.digest for d in graph.missing} == {arm_layer.digest, riscv.digest}
    missing_manifest = [n for n in graph.manifests() if n.descriptor.digest == riscv.digest]
    assert missing_manifest[0].manifest is None
    assert missing_manifest[0].platform == Platform("linux", "riscv64")

    # A namespace that has no metadata record for a blob cannot use it.
    known = {x.digest for x in b.blobs_of(outer)} - {amd_layer.digest}
    graph = store.walk(desc(outer), known)
    assert amd_layer.digest in {d.digest for d in graph.missing}


def test_walk_keeps_unknown_index_children_as_blobs(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    amd = b.manifest([b.layer(3, "x")])
    attachment = b.add(Blob("application/vnd.example.sbom", b"{}"))
    index = b.json_blob(
        OCI_INDEX,
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [amd.descriptor(), attachment.descriptor()],
        },
    )
    store = store_with(tmp_path, b, index)
    path = store.path(attachment.digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"{}")
    graph = store.walk(desc(index))
    kinds = [type(n) for n in graph.nodes()]
    assert kinds == [IndexNode, ManifestNode, BlobNode]
    assert graph.complete


def test_walk_keeps_the_bytes_it_read_and_reads_each_manifest_once(
    tmp_path: Path, image_builder: ImageBuilder
):
    b = image_builder
    amd = b.image([10], "bytes/amd")
    arm = b.image([20], "bytes/arm", architecture="arm64")
    index = b.index([amd, arm])
    store = store_with(tmp_path, b, index)
    store.path(arm.digest).unlink()
    reads: list[str] = []

    class Counting:
        def has(self, descriptor: Descriptor) -> bool:
            return store.has(descriptor)

        def read_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
            reads.append(descriptor.digest)
            return store.read_bytes(descriptor, limit)

        def source(self, descriptor: Descriptor) -> BlobSource:
            return store.source(descriptor)

    graph = walk(Counting(), desc(index))
    assert sorted(reads) == sorted([index.digest, amd.digest])
    root = graph.root
    assert isinstance(root, IndexNode) and root.data == index.data
    kept, absent = graph.manifests()
    assert kept.data == amd.data and absent.data is None
    assert graph.manifest_complete(kept) and not graph.manifest_complete(absent)
    assert graph.present(desc(amd)) and not graph.present(desc(arm))


def test_walk_tells_attestations_from_platforms(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    amd = b.image([10], "attest/amd")
    attestation = b.attestation(amd)
    index = b.index([amd, attestation])
    graph = store_with(tmp_path, b, index).walk(desc(index))
    assert graph.complete
    assert graph.platforms() == [Platform("linux", "amd64")]
    (node,) = graph.attestations()
    assert node.descriptor.digest == attestation.digest
    assert node.is_attestation and node.attests == amd.digest
    assert node.platform == Platform("unknown", "unknown")
    image = graph.manifests()[0]
    assert not image.is_attestation and image.attests is None


def test_walk_rejects_unsupported_root(tmp_path: Path, image_builder: ImageBuilder):
    blob = image_builder.add(
        Blob("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}")
    )
    store = ContentStore(tmp_path)
    path = store.path(blob.digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"{}")
    with pytest.raises(ManifestError, match="unsupported media type"):
        store.walk(desc(blob))
