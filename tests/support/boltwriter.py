"""A test-only bbolt writer: a tree of buckets to a file laid out as bbolt lays it out.

Fixtures for containerd versions that cannot run here are built from a real meta.db written by
containerd 1.6.20, read into a tree, transformed as the newer version's code would, and written
back with this writer under that version's bbolt options. It follows bbolt's own layout rules
(go.etcd.io/bbolt v1.3.10 and v1.4.0, the versions containerd 1.7 and 2.1 use; the on-disk
format is the same in both), written here from their documented behaviour:

- pages: a 16-byte header (id, flags, count, overflow); leaf elements (flags, pos, ksize,
  vsize), branch elements (pos, ksize, pgid), ``pos`` counted from the element; keys and values
  back to back after the element array (node.go:179 ``write``); a node larger than a page takes
  overflow pages.
- splitting: a node of more than 4 elements that does not fit a page is cut where the first
  part would pass half a page (``DefaultFillPercent`` 0.5 in bucket.go:27, at least 2 keys each
  side: node.go:206-290 ``split``/``splitTwo``/``splitIndex``); branch levels are built the
  same way over the children.
- buckets: a bucket without sub-buckets whose leaf (header included) is at most a quarter page
  is stored inline in its parent's value (bucket.go:802-830 ``inlineable``,
  ``maxInlineBucketSize``); others get their own pages. Children are spilled before their
  parent (bucket.go:742 ``spill``). The root bucket is always page-backed.
- freelist: with ``freelist=False`` (``NoFreelistSync``, containerd 1.7+) the meta's freelist
  id is all ones and no freelist page is written (tx.go:219-227); otherwise an empty freelist
  page follows the tree.
- file size: bbolt grows the file to its mmap size (32 KiB doubling, db.go:557 ``mmapSize``)
  unless ``NoGrowSync`` (``grow=False``), when the file ends with the last page written
  (db.go:1181-1225 ``grow``).

Line numbers are bbolt v1.4.0's. Bucket sequences are written as 0 (containerd's metadata
never reads them).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Union

MAGIC = 0xED0CDAED
FLAG_BRANCH = 0x01
FLAG_LEAF = 0x02
FLAG_META = 0x04
FLAG_FREELIST = 0x10
LEAF_BUCKET = 0x01
NO_FREELIST = (1 << 64) - 1
HEADER = 16
ELEMENT = 16
MIN_KEYS = 2
FILL = 0.5
MIN_MMAP = 32 << 10

#: A bucket: keys to plain values (bytes) or to nested buckets.
Tree = Mapping[bytes, Union[bytes, "Tree"]]


def fnv1a64(data: bytes) -> int:
    """bbolt's meta checksum (written independently of the reader under test)."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _page(pgid: int, flags: int, elements: list[tuple[int, bytes, bytes | int]]) -> bytes:
    """A leaf (flags, key, value) or branch (0, key, child pgid) page image, not padded."""
    count = len(elements)
    table = bytearray()
    data = bytearray()
    offset = HEADER + ELEMENT * count
    for i, (eflags, key, value) in enumerate(elements):
        pos = offset + len(data) - (HEADER + ELEMENT * i)
        if flags == FLAG_LEAF:
            assert isinstance(value, bytes)
            table += struct.pack("<IIII", eflags, pos, len(key), len(value))
            data += key + value
        else:
            assert isinstance(value, int)
            table += struct.pack("<IIQ", pos, len(key), value)
            data += key
    return struct.pack("<QHHI", pgid, flags, count, 0) + bytes(table) + bytes(data)


def _size(elements: list[tuple[int, bytes, bytes | int]]) -> int:
    return HEADER + sum(
        ELEMENT + len(k) + (len(v) if isinstance(v, bytes) else 0) for _, k, v in elements
    )


class BoltWriter:
    """Lay out one transaction's tree into pages; :meth:`file` returns the bytes."""

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self.pages: dict[int, bytes] = {}
        self.next_pgid = 2

    def _allocate(self, image: bytes) -> int:
        """Store a page image (with its overflow pages) at the next free page id."""
        ps = self.page_size
        count = -(-len(image) // ps)
        pgid = self.next_pgid
        self.next_pgid += count
        header = struct.pack("<QHHI", pgid, *struct.unpack_from("<HH", image, 8), count - 1)
        self.pages[pgid] = (header + image[HEADER:]).ljust(count * ps, b"\0")
        return pgid

    def _split(
        self, flags: int, elements: list[tuple[int, bytes, bytes | int]]
    ) -> list[list[tuple[int, bytes, bytes | int]]]:
        """Cut a node into pages as bbolt's ``node.split`` does."""
        out = []
        rest = elements
        threshold = self.page_size * FILL
        while len(rest) > MIN_KEYS * 2 and _size(rest) >= self.page_size:
            size = HEADER
            index = 0
            for i in range(len(rest) - MIN_KEYS):
                index = i
                _, key, value = rest[i]
                elsize = ELEMENT + len(key) + (len(value) if isinstance(value, bytes) else 0)
                if i >= MIN_KEYS and size + elsize > threshold:
                    break
                size += elsize
            out.append(rest[:index])
            rest = rest[index:]
        out.append(rest)
        return out

    def _tree(self, elements: list[tuple[int, bytes, bytes | int]]) -> int:
        """Write a page-backed bucket's B+tree; its root page id."""
        flags = FLAG_LEAF
        level = elements
        while True:
            nodes = self._split(flags, level)
            ids = [self._allocate(_page(0, flags, node)) for node in nodes]
            if len(ids) == 1:
                return ids[0]
            level = [(0, node[0][1], pgid) for node, pgid in zip(nodes, ids, strict=True)]
            flags = FLAG_BRANCH

    def bucket_value(self, tree: Tree, *, inline: bool = True) -> bytes:
        """The value a parent stores for ``tree``: inline, or a header naming its root page."""
        elements: list[tuple[int, bytes, bytes | int]] = []
        for key in sorted(tree):
            value = tree[key]
            if isinstance(value, bytes):
                elements.append((0, key, value))
            else:
                elements.append((LEAF_BUCKET, key, self.bucket_value(value)))
        nested = any(flags & LEAF_BUCKET for flags, _, _ in elements)
        if inline and not nested and _size(elements) <= self.page_size // 4:
            return struct.pack("<QQ", 0, 0) + _page(0, FLAG_LEAF, elements)
        return struct.pack("<QQ", self._tree(elements), 0)

    def file(self, tree: Tree, *, txid: int, freelist: bool = True, grow: bool = True) -> bytes:
        """The whole file for ``tree`` as the root bucket, committed as transaction ``txid``.

        Both meta pages are valid: ``txid`` in slot ``txid % 2`` and ``txid - 1`` (the same
        tree) in the other, as after two commits.
        """
        root = struct.unpack_from("<Q", self.bucket_value(tree, inline=False))[0]
        freelist_id = NO_FREELIST
        if freelist:
            freelist_id = self._allocate(struct.pack("<QHHI", 0, FLAG_FREELIST, 0, 0))
        pgid = self.next_pgid
        ps = self.page_size
        used = pgid * ps
        size = used
        if grow:
            size = MIN_MMAP
            while size < used + ps:  # bbolt grows to hold the high-water mark plus one page
                size *= 2
        out = bytearray(size)
        for slot_txid in (txid - 1, txid):
            slot = slot_txid % 2
            body = struct.pack("<IIIIQQQQQ", MAGIC, 2, ps, 0, root, 0, freelist_id, pgid, slot_txid)
            meta = struct.pack("<QHHI", slot, FLAG_META, 0, 0) + body
            meta += struct.pack("<Q", fnv1a64(body))
            out[slot * ps : slot * ps + len(meta)] = meta
        for page_id, image in self.pages.items():
            out[page_id * ps : page_id * ps + len(image)] = image
        return bytes(out)


def write_bolt(
    tree: Tree, *, page_size: int = 4096, txid: int = 100, freelist: bool = True, grow: bool = True
) -> bytes:
    """A bbolt file holding ``tree`` (see :class:`BoltWriter`)."""
    return BoltWriter(page_size).file(tree, txid=txid, freelist=freelist, grow=grow)
