"""``imagepushd export`` round trips through ``ctr images import`` and ``skopeo copy oci:``."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepushd.cli import Context, run
from tests.support.containerd import Containerd
from tests.support.docker import Dockerd
from tests.support.images import ImageBuilder
from tests.support.process import require_tools

pytestmark = pytest.mark.e2e


def export(containerd: Containerd, *args: str) -> tuple[int, str]:
    err = io.StringIO()
    ctx = Context(env={}, home=Path("/nonexistent"), stdout=io.StringIO())
    code = run(["export", "--root", str(containerd.root), *args], ctx, err)
    return code, err.getvalue()


def skopeo_copy(layout: Path, name: str, dest: Path) -> None:
    require_tools("skopeo", hint="install the Debian package skopeo")
    proc = subprocess.run(
        ["skopeo", "copy", "--all", f"oci:{layout}:{name}", f"dir:{dest}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def images(containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path) -> dict[str, str]:
    b = image_builder
    amd = b.manifest([b.layer(1000, "amd"), b.layer(0, "empty")])
    arm = b.manifest([b.layer(2000, "arm")], architecture="arm64", variant="v8")
    roots = {
        "example.com/multi:1": b.index([amd, arm]),
        "example.com/docker:1": b.manifest([b.layer(300, "d", docker=True)], docker=True),
        "example.com/big:1": b.manifest([b.layer(3 << 20, "big")]),
    }
    b.write_oci_archive(tmp_path / "src.tar", roots)
    containerd.import_archive(tmp_path / "src.tar")
    return {name: root.digest for name, root in roots.items()}


def test_tar_round_trip_through_ctr_import(
    containerd: Containerd, images: dict[str, str], tmp_path: Path
):
    out = tmp_path / "export.tar"
    code, err = export(containerd, *images, "-o", str(out))
    assert code == 0, err
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith("blobs/sha256/"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]
    names = {m["annotations"]["io.containerd.image.name"]: m["digest"] for m in index["manifests"]}
    assert names == images
    assert all(
        m["annotations"]["org.opencontainers.image.ref.name"]
        == m["annotations"]["io.containerd.image.name"]
        for m in index["manifests"]
    )
    containerd.create_namespace("reimport")
    containerd.import_archive(out, namespace="reimport")
    assert containerd.images("reimport") == images


def test_directory_layout_is_readable_by_skopeo(
    containerd: Containerd, images: dict[str, str], tmp_path: Path
):
    layout = tmp_path / "layout"
    code, err = export(containerd, *images, "-o", str(layout))
    assert code == 0, err
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    # skopeo 1.9 (Debian 12) skips index.json entries with Docker media types ("no descriptor
    # found"); those images are proven by the ctr round trip above instead.
    oci_images = {k: v for k, v in images.items() if k != "example.com/docker:1"}
    for name, digest in oci_images.items():
        dest = tmp_path / ("dir-" + name.replace("/", "_").replace(":", "_"))
        skopeo_copy(layout, name, dest)
        manifest = (dest / "manifest.json").read_bytes()
        assert "sha256:" + hashlib.sha256(manifest).hexdigest() == digest


def test_missing_content_fails_cleanly(
    containerd: Containerd, images: dict[str, str], image_builder: ImageBuilder, tmp_path: Path
):
    arm_layer = image_builder.layer(2000, "arm")
    containerd.content_rm(arm_layer.digest)
    for out in (tmp_path / "x.tar", tmp_path / "xdir"):
        code, err = export(containerd, "example.com/multi:1", "-o", str(out))
        assert code == 1
        assert err.count("\n") == 1 and arm_layer.digest in err and "missing" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unknown_image_and_existing_output(
    containerd: Containerd, images: dict[str, str], tmp_path: Path
):
    code, err = export(containerd, "example.com/nope:1", "-o", str(tmp_path / "n.tar"))
    assert (code, err) == (
        1,
        "imagepushd: error: image 'example.com/nope:1' not found in namespace 'default'\n",
    )
    (tmp_path / "taken.tar").write_bytes(b"keep me")
    code, err = export(containerd, "example.com/docker:1", "-o", str(tmp_path / "taken.tar"))
    assert code == 1 and "already exists" in err
    assert (tmp_path / "taken.tar").read_bytes() == b"keep me"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_clear_line_and_leaves_nothing(
    containerd: Containerd, images: dict[str, str], tiny_disk: Path
):
    for out in (tiny_disk / "big.tar", tiny_disk / "bigdir"):
        code, err = export(containerd, "example.com/big:1", "-o", str(out))
        assert code == 1
        assert err.startswith("imagepushd: error: writing ") and "No space left" in err
        assert err.count("\n") == 1
        assert list(tiny_disk.iterdir()) == []


@pytest.fixture
def dockerd(tmp_path: Path) -> Iterator[Dockerd]:
    """Debian's dockerd on a private data root and socket (no networking)."""
    with Dockerd(tmp_path / "docker") as daemon:
        yield daemon


def test_docker_load_reads_the_export(
    containerd: Containerd, dockerd: Dockerd, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """``docker load`` (Docker Engine 20.10, which predates OCI-layout loading) takes the
    export through its manifest.json: a single-platform image and the host's platform of an
    index, named by their tags, each checked by docker against its config's diff IDs; the
    loaded image ID is the config digest."""
    b = image_builder
    app = b.manifest([b.tar_layer({"app/one": b"1" * 3000}), b.tar_layer({"app/two": b"two"})])
    amd = b.manifest([b.tar_layer({"multi/amd64": b"amd"})])
    arm = b.manifest([b.tar_layer({"multi/arm64": b"arm"})], architecture="arm64", variant="v8")
    roots = {
        "docker.io/library/app:1": app,
        "registry.example.com/team/multi:2": b.index([amd, arm]),
    }
    b.write_oci_archive(tmp_path / "src.tar", roots)
    containerd.import_archive(tmp_path / "src.tar")
    out = tmp_path / "export.tar"
    code, err = export(containerd, *roots, "-o", str(out))
    assert code == 0, err

    loaded = dockerd.docker("load", "-i", str(out))
    assert "Loaded image: app:1" in loaded and "registry.example.com/team/multi:2" in loaded
    host = amd if platform.machine() == "x86_64" else arm
    for name, manifest in (("app:1", app), ("registry.example.com/team/multi:2", host)):
        inspected = json.loads(dockerd.docker("image", "inspect", name))[0]
        assert inspected["Id"] == manifest.json()["config"]["digest"]
        assert (
            inspected["RootFS"]["Layers"]
            == json.loads(b.get(manifest.json()["config"]["digest"]).data)["rootfs"]["diff_ids"]
        )
