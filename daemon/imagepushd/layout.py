"""Writing OCI image layouts (a directory, or a tar of one) from containerd's content store.

Beside ``index.json`` the layout carries what ``docker save`` writes, ``manifest.json`` and
``repositories``, pointing at the same ``blobs/`` files (as Docker 25's own ``docker save``
does), so ``docker load`` of any Docker version reads it too, not only ctr and skopeo. Docker
loads one platform per image: the host's manifest of an index (an image without one is left
out of ``manifest.json`` and stays in ``index.json``).

The output appears atomically: everything is written under a temporary sibling name and
renamed into place only when every blob has been copied and verified, so a failure (missing
or corrupt content, a full disk) leaves nothing half-written behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepushd.decide.platforms import host_manifest
from imagepushd.errors import (
    ImagepushdError,
    InvalidReferenceError,
    MissingContentError,
    OutputError,
)
from imagepushd.oci import OCI_INDEX, Descriptor, Platform
from imagepushd.reference import parse_reference
from imagepushd.watch.content import ContentStore, ImageGraph, ManifestNode

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


@dataclass(frozen=True)
class ExportImage:
    """One image to export: the name to record and its resolved graph."""

    name: str
    target: Descriptor
    graph: ImageGraph


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    images: int
    blobs: int
    bytes: int


def index_json(images: Sequence[ExportImage]) -> bytes:
    """The layout's ``index.json``: one descriptor per image, named both ways."""
    manifests: list[dict[str, Any]] = []
    for image in images:
        entry = Descriptor(image.target.media_type, image.target.digest, image.target.size)
        obj = entry.to_json()
        obj["annotations"] = {
            ANNOTATION_CONTAINERD_NAME: image.name,
            ANNOTATION_REF_NAME: image.name,
        }
        manifests.append(obj)
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(doc, indent=2).encode() + b"\n"


def _docker_manifest(graph: ImageGraph, host: Platform) -> ManifestNode | None:
    """The manifest ``docker load`` should load: the image's own, or the host's of an index."""
    if isinstance(graph.root, ManifestNode):
        return graph.root
    return host_manifest(graph, host)


def docker_save_json(images: Sequence[ExportImage], host: Platform) -> tuple[bytes, bytes]:
    """``manifest.json`` and ``repositories`` as ``docker save`` writes them, over ``blobs/``."""
    entries: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for image in images:
        node = _docker_manifest(image.graph, host)
        if node is None or node.manifest is None:
            continue
        try:
            ref = parse_reference(image.name, default_tag=None)
        except InvalidReferenceError:
            ref = None
        tags = []
        layers = [_blob_name(d) for d in node.manifest.layers]
        if ref is not None and ref.tag is not None and ref.digest is None:
            familiar = ref.familiar()
            tags.append(familiar)
            if layers:
                name = familiar.rsplit(":", 1)[0]
                top = node.manifest.layers[-1].digest.partition(":")[2]
                repositories.setdefault(name, {})[ref.tag] = top
        entries.append(
            {"Config": _blob_name(node.manifest.config), "RepoTags": tags, "Layers": layers}
        )
    manifest = json.dumps(entries, indent=2).encode() + b"\n"
    return manifest, json.dumps(repositories, indent=2).encode() + b"\n"


def _blobs(images: Sequence[ExportImage]) -> list[Descriptor]:
    seen: dict[str, Descriptor] = {}
    for image in images:
        if not image.graph.complete:
            raise MissingContentError(
                f"cannot export {image.name}", [d.digest for d in image.graph.missing]
            )
        for descriptor in image.graph.descriptors():
            seen.setdefault(descriptor.digest, descriptor)
    return list(seen.values())


def _blob_name(descriptor: Descriptor) -> str:
    algorithm, _, hex_ = descriptor.digest.partition(":")
    return f"blobs/{algorithm}/{hex_}"


def export_layout(
    store: ContentStore, images: Sequence[ExportImage], out: Path, host: Platform
) -> ExportResult:
    """Write ``images`` as an OCI layout at ``out`` (a tar when its name ends in ``.tar``).

    ``host`` is the platform ``docker load`` gets of a multi-platform image.
    """
    blobs = _blobs(images)
    as_tar = out.name.endswith(".tar")
    _refuse_existing(out, as_tar)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        _write(store, images, blobs, host, partial=partial, out=out, as_tar=as_tar)
    except BaseException as exc:
        _discard(partial)
        if isinstance(exc, OSError) and not isinstance(exc, ImagepushdError):
            raise OutputError(f"writing {out}: {exc.strerror or exc}") from exc
        raise
    return ExportResult(out, len(images), len(blobs), sum(b.size for b in blobs))


def _refuse_existing(out: Path, as_tar: bool) -> None:
    """Refuse to write over anything but an empty directory (a tar: over anything)."""
    if out.exists() and (as_tar or not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: already exists" + ("" if as_tar else " and is not empty"))


def _write(
    store: ContentStore,
    images: Sequence[ExportImage],
    blobs: Sequence[Descriptor],
    host: Platform,
    *,
    partial: Path,
    out: Path,
    as_tar: bool,
) -> None:
    """Write the layout at ``partial``, then rename it to ``out``."""
    if as_tar:
        _write_tar(store, images, blobs, partial, host)
    else:
        _write_dir(store, images, blobs, partial, host)
        if out.exists():
            out.rmdir()
    os.replace(partial, out)


def _discard(partial: Path) -> None:
    """Remove what was written of ``partial``, a directory or a tar."""
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


def _write_dir(
    store: ContentStore,
    images: Sequence[ExportImage],
    blobs: Sequence[Descriptor],
    dest: Path,
    host: Platform,
) -> None:
    dest.mkdir()
    (dest / "oci-layout").write_bytes(OCI_LAYOUT)
    for descriptor in blobs:
        path = dest / _blob_name(descriptor)
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.open(descriptor) as reader, path.open("wb") as file:
            for chunk in reader:
                file.write(chunk)
    manifest, repositories = docker_save_json(images, host)
    (dest / "manifest.json").write_bytes(manifest)
    (dest / "repositories").write_bytes(repositories)
    (dest / "index.json").write_bytes(index_json(images))


def _tar_info(name: str, size: int, mode: int, mtime: int, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, mtime, kind
    return info


def _write_tar(
    store: ContentStore,
    images: Sequence[ExportImage],
    blobs: Sequence[Descriptor],
    dest: Path,
    host: Platform,
) -> None:
    now = int(time.time())
    index = index_json(images)
    manifest, repositories = docker_save_json(images, host)
    with (
        dest.open("xb") as file,
        tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(
            _tar_info("oci-layout", len(OCI_LAYOUT), 0o644, now, tarfile.REGTYPE),
            io.BytesIO(OCI_LAYOUT),
        )
        for name, data in (
            ("index.json", index),
            ("manifest.json", manifest),
            ("repositories", repositories),
        ):
            tar.addfile(_tar_info(name, len(data), 0o644, now, tarfile.REGTYPE), io.BytesIO(data))
        dirs = sorted({_blob_name(b).rsplit("/", 1)[0] for b in blobs} | {"blobs"})
        for directory in dirs:
            tar.addfile(_tar_info(directory + "/", 0, 0o755, now, tarfile.DIRTYPE))
        for descriptor in blobs:
            info = _tar_info(_blob_name(descriptor), descriptor.size, 0o444, now, tarfile.REGTYPE)
            with store.open(descriptor) as reader:
                tar.addfile(info, reader)
        file.flush()
        os.fsync(file.fileno())
