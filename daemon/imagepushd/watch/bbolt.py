"""A read-only, lock-free reader of bbolt files.

containerd keeps its metadata in a bbolt file it holds an exclusive ``flock`` on, and a
restarting containerd waits forever for that lock, so this reader never locks: it opens the
file ``O_RDONLY`` and reads pages with ``pread`` (no mmap, so a truncated file is a short read,
not a SIGBUS). Consistency comes from the zero-advance rule: a walk of tree N is accepted only
if the newest valid meta page still holds exactly N after the walk; anything else is retried
with bounded, jittered backoff. A structural error on a stable txid is real corruption and is
raised as :class:`BoltFormatError` rather than looped on.

Every offset, count and length read from the file is bounds-checked before use, page visits
are cycle-checked, and no allocation is sized by a field the file could lie about beyond the
file's own size. This module knows nothing about containerd.
"""

from __future__ import annotations

import bisect
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from imagepushd.errors import BoltFormatError, ContainerdError, SnapshotBusyError

T = TypeVar("T")

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER_SIZE = 16
ELEMENT_SIZE = 16
BUCKET_HEADER_SIZE = 16
META_OFFSET = PAGE_HEADER_SIZE
META_SIZE = 64

FLAG_BRANCH = 0x01
FLAG_LEAF = 0x02
FLAG_META = 0x04
LEAF_BUCKET = 0x01

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 20
NODE_CACHE_SIZE = 64
#: Element arrays of up to this many elements are unpacked with one precompiled struct each.
_ELEMENT_STRUCTS = 256
#: Leaves of up to this many elements (record-sized: one image, one target) have their checked
#: layout remembered per transaction, at most this many layouts (see ``Tx.parse_leaf``).
_SHAPE_MAX_COUNT = 16
_SHAPES_PER_TX = 1024

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1

#: Where an error is, for its message: a string, a page id (``page N``), or a callable building
#: one. The callable is only called when an error is raised: hot paths never format locations.
Where = str | int | Callable[[], str]


def where_text(where: Where) -> str:
    """The text of a :data:`Where`."""
    if isinstance(where, str):
        return where
    if isinstance(where, int):
        return f"page {where}"
    return where()


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash, bbolt's meta checksum."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _U64
    return h


class _Layout:
    """Struct layouts for one byte order (bbolt writes the host CPU's order)."""

    def __init__(self, order: str) -> None:
        self.order = order
        self.page_header = struct.Struct(order + "QHHI")
        self.meta = struct.Struct(order + "IIIIQQQQQQ")
        self.bucket_header = struct.Struct(order + "QQ")
        self.element = struct.Struct(order + "IIII")
        self.branch_element = struct.Struct(order + "IIQ")
        self._elements: dict[int, struct.Struct] = {}

    def elements(self, count: int) -> struct.Struct:
        """The struct of a leaf element array of ``count`` elements, flattened (cached)."""
        found = self._elements.get(count)
        if found is None:
            found = self._elements[count] = struct.Struct(f"{self.order}{4 * count}I")
        return found


_LAYOUTS = {b"\xed\xda\x0c\xed": _Layout("<"), b"\xed\x0c\xda\xed": _Layout(">")}


@dataclass(frozen=True)
class Meta:
    """One valid meta page: where the tree of transaction ``txid`` starts."""

    page_size: int
    root: int
    sequence: int
    freelist: int
    pgid: int
    txid: int
    raw: bytes
    layout: _Layout

    @classmethod
    def parse(cls, raw: bytes) -> Meta | None:
        """Decode a 64-byte meta struct; None when it is not a valid meta."""
        if len(raw) < META_SIZE:
            return None
        layout = _LAYOUTS.get(raw[0:4])
        if layout is None:
            return None
        magic, version, page_size, _flags, root, seq, freelist, pgid, txid, checksum = (
            layout.meta.unpack_from(raw, 0)
        )
        if magic != MAGIC or version != VERSION:
            return None
        if checksum != fnv1a64(raw[:56]):
            return None
        return cls(page_size, root, seq, freelist, pgid, txid, bytes(raw[:META_SIZE]), layout)


class Leaf:
    """A parsed leaf page: parallel lists of keys, element flags and values.

    ``end`` is the offset in the parsed buffer just past the last element's data: the leaf is a
    function of the buffer's bytes up to ``end`` (and of the byte order) alone. ``shape`` is an
    opaque token or None: leaves parsed in one transaction with the same token have the same
    keys, element flags and value positions (so a reader may cache per shape what it derives
    from keys and flags alone).
    """

    __slots__ = ("end", "flags", "keys", "shape", "values")

    def __init__(
        self,
        keys: list[bytes],
        flags: list[int],
        values: list[bytes],
        end: int = 0,
        shape: object = None,
    ) -> None:
        self.keys = keys
        self.flags = flags
        self.values = values
        self.end = end
        self.shape = shape


class _Branch:
    """A parsed branch page: separator keys and child page ids."""

    __slots__ = ("children", "keys")

    def __init__(self, keys: list[bytes], children: list[int]) -> None:
        self.keys = keys
        self.children = children


_Node = Leaf | _Branch


class _Shape:
    """A checked leaf layout: one struct extracting every key and value, and the keys seen."""

    __slots__ = ("end", "extract", "flags", "keys")

    def __init__(
        self, extract: struct.Struct, keys: tuple[bytes, ...], flags: list[int], end: int
    ) -> None:
        self.extract = extract
        self.keys = keys
        self.flags = flags
        self.end = end


class Tx:
    """A read view of one meta's tree; valid only inside :meth:`BoltFile.view`."""

    def __init__(self, fd: int, meta: Meta, file_size: int, name: str) -> None:
        self._fd = fd
        self.meta = meta
        self._layout = meta.layout
        self._name = name
        self._page_size = meta.page_size
        self._pgid = meta.pgid
        self._cache: dict[int, _Node] = {}
        self._shapes: dict[bytes, _Shape] = {}
        if meta.root < 2 or meta.root >= meta.pgid:
            raise self.error(f"root page {meta.root} outside [2, {meta.pgid})")
        if meta.pgid * meta.page_size > file_size:
            raise self.error(
                f"file is {file_size} bytes but txid {meta.txid} uses "
                f"{meta.pgid * meta.page_size} (truncated)"
            )

    @property
    def txid(self) -> int:
        """The transaction id this view reads."""
        return self.meta.txid

    @property
    def byte_order(self) -> str:
        """The file's byte order as a struct prefix (``<`` or ``>``)."""
        return self._layout.order

    def error(self, what: str) -> BoltFormatError:
        """A format error naming the file and transaction."""
        return BoltFormatError(f"{self._name}: txid {self.meta.txid}: {what}")

    @property
    def root(self) -> Bucket:
        """The root bucket."""
        return Bucket(self, self.meta.root, None)

    def node(self, pgid: int) -> _Node:
        """Read and parse page ``pgid`` (a branch or leaf), with a small per-view cache."""
        cached = self._cache.get(pgid)
        if cached is not None:
            return cached
        buf, flags, count = self.read_page(pgid)
        node = self.parse_page(buf, flags, count, pgid)
        if len(self._cache) >= NODE_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[pgid] = node
        return node

    def read_page(self, pgid: int) -> tuple[bytes, int, int]:
        """Page ``pgid`` and its overflow pages, unparsed and uncached: (bytes, flags, count).

        The page id is bounds-checked, the header must name ``pgid`` and the overflow must stay
        below the high-water mark; the element array is not looked at (see :meth:`parse_page`).
        """
        if pgid < 2 or pgid >= self._pgid:
            raise self.error(f"page {pgid} outside [2, {self._pgid})")
        ps = self._page_size
        buf = self._pread(ps, pgid * ps, pgid)
        page_id, flags, count, overflow = self._layout.page_header.unpack_from(buf, 0)
        if page_id != pgid:
            raise self.error(f"page {pgid} has header id {page_id}")
        if overflow:
            if pgid + overflow >= self._pgid:
                raise self.error(f"page {pgid} overflow {overflow} runs past {self._pgid}")
            buf = self._pread((overflow + 1) * ps, pgid * ps, pgid)
        return buf, flags, count

    def _pread(self, size: int, offset: int, pgid: int) -> bytes:
        try:
            buf = os.pread(self._fd, size, offset)
        except OSError as exc:
            raise ContainerdError(f"{self._name}: reading page {pgid}: {exc.strerror}") from exc
        if len(buf) != size:
            raise self.error(f"short read of page {pgid} ({len(buf)} of {size} bytes)")
        return buf

    def parse_page(self, buf: bytes, flags: int, count: int, where: Where) -> _Node:
        """Decode the element array of a branch or leaf page image held in ``buf``."""
        if flags == FLAG_LEAF:
            return self.parse_leaf(buf, 0, count, where)
        end = PAGE_HEADER_SIZE + ELEMENT_SIZE * count
        if end > len(buf):
            raise self.error(f"{where_text(where)}: {count} elements overflow the page")
        if flags == FLAG_BRANCH:
            return self._parse_branch(buf, count, where)
        raise self.error(f"{where_text(where)}: unexpected page flags {flags:#x}")

    def parse_leaf(self, buf: bytes, offset: int, count: int, where: Where) -> Leaf:
        """Decode the ``count`` elements of the leaf page image at ``buf[offset:]``.

        Every element must lie inside ``buf``, after the element array and after the previous
        element's data (no overlap, so the copies never exceed the page), with a non-empty key
        greater than the previous one.

        Those checks depend on the element array, the keys and the length of ``buf`` only. A
        small leaf whose element array was checked before in this transaction (10,000 image
        buckets share a few) is therefore only checked for fitting in ``buf`` and for having
        the same keys; everything else is fully checked again.
        """
        base = offset + PAGE_HEADER_SIZE
        floor = base + ELEMENT_SIZE * count  # data starts after the elements
        if floor > len(buf):
            raise self.error(f"{where_text(where)}: {count} elements overflow the page")
        elements = buf[base:floor] if 0 < count <= _SHAPE_MAX_COUNT else b""
        if elements:
            known = self._known_leaf(buf, offset, elements)
            if known is not None:
                return known
        flat, leaf = self._checked_leaf(buf, offset, count, where)
        if elements and len(self._shapes) < _SHAPES_PER_TX:
            leaf.shape = self._shapes[elements] = self._shape(flat, leaf, offset)
        return leaf

    def _known_leaf(self, buf: bytes, offset: int, elements: bytes) -> Leaf | None:
        """The leaf at ``buf[offset:]`` if its element array is a known shape with its keys."""
        shape = self._shapes.get(elements)
        if shape is None or offset + shape.end > len(buf):
            return None
        parts = shape.extract.unpack_from(buf, offset)
        keys_seen = parts[0::2]
        if keys_seen != shape.keys:
            return None
        return Leaf(
            list(keys_seen), list(shape.flags), list(parts[1::2]), offset + shape.end, shape
        )

    def _checked_leaf(
        self, buf: bytes, offset: int, count: int, where: Where
    ) -> tuple[tuple[int, ...], Leaf]:
        """The flat element array and the leaf at ``buf[offset:]``, every element checked."""
        size = len(buf)
        base = offset + PAGE_HEADER_SIZE
        floor = base + ELEMENT_SIZE * count
        layout = self._layout
        if count <= _ELEMENT_STRUCTS:
            flat = layout.elements(count).unpack_from(buf, base)
        else:
            flat = struct.unpack_from(f"{layout.order}{4 * count}I", buf, base)
        keys: list[bytes] = []
        values: list[bytes] = []
        prev = b""
        for i in range(1, 4 * count, 4):
            start = base + flat[i]
            mid = start + flat[i + 1]
            stop = mid + flat[i + 2]
            if mid == start or stop > size:
                raise self.error(f"{where_text(where)}: element at {base - offset} out of bounds")
            if start < floor:
                raise self.error(
                    f"{where_text(where)}: element at {base - offset} overlaps earlier data"
                )
            floor = stop
            key = buf[start:mid]
            if key <= prev:
                raise self.error(f"{where_text(where)}: keys not in ascending order")
            prev = key
            keys.append(key)
            values.append(buf[mid:stop])
            base += ELEMENT_SIZE
        return flat, Leaf(keys, list(flat[0::4]), values, floor)

    @staticmethod
    def _shape(flat: tuple[int, ...], leaf: Leaf, offset: int) -> _Shape:
        """The layout of a leaf that passed every check, relative to its page start."""
        fmt = ["<"]
        cursor = 0
        element = PAGE_HEADER_SIZE
        for i in range(1, len(flat), 4):
            start = element + flat[i]
            fmt.append(f"{start - cursor}x{flat[i + 1]}s{flat[i + 2]}s")
            cursor = start + flat[i + 1] + flat[i + 2]
            element += ELEMENT_SIZE
        assert cursor == leaf.end - offset
        return _Shape(struct.Struct("".join(fmt)), tuple(leaf.keys), leaf.flags[:], cursor)

    def _parse_branch(self, buf: bytes, count: int, where: Where) -> _Branch:
        if count == 0:
            raise self.error(f"{where_text(where)}: empty branch page")
        keys: list[bytes] = []
        children: list[int] = []
        size = len(buf)
        elements = self._layout.branch_element.iter_unpack(
            buf[PAGE_HEADER_SIZE : PAGE_HEADER_SIZE + ELEMENT_SIZE * count]
        )
        base = PAGE_HEADER_SIZE
        floor = PAGE_HEADER_SIZE + ELEMENT_SIZE * count
        prev = b""
        for pos, ksize, child in elements:
            start = base + pos
            stop = start + ksize
            if ksize == 0 or stop > size:
                raise self.error(f"{where_text(where)}: element at {base} out of bounds")
            if start < floor:
                raise self.error(f"{where_text(where)}: element at {base} overlaps earlier data")
            floor = stop
            key = buf[start:stop]
            if key <= prev:
                raise self.error(f"{where_text(where)}: keys not in ascending order")
            prev = key
            keys.append(key)
            children.append(child)
            base += ELEMENT_SIZE
        return _Branch(keys, children)

    def bucket_value(self, value: bytes, where: Where) -> int | Leaf:
        """Interpret a sub-bucket value: a page-backed root's page id, or an inline leaf.

        An inline bucket's leaf is parsed and checked here; it is a function of ``value`` and
        the byte order alone, so callers may memoise it by ``value``.
        """
        if len(value) < BUCKET_HEADER_SIZE:
            raise self.error(f"{where_text(where)}: bucket value of {len(value)} bytes")
        root, _seq = self._layout.bucket_header.unpack_from(value, 0)
        if root != 0:
            if len(value) != BUCKET_HEADER_SIZE:
                raise self.error(
                    f"{where_text(where)}: page-backed bucket value of {len(value)} bytes"
                )
            return int(root)
        if len(value) < BUCKET_HEADER_SIZE + PAGE_HEADER_SIZE:
            raise self.error(f"{where_text(where)}: inline bucket without a page header")
        _id, flags, count, _overflow = self._layout.page_header.unpack_from(
            value, BUCKET_HEADER_SIZE
        )
        if flags != FLAG_LEAF:
            raise self.error(f"{where_text(where)}: inline bucket is not a leaf (flags {flags:#x})")
        return self.parse_leaf(
            value, BUCKET_HEADER_SIZE, count, lambda: f"{where_text(where)} (inline)"
        )

    def open_bucket(self, value: bytes, where: Where) -> Bucket:
        """Interpret a sub-bucket value: a page-backed root or an inline page image."""
        found = self.bucket_value(value, where)
        if isinstance(found, Leaf):
            return Bucket(self, 0, found, value)
        return Bucket(self, found, None, value)


class Bucket:
    """A bucket: ordered keys mapping to values or to nested buckets.

    ``value`` is what its parent holds for it (see :attr:`ref`), empty for the root bucket.
    """

    __slots__ = ("_inline", "_root", "_tx", "_value")

    def __init__(self, tx: Tx, root: int, inline: Leaf | None, value: bytes = b"") -> None:
        self._tx = tx
        self._root = root
        self._inline = inline
        self._value = value

    @property
    def ref(self) -> bytes:
        """What the parent bucket holds for this one: the root page id, or the inline page.

        bbolt is copy-on-write: a commit that changes anything in a bucket writes its changed
        pages, and every page above them up to the bucket's root, to pages that were free, and
        never writes a page in use. So between two consecutive transactions, an equal ``ref``
        means equal data, sub-buckets included. Across several commits, a page freed by one
        can be reused by the next (the same root page id may then hold other data): see
        :meth:`fingerprint`. An inline bucket's ``ref`` holds all its data.
        """
        return self._value

    @property
    def inline(self) -> bool:
        """Whether the bucket is stored in its parent's leaf (no pages of its own)."""
        return self._inline is not None

    def fingerprint(self) -> bytes:
        """Bytes that are equal for two versions of this bucket holding the same entries.

        That is the same keys and values, where a page-backed sub-bucket's value is the id of
        its root page: the sub-bucket's own pages are not covered. An inline bucket gives its
        value (header and page image); a page-backed one the ids and bytes of every page of its
        own tree (branches and leaves), read without parsing leaves.

        Unlike :attr:`ref`, this sees a change hidden by page reuse across several commits
        (a root page reused by a bucket with other entries), except in sub-buckets: one
        rewritten on its old root page (a name deleted and created again) keeps the fingerprint
        the same, and only reading the sub-buckets tells. Costs a read of every page of the
        bucket's own tree (about 250 for 10,000 image names).
        """
        if self._inline is not None:
            return self._value
        tx = self._tx
        parts: list[bytes] = []
        visited: set[int] = set()
        stack = [self._root]
        while stack:
            pgid = stack.pop()
            if pgid in visited:
                raise tx.error(f"page {pgid} reached twice in one bucket (cycle)")
            visited.add(pgid)
            buf, flags, count = tx.read_page(pgid)
            parts += (pgid.to_bytes(8, "little"), buf)
            if flags == FLAG_BRANCH:
                node = tx.parse_page(buf, flags, count, pgid)
                assert isinstance(node, _Branch)
                stack += reversed(node.children)
            elif flags != FLAG_LEAF:
                raise tx.error(f"page {pgid}: unexpected page flags {flags:#x}")
        return b"".join(parts)

    def _where(self) -> str:
        return "inline bucket" if self._inline is not None else f"bucket at page {self._root}"

    def _key_where(self, key: bytes) -> Callable[[], str]:
        return lambda: f"{self._where()} key {key!r}"

    def _leaves(self) -> Iterator[Leaf]:
        """Yield the leaves in key order, checking for cycles and key ordering across pages."""
        if self._inline is not None:
            yield self._inline
            return
        tx = self._tx
        visited: set[int] = set()
        # Each stack entry: (pgid, lower bound key, upper bound key or None).
        stack: list[tuple[int, bytes, bytes | None]] = [(self._root, b"", None)]
        while stack:
            pgid, low, high = stack.pop()
            if pgid in visited:
                raise tx.error(f"page {pgid} reached twice in one bucket (cycle)")
            visited.add(pgid)
            node = tx.node(pgid)
            if node.keys and (node.keys[0] < low or (high is not None and node.keys[-1] >= high)):
                raise tx.error(f"page {pgid}: keys outside the range its parent gives")
            if isinstance(node, Leaf):
                yield node
                continue
            keys = node.keys
            bounds: list[bytes | None] = [*keys[1:], high]
            for i in range(len(keys) - 1, -1, -1):
                stack.append((node.children[i], keys[i], bounds[i]))

    def _entry(self, key: bytes) -> tuple[int, bytes] | None:
        """Descend to ``key``'s leaf; return (flags, value) or None."""
        if self._inline is not None:
            leaf = self._inline
        else:
            tx = self._tx
            path: set[int] = set()
            pgid = self._root
            while True:
                if pgid in path:
                    raise tx.error(f"page {pgid} is its own ancestor (cycle)")
                path.add(pgid)
                node = tx.node(pgid)
                if isinstance(node, Leaf):
                    leaf = node
                    break
                i = bisect.bisect_right(node.keys, key) - 1
                pgid = node.children[max(i, 0)]
        i = bisect.bisect_left(leaf.keys, key)
        if i < len(leaf.keys) and leaf.keys[i] == key:
            return leaf.flags[i], leaf.values[i]
        return None

    def get(self, key: bytes) -> bytes | None:
        """The plain value at ``key``; None if absent or if ``key`` names a sub-bucket."""
        entry = self._entry(key)
        if entry is None or entry[0] & LEAF_BUCKET:
            return None
        return entry[1]

    def bucket(self, key: bytes) -> Bucket | None:
        """The sub-bucket at ``key``; None if absent or a plain value."""
        entry = self._entry(key)
        if entry is None or not entry[0] & LEAF_BUCKET:
            return None
        return self._tx.open_bucket(entry[1], self._key_where(key))

    def raw_items(self) -> Iterator[tuple[bytes, int, bytes]]:
        """Every (key, element flags, raw value) in ascending key order, sub-buckets unopened.

        For readers that interpret sub-bucket values themselves (:meth:`Tx.bucket_value`);
        the key order across pages is checked as in :meth:`items`.
        """
        prev = b""
        for leaf in self._leaves():
            keys = leaf.keys
            if keys:
                if keys[0] <= prev:
                    raise self._tx.error(f"{self._where()}: keys repeat across pages")
                prev = keys[-1]
            yield from zip(keys, leaf.flags, leaf.values, strict=True)

    def items(self) -> Iterator[tuple[bytes, bytes | Bucket]]:
        """Every (key, value-or-bucket) in ascending key order."""
        open_bucket = self._tx.open_bucket
        for key, flags, value in self.raw_items():
            if flags & LEAF_BUCKET:
                yield key, open_bucket(value, self._key_where(key))
            else:
                yield key, value

    def keys(self) -> Iterator[bytes]:
        """Every key in ascending order, without opening sub-buckets."""
        for leaf in self._leaves():
            yield from leaf.keys

    def buckets(self) -> Iterator[tuple[bytes, Bucket]]:
        """Only the sub-buckets, in key order (plain values are skipped)."""
        for key, value in self.items():
            if isinstance(value, Bucket):
                yield key, value

    def to_dict(self) -> dict[bytes, bytes | Bucket]:
        """All entries at once; convenient for small buckets such as one image record."""
        return dict(self.items())


class BoltFile:
    """A bbolt file opened for lock-free, consistent reads.

    ``sleep`` and ``rand`` are injected so tests can drive the retry schedule.
    """

    def __init__(
        self,
        path: Path,
        *,
        attempts: int = 10,
        backoff: tuple[float, float] = (0.01, 0.2),
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.path = Path(path)
        self._attempts = attempts
        self._backoff = backoff
        self._sleep = sleep
        self._rand = rand
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None

    def __enter__(self) -> BoltFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file descriptor (a later read reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._ino = None

    def _open(self) -> int:
        """Return an fd for the file at ``path``, reopening it if the file was replaced."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.close()
            raise ContainerdError(f"{self.path}: no such file") from None
        except OSError as exc:
            self.close()
            raise ContainerdError(f"{self.path}: {exc.strerror}") from exc
        if self._fd is not None and self._ino == (st.st_dev, st.st_ino):
            return self._fd
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise ContainerdError(
                f"{self.path}: permission denied (run as root or as containerd's rootless user)"
            ) from None
        except OSError as exc:
            raise ContainerdError(f"{self.path}: {exc.strerror}") from exc
        fst = os.fstat(fd)
        self._fd, self._ino = fd, (fst.st_dev, fst.st_ino)
        return fd

    def _read_metas(self, fd: int) -> Meta:
        """The valid meta with the highest txid, probing for meta 1 as bbolt does."""
        meta0 = Meta.parse(self._pread_meta(fd, PAGE_HEADER_SIZE + META_SIZE, 0)[META_OFFSET:])
        if meta0 is not None and not MIN_PAGE_SIZE <= meta0.page_size <= MAX_PAGE_SIZE:
            meta0 = None
        offsets = [meta0.page_size] if meta0 else [1024 << i for i in range(15)]
        meta1 = self._probe_meta1(fd, offsets)
        valid = [m for m in (meta0, meta1) if m is not None]
        if not valid:
            raise BoltFormatError(f"{self.path}: not a bbolt file (no valid meta page)")
        return max(valid, key=lambda m: m.txid)

    def _probe_meta1(self, fd: int, offsets: list[int]) -> Meta | None:
        """Meta 1 at the first of ``offsets`` (page sizes) where a valid one names that size."""
        for offset in offsets:
            candidate = Meta.parse(self._pread_meta(fd, META_SIZE, offset + META_OFFSET))
            if (
                candidate is not None
                and candidate.page_size == offset
                and MIN_PAGE_SIZE <= offset <= MAX_PAGE_SIZE
            ):
                return candidate
        return None

    def _pread_meta(self, fd: int, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset``; an OSError as a ContainerdError naming the file."""
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            raise ContainerdError(f"{self.path}: {exc.strerror}") from exc

    def meta(self) -> Meta:
        """The newest valid meta page now (cheap: a change check for watchers)."""
        return self._read_metas(self._open())

    def view(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` on a consistent snapshot and return its result.

        ``fn`` must only read. It is re-run when containerd committed during the walk.
        """
        low, high = self._backoff
        for attempt in range(self._attempts):
            fd = self._open()
            before = self._read_metas(fd)
            try:
                result = fn(Tx(fd, before, os.fstat(fd).st_size, str(self.path)))
            except ContainerdError:
                # A walk of a moving tree can fail in any way the data allows (a torn read can
                # even lose the schema bucket): only a stable txid makes the error real.
                if self._read_metas(fd).raw == before.raw:
                    raise
            else:
                if self._read_metas(fd).raw == before.raw:
                    return result
            if attempt + 1 < self._attempts:
                delay = min(high, low * (2**attempt))
                self._sleep(delay * (0.5 + self._rand() / 2))
        raise SnapshotBusyError(
            f"{self.path}: changed during each of {self._attempts} snapshot attempts"
        )
