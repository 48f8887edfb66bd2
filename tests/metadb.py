"""Real containerd meta.db files for reader tests, built once per test process.

A private containerd (``tests.support``) imports a single-manifest image and a multi-platform
index, tags ~300 names (so the ``images`` bucket needs branch pages), puts three 4000-byte labels
on one image (values on overflow pages) and is stopped. Both the final meta.db and the one from
before the last ``ctr`` operation are kept as bytes, with what ``ctr`` printed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import ImageBuilder
from tests.support.process import require_tools

PAGE_SIZE = 4096
NAMESPACE = "default"
SINGLE = "registry.example.com/bbolt/single:v1"
INDEX = "registry.example.com/bbolt/index:v1"
TAG_COUNT = 300
BIG_LABELS = {f"test.example.com/big.{i}": chr(ord("a") + i) * 4000 for i in range(3)}
LAST_LABEL = ("test.example.com/last", "1")


@dataclass(frozen=True)
class Corpus:
    """meta.db bytes and what ``ctr`` reported for them."""

    pristine: bytes
    before_last: bytes
    images: dict[str, str]
    images_before_last: dict[str, str]
    labels: dict[str, dict[str, str]]
    single_digest: str
    index_digest: str
    blob_digests: frozenset[str]


def tag_names() -> list[str]:
    return [f"registry.example.com/bbolt/tagged-{i:04d}:latest" for i in range(TAG_COUNT)]


def build_corpus(base: Path) -> Corpus:
    """Drive a private containerd under ``base`` and return the meta.db bytes it wrote."""
    require_tools("containerd", "ctr", hint="install the Debian package containerd")
    builder = ImageBuilder()
    single = builder.manifest([builder.layer(1000, "bbolt/single/0"), builder.layer(10, "s/1")])
    amd = builder.manifest([builder.layer(500, "bbolt/idx/amd")])
    arm = builder.manifest(
        [builder.layer(500, "bbolt/idx/arm")], architecture="arm64", variant="v8"
    )
    index = builder.index([amd, arm])
    archive = base / "images.tar"
    builder.write_oci_archive(archive, {SINGLE: single, INDEX: index})
    blob_digests = frozenset(b.digest for root in (single, index) for b in builder.blobs_of(root))

    ctrd = Containerd(base / "containerd")
    try:
        ctrd.start()
        ctrd.import_archive(archive, namespace=NAMESPACE)
        names = tag_names()
        for i in range(0, len(names), 50):
            ctrd.tag(SINGLE, *names[i : i + 50], namespace=NAMESPACE)
        ctrd.label(INDEX, *(f"{k}={v}" for k, v in BIG_LABELS.items()), namespace=NAMESPACE)
        images_before_last = ctrd.images(NAMESPACE)
        # Stop before copying: containerd's GC may commit at any moment while it runs.
        ctrd.stop()
        before_last = ctrd.meta_db.read_bytes()
        ctrd.start()
        ctrd.label(SINGLE, f"{LAST_LABEL[0]}={LAST_LABEL[1]}", namespace=NAMESPACE)
        images = ctrd.images(NAMESPACE)
        labels = {name: ctrd.labels(name, NAMESPACE) for name in (SINGLE, INDEX)}
        ctrd.stop()
        pristine = ctrd.meta_db.read_bytes()
    finally:
        ctrd.close()
    return Corpus(
        pristine=pristine,
        before_last=before_last,
        images=images,
        images_before_last=images_before_last,
        labels=labels,
        single_digest=single.digest,
        index_digest=index.digest,
        blob_digests=blob_digests,
    )


_CACHE: dict[str, Corpus] = {}


def corpus_once(factory: pytest.TempPathFactory) -> Corpus:
    """Build the corpus at most once per test process (shared by modules)."""
    if "corpus" not in _CACHE:
        _CACHE["corpus"] = build_corpus(factory.mktemp("metadb"))
    return _CACHE["corpus"]


# ---------------------------------------------------------------------- raw page access

PAGE_HEADER = struct.Struct("<QHHI")
BRANCH_ELEMENT = struct.Struct("<IIQ")
META = struct.Struct("<IIIIQQQQQQ")
FLAG_BRANCH = 0x01
FLAG_LEAF = 0x02


META_FIELDS = (
    "magic", "version", "page_size", "flags", "root", "sequence", "freelist", "pgid", "txid",
)  # fmt: skip


def forge_meta(out: bytearray, slot: int, **fields: int) -> None:
    """Rewrite fields of meta ``slot`` in place and recompute its checksum (a valid meta)."""
    base = slot * PAGE_SIZE + 16
    values = list(META.unpack_from(out, base)[:9])
    for key, value in fields.items():
        values[META_FIELDS.index(key)] = value
    body = struct.pack("<IIIIQQQQQ", *values)
    sealed = body + struct.pack("<Q", _fnv1a64(body))
    assert len(sealed) == META.size
    out[base : base + META.size] = sealed


def _fnv1a64(data: bytes) -> int:
    # Independent of the reader's own fnv1a64 on purpose.
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def meta_fields(data: bytes, slot: int) -> tuple[int, ...]:
    """(magic, version, page_size, flags, root, seq, freelist, pgid, txid, checksum)."""
    return META.unpack_from(data, slot * PAGE_SIZE + 16)


def newest_meta(data: bytes) -> tuple[int, ...]:
    return max((meta_fields(data, 0), meta_fields(data, 1)), key=lambda m: m[8])


def page_header(data: bytes, pgid: int) -> tuple[int, int, int, int]:
    """(id, flags, count, overflow) of page ``pgid``."""
    return PAGE_HEADER.unpack_from(data, pgid * PAGE_SIZE)


def reachable_pages(data: bytes) -> Iterator[int]:
    """Page ids reachable from the newest meta's root (every page-backed bucket, all levels)."""
    pgid_limit = newest_meta(data)[7]
    seen: set[int] = set()
    stack = [newest_meta(data)[4]]
    while stack:
        pgid = stack.pop()
        if pgid in seen or not 2 <= pgid < pgid_limit:
            continue
        seen.add(pgid)
        yield pgid
        _, flags, count, _ = page_header(data, pgid)
        base = pgid * PAGE_SIZE
        for i in range(count):
            off = base + 16 + 16 * i
            if flags & FLAG_BRANCH:
                stack.append(BRANCH_ELEMENT.unpack_from(data, off)[2])
            elif flags & FLAG_LEAF:
                eflags, pos, ksize, _vsize = struct.unpack_from("<IIII", data, off)
                if eflags & 1:
                    root = struct.unpack_from("<Q", data, off + pos + ksize)[0]
                    if root:
                        stack.append(root)
