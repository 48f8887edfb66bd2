"""The test-only bbolt writer (tests/support/boltwriter.py) makes files the reader reads back."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imagepushd.watch.bbolt import BoltFile, Bucket, Tx
from tests.support.boltwriter import FLAG_BRANCH, NO_FREELIST, BoltWriter, Tree, write_bolt


def read_back(path: Path) -> dict[bytes, object]:
    def dump(bucket: Bucket) -> dict[bytes, object]:
        return {k: dump(v) if isinstance(v, Bucket) else v for k, v in bucket.items()}

    def walk(tx: Tx) -> dict[bytes, object]:
        return dump(tx.root)

    with BoltFile(path) as bolt:
        return bolt.view(walk)


def sample(page_size: int) -> Tree:
    many = {f"key-{i:05d}".encode(): bytes([i % 251]) * (i % 90) for i in range(3000)}
    return {
        b"v1": {
            b"version": b"\x06",
            b"many": many,  # branch pages
            b"big": {b"blob": b"x" * (3 * page_size + 5)},  # overflow pages
            b"empty": {},
            b"nested": {b"a": {b"b": {b"c": b"d"}}},
        },
        b"other": {b"k": b""},
    }


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
@pytest.mark.parametrize(("freelist", "grow"), [(True, True), (False, True), (False, False)])
def test_round_trip(tmp_path: Path, page_size: int, freelist: bool, grow: bool) -> None:
    tree = sample(page_size)
    data = write_bolt(tree, page_size=page_size, txid=7, freelist=freelist, grow=grow)
    path = tmp_path / "db"
    path.write_bytes(data)
    assert read_back(path) == tree
    with BoltFile(path) as bolt:
        meta = bolt.meta()
    assert (meta.page_size, meta.txid) == (page_size, 7)
    assert (meta.freelist == NO_FREELIST) is not freelist
    if grow:
        assert len(data) > meta.pgid * page_size
        assert len(data) & (len(data) - 1) == 0  # bbolt's mmap sizes double
    else:
        assert len(data) == meta.pgid * page_size


def test_inline_only_up_to_a_quarter_page(tmp_path: Path) -> None:
    """bbolt inlines a leaf bucket of at most pageSize/4 bytes (header included)."""
    writer = BoltWriter(4096)
    fits = {b"k": b"v" * (1024 - 16 - 16 - 1)}
    assert struct.unpack_from("<Q", writer.bucket_value(fits))[0] == 0
    over = {b"k": b"v" * (1024 - 16 - 16)}
    assert struct.unpack_from("<Q", writer.bucket_value(over))[0] != 0
    with_bucket = {b"k": {}}
    assert struct.unpack_from("<Q", writer.bucket_value(with_bucket))[0] != 0


def test_large_buckets_get_branch_pages(tmp_path: Path) -> None:
    writer = BoltWriter(4096)
    value = writer.bucket_value(sample(4096)[b"v1"][b"many"])  # type: ignore[index]
    root = struct.unpack_from("<Q", value)[0]
    assert struct.unpack_from("<H", writer.pages[root], 8)[0] == FLAG_BRANCH
