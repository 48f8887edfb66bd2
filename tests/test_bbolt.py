"""Unit tests of the lock-free bbolt reader on real meta.db files (containerd is not running).

The files come from a private containerd driven once per session (``tests/metadb.py``); every
test works on copies of their bytes.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

from imagepushd.errors import (
    BoltFormatError,
    ContainerdError,
    SnapshotBusyError,
    UnsupportedSchemaError,
)
from imagepushd.watch import bbolt
from imagepushd.watch.bbolt import BoltFile, Bucket, Meta, Tx, fnv1a64
from imagepushd.watch.metadata import MetadataStore
from tests.metadb import (
    BIG_LABELS,
    FLAG_BRANCH,
    FLAG_LEAF,
    INDEX,
    LAST_LABEL,
    NAMESPACE,
    PAGE_SIZE,
    SINGLE,
    TAG_COUNT,
    Corpus,
    corpus_once,
    forge_meta,
    meta_fields,
    newest_meta,
    page_header,
    reachable_pages,
    tag_names,
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Real meta.db bytes: containerd started once, driven with ctr, stopped."""
    return corpus_once(tmp_path_factory)


def _write(tmp_path: Path, data: bytes, name: str = "meta.db") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _patched(data: bytes, *patches: tuple[int, bytes]) -> bytes:
    out = bytearray(data)
    for offset, new in patches:
        out[offset : offset + len(new)] = new
    return bytes(out)


def _images_bucket(tx: Tx) -> Bucket:
    v1 = tx.root.bucket(b"v1")
    assert v1 is not None
    ns = v1.bucket(NAMESPACE.encode())
    assert ns is not None
    images = ns.bucket(b"images")
    assert images is not None
    return images


def _image_targets(tx: Tx) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, image in _images_bucket(tx).buckets():
        target = image.bucket(b"target")
        assert target is not None
        digest = target.get(b"digest")
        assert digest is not None
        out[name.decode()] = digest.decode()
    return out


def _reseal_meta(data: bytes, slot: int, **fields: int) -> bytes:
    """A copy of ``data`` with fields of meta ``slot`` rewritten and validly resealed."""
    out = bytearray(data)
    forge_meta(out, slot, **fields)
    return bytes(out)


class _Timeout(Exception):
    pass


@pytest.fixture
def hang_guard() -> Iterator[None]:
    """Fail instead of hanging: SIGALRM after 10 s."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise _Timeout("reader did not finish within 10 s (hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------- fnv and meta


def test_fnv1a64_known_vectors() -> None:
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("which", ["pristine", "before_last"])
def test_meta_parse_of_real_metas(corpus: Corpus, which: str) -> None:
    data: bytes = getattr(corpus, which)
    metas = []
    for slot in (0, 1):
        raw = data[slot * PAGE_SIZE + 16 : slot * PAGE_SIZE + 80]
        meta = Meta.parse(raw)
        assert meta is not None
        fields = meta_fields(data, slot)
        assert fields[0] == 0xED0CDAED
        assert fields[1] == 2
        assert meta.page_size == PAGE_SIZE
        assert meta.txid == fields[8]
        assert meta.txid % 2 == slot  # txid N lives in page N mod 2
        assert meta.root == fields[4]
        assert meta.pgid == fields[7]
        assert 2 <= meta.root < meta.pgid
        assert meta.pgid * PAGE_SIZE <= len(data)
        assert fnv1a64(raw[:56]) == fields[9]
        assert meta.raw == raw
        metas.append(meta)
    assert abs(metas[0].txid - metas[1].txid) == 1


def test_meta_parse_rejects_invalid(corpus: Corpus) -> None:
    raw = corpus.pristine[16:80]
    assert Meta.parse(raw) is not None
    assert Meta.parse(raw[:63]) is None
    assert Meta.parse(b"\0" * 64) is None
    bad_version = _patched(raw, (4, struct.pack("<I", 1)))
    assert Meta.parse(bad_version) is None
    for offset in (8, 16, 40, 55, 56, 63):  # checksummed fields and the checksum itself
        flipped = bytearray(raw)
        flipped[offset] ^= 0x40
        assert Meta.parse(bytes(flipped)) is None, offset


def test_both_real_files_differ_by_the_last_operation(corpus: Corpus) -> None:
    assert newest_meta(corpus.pristine)[8] > newest_meta(corpus.before_last)[8]
    assert corpus.images == corpus.images_before_last  # only a label changed


# ---------------------------------------------------------------------- walking real trees


def test_view_returns_the_images_ctr_printed(corpus: Corpus, tmp_path: Path) -> None:
    path = _write(tmp_path, corpus.pristine)
    with BoltFile(path) as bolt:
        assert bolt.view(_image_targets) == corpus.images
        assert bolt.meta().txid == newest_meta(corpus.pristine)[8]
    assert len(corpus.images) == TAG_COUNT + 2
    assert corpus.images[SINGLE] == corpus.single_digest
    assert corpus.images[INDEX] == corpus.index_digest
    assert all(corpus.images[name] == corpus.single_digest for name in tag_names())


def test_metadata_store_matches_ctr(corpus: Corpus, tmp_path: Path) -> None:
    store = MetadataStore(BoltFile(_write(tmp_path, corpus.pristine)))
    snap = store.read(blobs=True)
    store.close()
    assert snap.txid == newest_meta(corpus.pristine)[8]
    assert snap.db_version == 3  # containerd 1.2-1.7
    assert snap.namespaces == (NAMESPACE,)
    assert {r.name: r.target.digest for r in snap.images} == corpus.images
    index = snap.image(NAMESPACE, INDEX)
    assert index is not None
    assert index.target.media_type == "application/vnd.oci.image.index.v1+json"
    assert dict(index.labels) == corpus.labels[INDEX] == BIG_LABELS
    single = snap.image(NAMESPACE, SINGLE)
    assert single is not None
    assert single.target.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert dict(single.labels) == corpus.labels[SINGLE] == dict([LAST_LABEL])
    assert single.created_at is not None
    assert single.updated_at is not None
    assert single.updated_at >= single.created_at
    assert set(snap.blobs[NAMESPACE]) == corpus.blob_digests


def test_older_file_has_the_older_state(corpus: Corpus, tmp_path: Path) -> None:
    snap = MetadataStore(BoltFile(_write(tmp_path, corpus.before_last))).read()
    assert snap.txid == newest_meta(corpus.before_last)[8]
    assert {r.name: r.target.digest for r in snap.images} == corpus.images_before_last
    single = snap.image(NAMESPACE, SINGLE)
    assert single is not None
    assert LAST_LABEL[0] not in single.labels


def test_walk_handles_branch_pages(corpus: Corpus, tmp_path: Path) -> None:
    def inspect(tx: Tx) -> tuple[object, list[bytes]]:
        images = _images_bucket(tx)
        root_pgid = images._root
        return tx.node(root_pgid), list(images.keys())

    with BoltFile(_write(tmp_path, corpus.pristine)) as bolt:
        root_node, keys = bolt.view(inspect)
    assert isinstance(root_node, bbolt._Branch)
    assert len(root_node.children) >= 2
    assert len(keys) >= TAG_COUNT
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    # A point lookup descends through the branch page too.
    with BoltFile(_write(tmp_path, corpus.pristine)) as bolt:
        last = tag_names()[-1].encode()
        found = bolt.view(lambda tx: _images_bucket(tx).bucket(last) is not None)
        missing = bolt.view(lambda tx: _images_bucket(tx).bucket(b"zzz-not-there"))
    assert found
    assert missing is None


def test_target_buckets_are_inline(corpus: Corpus, tmp_path: Path) -> None:
    def inspect(tx: Tx) -> list[tuple[bool, bool]]:
        out = []
        for _name, image in _images_bucket(tx).buckets():
            target = image.bucket(b"target")
            assert target is not None
            # An image bucket holds sub-buckets, so it is page-backed; its target is inline.
            out.append((image._inline is None, target._inline is not None))
            assert set(target.to_dict()) == {b"digest", b"mediatype", b"size"}
        return out

    with BoltFile(_write(tmp_path, corpus.pristine)) as bolt:
        flags = bolt.view(inspect)
    assert len(flags) == TAG_COUNT + 2
    assert all(page_backed and inline for page_backed, inline in flags)


def test_overflow_pages_decode_to_the_big_labels(corpus: Corpus, tmp_path: Path) -> None:
    def inspect(tx: Tx) -> tuple[int, dict[bytes, bytes | Bucket]]:
        image = _images_bucket(tx).bucket(INDEX.encode())
        assert image is not None
        labels = image.bucket(b"labels")
        assert labels is not None
        assert labels._inline is None  # 12 KB of labels cannot be inline
        return labels._root, labels.to_dict()

    with BoltFile(_write(tmp_path, corpus.pristine)) as bolt:
        pgid, labels = bolt.view(inspect)
    _id, flags, _count, overflow = page_header(corpus.pristine, pgid)
    assert flags == FLAG_LEAF
    assert overflow >= 2
    assert labels == {k.encode(): v.encode() for k, v in BIG_LABELS.items()}


# ---------------------------------------------------------------------- meta selection


def test_meta0_invalid_reads_meta1(corpus: Corpus, tmp_path: Path) -> None:
    data = corpus.pristine
    txids = {slot: meta_fields(data, slot)[8] for slot in (0, 1)}
    for offset in (24, 40, 64, 76):  # page size, sequence, txid, checksum
        broken = bytearray(data)
        broken[offset] ^= 0x01
        store = MetadataStore(BoltFile(_write(tmp_path, bytes(broken))))
        snap = store.read(blobs=True)
        store.close()
        assert snap.txid == txids[1], offset
        assert len(snap.images) == TAG_COUNT + 2


def test_meta1_invalid_reads_meta0(corpus: Corpus, tmp_path: Path) -> None:
    broken = bytearray(corpus.pristine)
    broken[PAGE_SIZE + 56] ^= 0x80  # meta 1's pgid
    snap = MetadataStore(BoltFile(_write(tmp_path, bytes(broken)))).read()
    assert snap.txid == meta_fields(corpus.pristine, 0)[8]


def test_newest_valid_meta_wins(corpus: Corpus, tmp_path: Path) -> None:
    data = corpus.pristine
    newest_slot = 0 if meta_fields(data, 0)[8] > meta_fields(data, 1)[8] else 1
    older_slot = 1 - newest_slot
    # Give the older slot a higher txid (validly resealed): it must now win.
    bumped = meta_fields(data, newest_slot)[8] + 1
    forged = _reseal_meta(data, older_slot, txid=bumped)
    with BoltFile(_write(tmp_path, forged)) as bolt:
        assert bolt.meta().txid == bumped
        assert bolt.view(_image_targets) == corpus.images


def test_both_metas_invalid_is_not_bbolt(corpus: Corpus, tmp_path: Path) -> None:
    broken = bytearray(corpus.pristine)
    broken[16 + 20] ^= 0x01
    broken[PAGE_SIZE + 16 + 20] ^= 0x01
    path = _write(tmp_path, bytes(broken))
    with pytest.raises(BoltFormatError, match="not a bbolt file"):
        BoltFile(path).meta()
    with pytest.raises(BoltFormatError, match="not a bbolt file"):
        MetadataStore(BoltFile(path)).read()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(random.Random(7).randbytes(3 * PAGE_SIZE), id="random-12k"),
        pytest.param(bytes(range(256)) * 64, id="counting-16k"),
        pytest.param(b"\0" * (2 * PAGE_SIZE), id="zeros"),
        pytest.param(b"SQLite format 3\0" + b"\0" * 8192, id="other-format"),
    ],
)
def test_non_bbolt_files(tmp_path: Path, content: bytes) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(BoltFormatError, match="not a bbolt file"):
        MetadataStore(BoltFile(path)).read(blobs=True)


@pytest.mark.parametrize(
    "length",
    [1, 16, 80, PAGE_SIZE, PAGE_SIZE + 50, 2 * PAGE_SIZE, 100 * PAGE_SIZE, -PAGE_SIZE, -1],
)
def test_truncated_file(corpus: Corpus, tmp_path: Path, length: int) -> None:
    pgid = newest_meta(corpus.pristine)[7]
    end = length if length > 0 else pgid * PAGE_SIZE + length
    path = _write(tmp_path, corpus.pristine[:end])
    with pytest.raises(BoltFormatError):
        MetadataStore(BoltFile(path)).read(blobs=True)


def test_missing_file_is_a_containerd_error(tmp_path: Path) -> None:
    with pytest.raises(ContainerdError, match="no such file"):
        BoltFile(tmp_path / "nope.db").meta()


# ---------------------------------------------------------------------- file lifecycle


def test_reopens_when_the_file_is_replaced(corpus: Corpus, tmp_path: Path) -> None:
    path = _write(tmp_path, corpus.before_last)
    with BoltFile(path) as bolt:
        store = MetadataStore(bolt)
        first = store.read()
        assert first.txid == newest_meta(corpus.before_last)[8]
        single = first.image(NAMESPACE, SINGLE)
        assert single is not None
        assert LAST_LABEL[0] not in single.labels
        old_ino = os.stat(path).st_ino
        _write(tmp_path, corpus.pristine, "meta.db.new")
        os.replace(tmp_path / "meta.db.new", path)
        assert os.stat(path).st_ino != old_ino
        second = store.read()
    assert second.txid == newest_meta(corpus.pristine)[8]
    single = second.image(NAMESPACE, SINGLE)
    assert single is not None
    assert single.labels[LAST_LABEL[0]] == LAST_LABEL[1]


def _overwrite_in_place(path: Path, data: bytes) -> None:
    """Write ``data`` into the same inode (as containerd does), not a replacement file."""
    with path.open("r+b") as f:
        f.write(data)
        f.truncate()


def test_retries_while_the_meta_moves_then_gives_up(corpus: Corpus, tmp_path: Path) -> None:
    path = _write(tmp_path, corpus.pristine)
    versions = {corpus.pristine: corpus.before_last, corpus.before_last: corpus.pristine}
    calls: list[int] = []
    sleeps: list[float] = []

    def walk(tx: Tx) -> dict[str, str]:
        calls.append(tx.txid)
        images = _images_bucket(tx)
        # A commit lands during the walk: the file now holds a different valid tree.
        _overwrite_in_place(path, versions[path.read_bytes()])
        names = list(images.keys())
        return {name.decode(): "" for name in names}

    bolt = BoltFile(path, sleep=sleeps.append, attempts=3)
    with pytest.raises(SnapshotBusyError, match="3 snapshot attempts"):
        bolt.view(walk)
    bolt.close()
    assert len(calls) == 3
    assert len(set(calls)) == 2  # alternating txids: each attempt saw a fresh meta
    assert 2 <= len(sleeps) <= 3
    assert all(0.005 <= delay <= 0.2 for delay in sleeps), sleeps


def test_retry_succeeds_on_the_new_tree(corpus: Corpus, tmp_path: Path) -> None:
    path = _write(tmp_path, corpus.before_last)
    calls: list[int] = []
    sleeps: list[float] = []

    def walk(tx: Tx) -> tuple[int, dict[str, str]]:
        calls.append(tx.txid)
        result = _image_targets(tx)
        if len(calls) == 1:
            _overwrite_in_place(path, corpus.pristine)
        return tx.txid, result

    with BoltFile(path, sleep=sleeps.append, attempts=3) as bolt:
        txid, images = bolt.view(walk)
    assert calls == [newest_meta(corpus.before_last)[8], newest_meta(corpus.pristine)[8]]
    assert txid == newest_meta(corpus.pristine)[8]
    assert images == corpus.images
    assert len(sleeps) == 1
    assert 0.005 <= sleeps[0] <= 0.2


def _images_root_pgid(data: bytes, tmp_path: Path) -> int:
    with BoltFile(_write(tmp_path, data, "probe.db")) as bolt:
        return bolt.view(lambda tx: _images_bucket(tx)._root)


def test_structural_error_on_stable_txid_raises_at_once(corpus: Corpus, tmp_path: Path) -> None:
    data = corpus.pristine
    pgid = _images_root_pgid(data, tmp_path)
    assert page_header(data, pgid)[1] == FLAG_BRANCH
    # The images root page claims to be another page.
    broken = _patched(data, (pgid * PAGE_SIZE, struct.pack("<Q", pgid + 1)))
    calls: list[int] = []
    sleeps: list[float] = []

    def walk(tx: Tx) -> list[bytes]:
        calls.append(tx.txid)
        return list(_images_bucket(tx).keys())

    bolt = BoltFile(_write(tmp_path, broken), sleep=sleeps.append, attempts=3)
    with pytest.raises(BoltFormatError, match=f"page {pgid} has header id {pgid + 1}"):
        bolt.view(walk)
    bolt.close()
    assert len(calls) == 1
    assert sleeps == []
    # Through the metadata layer too: one attempt, a BoltFormatError.
    with pytest.raises(BoltFormatError):
        MetadataStore(BoltFile(tmp_path / "meta.db", sleep=sleeps.append, attempts=3)).read()
    assert sleeps == []


def _branch_pages(data: bytes) -> list[int]:
    return [p for p in reachable_pages(data) if page_header(data, p)[1] == FLAG_BRANCH]


@pytest.mark.usefixtures("hang_guard")
@pytest.mark.parametrize("element", [0, -1])
def test_branch_pointing_at_itself(corpus: Corpus, tmp_path: Path, element: int) -> None:
    data = corpus.pristine
    branches = _branch_pages(data)
    assert branches, "the corpus must have a branch page"
    pgid = branches[0]
    count = page_header(data, pgid)[2]
    index = element % count
    child_offset = pgid * PAGE_SIZE + 16 + 16 * index + 8
    broken = _patched(data, (child_offset, struct.pack("<Q", pgid)))
    path = _write(tmp_path, broken)
    with BoltFile(path, attempts=2, sleep=lambda s: None) as bolt:
        with pytest.raises(BoltFormatError, match="cycle"):
            bolt.view(lambda tx: list(_images_bucket(tx).keys()))
        with pytest.raises(BoltFormatError, match="cycle"):
            bolt.view(lambda tx: list(_images_bucket(tx).items()))
        # A point lookup of a key under the patched element descends into the same page.
        names = sorted(corpus.images)
        key = (names[0] if index == 0 else names[-1]).encode()
        with pytest.raises(BoltFormatError, match="cycle"):
            bolt.view(lambda tx: _images_bucket(tx).get(key))
    with pytest.raises(BoltFormatError, match="cycle"):
        MetadataStore(BoltFile(path, attempts=2, sleep=lambda s: None)).read()


# ---------------------------------------------------------------------- reader bugs found


def test_inline_bucket_flagged_branch_and_leaf_is_a_format_error(
    corpus: Corpus, tmp_path: Path
) -> None:
    """An inline bucket page whose flags are 0x03 must be a BoltFormatError.

    Tx.parse_page checks the branch bit first, so open_bucket gets a _Branch back and its
    ``assert isinstance(node, _Leaf)`` raises AssertionError (under ``python -O`` the _Branch
    is used as a leaf and Bucket.items raises AttributeError: '_Branch' has no 'flags').
    """
    data = corpus.pristine
    pattern = re.escape(b"target" + b"\0" * 24 + b"\x02\x00")
    reachable = set(reachable_pages(data))
    patches = [
        (m.start() + 30, b"\x03")
        for m in re.finditer(pattern, data)
        if m.start() // PAGE_SIZE in reachable
    ]
    assert len(patches) == TAG_COUNT + 2
    path = _write(tmp_path, _patched(data, *patches))
    with pytest.raises(BoltFormatError):
        MetadataStore(BoltFile(path, attempts=2, sleep=lambda s: None)).read()


def test_unsupported_schema_from_a_torn_walk_is_retried(
    corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk that misses ``v1`` because its pages were reused mid-walk must be retried.

    Models bbolt's page reuse: tree N's root page is overwritten (by tx N+2) while it is read.
    BoltFile.view only retries BoltFormatError, so the UnsupportedSchemaError raised by
    metadata._read_snapshot escapes although the meta moved (zero-advance rule broken).
    """
    data = corpus.pristine
    meta = newest_meta(data)
    slot = meta[8] % 2
    root, pgid = meta[4], meta[7]
    assert (pgid + 1) * PAGE_SIZE <= len(data)
    # The newer state: the old root page reused as an empty leaf, the root copied to page pgid.
    empty_leaf = struct.pack("<QHHI", root, FLAG_LEAF, 0, 0).ljust(PAGE_SIZE, b"\0")
    copy_of_root = struct.pack("<Q", pgid) + data[root * PAGE_SIZE + 8 : (root + 1) * PAGE_SIZE]
    newer = _patched(data, (root * PAGE_SIZE, empty_leaf), (pgid * PAGE_SIZE, copy_of_root))
    newer = _reseal_meta(newer, slot, txid=meta[8] + 2, root=pgid, pgid=pgid + 1)
    path = _write(tmp_path, data)

    original_node = Tx.node
    state = {"written": False}

    def node(self: Tx, page: int) -> object:
        if not state["written"]:
            state["written"] = True
            _overwrite_in_place(path, newer)  # the commit lands as the walk starts
        return original_node(self, page)

    monkeypatch.setattr(Tx, "node", node)
    sleeps: list[float] = []
    snap = MetadataStore(BoltFile(path, attempts=3, sleep=sleeps.append)).read()
    assert snap.txid == meta[8] + 2
    assert len(snap.images) == TAG_COUNT + 2
    assert len(sleeps) == 1


def _synthetic_bbolt(root_page: bytes, pages: int) -> bytes:
    """A minimal bbolt file: two metas (txids 2 and 3), root leaf at page 2."""
    out = bytearray(pages * PAGE_SIZE)
    for slot, txid in ((0, 2), (1, 3)):
        body = struct.pack("<IIIIQQQQQ", 0xED0CDAED, 2, PAGE_SIZE, 0, 2, 0, 2**64 - 1, pages, txid)
        header = struct.pack("<QHHI", slot, 0x04, 0, 0)
        page = header + body + struct.pack("<Q", fnv1a64(body))
        out[slot * PAGE_SIZE : slot * PAGE_SIZE + len(page)] = page
    out[2 * PAGE_SIZE : 2 * PAGE_SIZE + len(root_page)] = root_page
    return bytes(out)


def test_overlapping_leaf_values_do_not_amplify_memory(tmp_path: Path) -> None:
    """Leaf elements whose values overlap must not make the reader copy the page many times.

    bbolt lays keys and values out back to back, so their total never exceeds the page. The
    reader copies every value (``buf[mid:stop]``) without checking overlap: 48 elements whose
    values each span a 1 MiB overflow page cost 48 MiB, and 65535 elements over a large file
    cost count x file size, contrary to the module's promise.
    """
    pages = 260  # root leaf at page 2 with 256 overflow pages: a ~1 MiB page
    overflow = pages - 3
    size = (overflow + 1) * PAGE_SIZE
    count = 48
    data_start = 16 + 16 * count
    elements = b""
    for i in range(count):
        element_at = 16 + 16 * i
        key_at = data_start + i
        pos = key_at - element_at
        vsize = size - key_at - 1
        elements += struct.pack("<IIII", 0, pos, 1, vsize)
    keys = bytes(range(1, count + 1))
    page = struct.pack("<QHHI", 2, FLAG_LEAF, count, overflow) + elements + keys
    path = _write(tmp_path, _synthetic_bbolt(page, pages))

    def walk(tx: Tx) -> int:
        return len(list(tx.root.keys()))

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        # Rejecting the overlap (BoltFormatError) is one possible fix.
        with BoltFile(path, attempts=1) as bolt, contextlib.suppress(BoltFormatError):
            bolt.view(walk)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / (1 << 20):.1f} MiB for a {size >> 20} MiB page"


def test_synthetic_file_sanity(tmp_path: Path) -> None:
    """The synthetic writer above makes files the reader accepts (guards the bug test)."""
    keys = [b"a", b"bb", b"ccc"]
    count = len(keys)
    data_start = 16 + 16 * count
    elements, blob, offset = b"", b"", data_start
    for i, key in enumerate(keys):
        value = key.upper() * 2
        elements += struct.pack("<IIII", 0, offset - (16 + 16 * i), len(key), len(value))
        blob += key + value
        offset += len(key) + len(value)
    page = struct.pack("<QHHI", 2, FLAG_LEAF, count, 0) + elements + blob
    path = _write(tmp_path, _synthetic_bbolt(page, 3))
    with BoltFile(path) as bolt:
        assert bolt.meta().txid == 3
        items: Callable[[Tx], dict[bytes, bytes | Bucket]] = lambda tx: tx.root.to_dict()  # noqa: E731
        assert bolt.view(items) == {k: k.upper() * 2 for k in keys}
    with pytest.raises(UnsupportedSchemaError):
        MetadataStore(BoltFile(path)).read()


def _leaf_image(pairs: list[tuple[bytes, bytes]], *, pgid: int = 2) -> bytes:
    """A leaf page image (header, elements, data back to back) holding ``pairs``."""
    count = len(pairs)
    elements, blob = b"", b""
    offset = 16 + 16 * count
    for i, (key, value) in enumerate(pairs):
        elements += struct.pack("<IIII", 0, offset - (16 + 16 * i), len(key), len(value))
        blob += key + value
        offset += len(key) + len(value)
    return struct.pack("<QHHI", pgid, FLAG_LEAF, count, 0) + elements + blob


def test_a_remembered_leaf_shape_still_checks_keys_and_bounds(tmp_path: Path) -> None:
    """Leaves sharing an element array reuse its checked layout, never its keys or bounds."""
    path = _write(tmp_path, _synthetic_bbolt(_leaf_image([(b"k", b"v")]), 3))
    good = _leaf_image([(b"ab", b"11"), (b"cd", b"22")])
    same_shape = _leaf_image([(b"ef", b"33"), (b"gh", b"44")])
    swapped = _leaf_image([(b"cd", b"11"), (b"ab", b"22")])
    repeated = _leaf_image([(b"ab", b"11"), (b"ab", b"22")])
    assert good[:48] == same_shape[:48] == swapped[:48] == repeated[:48]

    def parse(tx: Tx) -> None:
        first = tx.parse_leaf(good, 0, 2, "good")
        assert (first.keys, first.values, first.end) == ([b"ab", b"cd"], [b"11", b"22"], 56)
        again = tx.parse_leaf(same_shape, 0, 2, "same shape")
        assert (again.keys, again.values, again.flags) == ([b"ef", b"gh"], [b"33", b"44"], [0, 0])
        # A shape stands for equal keys too: new keys, new shape; the same leaf again, same one.
        assert again.shape is not first.shape
        assert tx.parse_leaf(same_shape, 0, 2, "again").shape is again.shape is not None
        with pytest.raises(BoltFormatError, match="swapped: keys not in ascending order"):
            tx.parse_leaf(swapped, 0, 2, "swapped")
        with pytest.raises(BoltFormatError, match="repeated: keys not in ascending order"):
            tx.parse_leaf(repeated, 0, 2, "repeated")
        with pytest.raises(BoltFormatError, match="short: element at 32 out of bounds"):
            tx.parse_leaf(good[:-1], 0, 2, "short")
        inline = tx.parse_leaf(b"\0" * 16 + good, 16, 2, "inline")  # as in a bucket value
        assert (inline.keys, inline.values, inline.end) == ([b"ab", b"cd"], [b"11", b"22"], 72)

    with BoltFile(path) as bolt:
        bolt.view(parse)


# ---------------------------------------------------------------------- change detection


def _images_and_blobs(data: bytes, tmp_path: Path) -> tuple[tuple[bytes, bytes], ...]:
    """(ref, fingerprint) of the namespace's images bucket and content/blob bucket."""

    def both(tx: Tx) -> tuple[tuple[bytes, bytes], ...]:
        images = _images_bucket(tx)
        v1 = tx.root.bucket(b"v1")
        ns = v1.bucket(NAMESPACE.encode()) if v1 is not None else None
        content = ns.bucket(b"content") if ns is not None else None
        blobs = content.bucket(b"blob") if content is not None else None
        assert blobs is not None and not images.inline and not blobs.inline
        return (images.ref, images.fingerprint()), (blobs.ref, blobs.fingerprint())

    with BoltFile(_write(tmp_path, data, "probe.db")) as bolt:
        return bolt.view(both)


def test_ref_and_fingerprint_follow_what_the_last_operation_changed(
    corpus: Corpus, tmp_path: Path
) -> None:
    """The last ctr operation (a label on one image) rewrote the images bucket, not the blobs'."""
    images_before, blobs_before = _images_and_blobs(corpus.before_last, tmp_path)
    images_after, blobs_after = _images_and_blobs(corpus.pristine, tmp_path)
    assert images_before[0] != images_after[0]
    assert images_before[1] != images_after[1]
    assert blobs_before == blobs_after
    # A page-backed bucket's ref is its root page id (and sequence): 16 bytes.
    assert len(images_after[0]) == 16
    assert struct.unpack("<Q", images_after[0][:8])[0] == _images_root_pgid(
        corpus.pristine, tmp_path
    )
    # The fingerprint covers every page of the bucket's own tree: 300 names need several.
    assert len(images_after[1]) > 2 * (8 + PAGE_SIZE)
    assert _images_and_blobs(corpus.pristine, tmp_path) == (images_after, blobs_after)


def _leaf_pages_of_images(data: bytes, tmp_path: Path) -> list[int]:
    def leaves(tx: Tx) -> list[int]:
        root = _images_bucket(tx)._root
        node = tx.node(root)
        assert isinstance(node, bbolt._Branch)
        return list(node.children)

    with BoltFile(_write(tmp_path, data, "probe.db")) as bolt:
        return bolt.view(leaves)


def test_fingerprint_sees_entries_changed_under_an_unchanged_root(
    corpus: Corpus, tmp_path: Path
) -> None:
    """A root page reused across commits keeps the ref; the leaves below tell the change.

    A record's own page (a sub-bucket) is not covered: only reading it tells.
    """
    data = corpus.pristine
    (ref, fingerprint), _blobs = _images_and_blobs(data, tmp_path)
    leaf = _leaf_pages_of_images(data, tmp_path)[-1]
    assert page_header(data, leaf)[1] == FLAG_LEAF
    # The last byte of the leaf's used area (a key or value byte), as another commit left it.
    used = data[leaf * PAGE_SIZE : (leaf + 1) * PAGE_SIZE].rstrip(b"\0")
    at = leaf * PAGE_SIZE + len(used) - 1
    changed = _patched(data, (at, bytes([data[at] ^ 0x01])))
    (ref2, fingerprint2), _ = _images_and_blobs(changed, tmp_path)
    assert ref2 == ref
    assert fingerprint2 != fingerprint

    # An image record's page changed in place: same ref, same fingerprint.
    def single_page(tx: Tx) -> int:
        image = _images_bucket(tx).bucket(SINGLE.encode())
        assert image is not None and not image.inline
        return image._root

    with BoltFile(_write(tmp_path, data, "probe.db")) as bolt:
        record = bolt.view(single_page)
    at = data.index(b"createdat", record * PAGE_SIZE) + len(b"createdat") + 5
    assert at < (record + 1) * PAGE_SIZE
    rewritten = _patched(data, (at, bytes([data[at] ^ 0x01])))
    assert _images_and_blobs(rewritten, tmp_path)[0] == (ref, fingerprint)


def test_an_inline_bucket_is_its_own_fingerprint(corpus: Corpus, tmp_path: Path) -> None:
    def target(tx: Tx) -> tuple[bool, bytes, bytes]:
        image = _images_bucket(tx).bucket(SINGLE.encode())
        found = image.bucket(b"target") if image is not None else None
        assert found is not None
        return found.inline, found.ref, found.fingerprint()

    with BoltFile(_write(tmp_path, corpus.pristine)) as bolt:
        inline, ref, fingerprint = bolt.view(target)
    assert inline
    assert fingerprint == ref
    assert corpus.single_digest.encode() in ref


@pytest.mark.usefixtures("hang_guard")
def test_fingerprint_of_a_branch_pointing_at_itself_is_a_cycle(
    corpus: Corpus, tmp_path: Path
) -> None:
    data = corpus.pristine
    pgid = _images_root_pgid(data, tmp_path)
    broken = _patched(data, (pgid * PAGE_SIZE + 16 + 8, struct.pack("<Q", pgid)))
    bolt = BoltFile(_write(tmp_path, broken), attempts=2, sleep=lambda s: None)
    with bolt, pytest.raises(BoltFormatError, match="cycle"):
        bolt.view(lambda tx: _images_bucket(tx).fingerprint())
