"""containerd's v1 metadata schema, read from meta.db through the lock-free bbolt reader.

Only the subtrees a pusher needs are walked: ``v1/<namespace>/images`` and, on request,
``v1/<namespace>/content/blob``. Values are decoded strictly; a record (one image, one blob)
holding a value that does not decode is left out of the snapshot and listed in its ``skipped``,
so one odd record never hides the others (:class:`MetadataStore` logs each once). A structural
error (a bad page, a bucket value of the wrong size) still fails the whole snapshot, which the
bbolt reader retries while meta.db is moving and reports when it is not.

Speed (10,000 images take one page each): an image or blob record is read straight from its
bucket's leaf page (one ``pread``, one leaf parse, no :class:`Bucket` per field), inline
sub-buckets (``target``, ``labels``, ``annotations``) are decoded once per distinct value per
snapshot (thousands of tags share a handful of targets), and labels are decoded to text on first
use. Every check of the general path still runs on every byte the result depends on: a memo or
cache is only consulted with the exact bytes that were checked before. With
``MetadataStore(reuse_records=True)`` a record also survives to the next snapshot while its page
holds the same bytes (for a daemon that snapshots after every commit).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar, cast

from imagepushd.errors import ContainerdError, MetadataFormatError, UnsupportedSchemaError
from imagepushd.oci import Descriptor, is_digest
from imagepushd.watch.bbolt import (
    FLAG_LEAF,
    LEAF_BUCKET,
    BoltFile,
    Bucket,
    Leaf,
    Tx,
    Where,
    where_text,
)

log = logging.getLogger(__name__)

R = TypeVar("R")


META_DB = Path("io.containerd.metadata.v1.bolt") / "meta.db"
NEWEST_KNOWN_DB_VERSION = 4
SOURCE_LABEL_PREFIX = "containerd.io/distribution.source."
#: An image label containerd 2.x's garbage collector reads (core/metadata/gc.go, v2.0.11:76 and
#: isExpiredImage at :771-785): once its RFC 3339 time has passed, the image is no longer a GC
#: root and is removed at the next collection (unless a lease holds it). containerd 1.x ignores
#: it on images. The 2.x schema is db version 4.
GC_EXPIRE_LABEL = "containerd.io/gc.expire"
GC_EXPIRE_DB_VERSION = 4
#: Go's ``time.Parse(time.RFC3339, ...)`` (fractional seconds allowed, as Go parses them).
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")

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
    try:
        return _time(data)
    except MetadataFormatError as exc:
        raise MetadataFormatError(f"{what}: {exc}") from None


def _time(data: bytes) -> datetime:
    """:func:`decode_time` without the value's name in errors (the caller adds it)."""
    size = len(data)
    if not ((size == 15 and data[0] == 1) or (size == 16 and data[0] == 2)):
        raise MetadataFormatError(f"invalid time encoding {data[:16].hex()}")
    _version, seconds, nanos, _zone = _TIME_V1.unpack_from(data, 0)
    if not 0 <= nanos < 1_000_000_000:
        raise MetadataFormatError(f"invalid nanoseconds {nanos}")
    try:
        return _EPOCH + timedelta(0, seconds - _GO_UNIX_OFFSET, nanos // 1000)
    except OverflowError:
        raise MetadataFormatError("time out of range") from None


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


class StringMap(Mapping[str, str]):
    """Read-only labels or annotations, decoded from their bucket's bytes on first access.

    The bucket's structure was checked when the record was read; decoding UTF-8 with
    replacement cannot fail, so nothing about it is deferred but the work. Equal to any mapping
    with the same items (a ``dict`` included); ``dict(m)`` gives a plain copy.
    """

    __slots__ = ("_decoded", "_keys", "_values")

    def __init__(self, keys: Sequence[bytes] = (), values: Sequence[bytes] = ()) -> None:
        self._keys: Sequence[bytes] | None = keys
        self._values: Sequence[bytes] = values
        self._decoded: dict[str, str] | None = None

    def _dict(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            keys = self._keys
            assert keys is not None
            decoded = {_text(k): _text(v) for k, v in zip(keys, self._values, strict=True)}
            self._decoded = decoded
            self._keys, self._values = None, ()
        return decoded

    def __getitem__(self, key: str) -> str:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __contains__(self, key: object) -> bool:
        return key in self._dict()

    def __repr__(self) -> str:
        return repr(self._dict())


_NO_STRINGS: Mapping[str, str] = StringMap()


def _string_map(bucket: Bucket | bytes | None) -> Mapping[str, str]:
    if not isinstance(bucket, Bucket):
        return _NO_STRINGS
    keys: list[bytes] = []
    values: list[bytes] = []
    for k, v in bucket.items():
        if isinstance(v, bytes):
            keys.append(k)
            values.append(v)
    return StringMap(keys, values)


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

    def expires_at(self, db_version: int) -> datetime | None:
        """When containerd (db ``db_version``) may collect this image; None: it never does.

        A label Go's RFC 3339 parser rejects is ignored, as containerd ignores it.
        """
        value = self.labels.get(GC_EXPIRE_LABEL)
        if db_version < GC_EXPIRE_DB_VERSION or value is None or not _RFC3339.fullmatch(value):
            return None
        try:
            return datetime.fromisoformat(value)
        except ValueError:  # a month 13 or a minute 61 matches the pattern, not the calendar
            return None


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out of a snapshot because a value in it does not decode."""

    kind: str  # "image" or "blob"
    namespace: str
    name: str
    reason: str


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

    def sources_on(self, registry: str) -> list[str]:
        """Repositories on ``registry`` (``host[:port]``) the blob was pulled from.

        containerd's ``distribution.source.<host>`` labels drop the port.
        """
        return self.sources().get(re.sub(r":\d+$", "", registry), [])


@dataclass(frozen=True)
class MetadataSnapshot:
    """A consistent view of containerd's images (and optionally blob records) at one txid.

    Equal snapshots hold the same records; what a read found changed is not compared.
    """

    txid: int
    db_version: int
    namespaces: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    blobs: Mapping[str, Mapping[str, BlobRecord]] = field(default_factory=dict)
    skipped: tuple[SkippedRecord, ...] = ()
    #: Namespaces whose image records may differ from the previous snapshot of the same store
    #: (``MetadataStore(reuse_buckets=True)``); None: no such snapshot, so any may.
    images_changed: frozenset[str] | None = field(default=None, compare=False)
    #: The same for blob records.
    blobs_changed: frozenset[str] | None = field(default=None, compare=False)
    #: Some records were carried over on a bucket's fingerprint across several commits: one
    #: rewritten on a reused page (a name deleted and created again) may be hidden until a
    #: ``read(full=True)``.
    unverified: bool = field(default=False, compare=False)

    def image(self, namespace: str, name: str) -> ImageRecord | None:
        """The image called ``name`` in ``namespace``, if any."""
        for record in self.images:
            if record.namespace == namespace and record.name == name:
                return record
        return None

    def moved(self, previous: MetadataSnapshot) -> set[tuple[str, str]]:
        """(namespace, name) of images added, retargeted or removed since ``previous``.

        ``previous`` is the store's snapshot before this one: only namespaces in
        :attr:`images_changed` are compared (all when it is None).
        """
        spaces = self.images_changed
        if spaces is not None and not spaces:
            return set()

        def digests(snap: MetadataSnapshot) -> dict[tuple[str, str], str]:
            return {
                (r.namespace, r.name): r.target.digest
                for r in snap.images
                if spaces is None or r.namespace in spaces
            }

        before, after = digests(previous), digests(self)
        return {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}


# ---------------------------------------------------------------------- general path
# Through Bucket objects: used for anything the page-level path below does not take (an image
# bucket spanning several pages, a page-backed target or labels bucket).


def _decode_target(bucket: Bucket | bytes | None, what: str) -> Descriptor:
    if not isinstance(bucket, Bucket):
        raise MetadataFormatError(f"{what}: no target bucket")
    fields = bucket.to_dict()
    digest, media_type, size = fields.get(b"digest"), fields.get(b"mediatype"), fields.get(b"size")
    return _descriptor(
        digest if isinstance(digest, bytes) else None,
        media_type if isinstance(media_type, bytes) else None,
        size if isinstance(size, bytes) else None,
        what,
    )


def _descriptor(
    digest: bytes | None, media_type: bytes | None, size: bytes | None, what: str
) -> Descriptor:
    if digest is None or not is_digest(_text(digest)):
        raise MetadataFormatError(f"{what}: invalid target digest {digest!r:.80}")
    if media_type is None:
        raise MetadataFormatError(f"{what}: target has no media type")
    size_value = decode_varint(size, f"{what} target size") if size is not None else -1
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


# ---------------------------------------------------------------------- page-level path


class _Cached:
    """A record and the page bytes it was decoded from (up to the leaf's last element)."""

    __slots__ = ("key", "namespace", "page", "record")

    def __init__(self, page: bytes, namespace: str, key: bytes, record: object) -> None:
        self.page = page
        self.namespace = namespace
        self.key = key
        self.record = record


class _BucketCache:
    """One namespace's ``images`` or ``content/blob`` bucket as of transaction ``txid``.

    ``records`` is what it decoded to (a tuple of images, or blobs by digest, with the records
    skipped), ``pages`` its records by the page id of their bucket, ``ref`` and
    ``fingerprint`` the bucket's (:attr:`Bucket.ref`, :meth:`Bucket.fingerprint`; empty when
    not taken or when there is no bucket).
    ``verified``: the records are known to be the bucket's at ``txid`` (read then, or carried
    over only from one transaction to the next since they were).
    """

    __slots__ = ("fingerprint", "pages", "records", "ref", "txid", "verified")

    def __init__(  # noqa: PLR0917 (one record)
        self,
        ref: bytes,
        fingerprint: bytes,
        records: object,
        pages: dict[int, _Cached],
        txid: int,
        verified: bool,
    ) -> None:
        self.ref = ref
        self.fingerprint = fingerprint
        self.records = records
        self.pages = pages
        self.txid = txid
        self.verified = verified


class _RecordCache:
    """Records of the last snapshot, per (namespace, bucket) (see ``reuse_records``).

    Holds only the records of the newest snapshot, each with its page's used bytes (a few
    hundred bytes per image): bounded by the number of records, not by the file.
    """

    def __init__(self) -> None:
        self.order = ""
        self.buckets: dict[tuple[str, bytes], _BucketCache] = {}

    @property
    def pages(self) -> dict[int, _Cached]:
        """Every cached record by the page id of its bucket."""
        return {pgid: c for b in self.buckets.values() for pgid, c in b.pages.items()}


def _key_where(where: Where, key: bytes) -> Callable[[], str]:
    return lambda: f"{where_text(where)} key {key!r}"


_new = object.__new__


def _new_image(  # noqa: PLR0917 (the dataclass's own signature)
    namespace: str,
    name: str,
    target: Descriptor,
    created_at: datetime | None,
    updated_at: datetime | None,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
) -> ImageRecord:
    """``ImageRecord(...)``, without the frozen dataclass ``__init__``.

    That ``__init__`` calls ``object.__setattr__`` once per field: a third of the cost of
    decoding an image. tests/test_metadata.py checks that both build the same record.
    """
    record = _new(ImageRecord)
    record.__dict__.update(
        namespace=namespace,
        name=name,
        target=target,
        created_at=created_at,
        updated_at=updated_at,
        labels=labels,
        annotations=annotations,
    )
    return record


class _Plan:
    """Which element of a record bucket's leaf holds which field (-1: none).

    Derived from the keys and element flags alone. ``others`` are the sub-buckets the record
    does not read; they are still opened (checked), as ``to_dict`` does on the general path.
    A ``target`` that is a plain value is no target (an error for an image).
    """

    __slots__ = ("annotations", "created", "labels", "others", "size", "target", "updated")

    def __init__(self, leaf: Leaf, *, image: bool) -> None:
        self.target = self.labels = self.annotations = -1
        self.created = self.updated = self.size = -1
        self.others: list[int] = []
        for i, (key, flags) in enumerate(zip(leaf.keys, leaf.flags, strict=True)):
            if flags & LEAF_BUCKET:
                self._sub_bucket(i, key, image=image)
            else:
                self._value(i, key, image=image)

    def _value(self, i: int, key: bytes, *, image: bool) -> None:
        if key == b"createdat":
            self.created = i
        elif key == b"updatedat":
            self.updated = i
        elif key == b"size" and not image:
            self.size = i

    def _sub_bucket(self, i: int, key: bytes, *, image: bool) -> None:
        if key == b"target" and image:
            self.target = i
        elif key == b"labels":
            self.labels = i
        elif key == b"annotations" and image:
            self.annotations = i
        else:
            self.others.append(i)


def _blob_bucket(namespace: Bucket) -> Bucket | None:
    """A namespace's ``content/blob`` bucket, if it has one."""
    content = namespace.bucket(b"content")
    return content.bucket(b"blob") if content is not None else None


def _image_times(
    values: list[bytes], plan: _Plan, namespace: str, name: str
) -> tuple[datetime | None, datetime | None]:
    """An image leaf's ``createdat`` and ``updatedat`` (often equal: decoded once then)."""
    created = values[plan.created] if plan.created >= 0 else None
    updated = values[plan.updated] if plan.updated >= 0 else None
    try:
        created_at = _time(created) if created else None
    except MetadataFormatError as exc:
        raise MetadataFormatError(f"image {namespace}/{name} createdat: {exc}") from None
    try:
        updated_at = created_at if updated == created else (_time(updated) if updated else None)
    except MetadataFormatError as exc:
        raise MetadataFormatError(f"image {namespace}/{name} updatedat: {exc}") from None
    return created_at, updated_at


class _Kind:
    """How to read one kind of record: from its leaf page, or through the general path."""

    __slots__ = ("decode", "general", "type")

    def __init__(
        self,
        record_type: type,
        decode: Callable[[str, bytes, Leaf, Where], tuple[object, bool]],
        general: Callable[[str, str, Bucket], object],
    ) -> None:
        self.type = record_type
        self.decode = decode
        self.general = general


def _cached_record(
    cached: _Cached | None, kind: _Kind, namespace: str, key: bytes
) -> _Cached | None:
    """``cached`` if it is a record of ``kind`` at ``key`` in ``namespace``, else None."""
    if cached is None or cached.key != key or cached.namespace != namespace:
        return None
    return cached if type(cached.record) is kind.type else None


def _carry(cached: _Cached, pgid: int, new: dict[int, _Cached] | None) -> object:
    """The record of ``cached``, kept at ``pgid`` in ``new`` when records are kept."""
    if new is not None:
        new[pgid] = cached
    return cached.record


class _Reader:
    """One snapshot attempt: the page-level record path, its memos and the record cache.

    Inline sub-buckets (``target``, ``labels``, ``annotations``) are memoised by their value
    bytes: parsing, checking and decoding an inline bucket depends on nothing else (the byte
    order is fixed within a transaction), and thousands of tags share a handful of values.
    """

    def __init__(
        self,
        tx: Tx,
        cache: _RecordCache | None,
        *,
        fingerprints: bool = False,
        reuse_buckets: bool = False,
    ) -> None:
        self.tx = tx
        self.page_size = tx.meta.page_size
        self.targets: dict[bytes, Descriptor] = {}
        self.maps: dict[bytes, Mapping[str, str]] = {}
        self.image_plans: dict[object, _Plan] = {}
        self.blob_plans: dict[object, _Plan] = {}
        self.fingerprints = fingerprints and cache is not None
        self.reuse_buckets = reuse_buckets and self.fingerprints
        self.old: dict[tuple[str, bytes], _BucketCache] = {}
        self.new: dict[tuple[str, bytes], _BucketCache] | None = None
        self.changed: dict[bytes, set[str]] = {b"images": set(), b"blob": set()}
        self.unverified = False
        self.decoded = 0  # image records decoded (not reused)
        self.trust_pages = False  # while reading a changed bucket: see _read_bucket
        if cache is not None:
            self.new = {}
            if cache.order == tx.byte_order:
                self.old = cache.buckets
        self.image_kind = _Kind(ImageRecord, self._image, _read_image)
        self.blob_kind = _Kind(BlobRecord, self._blob, _read_blob)

    def snapshot(self, wanted: Collection[str] | None, blobs: bool) -> MetadataSnapshot:
        tx = self.tx
        v1 = tx.root.bucket(b"v1")
        if v1 is None:
            raise UnsupportedSchemaError(
                "meta.db has no v1 bucket: not containerd metadata, or a schema this tool predates"
            )
        version = 0
        namespaces: list[str] = []
        images: list[ImageRecord] = []
        blob_records: dict[str, Mapping[str, BlobRecord]] = {}
        skipped: list[SkippedRecord] = []
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
            found, lost = self._bucket(namespace, b"images", value.bucket(b"images"), self._images)
            images += found
            skipped += lost
            if blobs:
                records, lost = self._bucket(namespace, b"blob", _blob_bucket(value), self._blobs)
                blob_records[namespace] = records
                skipped += lost
        self._mark_dropped()
        return MetadataSnapshot(
            tx.txid,
            version,
            tuple(namespaces),
            tuple(images),
            blob_records,
            tuple(skipped),
            self._changed(b"images"),
            self._changed(b"blob") if blobs else None,
            self.unverified,
        )

    def _mark_dropped(self) -> None:
        """Count as changed the buckets read last time and not this time."""
        if self.new is not None:
            for space, kind in self.old.keys() - self.new.keys():
                self.changed[kind].add(space)  # a namespace gone, or no longer read

    def _changed(self, kind: bytes) -> frozenset[str] | None:
        """The namespaces whose ``kind`` bucket changed (None: not known, without reuse)."""
        return frozenset(self.changed[kind]) if self.reuse_buckets else None

    def _bucket(
        self,
        namespace: str,
        kind: bytes,
        bucket: Bucket | None,
        read: Callable[[str, Bucket | None, dict[int, _Cached], dict[int, _Cached] | None], R],
    ) -> R:
        """The records of one namespace's ``images`` or ``content/blob`` bucket.

        With ``reuse_buckets``, a bucket that did not change since it was last read is not read
        again: its records (and cached pages) carry over. That is an equal :attr:`Bucket.ref`
        when no other commit came between (or when the ref holds the whole bucket), otherwise
        an equal :meth:`Bucket.fingerprint`, which leaves the records unverified.
        """
        old = self.old.get((namespace, kind))
        ref = bucket.ref if bucket is not None else b""
        # No bucket, or an inline one, is all in its ref: equal refs mean equal records.
        paged = None if bucket is None or bucket.inline else bucket
        fingerprint, verified = self._reuse(old, ref, paged)
        pages: dict[int, _Cached] | None
        if old is not None and verified is not None:
            records, pages = cast(R, old.records), old.pages
        else:
            self.changed[kind].add(namespace)
            records, pages, verified = self._read_bucket(namespace, bucket, old, read)
        self.unverified = self.unverified or not verified
        if self.new is not None and pages is not None:
            self.new[namespace, kind] = _BucketCache(
                ref, fingerprint, records, pages, self.tx.txid, verified
            )
        return records

    def _reuse(
        self, old: _BucketCache | None, ref: bytes, paged: Bucket | None
    ) -> tuple[bytes, bool | None]:
        """The bucket's fingerprint (empty: not taken) and whether ``old`` carries over whole.

        That is None when it does not (the bucket is read), else whether its records are
        verified. ``paged`` is the bucket when it has pages of its own.
        """
        if self.reuse_buckets and old is not None:
            if old.ref == ref and (paged is None or self._next_commit(old)):
                return old.fingerprint, old.verified
            if paged is not None:
                fingerprint = paged.fingerprint()
                return fingerprint, (False if fingerprint == old.fingerprint else None)
        return (paged.fingerprint() if self.fingerprints and paged is not None else b""), None

    def _read_bucket(
        self,
        namespace: str,
        bucket: Bucket | None,
        old: _BucketCache | None,
        read: Callable[[str, Bucket | None, dict[int, _Cached], dict[int, _Cached] | None], R],
    ) -> tuple[R, dict[int, _Cached] | None, bool]:
        """A changed bucket's records, their pages (when kept) and whether they are verified."""
        pages: dict[int, _Cached] | None = {} if self.new is not None else None
        # Records still at their root page are taken as they were, without reading the
        # page: certain from one commit to the next, unverified across several.
        self.trust_pages = self.reuse_buckets and old is not None
        records = read(namespace, bucket, old.pages if old is not None else {}, pages)
        verified = True
        if self.trust_pages and old is not None:
            verified = old.verified and self._next_commit(old)
        self.trust_pages = False
        return records, pages, verified

    def _next_commit(self, old: _BucketCache) -> bool:
        """Whether ``old`` was read in this transaction or the one just before it."""
        return 0 <= self.tx.txid - old.txid <= 1

    def _images(
        self,
        namespace: str,
        images_bucket: Bucket | None,
        old: dict[int, _Cached],
        new: dict[int, _Cached] | None,
    ) -> tuple[tuple[ImageRecord, ...], tuple[SkippedRecord, ...]]:
        images: list[ImageRecord] = []
        skipped: list[SkippedRecord] = []
        if images_bucket is not None:
            record, kind = self._record, self.image_kind
            for name, flags, raw in images_bucket.raw_items():
                if flags & LEAF_BUCKET:
                    try:
                        images.append(
                            cast(ImageRecord, record(kind, namespace, name, raw, old, new))
                        )
                    except MetadataFormatError as exc:
                        skipped.append(SkippedRecord("image", namespace, _text(name), str(exc)))
        return tuple(images), tuple(skipped)

    def _blobs(
        self,
        namespace: str,
        blob_bucket: Bucket | None,
        old: dict[int, _Cached],
        new: dict[int, _Cached] | None,
    ) -> tuple[dict[str, BlobRecord], tuple[SkippedRecord, ...]]:
        records: dict[str, BlobRecord] = {}
        skipped: list[SkippedRecord] = []
        if blob_bucket is not None:
            record, kind = self._record, self.blob_kind
            for digest, flags, raw in blob_bucket.raw_items():
                if flags & LEAF_BUCKET:
                    try:
                        records[_text(digest)] = cast(
                            BlobRecord, record(kind, namespace, digest, raw, old, new)
                        )
                    except MetadataFormatError as exc:
                        skipped.append(SkippedRecord("blob", namespace, _text(digest), str(exc)))
        return records, tuple(skipped)

    def _record(  # noqa: PLR0917 (the record cache goes with its bucket)
        self,
        kind: _Kind,
        namespace: str,
        key: bytes,
        value: bytes,
        old: dict[int, _Cached],
        new: dict[int, _Cached] | None,
    ) -> object:
        """The record in the sub-bucket ``value`` at ``key``, from its leaf page if it has one.

        What the general path checks is checked here too: the bucket value, the page (bounds,
        header id, overflow, flags, every element), every sub-bucket of the record and every
        value the record holds. ``old`` holds the records last read from this bucket by page
        id; ``new`` (when records are kept) collects this read's.
        """
        tx = self.tx
        where = lambda: f"namespace {namespace!r} key {key!r}"  # noqa: E731
        found = tx.bucket_value(value, where)
        if isinstance(found, Leaf):  # an inline record bucket (no sub-buckets, small)
            self.decoded += kind is self.image_kind
            return kind.decode(namespace, key, found, where)[0]
        pgid = found
        hit = _cached_record(old.get(pgid), kind, namespace, key)
        if hit is not None and self.trust_pages:
            # bbolt never writes a page in use: the record bucket still at the same root page
            # is the same record (certain from one commit to the next, see _read_bucket).
            return _carry(hit, pgid, new)
        buf, page_flags, count = tx.read_page(pgid)
        if hit is not None and buf.startswith(hit.page):
            # These bytes decoded to this record in the last snapshot, every check passed then;
            # the bucket value and the page header were checked again above.
            return _carry(hit, pgid, new)
        self.decoded += kind is self.image_kind
        if page_flags != FLAG_LEAF:  # a bucket spanning pages, or a bad flag: general path
            return kind.general(namespace, _text(key), Bucket(tx, pgid, None))
        leaf = tx.parse_leaf(buf, 0, count, pgid)
        record, self_contained = kind.decode(namespace, key, leaf, pgid)
        if new is not None and self_contained and len(buf) == self.page_size:
            new[pgid] = _Cached(buf[: leaf.end], namespace, key, record)
        return record

    def _image(
        self, namespace: str, key: bytes, leaf: Leaf, where: Where
    ) -> tuple[ImageRecord, bool]:
        """An image bucket's record (as :func:`_read_image`) and whether it is all in ``leaf``.

        Every sub-bucket is opened (checked) before any value is decoded, as ``to_dict`` does
        on the general path.
        """
        tx = self.tx
        plan = self._plan(leaf, image=True)
        values = leaf.values
        for i in plan.others:
            tx.bucket_value(values[i], _key_where(where, leaf.keys[i]))
        target, new_target = self._open_target(leaf, plan.target, where)
        labels, new_labels = self._open_map(leaf, plan.labels, where)
        annotations, new_annotations = self._open_map(leaf, plan.annotations, where)
        name = _text(key)
        if plan.target < 0:
            raise MetadataFormatError(f"image {namespace}/{name}: no target bucket")
        self_contained = True
        if new_target is not None:
            target, self_contained = self._decoded_target(*new_target, f"image {namespace}/{name}")
        assert target is not None
        created_at, updated_at = _image_times(values, plan, namespace, name)
        labels, labels_inline = self._decoded_map(labels, new_labels)
        annotations, annotations_inline = self._decoded_map(annotations, new_annotations)
        record = _new_image(namespace, name, target, created_at, updated_at, labels, annotations)
        return record, self_contained and labels_inline and annotations_inline

    def _blob(
        self, namespace: str, key: bytes, leaf: Leaf, where: Where
    ) -> tuple[BlobRecord, bool]:
        """A blob bucket's record (as :func:`_read_blob`) and whether it is all in ``leaf``."""
        tx = self.tx
        plan = self._plan(leaf, image=False)
        values = leaf.values
        for i in plan.others:
            tx.bucket_value(values[i], _key_where(where, leaf.keys[i]))
        labels, new_labels = self._open_map(leaf, plan.labels, where)
        digest = _text(key)
        what = f"blob {namespace}/{digest}"
        size = decode_varint(values[plan.size], f"{what} size") if plan.size >= 0 else -1
        created = values[plan.created] if plan.created >= 0 else None
        updated = values[plan.updated] if plan.updated >= 0 else None
        created_at = _optional_time(created, f"{what} createdat")
        updated_at = (
            created_at if updated == created else _optional_time(updated, f"{what} updatedat")
        )
        labels, self_contained = self._decoded_map(labels, new_labels)
        return BlobRecord(digest, size, created_at, updated_at, labels), self_contained

    def _plan(self, leaf: Leaf, *, image: bool) -> _Plan:
        """Where the fields are in ``leaf``, cached per leaf shape (same keys and flags)."""
        plans = self.image_plans if image else self.blob_plans
        shape = leaf.shape
        plan = plans.get(shape) if shape is not None else None
        if plan is None:
            plan = _Plan(leaf, image=image)
            if shape is not None:
                plans[shape] = plan
        return plan

    def _open_target(
        self, leaf: Leaf, index: int, where: Where
    ) -> tuple[Descriptor | None, tuple[bytes, int | Leaf] | None]:
        """A memoised target at ``leaf.values[index]``, or its opened (checked) bucket to decode."""
        if index < 0:
            return None, None
        value = leaf.values[index]
        target = self.targets.get(value)
        if target is not None:
            return target, None
        return None, (value, self.tx.bucket_value(value, _key_where(where, b"target")))

    def _decoded_target(
        self, value: bytes, found: int | Leaf, what: str
    ) -> tuple[Descriptor, bool]:
        """The target in an opened bucket (see :meth:`_open_target`), and whether it was inline."""
        if isinstance(found, Leaf):
            target = self.targets[value] = self._target(found, what)
            return target, True
        return _decode_target(Bucket(self.tx, found, None), what), False

    def _open_map(
        self, leaf: Leaf, index: int, where: Where
    ) -> tuple[Mapping[str, str], tuple[bytes, int | Leaf] | None]:
        """A memoised map at ``leaf.values[index]``, or its opened (checked) bucket to decode."""
        if index < 0:
            return _NO_STRINGS, None
        value = leaf.values[index]
        mapping = self.maps.get(value)
        if mapping is not None:
            return mapping, None
        return _NO_STRINGS, (
            value,
            self.tx.bucket_value(value, _key_where(where, leaf.keys[index])),
        )

    def _target(self, leaf: Leaf, what: str) -> Descriptor:
        """The descriptor in an inline ``target`` bucket (as :func:`_decode_target`)."""
        digest = media_type = size = None
        for key, flags, value in zip(leaf.keys, leaf.flags, leaf.values, strict=True):
            if flags & LEAF_BUCKET:
                self.tx.bucket_value(value, _key_where(lambda: f"{what} target", key))
            elif key == b"digest":
                digest = value
            elif key == b"mediatype":
                media_type = value
            elif key == b"size":
                size = value
        return _descriptor(digest, media_type, size, what)

    def _map(self, value: bytes, found: int | Leaf) -> tuple[Mapping[str, str], bool]:
        """Labels or annotations (as :func:`_string_map`), and whether they were inline."""
        tx = self.tx
        if not isinstance(found, Leaf):
            return _string_map(Bucket(tx, found, None)), False
        if any(flags & LEAF_BUCKET for flags in found.flags):
            mapping = _string_map(Bucket(tx, 0, found))  # opens (checks) the nested buckets
        else:
            mapping = StringMap(found.keys, found.values)
        self.maps[value] = mapping
        return mapping, True

    def _decoded_map(
        self, mapping: Mapping[str, str], opened: tuple[bytes, int | Leaf] | None
    ) -> tuple[Mapping[str, str], bool]:
        """What :meth:`_open_map` gave, its bucket decoded if opened; and whether it was inline."""
        return (mapping, True) if opened is None else self._map(*opened)


class MetadataStore:
    """containerd's metadata database, read without locks.

    ``reuse_records`` keeps the records of the last snapshot with the page bytes they came
    from; the next snapshot reuses a record whose page still holds the same bytes (at the same
    page id, for the same name) instead of decoding it again. Pages are still read and their
    headers checked every time; the cache holds only the newest snapshot's records.

    ``reuse_buckets`` (implies ``reuse_records``) goes further for a daemon reading after
    every commit of a busy containerd, where most commits touch leases, containers or snapshots:
    a namespace's ``images`` or ``content/blob`` bucket whose fingerprint
    (:meth:`Bucket.fingerprint`: its own pages, a few hundred for 10,000 images, not the
    records' pages) is the one last read is not read further, its records carry over, and the
    snapshot says which namespaces were read again (``images_changed``, ``blobs_changed``).
    Records carried over across several commits may hide a record rewritten on a reused page
    (``unverified``); ``read(full=True)`` reads every bucket, which settles that.
    """

    def __init__(
        self, bolt: BoltFile, *, reuse_records: bool = False, reuse_buckets: bool = False
    ) -> None:
        self._bolt = bolt
        self._warned_version = 0
        self._warned_skips: frozenset[SkippedRecord] = frozenset()
        self._cache = _RecordCache() if reuse_records or reuse_buckets else None
        self._reuse_buckets = reuse_buckets
        #: Image records decoded by this store's snapshots so far (not carried over or reused).
        self.images_decoded = 0
        #: The newest snapshot read (None before the first): the daemon's workers take theirs
        #: from here (one attribute read, atomic) while its loop reads the next.
        self.latest: MetadataSnapshot | None = None

    @classmethod
    def at_root(
        cls, root: Path, *, reuse_records: bool = False, reuse_buckets: bool = False
    ) -> MetadataStore:
        """The metadata store of the containerd root ``root``."""
        return cls(
            BoltFile(root / META_DB), reuse_records=reuse_records, reuse_buckets=reuse_buckets
        )

    @property
    def path(self) -> Path:
        """The meta.db file."""
        return self._bolt.path

    def close(self) -> None:
        """Release the file descriptor."""
        self._bolt.close()

    def read(
        self,
        namespaces: Collection[str] | None = None,
        *,
        blobs: bool = False,
        full: bool = False,
    ) -> MetadataSnapshot:
        """A consistent snapshot of images (and blob records when ``blobs``) in ``namespaces``.

        ``namespaces`` None means all; names that do not exist are simply absent. ``full``
        reads every bucket even when its fingerprint says it did not change (the snapshot then
        reports every namespace as changed).
        """
        wanted = None if namespaces is None else frozenset(namespaces)
        cache = self._cache
        buckets = self._reuse_buckets

        def attempt(tx: Tx) -> tuple[MetadataSnapshot, _Reader]:
            reader = _Reader(tx, cache, fingerprints=buckets, reuse_buckets=buckets and not full)
            return reader.snapshot(wanted, blobs), reader

        snap, reader = self._bolt.view(attempt)
        if cache is not None and reader.new is not None:
            cache.order = reader.tx.byte_order
            cache.buckets = reader.new
        self.images_decoded += reader.decoded
        if snap.db_version < 1:
            raise UnsupportedSchemaError(
                f"{self.path}: containerd metadata version {snap.db_version} is not supported"
            )
        self._warn_skipped(snap.skipped)
        if snap.db_version > NEWEST_KNOWN_DB_VERSION and snap.db_version != self._warned_version:
            self._warned_version = snap.db_version
            log.warning(
                "%s: containerd metadata version %d is newer than %d; reading it as version %d",
                self.path,
                snap.db_version,
                NEWEST_KNOWN_DB_VERSION,
                NEWEST_KNOWN_DB_VERSION,
            )
        self.latest = snap
        return snap

    def _warn_skipped(self, skipped: Sequence[SkippedRecord]) -> None:
        """One warning per skipped record while it stays as it is (not one per snapshot)."""
        for record in skipped:
            if record not in self._warned_skips:
                log.warning(
                    "%s: skipping a record this reader cannot decode (every other one is read): %s",
                    self.path,
                    record.reason,
                )
        self._warned_skips = frozenset(skipped)


class TxidProbe:
    """meta.db's newest txid under ``root``, on a file descriptor of its own.

    The watcher polls it from its own thread, apart from the reads of :class:`MetadataStore`.
    """

    def __init__(self, root: Path) -> None:
        self._bolt = BoltFile(root / META_DB)

    def __call__(self) -> int | None:
        """The newest txid, or None while meta.db is missing or unreadable."""
        try:
            return self._bolt.meta().txid
        except ContainerdError:
            return None

    def close(self) -> None:
        """Close its file descriptor."""
        self._bolt.close()
