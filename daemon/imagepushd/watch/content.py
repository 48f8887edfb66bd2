"""containerd's content store: open blobs with verification, walk image graphs.

Blob files are shared by all namespaces; whether a namespace may use one is decided by its
``content/blob`` record in meta.db, so completeness checks take that set of digests too.
Every byte read through :class:`BlobReader` is hashed once and compared at the end: a corrupt
local blob is an error, never data.

The graph walk (:func:`walk`) works on any :class:`~imagepushd.blobs.BlobStore`: the content
store here, or an image archive (``push/archive.py``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from imagepushd.blobs import BlobSource, BlobStore
from imagepushd.errors import (
    BlobCorruptError,
    ContainerdError,
    ManifestError,
    MissingContentError,
)
from imagepushd.oci import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    Index,
    Manifest,
    Platform,
    config_platform,
    is_digest,
    parse_manifest,
)

CONTENT_BLOBS = Path("io.containerd.content.v1.content") / "blobs"
MAX_INDEX_DEPTH = 8
READ_SIZE = 256 << 10


class BlobReader:
    """A read-only stream of one blob that verifies size and digest as it is consumed.

    The digest is checked the moment the last byte is read, so callers that read exactly
    ``size`` bytes (tar writers, uploaders) get verification without reading to EOF.
    """

    def __init__(self, file: BinaryIO, descriptor: Descriptor) -> None:
        self._file = file
        self.descriptor = descriptor
        algorithm, _, self._expected = descriptor.digest.partition(":")
        self._hash = hashlib.new(algorithm)
        self._read = 0

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying file."""
        self._file.close()

    def read(self, size: int = READ_SIZE) -> bytes:
        """Up to ``size`` bytes; raises :class:`BlobCorruptError` as soon as a mismatch shows."""
        want = self.descriptor.size - self._read
        if want <= 0:
            return b""
        data = self._file.read(min(size if size >= 0 else want, want))
        if not data:
            raise BlobCorruptError(
                f"blob {self.descriptor.digest} is truncated: {self._read} of "
                f"{self.descriptor.size} bytes"
            )
        self._hash.update(data)
        self._read += len(data)
        if self._read == self.descriptor.size and self._hash.hexdigest() != self._expected:
            raise BlobCorruptError(
                f"blob {self.descriptor.digest} is corrupt: its content hashes to "
                f"{self._hash.name}:{self._hash.hexdigest()}"
            )
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read():
            yield chunk


class ContentStore:
    """The blob files under ``<root>/io.containerd.content.v1.content/blobs``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / CONTENT_BLOBS

    def path(self, digest: str) -> Path:
        """The file holding ``digest`` (validated, so a digest can never escape the store)."""
        if not is_digest(digest):
            raise ContainerdError(f"invalid or unsupported digest {digest!r}")
        algorithm, _, hex_ = digest.partition(":")
        return self.blobs / algorithm / hex_

    def has(self, descriptor: Descriptor) -> bool:
        """Whether the blob file exists with the descriptor's size."""
        try:
            return self.path(descriptor.digest).stat().st_size == descriptor.size
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ContainerdError(f"{self.path(descriptor.digest)}: {exc.strerror}") from exc

    def source(self, descriptor: Descriptor) -> BlobSource:
        """The blob's file, for the uploader (which verifies size and digest as it sends)."""
        return BlobSource(self.path(descriptor.digest), descriptor)

    def open(self, descriptor: Descriptor) -> BlobReader:
        """A verifying reader of the blob; missing or mis-sized files are errors."""
        path = self.path(descriptor.digest)
        try:
            file = path.open("rb", buffering=0)
        except FileNotFoundError:
            raise MissingContentError(f"blob {descriptor.digest}", [descriptor.digest]) from None
        except OSError as exc:
            raise ContainerdError(f"{path}: {exc.strerror}") from exc
        size = os.fstat(file.fileno()).st_size
        if size != descriptor.size:
            file.close()
            raise BlobCorruptError(
                f"blob {descriptor.digest} is {size} bytes, its descriptor says {descriptor.size}"
            )
        return BlobReader(file, descriptor)

    def read_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
        """The whole verified blob, refusing anything larger than ``limit``."""
        if descriptor.size > limit:
            raise ManifestError(
                f"blob {descriptor.digest} is {descriptor.size} bytes, over the {limit} limit"
            )
        with self.open(descriptor) as reader:
            return b"".join(reader)

    def walk(self, target: Descriptor, known: Collection[str] | None = None) -> ImageGraph:
        """The graph below ``target``, noting every blob that is absent.

        ``known`` is the namespace's set of blob digests from meta.db; a file outside it is
        not usable in that namespace and counts as missing.
        """
        return walk(self, target, known)


@dataclass(frozen=True)
class BlobNode:
    """A blob an index refers to that is neither a manifest nor an index (kept as it is)."""

    descriptor: Descriptor


@dataclass(frozen=True)
class ManifestNode:
    """An image manifest, its platform, and its content (None when the manifest is absent).

    ``data`` holds the verified bytes the walk parsed (at most ``MAX_MANIFEST_SIZE``), so a
    push sends them without reading and hashing the blob again.
    """

    descriptor: Descriptor
    platform: Platform | None
    manifest: Manifest | None
    data: bytes | None = field(default=None, repr=False)

    @property
    def attests(self) -> str | None:
        """For a BuildKit attestation manifest, the digest of the manifest it describes."""
        return self.descriptor.attests

    @property
    def is_attestation(self) -> bool:
        """Whether this is a BuildKit attestation manifest (platform ``unknown/unknown``)."""
        return self.descriptor.is_attestation


@dataclass(frozen=True)
class IndexNode:
    """An index and its children (none when the index blob itself is absent).

    ``data`` holds the verified bytes of the index, as for :class:`ManifestNode`.
    """

    descriptor: Descriptor
    index: Index | None
    children: tuple[GraphNode, ...]
    data: bytes | None = field(default=None, repr=False)


GraphNode = BlobNode | ManifestNode | IndexNode


@dataclass(frozen=True)
class ImageGraph:
    """Everything reachable from an image's target, and what of it is missing."""

    root: GraphNode
    missing: tuple[Descriptor, ...]

    @property
    def complete(self) -> bool:
        """Whether every reachable blob is present."""
        return not self.missing

    @cached_property
    def _missing_digests(self) -> frozenset[str]:
        return frozenset(d.digest for d in self.missing)

    def present(self, descriptor: Descriptor) -> bool:
        """Whether the walk found ``descriptor``'s blob (so nobody needs to look again)."""
        return descriptor.digest not in self._missing_digests

    def manifest_complete(self, node: ManifestNode) -> bool:
        """Whether ``node``'s manifest, config and every layer are present."""
        if node.manifest is None:
            return False
        parts = (node.manifest.config, *node.manifest.layers)
        return all(self.present(d) for d in parts)

    def nodes(self) -> Iterator[GraphNode]:
        """Every node, parents before children."""
        stack: list[GraphNode] = [self.root]
        while stack:
            node = stack.pop()
            yield node
            if isinstance(node, IndexNode):
                stack.extend(reversed(node.children))

    def manifests(self) -> list[ManifestNode]:
        """Every image manifest node, in index order."""
        return [n for n in self.nodes() if isinstance(n, ManifestNode)]

    def platforms(self) -> list[Platform]:
        """The distinct platforms of the image's manifests, sorted.

        Attestation manifests say ``unknown/unknown``: they are not a platform of the image.
        """
        return sorted(
            {
                m.platform
                for m in self.manifests()
                if m.platform is not None and not m.is_attestation
            }
        )

    def attestations(self) -> list[ManifestNode]:
        """The BuildKit attestation manifests, in index order."""
        return [m for m in self.manifests() if m.is_attestation]

    def descriptors(self) -> list[Descriptor]:
        """Every reachable blob once: configs and layers, then manifests, then indexes."""
        blobs: dict[str, Descriptor] = {}
        manifests: dict[str, Descriptor] = {}
        indexes: dict[str, Descriptor] = {}
        for node in self.nodes():
            if isinstance(node, IndexNode):
                indexes[node.descriptor.digest] = node.descriptor
            elif isinstance(node, ManifestNode):
                manifests[node.descriptor.digest] = node.descriptor
                if node.manifest is not None:
                    for d in (node.manifest.config, *node.manifest.layers):
                        blobs.setdefault(d.digest, d)
            else:
                blobs.setdefault(node.descriptor.digest, node.descriptor)
        # Indexes were met parents-first; children must come before the indexes naming them.
        return [*blobs.values(), *manifests.values(), *reversed(indexes.values())]

    @property
    def size(self) -> int:
        """Total bytes of the distinct blobs the graph names, present or not."""
        return sum(d.size for d in self.descriptors())


def walk(store: BlobStore, target: Descriptor, known: Collection[str] | None = None) -> ImageGraph:
    """The graph below ``target`` in ``store``, noting every blob that is absent.

    ``known``, when given, is the set of digests the caller may use; anything outside it
    counts as missing even if ``store`` has it.
    """
    return _Walker(store, known).graph(target)


class _Walker:
    """One graph walk: records missing blobs and bounds index nesting."""

    def __init__(self, store: BlobStore, known: Collection[str] | None) -> None:
        self._store = store
        self._known = known
        self._missing: dict[str, Descriptor] = {}

    def graph(self, target: Descriptor) -> ImageGraph:
        root = self._visit(target, target.platform, 0)
        return ImageGraph(root, tuple(self._missing.values()))

    def _present(self, descriptor: Descriptor) -> bool:
        ok = (self._known is None or descriptor.digest in self._known) and self._store.has(
            descriptor
        )
        if not ok:
            self._missing.setdefault(descriptor.digest, descriptor)
        return ok

    def _visit(self, desc: Descriptor, platform: Platform | None, depth: int) -> GraphNode:
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"index {desc.digest}: nested deeper than {MAX_INDEX_DEPTH}")
        is_index = desc.media_type in INDEX_TYPES
        if not is_index and desc.media_type not in MANIFEST_TYPES and depth > 0:
            self._present(desc)
            return BlobNode(desc)
        if not self._present(desc):
            if is_index:
                return IndexNode(desc, None, ())
            return ManifestNode(desc, platform, None)
        data = self._store.read_bytes(desc, MAX_MANIFEST_SIZE)
        parsed = parse_manifest(data, desc)
        if isinstance(parsed, Index):
            children = tuple(self._visit(c, c.platform, depth + 1) for c in parsed.manifests)
            return IndexNode(desc, parsed, children, data)
        return self._manifest(desc, platform, parsed, data)

    def _manifest(
        self, desc: Descriptor, platform: Platform | None, parsed: Manifest, data: bytes
    ) -> ManifestNode:
        """A present manifest's node; its platform read from its config if no index gave one."""
        config_present = self._present(parsed.config)
        for layer in parsed.layers:
            self._present(layer)
        if platform is None and config_present:
            config = self._store.read_bytes(parsed.config, MAX_CONFIG_SIZE)
            platform = config_platform(config, parsed.config.digest)
        return ManifestNode(desc, platform, parsed, data)
