"""containerd's v1 metadata schema, read from meta.db through the lock-free bbolt reader.

Only the subtrees a pusher needs are walked: ``v1/<namespace>/images`` and, on request,
``v1/<namespace>/content/blob``. Values are decoded strictly; a value that does not decode is a
:class:`MetadataFormatError`, which the bbolt snapshot treats like any structural error (retried
while meta.db is moving, reported when it is not).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from imagepushd.containerd.bbolt import BoltFile, Bucket, Tx
from imagepushd.errors import MetadataFormatError, UnsupportedSchemaError
from imagepushd.oci import Descriptor, is_digest

log = logging.getLogger(__name__)

META_DB = Path("io.containerd.metadata.v1.bolt") / "meta.db"
NEWEST_KNOWN_DB_VERSION = 4
SOURCE_LABEL_PREFIX = "containerd.io/distribution.source."

_GO_UNIX_OFFSET = 62135596800  # seconds from 0001-01-01 to 1970-01-01
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_V1 = struct.Struct(">BqiH")


def decode_varint(data: bytes, what: str) -> int:
    """Decode a Go ``binary.PutVarint`` value (LEB128 then zigzag); the whole value must be used."""
    result = 0
    shift = 0
    for i, byte in enumerate(data):
        if i >= 10:
            break
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if i != len(data) - 1:
                break
            return (result >> 1) ^ -(result & 1)
        shift += 7
    raise MetadataFormatError(f"{what}: invalid varint {data[:12].hex()}")


def decode_time(data: bytes, what: str) -> datetime:
    """Decode Go's ``time.Time.MarshalBinary`` (versions 1 and 2) to an aware UTC datetime."""
    if not data or data[0] not in (1, 2) or len(data) != (15 if data[0] == 1 else 16):
        raise MetadataFormatError(f"{what}: invalid time encoding {data[:16].hex()}")
    _version, seconds, nanos, _zone = _TIME_V1.unpack_from(data, 0)
    if not 0 <= nanos < 1_000_000_000:
        raise MetadataFormatError(f"{what}: invalid nanoseconds {nanos}")
    try:
        return _EPOCH + timedelta(seconds=seconds - _GO_UNIX_OFFSET, microseconds=nanos // 1000)
    except OverflowError:
        raise MetadataFormatError(f"{what}: time out of range") from None


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _string_map(bucket: Bucket | bytes | None) -> dict[str, str]:
    if not isinstance(bucket, Bucket):
        return {}
    return {_text(k): _text(v) for k, v in bucket.items() if isinstance(v, bytes)}


@dataclass(frozen=True)
class ImageRecord:
    """One image name in one namespace and the manifest or index it points at."""

    namespace: str
    name: str
    target: Descriptor
    created_at: datetime | None = None
    updated_at: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class BlobRecord:
    """containerd's record of one blob in one namespace (the file itself is shared)."""

    digest: str
    size: int
    created_at: datetime | None = None
    updated_at: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)

    def sources(self) -> dict[str, list[str]]:
        """Repositories the blob was pulled from, per registry host (for cross-repo mounts)."""
        out: dict[str, list[str]] = {}
        for key, value in self.labels.items():
            if key.startswith(SOURCE_LABEL_PREFIX) and value:
                host = key[len(SOURCE_LABEL_PREFIX) :]
                out[host] = [repo for repo in value.split(",") if repo]
        return out


@dataclass(frozen=True)
class MetadataSnapshot:
    """A consistent view of containerd's images (and optionally blob records) at one txid."""

    txid: int
    db_version: int
    namespaces: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    blobs: Mapping[str, Mapping[str, BlobRecord]] = field(default_factory=dict)

    def image(self, namespace: str, name: str) -> ImageRecord | None:
        """The image called ``name`` in ``namespace``, if any."""
        for record in self.images:
            if record.namespace == namespace and record.name == name:
                return record
        return None


def _decode_target(bucket: Bucket | bytes | None, what: str) -> Descriptor:
    if not isinstance(bucket, Bucket):
        raise MetadataFormatError(f"{what}: no target bucket")
    fields = bucket.to_dict()
    digest, media_type, size = fields.get(b"digest"), fields.get(b"mediatype"), fields.get(b"size")
    if not isinstance(digest, bytes) or not is_digest(_text(digest)):
        raise MetadataFormatError(f"{what}: invalid target digest {digest!r:.80}")
    if not isinstance(media_type, bytes):
        raise MetadataFormatError(f"{what}: target has no media type")
    size_value = decode_varint(size, f"{what} target size") if isinstance(size, bytes) else -1
    if size_value < 0:
        raise MetadataFormatError(f"{what}: invalid target size")
    return Descriptor(_text(media_type), _text(digest), size_value)


def _optional_time(value: bytes | Bucket | None, what: str) -> datetime | None:
    return decode_time(value, what) if isinstance(value, bytes) and value else None


def _read_image(namespace: str, name: str, bucket: Bucket) -> ImageRecord:
    what = f"image {namespace}/{name}"
    fields = bucket.to_dict()
    return ImageRecord(
        namespace=namespace,
        name=name,
        target=_decode_target(fields.get(b"target"), what),
        created_at=_optional_time(fields.get(b"createdat"), f"{what} createdat"),
        updated_at=_optional_time(fields.get(b"updatedat"), f"{what} updatedat"),
        labels=_string_map(fields.get(b"labels")),
        annotations=_string_map(fields.get(b"annotations")),
    )


def _read_blob(namespace: str, digest: str, bucket: Bucket) -> BlobRecord:
    what = f"blob {namespace}/{digest}"
    fields = bucket.to_dict()
    size = fields.get(b"size")
    return BlobRecord(
        digest=digest,
        size=decode_varint(size, f"{what} size") if isinstance(size, bytes) else -1,
        created_at=_optional_time(fields.get(b"createdat"), f"{what} createdat"),
        updated_at=_optional_time(fields.get(b"updatedat"), f"{what} updatedat"),
        labels=_string_map(fields.get(b"labels")),
    )


def _read_snapshot(tx: Tx, wanted: Collection[str] | None, blobs: bool) -> MetadataSnapshot:
    v1 = tx.root.bucket(b"v1")
    if v1 is None:
        raise UnsupportedSchemaError(
            "meta.db has no v1 bucket: not containerd metadata, or a schema this tool predates"
        )
    version = 0
    namespaces: list[str] = []
    images: list[ImageRecord] = []
    blob_records: dict[str, dict[str, BlobRecord]] = {}
    for key, value in v1.items():
        if key == b"version" and isinstance(value, bytes):
            version = decode_varint(value, "v1/version")
            continue
        if not isinstance(value, Bucket):
            continue
        namespace = _text(key)
        namespaces.append(namespace)
        if wanted is not None and namespace not in wanted:
            continue
        images_bucket = value.bucket(b"images")
        if images_bucket is not None:
            for name, image in images_bucket.buckets():
                images.append(_read_image(namespace, _text(name), image))
        if blobs:
            content = value.bucket(b"content")
            blob_bucket = content.bucket(b"blob") if content is not None else None
            records: dict[str, BlobRecord] = {}
            if blob_bucket is not None:
                for digest, record in blob_bucket.buckets():
                    text = _text(digest)
                    records[text] = _read_blob(namespace, text, record)
            blob_records[namespace] = records
    return MetadataSnapshot(tx.txid, version, tuple(namespaces), tuple(images), blob_records)


class MetadataStore:
    """containerd's metadata database, read without locks."""

    def __init__(self, bolt: BoltFile) -> None:
        self._bolt = bolt
        self._warned_version = 0

    @classmethod
    def at_root(cls, root: Path) -> MetadataStore:
        """The metadata store of the containerd root ``root``."""
        return cls(BoltFile(root / META_DB))

    @property
    def path(self) -> Path:
        """The meta.db file."""
        return self._bolt.path

    def close(self) -> None:
        """Release the file descriptor."""
        self._bolt.close()

    def txid(self) -> int:
        """The newest committed transaction id: a cheap change detector."""
        return self._bolt.meta().txid

    def read(
        self, namespaces: Collection[str] | None = None, *, blobs: bool = False
    ) -> MetadataSnapshot:
        """A consistent snapshot of images (and blob records when ``blobs``) in ``namespaces``.

        ``namespaces`` None means all; names that do not exist are simply absent.
        """
        wanted = None if namespaces is None else frozenset(namespaces)
        snap = self._bolt.view(lambda tx: _read_snapshot(tx, wanted, blobs))
        if snap.db_version < 1:
            raise UnsupportedSchemaError(
                f"{self.path}: containerd metadata version {snap.db_version} is not supported"
            )
        if snap.db_version > NEWEST_KNOWN_DB_VERSION and snap.db_version != self._warned_version:
            self._warned_version = snap.db_version
            log.warning(
                "%s: containerd metadata version %d is newer than %d; reading it as version %d",
                self.path,
                snap.db_version,
                NEWEST_KNOWN_DB_VERSION,
                NEWEST_KNOWN_DB_VERSION,
            )
        return snap
