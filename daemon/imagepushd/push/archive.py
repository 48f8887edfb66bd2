"""Image archives read in place: ``docker save`` tars and OCI image-layout tars as blob stores.

Nothing is extracted. The tar is indexed once with :mod:`tarfile` (which seeks over member
data rather than reading it) into member name → (data offset, size), and every blob is then a
byte range of the archive file: :meth:`ArchiveStore.source` hands the uploader the archive's
path and the member's offset, so an archive push streams exactly like a content-store push
(same uploader, same resume, retry, auth and progress) with no temporary file and bounded
memory.

Two layouts are understood:

- **OCI image layout** (``index.json`` + ``blobs/<alg>/<hex>``; also what ``ctr images
  export``, ``imagepushd export`` and Docker ≥ 25's ``docker save`` write). Images are the
  descriptors of ``index.json``, named by their ``io.containerd.image.name`` and
  ``org.opencontainers.image.ref.name`` annotations; manifests are pushed byte for byte, so the
  pushed digest is the archive's.
- **docker save** (``manifest.json`` with ``Config``, ``RepoTags``, ``Layers``). The archive
  holds no manifest, so one is written in memory: a Docker schema 2 manifest over the config
  and the layers as they are in the archive, each layer's digest computed by streaming the
  member once and its media type sniffed from its first bytes. The bytes are those
  containerd's importer writes (``images/archive/importer.go``: Go's field order, compact), so
  the same archive always gives the same digest, and the same digest as ``ctr images import``
  followed by a push from containerd.

Compressed archives are refused with one line saying to decompress first: a compressed
stream has no byte ranges to upload from, and decompressing on the fly would mean either a
temporary copy (what this module exists to avoid) or one decompression pass per blob.
Symbolic and hard links between members (``docker save`` links shared layers) resolve to the
member they name; links leaving the archive or naming nothing, sparse members and special
files are errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

from imagepushd.blobs import BlobSource, verify_bytes
from imagepushd.errors import (
    ArchiveError,
    BlobCorruptError,
    InvalidReferenceError,
    ManifestError,
    MissingContentError,
    UsageError,
)
from imagepushd.oci import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    is_digest,
    load_object,
    sniff_media_type,
)
from imagepushd.reference import parse_reference
from imagepushd.watch.content import ImageGraph, walk

log = logging.getLogger(__name__)

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

READ_SIZE = 1 << 20
MAX_LINK_HOPS = 8
# index.json and manifest.json list every image of the archive: allow more than one manifest.
MAX_LISTING_SIZE = MAX_CONFIG_SIZE

# Leading bytes of compressed streams (what `file` and containerd's DetectCompression look at).
_COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\xfd7zXZ\x00", "xz", "unxz -k"),
)
# containerd's importer labels a layer compressed (…tar.gzip) when its first bytes are gzip's
# or zstd's magic, else uncompressed (…tar); the same rule keeps digests identical to its.
_LAYER_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"\x28\xb5\x2f\xfd")

Format = Literal["oci", "docker"]


@dataclass(frozen=True)
class Member:
    """The data of one regular archive member: bytes ``[offset, offset + size)`` of the file."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Entry:
    """One tar header, as indexed: a regular file, a link to resolve, or something unusable."""

    kind: Literal["file", "symlink", "hardlink", "sparse", "other"]
    offset: int = 0
    size: int = 0
    link: str = ""


@dataclass(frozen=True)
class ArchiveImage:
    """One image an archive holds and the names it goes by (possibly none).

    OCI layouts give the target descriptor directly; for ``docker save`` entries it is made
    by :meth:`ArchiveStore.target` from ``config`` and ``layers`` (member names).
    """

    names: tuple[str, ...]
    target: Descriptor | None = None
    config: str = ""
    layers: tuple[str, ...] = ()

    @property
    def key(self) -> object:
        """What identifies the image: the same key means the same image under other names."""
        return self.target.digest if self.target is not None else (self.config, self.layers)

    def describe(self) -> str:
        """The image's names for messages, or what identifies an unnamed one."""
        if self.names:
            return ", ".join(self.names)
        if self.target is not None:
            return f"<unnamed {self.target.digest}>"
        return f"<untagged {self.config}>"


def _clean(name: str) -> str:
    """A member name as the layout names files: no ``./`` or leading ``/``, no ``a/../``."""
    cleaned = posixpath.normpath(name.lstrip("/"))
    return "" if cleaned == "." else cleaned


def _index(path: Path) -> dict[str, _Entry]:
    """Every member of the tar at ``path`` by cleaned name (the last one wins, as in tar)."""
    try:
        with path.open("rb") as file:
            head = file.read(8)
            size = os.fstat(file.fileno()).st_size
            _refuse_compressed(path, head)
            file.seek(0)
            with tarfile.open(fileobj=file, mode="r:") as tar:
                entries = _entries(path, tar, size)
    except tarfile.TarError as exc:
        raise ArchiveError(f"{path}: not a tar archive ({exc})") from None
    except OSError as exc:
        raise ArchiveError(f"{path}: {exc.strerror or exc}") from exc
    return entries


def _refuse_compressed(path: Path, head: bytes) -> None:
    for magic, kind, command in _COMPRESSION_MAGIC:
        if head.startswith(magic):
            raise ArchiveError(
                f"{path} is {kind}-compressed: decompress it first ({command} {path}) "
                "and push the .tar; blobs are uploaded straight from the uncompressed "
                "archive, never extracted"
            )


def _entries(path: Path, tar: tarfile.TarFile, size: int) -> dict[str, _Entry]:
    """The members of ``tar`` (``path``, ``size`` bytes) but directories, by cleaned name."""
    entries: dict[str, _Entry] = {}
    for info in tar:
        name = _clean(info.name)
        if not name or info.isdir():
            continue
        entries[name] = _entry(path, name, info, size)
    return entries


def _entry(path: Path, name: str, info: tarfile.TarInfo, size: int) -> _Entry:
    """One tar header as indexed; a regular member must lie inside the file's ``size``."""
    if info.issparse():
        return _Entry("sparse", size=info.size)
    if info.isreg():
        if info.offset_data + info.size > size:
            raise ArchiveError(
                f"{path} is truncated: member {name} needs bytes up to "
                f"{info.offset_data + info.size}, the file has {size}"
            )
        return _Entry("file", info.offset_data, info.size)
    if info.issym():
        return _Entry("symlink", link=info.linkname)
    if info.islnk():
        return _Entry("hardlink", link=info.linkname)
    return _Entry("other")


def _pread_all(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from ``offset`` (short only if the file shrank)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ArchiveError(f"{path}: {exc.strerror or exc}") from exc
    try:
        pieces: list[bytes] = []
        done = 0
        while done < size:
            data = os.pread(fd, min(READ_SIZE << 2, size - done), offset + done)
            if not data:
                break
            pieces.append(data)
            done += len(data)
        return b"".join(pieces)
    except OSError as exc:
        raise ArchiveError(f"{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _load_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{where}: not valid JSON ({exc})") from None


def _docker_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """The Docker schema 2 manifest containerd's importer writes for a ``docker save`` entry.

    Field order and compact separators are Go's ``json.Marshal`` of containerd's struct; all
    values are ASCII (media types, digests, sizes), so the bytes are identical to containerd's.
    """
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": config.to_json(),  # plain descriptors: mediaType, digest, size, in that order
        "layers": [layer.to_json() for layer in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _strings(value: object) -> TypeGuard[list[str]]:
    """Whether ``value`` is a JSON list of strings."""
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _distinct(images: Iterable[ArchiveImage]) -> dict[object, ArchiveImage]:
    """``images`` by :attr:`ArchiveImage.key`: one entry per image, whatever its names."""
    return {image.key: image for image in images}


def _same_reference(a: str, b: str) -> bool:
    """Whether two names mean the same image once normalised (``alpine`` = ``docker.io/…``)."""
    try:
        return parse_reference(a) == parse_reference(b)
    except InvalidReferenceError:
        return False


def _matches_loosely(image: ArchiveImage, name: str) -> bool:
    """Whether ``name`` names ``image`` once normalised, or is its OCI target's digest."""
    return any(_same_reference(name, n) for n in image.names) or (
        image.target is not None and image.target.digest == name
    )


class ArchiveStore:
    """An uncompressed image archive as a :class:`~imagepushd.blobs.BlobStore`.

    Open with :meth:`open`; pick an image with :meth:`select`, get its target with
    :meth:`target` and its graph with :meth:`walk`; then push it with a
    :class:`~imagepushd.push.pusher.Pusher` like any image of the content store.
    """

    def __init__(
        self,
        path: Path,
        entries: Mapping[str, _Entry],
        kind: Format,
        images: Sequence[ArchiveImage],
    ) -> None:
        self.path = path
        self.format: Format = kind
        self.images = tuple(images)
        self._entries = dict(entries)
        # docker save: blobs found by digest once hashed; manifests made in memory.
        self._by_digest: dict[str, Member] = {}
        self._memory: dict[str, bytes] = {}
        self._layer_cache: dict[str, Descriptor] = {}
        self._targets: dict[object, Descriptor] = {}

    @classmethod
    def open(cls, path: Path) -> ArchiveStore:
        """Index the archive at ``path`` and list its images (nothing is extracted or hashed)."""
        entries = _index(path)
        store = cls(path, entries, "oci", ())
        if "index.json" in entries:
            store.images = store._oci_images()
        elif "manifest.json" in entries:
            store.format = "docker"
            store.images = store._docker_images()
        else:
            raise ArchiveError(
                f"{path}: neither index.json (OCI image layout) nor manifest.json "
                "(docker save) found: not an image archive"
            )
        if not store.images:
            raise ArchiveError(f"{path}: the archive lists no images")
        return store

    # ---- members -----------------------------------------------------------------------

    def member(self, name: str) -> Member:
        """The regular member called ``name``, following links inside the archive."""
        wanted = current = _clean(name)
        for _ in range(MAX_LINK_HOPS + 1):
            entry = self._entries.get(current)
            if entry is None:
                via = "" if current == wanted else f" (a link from {wanted})"
                raise MissingContentError(f"{self.path}: member {current}{via} not found", [])
            if entry.kind == "file":
                return Member(current, entry.offset, entry.size)
            current = self._link_target(current, entry)
        raise ArchiveError(f"{self.path}: member {wanted}: more than {MAX_LINK_HOPS} links deep")

    def _link_target(self, current: str, entry: _Entry) -> str:
        """The member the link ``current`` names; an error for what cannot lead to data."""
        if entry.kind == "sparse":
            raise ArchiveError(
                f"{self.path}: member {current} is a sparse file, whose bytes are not "
                "stored contiguously; re-create the archive without --sparse"
            )
        if entry.kind == "other":
            raise ArchiveError(f"{self.path}: member {current} is not a regular file")
        if entry.link.startswith("/"):
            raise ArchiveError(
                f"{self.path}: member {current} links to {entry.link}, outside the archive"
            )
        base = posixpath.dirname(current) if entry.kind == "symlink" else ""
        target = posixpath.normpath(posixpath.join(base, entry.link))
        if target == ".." or target.startswith("../"):
            raise ArchiveError(
                f"{self.path}: member {current} links to {entry.link}, outside the archive"
            )
        return target

    def _find(self, descriptor: Descriptor) -> Member | None:
        """The member holding ``descriptor``'s blob, or None if the archive has none."""
        member = self._by_digest.get(descriptor.digest)
        if member is not None or self.format == "docker":
            return member
        if not is_digest(descriptor.digest):
            raise ManifestError(f"invalid or unsupported digest {descriptor.digest!r}")
        algorithm, _, hex_ = descriptor.digest.partition(":")
        name = f"blobs/{algorithm}/{hex_}"
        if name not in self._entries:
            return None
        return self.member(name)

    def _read_member(self, member: Member, limit: int, what: str) -> bytes:
        if member.size > limit:
            raise ArchiveError(
                f"{self.path}: {what} {member.name} is {member.size} bytes, over the {limit} limit"
            )
        data = _pread_all(self.path, member.offset, member.size)
        if len(data) != member.size:
            raise ArchiveError(f"{self.path}: member {member.name} is truncated")
        return data

    # ---- BlobStore ---------------------------------------------------------------------

    def has(self, descriptor: Descriptor) -> bool:
        """Whether the archive holds the blob with the descriptor's size."""
        data = self._memory.get(descriptor.digest)
        if data is not None:
            return len(data) == descriptor.size
        member = self._find(descriptor)
        return member is not None and member.size == descriptor.size

    def read_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
        """The whole verified blob (a manifest, index or config), refusing more than ``limit``."""
        if descriptor.size > limit:
            raise ManifestError(
                f"blob {descriptor.digest} is {descriptor.size} bytes, over the {limit} limit"
            )
        data = self._memory.get(descriptor.digest)
        if data is None:
            data = _pread_all(self.path, *self._range(descriptor))
        return verify_bytes(data, descriptor)

    def source(self, descriptor: Descriptor) -> BlobSource:
        """The archive file at the member's data offset; the uploader verifies as it sends."""
        if descriptor.digest in self._memory:
            raise ArchiveError(
                f"{descriptor.digest} was made in memory from {self.path}; it is not a member"
            )
        offset, _size = self._range(descriptor)
        return BlobSource(self.path, descriptor, offset)

    def _range(self, descriptor: Descriptor) -> tuple[int, int]:
        member = self._find(descriptor)
        if member is None:
            raise MissingContentError(f"{self.path}: blob {descriptor.digest}", [descriptor.digest])
        if member.size != descriptor.size:
            raise BlobCorruptError(
                f"blob {descriptor.digest} is {member.size} bytes in {self.path} "
                f"({member.name}), its descriptor says {descriptor.size}"
            )
        return member.offset, member.size

    # ---- images ------------------------------------------------------------------------

    def select(self, name: str | None) -> ArchiveImage:
        """The image called ``name`` (exactly, or once normalised), or the only image if None.

        Names are ``RepoTags`` (docker save) or the ``io.containerd.image.name`` and
        ``org.opencontainers.image.ref.name`` annotations (OCI); the digest of an OCI
        image's target also selects it.
        """
        if name is None:
            return self._only()
        distinct = self._named(name)
        if len(distinct) == 1:
            return next(iter(distinct.values()))
        if not distinct:
            raise ArchiveError(f"{self.path} holds no image {name!r}; it has {self._listing()}")
        raise ArchiveError(
            f"{self.path}: {name!r} names {len(distinct)} different images: "
            + "; ".join(i.describe() for i in distinct.values())
        )

    def _only(self) -> ArchiveImage:
        """The archive's one image (under however many names), if it holds only one."""
        distinct = _distinct(self.images)
        if len(distinct) == 1:
            return next(iter(distinct.values()))
        raise UsageError(
            f"{self.path} holds {len(distinct)} images; name one before the target: "
            + self._listing()
        )

    def _named(self, name: str) -> dict[object, ArchiveImage]:
        """The images ``name`` names exactly; if none, those it names once normalised."""
        exact = [i for i in self.images if name in i.names]
        return _distinct(exact or [i for i in self.images if _matches_loosely(i, name)])

    def _listing(self) -> str:
        return "; ".join(dict.fromkeys(i.describe() for i in self.images))

    def target(self, image: ArchiveImage) -> Descriptor:
        """The descriptor to push for ``image``: from index.json, or made from manifest.json.

        For a ``docker save`` entry the config is read, every layer is hashed by streaming
        its member once, and the manifest is kept in memory (it is small).
        """
        cached = self._targets.get(image.key)
        if cached is not None:
            return cached
        if image.target is not None:
            target = self._typed(image.target)
            self._targets[image.key] = target
            return target
        config_member = self._docker_member(image, image.config)
        config_data = self._read_member(config_member, MAX_CONFIG_SIZE, "config")
        config = Descriptor(
            DOCKER_CONFIG, "sha256:" + hashlib.sha256(config_data).hexdigest(), len(config_data)
        )
        self._by_digest.setdefault(config.digest, config_member)
        layers = [self._layer(self._docker_member(image, name)) for name in image.layers]
        data = _docker_manifest(config, layers)
        target = Descriptor(
            DOCKER_MANIFEST, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
        )
        self._memory[target.digest] = data
        self._targets[image.key] = target
        log.info(
            "%s: %s is %s (manifest made from manifest.json)",
            self.path,
            image.describe(),
            target.digest,
        )
        return target

    def _typed(self, target: Descriptor) -> Descriptor:
        """``target`` with a manifest or index media type (index.json may leave it out)."""
        if target.media_type in MANIFEST_TYPES | INDEX_TYPES:
            return target
        data = self.read_bytes(target, MAX_MANIFEST_SIZE)
        media_type = sniff_media_type(load_object(data, f"manifest {target.digest}"), "")
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            raise ManifestError(
                f"{self.path}: index.json names {target.digest} of unsupported media type "
                f"{target.media_type or media_type or 'unknown'!r}"
            )
        return Descriptor(media_type, target.digest, target.size)

    def _docker_member(self, image: ArchiveImage, name: str) -> Member:
        try:
            return self.member(name)
        except MissingContentError:
            raise ArchiveError(
                f"{self.path}: manifest.json names {name} for {image.describe()}, but the "
                "archive holds no such member"
            ) from None

    def walk(self, target: Descriptor) -> ImageGraph:
        """The graph below ``target``, noting every blob the archive lacks."""
        return walk(self, target)

    def _layer(self, member: Member) -> Descriptor:
        """A layer member's descriptor: digest by streaming it once, media type by sniffing."""
        cached = self._layer_cache.get(member.name)
        if cached is not None:
            return cached
        hasher = hashlib.sha256()
        head = b""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ArchiveError(f"{self.path}: {exc.strerror or exc}") from exc
        try:
            done = 0
            while done < member.size:
                data = os.pread(fd, min(READ_SIZE, member.size - done), member.offset + done)
                if not data:
                    raise ArchiveError(f"{self.path}: member {member.name} is truncated")
                if done == 0:
                    head = data[:4]
                hasher.update(data)
                done += len(data)
        except OSError as exc:
            raise ArchiveError(f"{self.path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
        compressed = head.startswith(_LAYER_COMPRESSED_MAGIC)
        layer = Descriptor(
            DOCKER_LAYER_GZIP if compressed else DOCKER_LAYER,
            "sha256:" + hasher.hexdigest(),
            member.size,
        )
        self._layer_cache[member.name] = layer
        self._by_digest.setdefault(layer.digest, member)
        return layer

    def _oci_images(self) -> tuple[ArchiveImage, ...]:
        where = f"{self.path}: index.json"
        self._check_layout_version()
        index = _load_json(
            self._read_member(self.member("index.json"), MAX_LISTING_SIZE, "index"), where
        )
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ArchiveError(f"{where}: no manifests list")
        return tuple(_oci_image(obj, f"{where} manifests[{i}]") for i, obj in enumerate(manifests))

    def _check_layout_version(self) -> None:
        """Refuse an ``oci-layout`` file of another major version (the file is optional)."""
        layout = self._entries.get("oci-layout")
        if layout is None or layout.kind != "file":
            return
        doc = _load_json(
            self._read_member(self.member("oci-layout"), 4096, "oci-layout"),
            f"{self.path}: oci-layout",
        )
        version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise ArchiveError(f"{self.path}: unsupported OCI image layout version {version!r}")

    def _docker_images(self) -> tuple[ArchiveImage, ...]:
        where = f"{self.path}: manifest.json"
        doc = _load_json(
            self._read_member(self.member("manifest.json"), MAX_LISTING_SIZE, "manifest"),
            where,
        )
        if not isinstance(doc, list):
            raise ArchiveError(f"{where}: not a list of images")
        return tuple(_docker_image(entry, f"{where}[{i}]") for i, entry in enumerate(doc))


def _oci_image(obj: object, where: str) -> ArchiveImage:
    """The image an entry of index.json's ``manifests`` names, under its annotated names."""
    try:
        descriptor = Descriptor.from_json(obj, where)
    except ManifestError as exc:
        raise ArchiveError(str(exc)) from None
    if descriptor.size > MAX_MANIFEST_SIZE:
        raise ArchiveError(
            f"{where}: {descriptor.digest} is {descriptor.size} bytes, too large for a manifest"
        )
    notes = descriptor.annotations
    names = (notes.get(ANNOTATION_CONTAINERD_NAME), notes.get(ANNOTATION_REF_NAME))
    return ArchiveImage(
        tuple(dict.fromkeys(n for n in names if n)),
        Descriptor(descriptor.media_type, descriptor.digest, descriptor.size),
    )


def _docker_image(entry: object, where: str) -> ArchiveImage:
    """The image an entry of manifest.json lists (``RepoTags`` may be null: untagged)."""
    if not isinstance(entry, dict):
        raise ArchiveError(f"{where}: not an object")
    config, tags, layers = entry.get("Config"), entry.get("RepoTags"), entry.get("Layers")
    if not isinstance(config, str) or not config:
        raise ArchiveError(f"{where}: no Config")
    if not _strings(layers):
        raise ArchiveError(f"{where}: Layers is not a list of member names")
    if tags is None:
        tags = []
    if not _strings(tags):
        raise ArchiveError(f"{where}: RepoTags is not a list of names")
    return ArchiveImage(tuple(dict.fromkeys(tags)), None, config, tuple(layers))
