"""Property tests: corrupted real meta.db files never crash the reader, hang it or blow memory.

The meta.db is written by a real, private containerd (once per test process, shared with
tests/test_bbolt.py through tests/metadb.py), then mutated by Hypothesis. For every example the
full metadata read must either return a MetadataSnapshot or raise BoltFormatError (including its
subclass MetadataFormatError) or UnsupportedSchemaError (the documented error when ``v1`` is
gone), within 2 s and 8 MiB of peak allocation.
"""

from __future__ import annotations

import random
import re
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from imagepushd.errors import BoltFormatError, UnsupportedSchemaError
from imagepushd.watch.bbolt import BoltFile
from imagepushd.watch.metadata import MetadataSnapshot, MetadataStore
from tests.metadb import (
    PAGE_SIZE,
    TAG_COUNT,
    Corpus,
    corpus_once,
    forge_meta,
    newest_meta,
    reachable_pages,
)

pytestmark = pytest.mark.e2e

MAX_SECONDS = 10.0  # a hang guard (a full read costs ~50 ms), not a speed target
MAX_PEAK = 8 << 20
RANDOM_FILE_MAX = 64 << 10
GARBAGE_MAX = 64 << 10

# Examples that reach a full read cost ~50 ms under tracemalloc; files rejected at the meta or
# size checks cost well under 1 ms. Budget: the module in under ~60 s on 2 cores.
FULL_READS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
FORGED = settings(max_examples=100, deadline=None, derandomize=True, database=None)
CHEAP = settings(max_examples=300, deadline=None, derandomize=True, database=None)


class Target:
    """The pristine file and where its interesting bytes are.

    A plain class with a short repr on purpose: Hypothesis pretty-prints a failing test's
    arguments (dataclasses field by field), and a 2 MiB bytes field makes it report a
    FlakyStrategyDefinition instead of the actual failure.
    """

    def __init__(
        self, data: bytes, reachable: tuple[int, ...], inline_headers: tuple[int, ...], path: Path
    ) -> None:
        self.data = data
        self.used = newest_meta(data)[7] * PAGE_SIZE  # pgid * page size: the meaningful prefix
        self.reachable = reachable  # page ids reachable from the newest meta
        self.inline_headers = inline_headers  # inline bucket page headers (target buckets)
        self.path = path

    def __repr__(self) -> str:
        return f"<meta.db: {len(self.data)} bytes, {len(self.reachable)} reachable pages>"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    corpus: Corpus = corpus_once(tmp_path_factory)
    data = corpus.pristine
    reachable = tuple(sorted(reachable_pages(data)))
    pattern = re.escape(b"target" + b"\0" * 24 + b"\x02\x00")
    inline = tuple(
        m.start() + 22
        for m in re.finditer(pattern, data)
        if m.start() // PAGE_SIZE in set(reachable)
    )
    assert len(inline) == TAG_COUNT + 2
    work = tmp_path_factory.mktemp("corruption")
    return Target(data, reachable, inline, work / "meta.db")


def _read(path: Path) -> MetadataSnapshot | Exception:
    with BoltFile(path, attempts=2, sleep=lambda s: None) as bolt:
        try:
            return MetadataStore(bolt).read(blobs=True)
        except (BoltFormatError, UnsupportedSchemaError) as exc:
            return exc


def check(target: Target, mutated: bytes) -> MetadataSnapshot | Exception:
    """Read ``mutated`` as meta.db: a snapshot or a documented error, fast and small."""
    target.path.write_bytes(mutated)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        outcome = _read(target.path)
        elapsed = time.perf_counter() - start
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(outcome, MetadataSnapshot | BoltFormatError | UnsupportedSchemaError)
    if currently_in_test_context():
        event(type(outcome).__name__)  # --hypothesis-show-statistics shows the outcome mix
    assert elapsed < MAX_SECONDS, f"read took {elapsed:.2f} s"
    assert peak < MAX_PEAK, f"peak allocation {peak / (1 << 20):.1f} MiB"
    return outcome


def _xor(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for offset, mask in flips:
        out[offset] ^= mask
    return bytes(out)


def _flips(low: int, high: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    return st.lists(
        st.tuples(st.integers(low, high - 1), st.integers(1, 255)), min_size=1, max_size=20
    )


# ---------------------------------------------------------------------- baseline


def test_pristine_file_reads(target: Target) -> None:
    outcome = check(target, target.data)
    assert isinstance(outcome, MetadataSnapshot)
    assert len(outcome.images) == TAG_COUNT + 2


# ---------------------------------------------------------------------- bit flips


@FULL_READS
@given(data=st.data())
def test_flip_bytes_anywhere(target: Target, data: st.DataObject) -> None:
    flips = data.draw(_flips(0, len(target.data)), label="flips")
    check(target, _xor(target.data, flips))


@FULL_READS
@given(data=st.data())
def test_flip_bytes_in_meta_pages(target: Target, data: st.DataObject) -> None:
    # Bias towards the page headers and meta structs (the first 80 bytes of pages 0 and 1).
    offsets = st.one_of(
        st.integers(0, 2 * PAGE_SIZE - 1),
        st.integers(0, 79),
        st.integers(PAGE_SIZE, PAGE_SIZE + 79),
    )
    flips = data.draw(
        st.lists(st.tuples(offsets, st.integers(1, 255)), min_size=1, max_size=20), label="flips"
    )
    check(target, _xor(target.data, flips))


@FULL_READS
@given(data=st.data())
def test_flip_bytes_in_data_pages(target: Target, data: st.DataObject) -> None:
    flips = data.draw(_flips(2 * PAGE_SIZE, target.used), label="flips")
    check(target, _xor(target.data, flips))


@FULL_READS
@given(data=st.data())
def test_flip_bytes_in_reachable_pages(target: Target, data: st.DataObject) -> None:
    pages = st.sampled_from(target.reachable)
    # Page headers and element arrays are at the start of a page: bias towards them.
    within = st.one_of(st.integers(0, PAGE_SIZE - 1), st.integers(0, 255))
    flips = data.draw(
        st.lists(
            st.tuples(pages, within, st.integers(1, 255)).map(
                lambda t: (t[0] * PAGE_SIZE + t[1], t[2])
            ),
            min_size=1,
            max_size=20,
        ),
        label="flips",
    )
    check(target, _xor(target.data, flips))


# ---------------------------------------------------------------------- truncation, garbage


@CHEAP
@given(data=st.data())
def test_truncate(target: Target, data: st.DataObject) -> None:
    length = data.draw(
        st.one_of(st.integers(0, len(target.data) - 1), st.integers(0, 3 * PAGE_SIZE)),
        label="length",
    )
    outcome = check(target, target.data[:length])
    if length < target.used:
        assert isinstance(outcome, BoltFormatError)


@FULL_READS
@given(data=st.data())
def test_overwrite_range_with_garbage(target: Target, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, target.used - 1), label="start")
    length = data.draw(st.integers(1, GARBAGE_MAX), label="length")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    garbage = random.Random(seed).randbytes(length)
    check(target, target.data[:start] + garbage + target.data[start + length :])


# ---------------------------------------------------------------------- page headers

_HEADER_FIELDS = {"id": (0, "<Q"), "flags": (8, "<H"), "count": (10, "<H"), "overflow": (12, "<I")}


def _field_value(fmt: str) -> st.SearchStrategy[int]:
    bits = struct.calcsize(fmt) * 8
    return st.one_of(st.integers(0, 2**bits - 1), st.integers(0, 600), st.sampled_from([1, 2]))


@FULL_READS
@given(data=st.data())
def test_page_header_fields(target: Target, data: st.DataObject) -> None:
    npages = target.used // PAGE_SIZE
    changes = data.draw(st.integers(1, 4), label="changes")
    out = bytearray(target.data)
    for _ in range(changes):
        pgid = data.draw(
            st.one_of(st.sampled_from(target.reachable), st.integers(0, npages - 1)), label="page"
        )
        name = data.draw(st.sampled_from(sorted(_HEADER_FIELDS)), label="field")
        offset, fmt = _HEADER_FIELDS[name]
        value = data.draw(_field_value(fmt), label="value")
        struct.pack_into(fmt, out, pgid * PAGE_SIZE + offset, value)
    check(target, bytes(out))


@FULL_READS
@given(data=st.data())
def test_inline_bucket_headers(target: Target, data: st.DataObject) -> None:
    """Same as above for the page header embedded in inline bucket values."""
    out = bytearray(target.data)
    at = data.draw(st.sampled_from(target.inline_headers), label="inline header")
    name = data.draw(st.sampled_from(sorted(_HEADER_FIELDS)), label="field")
    offset, fmt = _HEADER_FIELDS[name]
    value = data.draw(_field_value(fmt), label="value")
    struct.pack_into(fmt, out, at + offset, value)
    check(target, bytes(out))


# ---------------------------------------------------------------------- forged metas


@FORGED
@given(data=st.data())
def test_forged_valid_meta(target: Target, data: st.DataObject) -> None:
    """A meta with a correct checksum but lying root / pgid / page size / txid."""
    out = bytearray(target.data)
    slot = data.draw(st.sampled_from([0, 1]), label="slot")
    npages = target.used // PAGE_SIZE
    fields = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "root": st.one_of(st.integers(0, 2**64 - 1), st.integers(0, npages + 2)),
                "pgid": st.one_of(st.integers(0, 2**64 - 1), st.integers(0, npages + 200)),
                "page_size": st.one_of(
                    st.integers(0, 2**32 - 1), st.sampled_from([512, 1024, 4096, 8192, 65536])
                ),
                "txid": st.integers(0, 2**64 - 1),
            },
        ),
        label="fields",
    )
    forge_meta(out, slot, **fields)
    check(target, bytes(out))


# ---------------------------------------------------------------------- random files


@CHEAP
@given(
    length=st.one_of(st.integers(0, RANDOM_FILE_MAX), st.integers(0, 200)),
    seed=st.integers(0, 2**32 - 1),
)
def test_entirely_random_bytes(target: Target, length: int, seed: int) -> None:
    outcome = check(target, random.Random(seed).randbytes(length))
    assert isinstance(outcome, BoltFormatError)


@CHEAP
@given(
    pages=st.integers(3, 16),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_random_pages_behind_a_valid_meta(
    target: Target, pages: int, seed: int, data: st.DataObject
) -> None:
    """Random page contents reached from a valid meta: the tree walk itself meets garbage.

    Random page headers with the right id (so the walk goes past the id check) are mixed in.
    """
    rng = random.Random(seed)
    out = bytearray(rng.randbytes(pages * PAGE_SIZE))
    for pgid in range(2, pages):
        if rng.random() < 0.7:
            flags = rng.choice([1, 2, 2, 3, 4, 0x10])
            count = rng.choice([0, 1, 2, 3, rng.randrange(65536)])
            struct.pack_into("<QHHI", out, pgid * PAGE_SIZE, pgid, flags, count, rng.choice([0, 1]))
    root = data.draw(st.integers(2, pages - 1), label="root")
    for slot, txid in ((0, 4), (1, 5)):
        struct.pack_into("<QHHI", out, slot * PAGE_SIZE, slot, 4, 0, 0)
        fields = {"magic": 0xED0CDAED, "version": 2, "page_size": PAGE_SIZE, "flags": 0}
        fields |= {"root": root, "sequence": 0, "freelist": 2**64 - 1, "pgid": pages}
        forge_meta(out, slot, **fields, txid=txid)
    check(target, bytes(out))
