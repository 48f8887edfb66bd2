"""OCI and Docker image model: descriptors, manifests, indexes, media types, platforms.

Parsing is strict about what a push needs (digests, sizes, media types) and lenient about
everything else, because images come from many producers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from imagepushd.errors import ManifestError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

# BuildKit's attestation manifests: index entries of platform unknown/unknown whose
# annotations name the image manifest they describe (docs: "attestation storage").
ANNOTATION_REFERENCE_TYPE = "vnd.docker.reference.type"
ANNOTATION_REFERENCE_DIGEST = "vnd.docker.reference.digest"
ATTESTATION_MANIFEST = "attestation-manifest"

# Registries cap manifests at 4 MiB; configs can be larger (long histories), so allow more.
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20

#: What containerd's digest library (go-digest v1.0.0, algorithm.go) accepts: sha256, sha384
#: and sha512 in lower-case hex of the algorithm's length (blake3 only when a program imports
#: it, which containerd does not).
_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128})$")


def is_digest(value: str) -> bool:
    """Whether ``value`` is a digest containerd accepts and this tool can verify."""
    return _DIGEST_RE.fullmatch(value) is not None


@dataclass(frozen=True, order=True)
class Platform:
    """An OS/architecture/variant triple, as in an index's descriptors or an image config."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]``."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r} (want os/arch[/variant])")
        return cls(*parts)

    @classmethod
    def from_json(cls, obj: object) -> Platform | None:
        """The platform of a descriptor's ``platform`` object or an image config; None if absent."""
        if not isinstance(obj, Mapping):
            return None
        os_, arch, variant = obj.get("os"), obj.get("architecture"), obj.get("variant", "")
        if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
            return None
        return cls(os_, arch, variant if isinstance(variant, str) else "")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, which bytes, and (in indexes) for which platform."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        """Validate and build a descriptor from its JSON object."""
        if not isinstance(obj, Mapping):
            raise ManifestError(f"{where}: descriptor is not an object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ManifestError(f"{where}: invalid or unsupported digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: invalid size {size!r} for {digest}")
        if not isinstance(media_type, str):
            media_type = ""
        raw_annotations = obj.get("annotations")
        annotations = (
            {str(k): str(v) for k, v in raw_annotations.items()}
            if isinstance(raw_annotations, Mapping)
            else {}
        )
        return cls(media_type, digest, size, Platform.from_json(obj.get("platform")), annotations)

    @property
    def is_attestation(self) -> bool:
        """Whether this index entry is a BuildKit attestation manifest (not an image)."""
        return self.annotations.get(ANNOTATION_REFERENCE_TYPE) == ATTESTATION_MANIFEST

    @property
    def attests(self) -> str | None:
        """For an attestation manifest, the digest of the manifest it describes."""
        if not self.is_attestation:
            return None
        return self.annotations.get(ANNOTATION_REFERENCE_DIGEST) or None

    def to_json(self) -> dict[str, Any]:
        """The descriptor as an OCI JSON object."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and its layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """An index or Docker manifest list: per-platform manifests or nested indexes."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def load_object(data: bytes, where: str) -> Mapping[str, Any]:
    """A JSON object from ``data``; anything else is a :class:`ManifestError` naming ``where``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, Mapping):
        raise ManifestError(f"{where}: not a JSON object")
    return doc


def sniff_media_type(doc: Mapping[str, Any], declared: str) -> str:
    """The media type of a manifest document: its own ``mediaType``, the declared one, or shape."""
    own = doc.get("mediaType")
    if isinstance(own, str) and own:
        return own
    if declared:
        return declared
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return ""


def parse_manifest(data: bytes, descriptor: Descriptor) -> Manifest | Index:
    """Parse the bytes of an image manifest or index named by ``descriptor``."""
    where = f"manifest {descriptor.digest}"
    doc = load_object(data, where)
    media_type = sniff_media_type(doc, descriptor.media_type)
    if media_type in INDEX_TYPES:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestError(f"{where}: index without a manifests list")
        return Index(
            media_type,
            tuple(
                Descriptor.from_json(c, f"{where} manifests[{i}]") for i, c in enumerate(children)
            ),
        )
    if media_type in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError(f"{where}: manifest without a layers list")
        return Manifest(
            media_type,
            Descriptor.from_json(doc.get("config"), f"{where} config"),
            tuple(Descriptor.from_json(x, f"{where} layers[{i}]") for i, x in enumerate(layers)),
        )
    raise ManifestError(f"{where}: unsupported media type {media_type or 'unknown'!r}")


def config_platform(data: bytes, digest: str) -> Platform | None:
    """The platform an image config declares (``os``, ``architecture``, ``variant``)."""
    return Platform.from_json(load_object(data, f"config {digest}"))
