"""Image archives read in place: both layouts, image choice, digests, links, and every refusal."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagepushd.blobs import BlobSource
from imagepushd.cli import Context, run
from imagepushd.errors import (
    ArchiveError,
    BlobCorruptError,
    ManifestError,
    MissingContentError,
    UsageError,
)
from imagepushd.oci import DOCKER_CONFIG, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Descriptor
from imagepushd.push.archive import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    ArchiveStore,
)
from imagepushd.watch.content import ContentStore, IndexNode, ManifestNode
from tests.support.images import Blob, ImageBuilder, canonical_json

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def desc(blob: Blob) -> Descriptor:
    return Descriptor(blob.media_type, blob.digest, blob.size)


def member_bytes(path: Path, source: BlobSource) -> bytes:
    with path.open("rb") as file:
        file.seek(source.offset)
        return file.read(source.descriptor.size)


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def docker_tar(path: Path, members: dict[str, bytes], entries: list[dict[str, object]]) -> None:
    """A hand-made docker save tar: ``members`` as regular files, then manifest.json."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            add(tar, name, data)
        add(tar, "manifest.json", json.dumps(entries).encode())


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env={}, home=Path("/nonexistent-home"), stdout=out, stdin=io.StringIO())
    code = run(list(argv), ctx, err)
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    assert err.startswith("imagepushd: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------- OCI layouts


@pytest.fixture
def oci_archive(tmp_path: Path, image_builder: ImageBuilder) -> tuple[Path, dict[str, Blob]]:
    b = image_builder
    amd = b.manifest([b.layer(3000, "amd"), b.layer(0, "empty")])
    arm = b.manifest([b.layer(2000, "arm")], architecture="arm64", variant="v8")
    roots = {
        "example.com/multi:1": b.index([amd, arm]),
        "docker.io/library/app:2": b.image([100], "app"),
        "example.com/docker:1": b.manifest([b.layer(300, "d", docker=True)], docker=True),
    }
    path = tmp_path / "oci.tar"
    b.write_oci_archive(path, roots)
    return path, roots


def test_oci_images_and_names(oci_archive: tuple[Path, dict[str, Blob]]) -> None:
    path, roots = oci_archive
    store = ArchiveStore.open(path)
    assert store.format == "oci"
    assert [(i.names, i.target and i.target.digest) for i in store.images] == [
        ((name,), root.digest) for name, root in roots.items()
    ]


def test_oci_select_exactly_normalised_or_by_digest(
    oci_archive: tuple[Path, dict[str, Blob]],
) -> None:
    path, roots = oci_archive
    store = ArchiveStore.open(path)
    for name, root in roots.items():
        assert store.target(store.select(name)) == desc(root)
    app = roots["docker.io/library/app:2"]
    assert store.select("app:2").names == ("docker.io/library/app:2",)
    assert store.select("docker.io/app:2").names == ("docker.io/library/app:2",)
    assert store.select(app.digest).names == ("docker.io/library/app:2",)


def test_oci_walk_and_blob_access(
    oci_archive: tuple[Path, dict[str, Blob]], image_builder: ImageBuilder
) -> None:
    path, roots = oci_archive
    store = ArchiveStore.open(path)
    root = roots["example.com/multi:1"]
    graph = store.walk(store.target(store.select("example.com/multi:1")))
    assert graph.complete
    assert isinstance(graph.root, IndexNode)
    assert [str(p) for p in graph.platforms()] == ["linux/amd64", "linux/arm64/v8"]
    for blob in image_builder.blobs_of(root):
        assert isinstance(blob, Blob)
        d = desc(blob)
        assert store.has(d)
        assert store.read_bytes(d, 1 << 20) == blob.data
        source = store.source(d)
        assert source.path == path and source.descriptor == d
        assert source.offset % 512 == 0
        assert member_bytes(path, source) == blob.data
    with tarfile.open(path) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    layer = image_builder.layer(3000, "amd")
    assert store.source(desc(layer)).offset == offsets[f"blobs/sha256/{layer.hex}"]


def test_oci_size_mismatch_missing_and_limits(
    oci_archive: tuple[Path, dict[str, Blob]], image_builder: ImageBuilder
) -> None:
    path, _ = oci_archive
    store = ArchiveStore.open(path)
    layer = image_builder.layer(3000, "amd")
    wrong_size = Descriptor(layer.media_type, layer.digest, layer.size + 1)
    assert not store.has(wrong_size)
    with pytest.raises(BlobCorruptError, match="3000 bytes"):
        store.source(wrong_size)
    absent = Descriptor(layer.media_type, "sha256:" + "0" * 64, 10)
    assert not store.has(absent)
    with pytest.raises(MissingContentError, match="0000"):
        store.read_bytes(absent, 100)
    with pytest.raises(MissingContentError):
        store.source(absent)
    with pytest.raises(ManifestError, match="over the 100 limit"):
        store.read_bytes(desc(layer), 100)


def test_oci_missing_blob_shows_in_the_graph(tmp_path: Path, image_builder: ImageBuilder) -> None:
    b = image_builder
    gone = b.layer(500, "gone")
    root = b.index([b.image([10], "kept"), b.manifest([gone], architecture="arm64")])
    full = tmp_path / "full.tar"
    b.write_oci_archive(full, {"example.com/partial:1": root})
    partial = tmp_path / "partial.tar"
    with tarfile.open(full) as src, tarfile.open(partial, "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(gone.hex):
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    store = ArchiveStore.open(partial)
    graph = store.walk(store.target(store.select(None)))
    assert [d.digest for d in graph.missing] == [gone.digest]


def test_oci_corrupt_member_is_refused_when_read(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    root = b.image([10], "c")
    config = b.children_of(root)[0]
    assert isinstance(config, Blob)
    path = tmp_path / "corrupt.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tar, "index.json", b.oci_index_json({"x:1": root}).data)
        add(tar, f"blobs/sha256/{root.hex}", root.data)
        add(tar, f"blobs/sha256/{config.hex}", b"X" * config.size)
    store = ArchiveStore.open(path)
    with pytest.raises(BlobCorruptError, match="corrupt"):
        store.walk(store.target(store.select(None)))


def test_oci_layout_wins_over_manifest_json(tmp_path: Path, image_builder: ImageBuilder) -> None:
    """ctr images export and docker save ≥ 25 write both: index.json has the exact manifests."""
    b = image_builder
    root = b.image([10], "both")
    path = tmp_path / "both.tar"
    b.write_oci_archive(path, {"example.com/both:1": root})
    with tarfile.open(path, "a") as tar:
        add(tar, "manifest.json", b'[{"Config":"nope.json","RepoTags":["x:1"],"Layers":[]}]')
    store = ArchiveStore.open(path)
    assert store.format == "oci"
    assert store.target(store.select(None)) == desc(root)


def test_index_entry_without_media_type_is_sniffed(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    root = b.image([10], "sniff")
    index = {"schemaVersion": 2, "manifests": [{"digest": root.digest, "size": root.size}]}
    path = tmp_path / "sniff.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "index.json", json.dumps(index).encode())
        for blob in b.blobs_of(root):
            assert isinstance(blob, Blob)
            add(tar, f"./blobs/sha256/{blob.hex}", blob.data)
    store = ArchiveStore.open(path)
    image = store.select(None)
    assert image.names == ()
    assert store.target(image).media_type == OCI_MANIFEST
    assert store.walk(store.target(image)).complete


def test_index_entry_naming_a_non_object_is_a_manifest_error(tmp_path: Path) -> None:
    """A media type sniffed from a blob that is JSON but not an object: one clear line."""
    data = b"[1, 2]"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    index = {"schemaVersion": 2, "manifests": [{"digest": digest, "size": len(data)}]}
    path = tmp_path / "list.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "index.json", json.dumps(index).encode())
        add(tar, f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    store = ArchiveStore.open(path)
    with pytest.raises(ManifestError, match=f"manifest {digest}: not a JSON object"):
        store.target(store.select(None))
    code, _, err = cli("push", "--archive", str(path), "localhost:1/x:1")
    assert code == 1
    assert "not a JSON object" in one_line(err)


# ---------------------------------------------------------------------- docker save


@pytest.fixture
def docker_archive(tmp_path: Path, image_builder: ImageBuilder) -> tuple[Path, dict[str, Blob]]:
    b = image_builder
    shared = b.layer(4000, "shared", docker=True)
    roots = {
        "example.com/one:1": b.manifest([shared, b.layer(0, "zero", docker=True)], docker=True),
        "busybox:latest": b.manifest([shared, b.layer(70, "bb", docker=True)], docker=True),
    }
    path = tmp_path / "docker.tar"
    b.write_docker_archive(path, roots)
    return path, roots


def test_docker_manifest_is_containerds(
    docker_archive: tuple[Path, dict[str, Blob]], image_builder: ImageBuilder
) -> None:
    """The manifest made from manifest.json is byte for byte what ``ctr images import`` writes."""
    path, roots = docker_archive
    store = ArchiveStore.open(path)
    assert store.format == "docker"
    for name, root in roots.items():
        expected = image_builder.docker_import_manifest(root)
        target = store.target(store.select(name))
        assert target == Descriptor(DOCKER_MANIFEST, expected.digest, expected.size)
        assert store.read_bytes(target, 1 << 20) == expected.data
        graph = store.walk(target)
        assert graph.complete
        assert isinstance(graph.root, ManifestNode) and graph.root.manifest is not None
        manifest = graph.root.manifest
        config = image_builder.children_of(root)[0]
        assert manifest.config == Descriptor(DOCKER_CONFIG, config.digest, config.size)
        assert [d.media_type for d in manifest.layers] == [DOCKER_LAYER] * 2
        assert str(graph.root.platform) == "linux/amd64"


def test_docker_digests_are_stable(docker_archive: tuple[Path, dict[str, Blob]]) -> None:
    path, roots = docker_archive
    first = [ArchiveStore.open(path) for _ in range(2)]
    digests = [[s.target(s.select(name)).digest for name in roots] for s in first]
    assert digests[0] == digests[1]
    assert len(set(digests[0])) == 2


def test_docker_layer_sources_are_member_ranges(
    docker_archive: tuple[Path, dict[str, Blob]], image_builder: ImageBuilder
) -> None:
    path, _ = docker_archive
    store = ArchiveStore.open(path)
    graph = store.walk(store.target(store.select("example.com/one:1")))
    assert isinstance(graph.root, ManifestNode) and graph.root.manifest is not None
    with tarfile.open(path) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    shared = image_builder.layer(4000, "shared", docker=True)
    layer = graph.root.manifest.layers[0]
    assert layer.digest == shared.digest
    source = store.source(layer)
    assert source.offset == offsets[f"{shared.hex}/layer.tar"]
    assert member_bytes(path, source) == shared.data
    # The manifest exists only in memory: it is read, never uploaded as a blob.
    with pytest.raises(ArchiveError, match="in memory"):
        store.source(graph.root.descriptor)
    empty = graph.root.manifest.layers[1]
    assert (empty.size, empty.digest) == (0, "sha256:" + hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize(
    ("head", "media_type"),
    [
        (gzip.compress(b"layer bytes"), DOCKER_LAYER_GZIP),
        (ZSTD_MAGIC + b"zstd frame", DOCKER_LAYER_GZIP),  # as containerd labels zstd
        (b"\x1f\x8b\x07 not deflate", DOCKER_LAYER),
        (b"plain tar bytes", DOCKER_LAYER),
        (b"", DOCKER_LAYER),
    ],
)
def test_docker_layer_media_type_from_content(tmp_path: Path, head: bytes, media_type: str):
    config = canonical_json({"architecture": "amd64", "os": "linux"})
    path = tmp_path / "sniff.tar"
    docker_tar(
        path,
        {"c.json": config, "l/layer.tar": head},
        [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}],
    )
    store = ArchiveStore.open(path)
    graph = store.walk(store.target(store.select(None)))
    assert isinstance(graph.root, ManifestNode) and graph.root.manifest is not None
    (layer,) = graph.root.manifest.layers
    assert layer == Descriptor(media_type, "sha256:" + hashlib.sha256(head).hexdigest(), len(head))


def test_docker_symlinked_and_hardlinked_layers_resolve(tmp_path: Path) -> None:
    """docker save links a layer shared by two images to its first copy."""
    config = canonical_json({"architecture": "amd64", "os": "linux"})
    layer = b"shared layer" * 100
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "c.json", config)
        add(tar, "a/layer.tar", layer)
        add(tar, "b/layer.tar", type=tarfile.SYMTYPE, linkname="../a/layer.tar")
        add(tar, "c/layer.tar", type=tarfile.LNKTYPE, linkname="a/layer.tar")
        entries = [
            {"Config": "c.json", "RepoTags": [f"{x}:1"], "Layers": [f"{x}/layer.tar"]}
            for x in "abc"
        ]
        add(tar, "manifest.json", json.dumps(entries).encode())
    store = ArchiveStore.open(path)
    targets = {store.target(store.select(f"{x}:1")).digest for x in "abc"}
    assert len(targets) == 1  # same config and layer bytes: the same image
    with tarfile.open(path) as tar:
        offset = tar.getmember("a/layer.tar").offset_data
    assert store.member("b/layer.tar").offset == store.member("c/layer.tar").offset == offset


@pytest.mark.parametrize(
    ("kind", "linkname", "message"),
    [
        (tarfile.SYMTYPE, "../../etc/passwd", "outside the archive"),
        (tarfile.SYMTYPE, "/etc/passwd", "outside the archive"),
        (tarfile.SYMTYPE, "nowhere.tar", "no such member"),
        (tarfile.LNKTYPE, "nowhere.tar", "no such member"),
        (tarfile.SYMTYPE, "layer.tar", "links deep"),
    ],
)
def test_bad_links_are_refused(tmp_path: Path, kind: bytes, linkname: str, message: str):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "c.json", b"{}")
        add(tar, "l/layer.tar", type=kind, linkname=linkname)
        add(
            tar,
            "manifest.json",
            b'[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]',
        )
    store = ArchiveStore.open(path)
    with pytest.raises(ArchiveError, match=message):
        store.target(store.select(None))


def test_docker_missing_member_names_it(tmp_path: Path) -> None:
    path = tmp_path / "missing.tar"
    docker_tar(
        path,
        {"c.json": b"{}"},
        [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": ["gone/layer.tar"]}],
    )
    store = ArchiveStore.open(path)
    with pytest.raises(ArchiveError, match=r"gone/layer\.tar for x:1, but the archive holds no"):
        store.target(store.select("x:1"))


def test_special_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fifo.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "c.json", type=tarfile.FIFOTYPE)
        add(tar, "manifest.json", b'[{"Config":"c.json","RepoTags":["x:1"],"Layers":[]}]')
    store = ArchiveStore.open(path)
    with pytest.raises(ArchiveError, match="not a regular file"):
        store.target(store.select(None))


def test_sparse_member_is_refused(tmp_path: Path) -> None:
    gnu_tar = shutil.which("tar")
    assert gnu_tar is not None
    src = tmp_path / "src"
    (src / "l").mkdir(parents=True)
    (src / "c.json").write_bytes(b"{}")
    with (src / "l" / "layer.tar").open("wb") as file:
        file.truncate(8 << 20)
        file.write(b"data at the start")
    (src / "manifest.json").write_text(
        '[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l/layer.tar"]}]'
    )
    path = tmp_path / "sparse.tar"
    subprocess.run(
        [
            gnu_tar,
            "--sparse",
            "--format=gnu",
            "-cf",
            path,
            "-C",
            src,
            "c.json",
            "l",
            "manifest.json",
        ],
        check=True,
    )
    assert path.stat().st_size < 1 << 20
    store = ArchiveStore.open(path)
    with pytest.raises(ArchiveError, match="sparse"):
        store.target(store.select(None))


# ---------------------------------------------------------------------- choosing the image


def test_several_images_need_a_name(docker_archive: tuple[Path, dict[str, Blob]]) -> None:
    path, _ = docker_archive
    store = ArchiveStore.open(path)
    with pytest.raises(UsageError, match="holds 2 images; name one") as caught:
        store.select(None)
    assert "example.com/one:1; busybox:latest" in str(caught.value)
    with pytest.raises(ArchiveError, match=r"holds no image 'nope:1'; it has example\.com/one:1"):
        store.select("nope:1")
    # Normalised matching: busybox:latest is docker.io/library/busybox:latest.
    assert store.select("docker.io/library/busybox").names == ("busybox:latest",)


def test_one_image_under_several_names_needs_none(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    root = b.image([10], "same")
    path = tmp_path / "same.tar"
    b.write_oci_archive(path, {"example.com/a:1": root, "example.com/b:1": root})
    store = ArchiveStore.open(path)
    assert len(store.images) == 2
    assert store.target(store.select(None)) == desc(root)


def test_a_name_for_two_different_images_is_ambiguous(tmp_path: Path, image_builder: ImageBuilder):
    b = image_builder
    path = tmp_path / "ambiguous.tar"
    docker_one, docker_two = b.image([10], "one", docker=True), b.image([20], "two", docker=True)
    b.write_docker_archive(path, {"app:1": docker_one, "docker.io/library/app:1": docker_two})
    store = ArchiveStore.open(path)
    assert store.select("app:1").names == ("app:1",)  # exact wins over normalised
    with pytest.raises(ArchiveError, match="names 2 different images"):
        store.select("docker.io/app:1")


# ---------------------------------------------------------------------- what is not an archive


@pytest.mark.parametrize(
    ("compress", "kind"),
    [
        (gzip.compress, "gzip"),
        (bz2.compress, "bzip2"),
        (lzma.compress, "xz"),
        (lambda data: ZSTD_MAGIC + data, "zstd"),
    ],
)
def test_compressed_archives_are_one_clear_error(
    tmp_path: Path, image_builder: ImageBuilder, compress: object, kind: str
) -> None:
    plain = tmp_path / "plain.tar"
    image_builder.write_oci_archive(plain, {"x:1": image_builder.image([10], "z")})
    path = tmp_path / "image.tar"  # the name says nothing: the bytes decide
    assert callable(compress)
    path.write_bytes(compress(plain.read_bytes()))
    with pytest.raises(ArchiveError, match=f"is {kind}-compressed: decompress it first"):
        ArchiveStore.open(path)
    code, _, err = cli("push", "--archive", str(path), "127.0.0.1:1/x:1", "--plain-http")
    assert code == 1
    assert "decompress it first" in one_line(err)


def test_not_an_archive(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive " * 300)
    for path in (empty, junk):
        with pytest.raises(ArchiveError, match="not a tar archive"):
            ArchiveStore.open(path)
    with pytest.raises(ArchiveError, match="No such file"):
        ArchiveStore.open(tmp_path / "absent.tar")
    other = tmp_path / "other.tar"
    with tarfile.open(other, "w") as tar:
        add(tar, "hello.txt", b"hi")
    with pytest.raises(ArchiveError, match=r"neither index\.json .* nor manifest\.json"):
        ArchiveStore.open(other)


def test_truncated_archive(tmp_path: Path, image_builder: ImageBuilder) -> None:
    path = tmp_path / "cut.tar"
    image_builder.write_oci_archive(path, {"x:1": image_builder.image([100_000], "t")})
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
    path.write_bytes(data[: big.offset_data + 1000])
    with pytest.raises(ArchiveError, match="truncated"):
        ArchiveStore.open(path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (b"{", "index.json: not valid JSON"),
        (b'{"manifests": 1}', "no manifests list"),
        (b'{"manifests": [{"digest": "md5:x", "size": 1}]}', "invalid or unsupported digest"),
        (b'{"manifests": []}', "lists no images"),
    ],
)
def test_bad_index_json(tmp_path: Path, index: bytes, message: str) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "index.json", index)
    with pytest.raises(ArchiveError, match=message):
        ArchiveStore.open(path)


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"{}", "not a list of images"),
        (b"[1]", r"manifest.json\[0\]: not an object"),
        (b'[{"RepoTags":[],"Layers":[]}]', "no Config"),
        (b'[{"Config":"c","Layers":"x"}]', "Layers is not a list"),
        (b'[{"Config":"c","Layers":[],"RepoTags":"x"}]', "RepoTags is not a list"),
    ],
)
def test_bad_manifest_json(tmp_path: Path, manifest: bytes, message: str) -> None:
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "manifest.json", manifest)
    with pytest.raises(ArchiveError, match=message):
        ArchiveStore.open(path)


def test_unsupported_layout_version(tmp_path: Path) -> None:
    path = tmp_path / "v2.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion":"2.0.0"}')
        add(tar, "index.json", b'{"manifests":[]}')
    with pytest.raises(ArchiveError, match=r"layout version '2\.0\.0'"):
        ArchiveStore.open(path)


# ---------------------------------------------------------------------- the store protocol


def test_content_store_source_is_the_blob_file(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    d = Descriptor(OCI_INDEX, "sha256:" + "a" * 64, 3)
    assert store.source(d) == BlobSource(store.path(d.digest), d, 0)


# ---------------------------------------------------------------------- the command line


def test_cli_archive_usage_errors(docker_archive: tuple[Path, dict[str, Blob]]) -> None:
    path, _ = docker_archive
    code, _, err = cli("push", "--archive", str(path), "127.0.0.1:1/x:1")
    assert code == 2
    assert "holds 2 images; name one before the target: example.com/one:1" in one_line(err)
    code, _, err = cli("push", "--archive", str(path), "nope:1", "127.0.0.1:1/x:1")
    assert code == 1
    assert "holds no image 'nope:1'" in one_line(err)
    code, _, err = cli("push", "--archive", str(path), "busybox", "x", "--root", "/tmp")
    assert code == 2
    assert "--archive pushes from the archive" in one_line(err)
    code, _, err = cli("push", "--archive", str(path), "busybox", "Bad//ref")
    assert code == 2
    one_line(err)
