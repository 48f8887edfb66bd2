"""Build OCI / Docker image content and image archives for tests, with the standard library only.

Everything is deterministic: layer bytes come from ``random.Random(seed)`` and JSON is
serialised canonically (sorted keys, no spaces), so the same calls always give the same digests.

Typical use::

    b = ImageBuilder()
    amd = b.manifest([b.layer(1024, "a")], architecture="amd64")
    arm = b.manifest([b.layer(1024, "b")], architecture="arm64", variant="v8")
    idx = b.index([amd, arm])
    b.write_oci_archive(tmp / "img.tar", {"example.com/app:1": idx})
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

IN_TOTO = "application/vnd.in-toto+json"
PREDICATE_SPDX = "https://spdx.dev/Document"
PREDICATE_SLSA = "https://slsa.dev/provenance/v0.2"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

#: containerd's annotation for the full image name in an OCI layout's index.json.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
#: The OCI annotation for an image's reference name.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

_CHUNK = 1 << 20  # 1 MiB


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` deterministically (sorted keys, no whitespace) as UTF-8 bytes."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def sha256_digest(data: bytes) -> str:
    """Return the ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(
    media_type: str, digest: str, size: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    desc.update({k: v for k, v in extra.items() if v is not None})
    return desc


@dataclass(frozen=True)
class Blob:
    """A piece of content held in memory: its media type and its bytes."""

    media_type: str
    data: bytes = field(repr=False)

    @cached_property
    def digest(self) -> str:
        """The ``sha256:<hex>`` digest of the data."""
        return sha256_digest(self.data)

    @property
    def hex(self) -> str:
        """The hex part of the digest (the blob's file name in an OCI layout)."""
        return self.digest.split(":", 1)[1]

    @property
    def size(self) -> int:
        """The size of the data in bytes."""
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """Return an OCI descriptor; ``extra`` keys (``platform``, ``annotations``...) are added.

        Extra keys whose value is ``None`` are left out.
        """
        return _descriptor(self.media_type, self.digest, self.size, extra)

    def json(self) -> Any:
        """Parse the data as JSON (for manifests, indexes and configs)."""
        return json.loads(self.data)

    def open(self) -> BinaryIO:
        """Return a binary file object reading the data."""
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class FileBlob:
    """A (large) layer whose bytes live in a file: only its descriptor is kept in memory."""

    media_type: str
    path: Path
    digest: str
    size: int

    @property
    def hex(self) -> str:
        """The hex part of the digest."""
        return self.digest.split(":", 1)[1]

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        """Return an OCI descriptor; ``extra`` keys are added (``None`` values left out)."""
        return _descriptor(self.media_type, self.digest, self.size, extra)

    def open(self) -> BinaryIO:
        """Open the backing file for reading."""
        return self.path.open("rb")


#: Anything that can be written into an archive as a blob.
Content = Blob | FileBlob


def _platform(os: str, architecture: str, variant: str | None) -> dict[str, str]:
    plat = {"architecture": architecture, "os": os}
    if variant:
        plat["variant"] = variant
    return plat


def _predicate(predicate_type: str, subject: str) -> dict[str, Any]:
    """A small predicate of the kind BuildKit writes (SPDX SBOM or SLSA provenance)."""
    if predicate_type == PREDICATE_SPDX:
        return {
            "spdxVersion": "SPDX-2.3",
            "SPDXID": "SPDXRef-DOCUMENT",
            "name": f"sbom-{subject}",
            "packages": [{"name": "busybox", "versionInfo": "1.36.1", "SPDXID": "SPDXRef-1"}],
        }
    return {
        "buildType": "https://mobyproject.org/buildkit@v1",
        "builder": {"id": ""},
        "invocation": {"parameters": {"frontend": "dockerfile.v0"}},
        "metadata": {"buildInvocationID": subject},
    }


def _diff_id(layer: Content) -> str:
    # Any sha256 will do for tests; derive one from the layer digest so configs are stable.
    return sha256_digest(b"diff-id:" + layer.digest.encode())


class ImageBuilder:
    """Collect blobs (deduplicated by digest) and assemble images, indexes and archives."""

    def __init__(self) -> None:
        self._blobs: dict[str, Content] = {}
        self._platforms: dict[str, dict[str, str]] = {}
        self._annotations: dict[str, dict[str, str]] = {}
        # The true diff IDs of real (gzip'd tar) layers; other layers get made-up ones.
        self._diff_ids: dict[str, str] = {}

    # ------------------------------------------------------------------ content
    def add(self, blob: Content) -> Content:
        """Register ``blob`` (returned unchanged unless one with that digest already exists)."""
        return self._blobs.setdefault(blob.digest, blob)

    def get(self, digest: str) -> Content:
        """Return the registered blob with ``digest`` (KeyError if unknown)."""
        return self._blobs[digest]

    def json_blob(self, media_type: str, obj: Any) -> Blob:
        """Register and return a blob holding ``obj`` as canonical JSON."""
        blob = Blob(media_type, canonical_json(obj))
        self.add(blob)
        return blob

    def layer(self, size: int, seed: int | str, docker: bool = False) -> Blob:
        """Return a layer of exactly ``size`` random bytes, deterministic from ``seed``.

        The bytes are not really gzip; containerd's ``import --no-unpack`` does not check.
        """
        if size < 0:
            raise ValueError(f"negative layer size {size}")
        data = random.Random(seed).randbytes(size)
        blob = Blob(DOCKER_LAYER if docker else OCI_LAYER, data)
        self.add(blob)
        return blob

    def tar_layer(self, files: Mapping[str, bytes], docker: bool = False) -> Blob:
        """Return a real gzip'd tar layer holding ``files`` (path -> content), reproducibly.

        Configs built over it carry its true diff ID, so ``docker load`` can unpack and check it.
        """
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        uncompressed = raw.getvalue()
        blob = Blob(DOCKER_LAYER if docker else OCI_LAYER, gzip.compress(uncompressed, mtime=0))
        self._diff_ids[blob.digest] = sha256_digest(uncompressed)
        self.add(blob)
        return blob

    def layer_file(
        self, path: str | os.PathLike[str], size: int, seed: int | str, docker: bool = False
    ) -> FileBlob:
        """Write a ``size``-byte random layer to ``path`` in 1 MiB pieces; return a FileBlob.

        The bytes equal those of :meth:`layer` with the same size and seed only for sizes up to
        1 MiB; callers should not rely on that.
        """
        if size < 0:
            raise ValueError(f"negative layer size {size}")
        target = Path(path)
        rng = random.Random(seed)
        hasher = hashlib.sha256()
        with target.open("wb") as out:
            remaining = size
            while remaining:
                piece = rng.randbytes(min(_CHUNK, remaining))
                hasher.update(piece)
                out.write(piece)
                remaining -= len(piece)
        blob = FileBlob(
            media_type=DOCKER_LAYER if docker else OCI_LAYER,
            path=target,
            digest="sha256:" + hasher.hexdigest(),
            size=size,
        )
        self.add(blob)
        return blob

    # ------------------------------------------------------------------ images
    def config(
        self,
        layers: Sequence[Content],
        os: str = "linux",
        architecture: str = "amd64",
        variant: str | None = None,
        docker: bool = False,
    ) -> Blob:
        """Register and return an image config blob for ``layers`` on the given platform."""
        cfg: dict[str, Any] = {
            "architecture": architecture,
            "os": os,
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": [self._diff_ids.get(x.digest) or _diff_id(x) for x in layers],
            },
        }
        if variant:
            cfg["variant"] = variant
        return self.json_blob(DOCKER_CONFIG if docker else OCI_CONFIG, cfg)

    def manifest(
        self,
        layers: Sequence[Content],
        os: str = "linux",
        architecture: str = "amd64",
        variant: str | None = None,
        docker: bool = False,
        annotations: Mapping[str, str] | None = None,
    ) -> Blob:
        """Build a config and an image manifest over ``layers``; return the manifest blob.

        The platform is remembered so that :meth:`index` puts it on the child descriptor.
        """
        for layer in layers:
            self.add(layer)
        config = self.config(
            layers, os=os, architecture=architecture, variant=variant, docker=docker
        )
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer.descriptor() for layer in layers],
        }
        if annotations:
            doc["annotations"] = dict(annotations)
        blob = self.json_blob(doc["mediaType"], doc)
        self._platforms[blob.digest] = _platform(os, architecture, variant)
        return blob

    def attestation(
        self,
        subject: Blob,
        predicate_types: Sequence[str] = (PREDICATE_SPDX, PREDICATE_SLSA),
        name: str = "pkg:docker/example.com/app",
    ) -> Blob:
        """A BuildKit attestation manifest for the image manifest ``subject``; return it.

        As ``docker buildx build --attest type=sbom --attest type=provenance`` writes it: one
        in-toto statement layer per predicate (annotated with its predicate type) and an
        ``unknown/unknown`` config; :meth:`index` gives its entry platform ``unknown/unknown``
        and the ``vnd.docker.reference.*`` annotations naming ``subject``.
        """
        layers: list[dict[str, Any]] = []
        for predicate_type in predicate_types:
            statement = {
                "_type": "https://in-toto.io/Statement/v0.1",
                "predicateType": predicate_type,
                "subject": [{"name": name, "digest": {"sha256": subject.hex}}],
                "predicate": _predicate(predicate_type, subject.digest),
            }
            blob = self.json_blob(IN_TOTO, statement)
            layers.append(
                blob.descriptor(annotations={"in-toto.io/predicate-type": predicate_type})
            )
        config = self.json_blob(
            OCI_CONFIG,
            {
                "architecture": "unknown",
                "os": "unknown",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layers]},
            },
        )
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers,
        }
        blob = self.json_blob(OCI_MANIFEST, doc)
        self._platforms[blob.digest] = _platform("unknown", "unknown", None)
        self._annotations[blob.digest] = {
            "vnd.docker.reference.digest": subject.digest,
            "vnd.docker.reference.type": "attestation-manifest",
        }
        return blob

    def index(
        self,
        children: Sequence[Content],
        docker: bool = False,
        annotations: Mapping[str, str] | None = None,
    ) -> Blob:
        """Build an OCI index (or a Docker manifest list with ``docker=True``) over ``children``.

        Children built by :meth:`manifest` carry their platform; others (e.g. nested indexes)
        get none.
        """
        for child in children:
            self.add(child)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST if docker else OCI_INDEX,
            "manifests": [
                child.descriptor(
                    platform=self._platforms.get(child.digest),
                    annotations=self._annotations.get(child.digest),
                )
                for child in children
            ],
        }
        if annotations:
            doc["annotations"] = dict(annotations)
        return self.json_blob(doc["mediaType"], doc)

    def image(
        self,
        layer_sizes: Sequence[int],
        seed: int | str,
        os: str = "linux",
        architecture: str = "amd64",
        variant: str | None = None,
        docker: bool = False,
    ) -> Blob:
        """Shortcut: a single-platform image whose layers have ``layer_sizes`` bytes each.

        Layer ``i`` is ``layer(layer_sizes[i], f"{seed}/{i}")``.
        """
        layers = [self.layer(n, f"{seed}/{i}", docker=docker) for i, n in enumerate(layer_sizes)]
        return self.manifest(
            layers, os=os, architecture=architecture, variant=variant, docker=docker
        )

    # ------------------------------------------------------------------ walking
    def children_of(self, blob: Content) -> list[Content]:
        """Return the blobs directly referenced by a manifest or index (none for other types)."""
        if not isinstance(blob, Blob):
            return []
        if blob.media_type in MANIFEST_TYPES:
            doc = blob.json()
            descs = [doc["config"], *doc.get("layers", [])]
        elif blob.media_type in INDEX_TYPES:
            descs = list(blob.json().get("manifests", []))
        else:
            return []
        return [self._blobs[d["digest"]] for d in descs]

    def blobs_of(self, root: Content) -> list[Content]:
        """Return every blob reachable from ``root`` (root first, each digest once)."""
        seen: dict[str, Content] = {}
        stack = [root]
        while stack:
            blob = stack.pop()
            if blob.digest in seen:
                continue
            seen[blob.digest] = blob
            stack.extend(reversed(self.children_of(blob)))
        return list(seen.values())

    def _reachable(self, roots: Sequence[Content]) -> list[Content]:
        out: dict[str, Content] = {}
        for root in roots:
            for blob in self.blobs_of(root):
                out.setdefault(blob.digest, blob)
        return list(out.values())

    # ------------------------------------------------------------------ archives
    def oci_index_json(self, images: Mapping[str, Content]) -> Blob:
        """Return the ``index.json`` of an OCI layout naming ``images`` (full name -> root)."""
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                root.descriptor(
                    annotations={ANNOTATION_CONTAINERD_NAME: name, ANNOTATION_REF_NAME: name}
                )
                for name, root in images.items()
            ],
        }
        return Blob(OCI_INDEX, canonical_json(doc))

    def write_oci_archive(
        self, path: str | os.PathLike[str], images: Mapping[str, Content]
    ) -> None:
        """Write an OCI image-layout tar holding ``images`` (full name -> root blob).

        ``index.json`` has one descriptor per name, annotated with the name for containerd;
        every reachable blob is stored once under ``blobs/sha256/``. File-backed layers are
        streamed from disk.
        """
        for root in images.values():
            self.add(root)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_dir(tar, "blobs")
            _add_dir(tar, "blobs/sha256")
            for blob in self._reachable(list(images.values())):
                _add_content(tar, f"blobs/sha256/{blob.hex}", blob)
            _add_bytes(tar, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(tar, "index.json", self.oci_index_json(images).data)

    def docker_import_manifest(self, root: Content) -> Blob:
        """Return the manifest containerd 1.6 writes when importing ``root`` from a docker archive.

        containerd builds it itself (Go JSON field order, compact) with a Docker config
        descriptor and layer media types chosen by sniffing the layer bytes (gzip or zstd magic:
        ``...tar.gzip``, else uncompressed ``...tar``). Its digest is the imported image's target.
        """
        if not isinstance(root, Blob) or root.media_type not in MANIFEST_TYPES:
            raise ValueError(f"not an image manifest: {root.media_type}")
        doc = root.json()

        def desc(media_type: str, digest: str, size: int) -> str:
            return json.dumps(
                {"mediaType": media_type, "digest": digest, "size": size}, separators=(",", ":")
            )

        config = self._blobs[doc["config"]["digest"]]
        parts = [desc(DOCKER_CONFIG, config.digest, config.size)]
        layers: list[str] = []
        for d in doc["layers"]:
            layer = self._blobs[d["digest"]]
            with layer.open() as src:
                head = src.read(4)
            compressed = head.startswith((b"\x1f\x8b\x08", b"\x28\xb5\x2f\xfd"))
            layers.append(
                desc(DOCKER_LAYER if compressed else DOCKER_LAYER_TAR, layer.digest, layer.size)
            )
        text = (
            f'{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{parts[0]},'
            f'"layers":[{",".join(layers)}]}}'
        )
        blob = Blob(DOCKER_MANIFEST, text.encode())
        self.add(blob)
        return blob

    def write_docker_archive(
        self, path: str | os.PathLike[str], images: Mapping[str, Content]
    ) -> None:
        """Write a ``docker save`` archive (``manifest.json``, config, ``<id>/layer.tar``).

        Each root must be a single-platform image manifest. Names sharing a root share one
        ``manifest.json`` entry. Layer files hold the layer blob's bytes as they are.
        Note: importers build their own manifest from this, so the imported image's target
        digest is not the builder's manifest digest (the config digest is kept).
        """
        by_root: dict[str, list[str]] = {}
        for name, root in images.items():
            if root.media_type not in MANIFEST_TYPES:
                raise ValueError(
                    f"{name}: docker archives hold image manifests, not {root.media_type}"
                )
            self.add(root)
            by_root.setdefault(root.digest, []).append(name)
        entries: list[dict[str, Any]] = []
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            written: set[str] = set()
            for root_digest, names in by_root.items():
                doc = self._blobs[root_digest]
                assert isinstance(doc, Blob)
                manifest = doc.json()
                config = self._blobs[manifest["config"]["digest"]]
                layer_names: list[str] = []
                if config.digest not in written:
                    _add_content(tar, f"{config.hex}.json", config)
                    written.add(config.digest)
                for desc in manifest["layers"]:
                    layer = self._blobs[desc["digest"]]
                    name = f"{layer.hex}/layer.tar"
                    if layer.digest not in written:
                        _add_dir(tar, layer.hex)
                        _add_content(tar, name, layer)
                        written.add(layer.digest)
                    layer_names.append(name)
                entries.append(
                    {"Config": f"{config.hex}.json", "RepoTags": names, "Layers": layer_names}
                )
            _add_bytes(tar, "manifest.json", json.dumps(entries, separators=(",", ":")).encode())


def _tarinfo(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_tarinfo(name, 0, tarfile.DIRTYPE))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _add_content(tar: tarfile.TarFile, name: str, blob: Content) -> None:
    # tarfile copies from the file object in chunks, so file-backed layers are streamed.
    with blob.open() as src:
        tar.addfile(_tarinfo(name, blob.size), src)


class _PatternBytes(io.RawIOBase):
    """``size`` bytes made fast, hashed as read: a random MiB, each copy numbered.

    No two 32 KiB windows repeat, so gzip cannot shrink it; no block is all zeros, so file
    systems store it whole.
    """

    def __init__(self, size: int, seed: int | str) -> None:
        self._base = random.Random(seed).randbytes(_CHUNK)
        self._size = size
        self._pos = 0
        self.hasher = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos)
        done = 0
        while done < n:
            block, within = divmod(self._pos + done, _CHUNK)
            data = block.to_bytes(8, "big") + self._base[8:]
            piece = data[within : within + n - done]
            view[done : done + len(piece)] = piece
            done += len(piece)
        self.hasher.update(view[:n])
        self._pos += n
        return n


def write_large_docker_archive(
    path: str | os.PathLike[str], layer_size: int, name: str, seed: int | str | None = None
) -> str:
    """Write a ``docker save`` tar of one ``layer_size``-byte layer in one pass; return its digest.

    Nothing is held in memory or written twice: the layer streams into the tar while it is
    hashed, and the config (whose ``diff_ids`` name the layer's true digest, as skopeo's
    docker-archive reader requires) follows it.
    """
    stream = _PatternBytes(layer_size, name if seed is None else seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = 4 * _CHUNK
        info = _tarinfo("layer/layer.tar", layer_size)
        tar.addfile(info, io.BufferedReader(stream, 4 * _CHUNK))
        digest = "sha256:" + stream.hasher.hexdigest()
        config = canonical_json(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [digest]},
            }
        )
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        _add_bytes(tar, config_name, config)
        manifest = [{"Config": config_name, "RepoTags": [name], "Layers": ["layer/layer.tar"]}]
        _add_bytes(tar, "manifest.json", canonical_json(manifest))
    return digest
