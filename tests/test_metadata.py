"""Decoding of containerd's value encodings (varints, Go binary times, labels), and the
page-level record path: the same records and errors as the general path, and ``reuse_records``.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagepushd.errors import BoltFormatError, MetadataFormatError, UnsupportedSchemaError
from imagepushd.oci import Descriptor
from imagepushd.watch import metadata
from imagepushd.watch.bbolt import BoltFile, Bucket, Leaf, Tx
from imagepushd.watch.metadata import (
    BlobRecord,
    ImageRecord,
    MetadataSnapshot,
    MetadataStore,
    SkippedRecord,
    StringMap,
    decode_time,
    decode_varint,
)
from tests.metadb import (
    BIG_LABELS,
    INDEX,
    NAMESPACE,
    PAGE_SIZE,
    SINGLE,
    TAG_COUNT,
    Corpus,
    corpus_once,
    forge_meta,
    newest_meta,
    reachable_pages,
)


def go_varint(value: int) -> bytes:
    """Go's binary.PutVarint, written independently of the decoder under test."""
    u = (value << 1) ^ (value >> 63)
    u &= (1 << 64) - 1
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


@pytest.mark.parametrize("value", [0, 1, -1, 63, -64, 64, 300, 4, 2**31, 2**62, -(2**63)])
def test_varint_round_trip(value: int):
    assert decode_varint(go_varint(value), "x") == value


def test_varint_known_encodings():
    # containerd writes db version 3 as 0x06 and size 1234 as 0xa4 0x13.
    assert decode_varint(b"\x06", "v") == 3
    assert decode_varint(b"\xa4\x13", "size") == 1234


@pytest.mark.parametrize("data", [b"", b"\x80", b"\x06\x00", b"\xff" * 11])
def test_varint_rejects_malformed(data: bytes):
    with pytest.raises(MetadataFormatError):
        decode_varint(data, "size")


def go_time(seconds_since_epoch: int, nanos: int, version: int = 1) -> bytes:
    raw = struct.pack(">BqiH", version, seconds_since_epoch + 62135596800, nanos, 0xFFFF)
    return raw + (b"\x00" if version == 2 else b"")


def test_time_versions_1_and_2():
    expected = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    seconds = int(expected.replace(microsecond=0).timestamp())
    assert decode_time(go_time(seconds, 123456789), "t") == expected
    assert decode_time(go_time(seconds, 123456789, version=2), "t") == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"\x03" + b"\0" * 14, go_time(0, 0)[:-1], go_time(0, 2_000_000_000), go_time(0, -1)],
)
def test_time_rejects_malformed(data: bytes):
    with pytest.raises(MetadataFormatError) as exc:
        decode_time(data, "createdat")
    assert isinstance(exc.value, BoltFormatError)


def test_blob_sources_from_distribution_labels():
    record = BlobRecord(
        "sha256:" + "a" * 64,
        1,
        labels={
            "containerd.io/distribution.source.docker.io": "library/alpine,library/busybox",
            "containerd.io/distribution.source.ghcr.io": "org/app",
            "containerd.io/gc.ref.content.l.0": "sha256:" + "b" * 64,
        },
    )
    assert record.sources() == {
        "docker.io": ["library/alpine", "library/busybox"],
        "ghcr.io": ["org/app"],
    }
    # The labels name hosts without ports; a registry's port is dropped to match.
    assert record.sources_on("ghcr.io:443") == ["org/app"]
    assert record.sources_on("quay.io") == []


# ---------------------------------------------------------------------- record objects


def test_string_map_is_a_read_only_dict_view():
    labels = StringMap([b"a", b"b\xff"], [b"1", b"2"])
    assert labels == {"a": "1", "b\ufffd": "2"}
    assert {"a": "1", "b\ufffd": "2"} == labels  # noqa: SIM300 (dict on the left)
    assert dict(labels) == {"a": "1", "b\ufffd": "2"}
    assert len(labels) == 2 and "a" in labels and "c" not in labels
    assert labels["a"] == "1" and labels.get("c") is None
    assert list(labels.items()) == [("a", "1"), ("b\ufffd", "2")]
    assert repr(labels) == repr({"a": "1", "b\ufffd": "2"})
    assert pickle.loads(pickle.dumps(labels)) == labels
    assert not hasattr(labels, "__setitem__")
    assert StringMap() == {}


def test_fast_image_constructor_builds_the_dataclass_record():
    target = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "a" * 64, 7)
    when = datetime(2024, 5, 6, tzinfo=UTC)
    args = ("ns", "example.com/a:1", target, when, None, {"l": "1"}, {"a": "2"})
    fast, slow = metadata._new_image(*args), ImageRecord(*args)
    assert [f.name for f in dataclasses.fields(ImageRecord)] == list(vars(fast))
    assert vars(fast) == vars(slow)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert dataclasses.replace(fast, name="b") == dataclasses.replace(slow, name="b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.name = "c"  # type: ignore[misc]


# ---------------------------------------------------------------------- page path = general path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return corpus_once(tmp_path_factory)


def general_snapshot(tx: Tx) -> MetadataSnapshot:
    """The snapshot as the general path reads it: every record through Bucket objects.

    A record whose values do not decode is skipped, as the page path skips it.
    """
    v1 = tx.root.bucket(b"v1")
    if v1 is None:
        raise UnsupportedSchemaError("no v1 bucket")
    version, namespaces, images, blobs, skipped = 0, [], [], {}, []
    for key, value in v1.items():
        if key == b"version" and isinstance(value, bytes):
            version = decode_varint(value, "v1/version")
            continue
        if not isinstance(value, Bucket):
            continue
        namespace = metadata._text(key)
        namespaces.append(namespace)
        images_bucket = value.bucket(b"images")
        if images_bucket is not None:
            for name, image in images_bucket.buckets():
                try:
                    images.append(metadata._read_image(namespace, metadata._text(name), image))
                except MetadataFormatError as exc:
                    skipped.append(
                        SkippedRecord("image", namespace, metadata._text(name), str(exc))
                    )
        content = value.bucket(b"content")
        blob_bucket = content.bucket(b"blob") if content is not None else None
        blobs[namespace] = {}
        for d, b in blob_bucket.buckets() if blob_bucket is not None else ():
            try:
                blobs[namespace][metadata._text(d)] = metadata._read_blob(
                    namespace, metadata._text(d), b
                )
            except MetadataFormatError as exc:
                skipped.append(SkippedRecord("blob", namespace, metadata._text(d), str(exc)))
    return MetadataSnapshot(
        tx.txid, version, tuple(namespaces), tuple(images), blobs, tuple(skipped)
    )


def outcome(path: Path, read: Callable[[Tx], MetadataSnapshot]) -> object:
    """A comparable summary of reading ``path``: the error family, or every field read."""
    try:
        with BoltFile(path, attempts=1) as bolt:
            snap = bolt.view(read)
    except BoltFormatError:
        return BoltFormatError
    except UnsupportedSchemaError:
        return UnsupportedSchemaError
    images = [(r, dict(r.labels), dict(r.annotations)) for r in snap.images]
    blobs = {
        ns: {d: (b, dict(b.labels)) for d, b in records.items()}
        for ns, records in snap.blobs.items()
    }
    return snap.txid, snap.db_version, snap.namespaces, images, blobs, snap.skipped


def page_path(tx: Tx) -> MetadataSnapshot:
    return metadata._Reader(tx, None).snapshot(None, blobs=True)


def test_page_path_reads_what_the_general_path_reads(corpus: Corpus, tmp_path: Path):
    for data in (corpus.pristine, corpus.before_last):
        path = tmp_path / "meta.db"
        path.write_bytes(data)
        fast = outcome(path, page_path)
        assert isinstance(fast, tuple)
        assert fast == outcome(path, general_snapshot)
        images = fast[3]
        assert len(images) == TAG_COUNT + 2
        assert {name: labels for (r, labels, _a) in images for name in [r.name]}[INDEX] == (
            BIG_LABELS
        )


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_page_path_agrees_with_the_general_path_on_corrupted_files(
    corpus: Corpus, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
):
    """No check is lost on the page path: same records, or an error on both paths."""
    pristine = corpus.pristine
    pages = sorted(reachable_pages(pristine))
    offsets = st.tuples(
        st.sampled_from(pages), st.one_of(st.integers(0, 255), st.integers(0, PAGE_SIZE - 1))
    )
    flips = data.draw(
        st.lists(st.tuples(offsets, st.integers(1, 255)), min_size=1, max_size=8), label="flips"
    )
    mutated = bytearray(pristine)
    for (pgid, within), mask in flips:
        mutated[pgid * PAGE_SIZE + within] ^= mask
    path = tmp_path_factory.mktemp("agree") / "meta.db"
    path.write_bytes(bytes(mutated))
    assert outcome(path, page_path) == outcome(path, general_snapshot)


# ---------------------------------------------------------------------- reuse_records


def image_page(path: Path, name: str) -> tuple[int, int]:
    """(page id, used bytes) of the leaf page holding image ``name``'s bucket."""

    def find(tx: Tx) -> tuple[int, int]:
        v1 = tx.root.bucket(b"v1")
        assert v1 is not None
        ns = v1.bucket(NAMESPACE.encode())
        assert ns is not None
        images = ns.bucket(b"images")
        assert images is not None
        image = images.bucket(name.encode())
        assert image is not None
        pgid = image._root
        leaf = tx.node(pgid)
        assert isinstance(leaf, Leaf)
        return pgid, leaf.end

    with BoltFile(path) as bolt:
        return bolt.view(find)


def patch(path: Path, offset: int, new: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(new)


def test_reuse_records_reuses_unchanged_pages(corpus: Corpus, tmp_path: Path):
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.pristine)
    store = MetadataStore(BoltFile(path), reuse_records=True)
    first = store.read(blobs=True)
    second = store.read(blobs=True)
    assert second == first
    # Every image but the one with page-backed labels comes back as the very same object.
    same = [a is b for a, b in zip(first.images, second.images, strict=True)]
    assert same.count(False) == 1
    assert not same[[r.name for r in first.images].index(INDEX)]
    assert any(
        a is b
        for a, b in zip(
            first.blobs[NAMESPACE].values(), second.blobs[NAMESPACE].values(), strict=True
        )
    )
    # Bounded by the last snapshot's records (one entry per page-backed, self-contained one).
    cached = len(store._cache.pages)  # type: ignore[union-attr]
    assert TAG_COUNT + 1 <= cached <= len(first.images) + len(first.blobs[NAMESPACE])
    store.read(["no-such-namespace"])
    assert len(store._cache.pages) == 0  # type: ignore[union-attr]
    store.close()


def test_reuse_records_decodes_a_changed_page_again(corpus: Corpus, tmp_path: Path):
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.pristine)
    store = MetadataStore(BoltFile(path), reuse_records=True)
    first = store.read()
    old = first.image(NAMESPACE, SINGLE)
    assert old is not None and old.created_at is not None
    pgid, used = image_page(path, SINGLE)
    page = corpus.pristine[pgid * PAGE_SIZE : (pgid + 1) * PAGE_SIZE]
    # Bytes past the leaf's last element are not part of the record: still reused.
    patch(path, pgid * PAGE_SIZE + PAGE_SIZE - 1, bytes([page[-1] ^ 0xFF]))
    assert used < PAGE_SIZE - 1
    assert store.read().image(NAMESPACE, SINGLE) is old
    # A new createdat in the same page: that record, and only it, is decoded again.
    created = go_time(int(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()), 6000)
    at = page.index(b"createdat") + len(b"createdat")
    assert decode_time(page[at : at + 15], "createdat") == old.created_at
    patch(path, pgid * PAGE_SIZE + at, created)
    second = store.read()
    new = second.image(NAMESPACE, SINGLE)
    assert new is not None and new is not old
    assert new.created_at == datetime(2020, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert new.updated_at == old.updated_at
    assert dict(new.labels) == dict(old.labels)
    unchanged = [
        (a, b) for a, b in zip(first.images, second.images, strict=True) if a.name != SINGLE
    ]
    assert all(a is b for a, b in unchanged if a.name != INDEX)
    assert store.read().image(NAMESPACE, SINGLE) is new  # the new bytes are cached now
    # A corrupted element array in a cached page is checked (and rejected), not reused.
    patch(path, pgid * PAGE_SIZE + 16 + 8, struct.pack("<I", 0))  # first key size 0
    with pytest.raises(BoltFormatError, match="out of bounds"):
        MetadataStore(BoltFile(path, attempts=1)).read()
    with pytest.raises(BoltFormatError, match="out of bounds"):
        store.read()
    store.close()


def test_reuse_records_never_reuses_records_read_from_other_pages(corpus: Corpus, tmp_path: Path):
    """The index image's labels live on overflow pages: a change there is always seen."""
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.pristine)
    store = MetadataStore(BoltFile(path), reuse_records=True)
    before = store.read().image(NAMESPACE, INDEX)
    assert before is not None and before.labels == BIG_LABELS

    def labels_page(tx: Tx) -> int:
        v1 = tx.root.bucket(b"v1")
        ns = v1.bucket(NAMESPACE.encode()) if v1 is not None else None
        images = ns.bucket(b"images") if ns is not None else None
        image = images.bucket(INDEX.encode()) if images is not None else None
        labels = image.bucket(b"labels") if image is not None else None
        assert labels is not None and labels._inline is None
        return labels._root

    with BoltFile(path) as bolt:
        pgid = bolt.view(labels_page)
    at = corpus.pristine.index(b"b" * 4000, pgid * PAGE_SIZE)
    assert at < (pgid + 4) * PAGE_SIZE  # in the labels leaf or its overflow pages
    patch(path, at + 100, b"B")
    after = store.read().image(NAMESPACE, INDEX)
    assert after is not None and after is not before
    label = "test.example.com/big.1"
    assert after.labels[label] == "b" * 100 + "B" + "b" * 3899
    store.close()


# ---------------------------------------------------------------------- reuse_buckets


def advance(path: Path, by: int) -> int:
    """Make the newest meta of ``path`` say ``by`` more commits happened, on the same tree."""
    data = bytearray(path.read_bytes())
    _magic, _version, _size, _flags, root, seq, freelist, pgid, txid, _sum = newest_meta(data)
    forge_meta(
        data,
        (txid + by) % 2,
        root=root,
        sequence=seq,
        freelist=freelist,
        pgid=pgid,
        txid=txid + by,
    )
    patch(path, 0, bytes(data[: 2 * PAGE_SIZE]))
    return txid + by


def test_reuse_buckets_carries_unchanged_buckets_over(corpus: Corpus, tmp_path: Path):
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.pristine)
    store = MetadataStore(BoltFile(path), reuse_buckets=True)
    first = store.read(blobs=True)
    assert (first.images_changed, first.blobs_changed) == ({NAMESPACE}, {NAMESPACE})
    decoded = store.images_decoded
    assert decoded == len(first.images) == TAG_COUNT + 2
    second = store.read(blobs=True)
    assert (second.images_changed, second.blobs_changed) == (frozenset(), frozenset())
    assert not second.unverified
    assert second == first
    assert all(a is b for a, b in zip(first.images, second.images, strict=True))
    assert second.blobs[NAMESPACE] is first.blobs[NAMESPACE]
    assert store.images_decoded == decoded
    assert second.moved(first) == set()
    # Without blobs this time: no blob records, and the blob bucket no longer counts as read.
    third = store.read()
    assert (third.images_changed, third.blobs_changed, third.blobs) == (frozenset(), None, {})
    # Asked for another namespace only: the one read before is gone from the snapshot.
    assert store.read(["no-such-namespace"]).images_changed == {NAMESPACE}
    store.close()


def test_reuse_buckets_reads_a_changed_namespace_again(corpus: Corpus, tmp_path: Path):
    """before_last → pristine: one image's labels changed, so its namespace is read again."""
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.before_last)
    store = MetadataStore(BoltFile(path), reuse_buckets=True)
    before = store.read(blobs=True)
    decoded = store.images_decoded
    (tmp_path / "next.db").write_bytes(corpus.pristine)
    (tmp_path / "next.db").replace(path)
    after = store.read(blobs=True)
    plain = MetadataStore(BoltFile(path)).read(blobs=True)
    assert after == plain
    assert after.images_changed == {NAMESPACE}
    assert after.blobs_changed == frozenset()
    # Decoded again: the relabelled image, and the one whose labels have pages of their own
    # (never cached, see test_reuse_records_never_reuses_records_read_from_other_pages).
    assert store.images_decoded == decoded + 2
    assert after.moved(before) == set()  # labels, not targets
    assert after.txid - before.txid > 1
    # The blob bucket was carried over across two commits: unverified until a full read.
    assert after.unverified
    full = store.read(blobs=True, full=True)
    assert (full.images_changed, full.blobs_changed, full.unverified) == (None, None, False)
    assert full == plain
    assert not store.read(blobs=True).unverified
    store.close()


def test_records_carried_over_across_commits_are_unverified(corpus: Corpus, tmp_path: Path):
    """A record page rewritten in place stands for one deleted and created again on a reused
    page: invisible to the fingerprints, flagged when commits came between, read by full."""
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.pristine)
    store = MetadataStore(BoltFile(path), reuse_buckets=True)
    first = store.read(blobs=True)
    old = first.image(NAMESPACE, SINGLE)
    assert old is not None and old.created_at is not None
    pgid, _used = image_page(path, SINGLE)
    page = corpus.pristine[pgid * PAGE_SIZE : (pgid + 1) * PAGE_SIZE]
    created = go_time(int(datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()), 6000)
    at = page.index(b"createdat") + len(b"createdat")
    patch(path, pgid * PAGE_SIZE + at, created)
    # One commit later the same root pages mean the same data (bbolt never writes a page in use).
    txid = advance(path, 1)
    second = store.read(blobs=True)
    assert second.txid == txid
    assert second.image(NAMESPACE, SINGLE) is old
    assert (second.images_changed, second.unverified) == (frozenset(), False)
    # Three commits later they may not: the records are carried over, flagged.
    advance(path, 3)
    third = store.read(blobs=True)
    assert third.image(NAMESPACE, SINGLE) is old
    assert (third.images_changed, third.unverified) == (frozenset(), True)
    assert store.read(blobs=True).unverified  # stays flagged, even one commit later
    full = store.read(blobs=True, full=True)
    new = full.image(NAMESPACE, SINGLE)
    assert new is not None and new.created_at == datetime(2020, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert not full.unverified
    # A txid going back (meta.db replaced by an offline compaction, say) is no next commit.
    data = bytearray(path.read_bytes())
    _magic, _version, _size, _flags, root, seq, freelist, pgid, txid, _sum = newest_meta(data)
    for back in (10, 11):
        forge_meta(
            data, (txid - back) % 2, root=root, sequence=seq, freelist=freelist, pgid=pgid,
            txid=txid - back,
        )  # fmt: skip
    patch(path, 0, bytes(data[: 2 * PAGE_SIZE]))
    earlier = store.read(blobs=True)
    assert earlier.txid == txid - 10
    assert earlier.unverified
    store.close()


def set_txid(path: Path, txid: int) -> None:
    """Make both metas of ``path`` describe its newest tree, the newer one at ``txid``."""
    data = bytearray(path.read_bytes())
    _magic, _version, _size, _flags, root, seq, freelist, pgid, _txid, _sum = newest_meta(data)
    for at in (txid, txid - 1):
        forge_meta(
            data, at % 2, root=root, sequence=seq, freelist=freelist, pgid=pgid, txid=at
        )  # fmt: skip
    patch(path, 0, bytes(data[: 2 * PAGE_SIZE]))


@pytest.mark.parametrize("commits", [1, 2])
def test_a_changed_namespace_takes_records_still_at_their_page(
    corpus: Corpus, tmp_path: Path, commits: int
):
    """before_last → pristine rewrote the images bucket: it is read again, but a record whose
    bucket still starts at the same page is taken as it was, without reading that page (here
    one changed in place, which bbolt never does): certain one commit later, unverified after
    several, and a full read reads it."""
    path = tmp_path / "meta.db"
    path.write_bytes(corpus.before_last)
    store = MetadataStore(BoltFile(path), reuse_buckets=True)
    before = store.read(blobs=True)
    name = min(set(corpus.images) - {SINGLE, INDEX})
    old = before.image(NAMESPACE, name)
    assert old is not None
    nxt = tmp_path / "next.db"
    nxt.write_bytes(corpus.pristine)
    pgid, _used = image_page(nxt, name)
    page = corpus.pristine[pgid * PAGE_SIZE : (pgid + 1) * PAGE_SIZE]
    at = page.index(b"createdat") + len(b"createdat")
    patch(nxt, pgid * PAGE_SIZE + at, go_time(0, 0))
    set_txid(nxt, before.txid + commits)
    nxt.replace(path)
    after = store.read(blobs=True)
    assert after.images_changed == {NAMESPACE}
    assert after.image(NAMESPACE, name) is old
    assert after.unverified == (commits > 1)
    full = store.read(blobs=True, full=True)
    fresh = full.image(NAMESPACE, name)
    assert fresh is not None and fresh.created_at == datetime(1970, 1, 1, tzinfo=UTC)
    store.close()


def image_record(ns: str, name: str, digest: str) -> ImageRecord:
    return ImageRecord(ns, name, Descriptor("application/vnd.oci.image.index.v1+json", digest, 1))


def test_moved_names_added_retargeted_and_removed_in_changed_namespaces():
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    r = image_record
    before = MetadataSnapshot(
        1,
        3,
        ("a", "b"),
        (r("a", "kept", d1), r("a", "moved", d1), r("a", "gone", d1), r("b", "quiet", d1)),
    )
    after = MetadataSnapshot(
        2,
        3,
        ("a", "b"),
        (r("a", "kept", d1), r("a", "moved", d2), r("a", "new", d1), r("b", "quiet", d2)),
        images_changed=frozenset({"a"}),
    )
    assert after.moved(before) == {("a", "moved"), ("a", "gone"), ("a", "new")}
    # Without a record of what changed, every namespace is compared.
    unknown = dataclasses.replace(after, images_changed=None)
    assert unknown.moved(before) == {("a", "moved"), ("a", "gone"), ("a", "new"), ("b", "quiet")}


# ---------------------------------------------------------------------- odd records


def test_one_undecodable_record_is_skipped_and_reported_once(
    corpus: Corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A target digest containerd would never write hides only its own image, logged once."""
    data = bytearray(corpus.pristine)
    reachable = set(reachable_pages(corpus.pristine))
    needle = b"digest" + corpus.single_digest.encode()
    at = data.find(needle)
    while at // PAGE_SIZE not in reachable:
        at = data.find(needle, at + 1)
    bad = data.copy()
    bad[at + 6 : at + 12] = b"sha999"  # same length: the page stays well-formed
    path = tmp_path / "meta.db"
    path.write_bytes(bytes(bad))
    store = MetadataStore(BoltFile(path))
    with caplog.at_level("WARNING"):
        snap = store.read()
        again = store.read()
    assert len(snap.images) == len(corpus.images) - 1
    [skipped] = snap.skipped
    assert skipped.kind == "image"
    assert skipped.namespace == NAMESPACE
    assert skipped.name in corpus.images
    assert skipped.name not in {r.name for r in snap.images}
    assert f"invalid target digest b'sha999:{corpus.single_digest[7:]}'" in skipped.reason
    assert again.skipped == snap.skipped
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert skipped.reason in warnings[0]
    assert str(path) in warnings[0]
    # Repaired, then broken again: reported again.
    caplog.clear()
    path.write_bytes(corpus.pristine)
    assert store.read().skipped == ()
    path.write_bytes(bytes(bad))
    assert store.read().skipped == snap.skipped
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_gc_expire_counts_from_db_version_4():
    """containerd 2.x (db version 4) collects images whose gc.expire passed; 1.x never does."""
    target = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "1" * 64, 1)

    def record(value: str) -> ImageRecord:
        return ImageRecord("default", "a:1", target, labels={"containerd.io/gc.expire": value})

    expected = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert record("2020-01-02T03:04:05Z").expires_at(4) == expected
    assert record("2020-01-02T05:04:05.5+02:00").expires_at(4) == expected.replace(
        microsecond=500000
    )
    assert record("2020-01-02T03:04:05Z").expires_at(3) is None
    for invalid in ("2020-01-02", "2020-01-02 03:04:05Z", "2020-13-02T03:04:05Z", "soon"):
        assert record(invalid).expires_at(4) is None, invalid
    assert ImageRecord("default", "a:1", target).expires_at(4) is None
