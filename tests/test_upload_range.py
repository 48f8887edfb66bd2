"""``parse_range`` (the registry's ``Range`` header), ``registry_limits`` (per-host chunks) and
``chunk_sizer`` (fixed or adaptive chunk sizes within those limits)."""

from __future__ import annotations

import pytest

from imagepushd.push.registry.upload import (
    ChunkLimits,
    ChunkSizer,
    MiB,
    chunk_sizer,
    parse_range,
    registry_limits,
)


@pytest.mark.parametrize(
    ("value", "own", "expected"),
    [
        ("0-99", 100, 100),
        ("0-99", 0, 100),  # the registry's count wins over ours when it is not ambiguous
        ("0-1048575", 1 << 20, 1 << 20),
        ("bytes=0-99", 100, 100),  # prefixes some registries send
        ("bytes 0-99", 100, 100),
        ("  0-99  ", 100, 100),
        ("0--1", 0, 0),  # Quay: nothing received
        ("0--1", 50, 0),
    ],
)
def test_parse_range_offsets(value: str, own: int, expected: int) -> None:
    assert parse_range(value, own) == expected


@pytest.mark.parametrize(("own", "expected"), [(0, 0), (1, 1), (5000, 1)])
def test_parse_range_zero_zero_is_decided_by_our_count(own: int, expected: int) -> None:
    # "0-0" means "nothing" on an empty session and "one byte" after one byte: ambiguous.
    assert parse_range("0-0", own) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "100",  # no dash
        "0-",  # no end
        "-99",  # no start
        "5-99",  # must start at 0
        "abc",
        "0-x",
        "bytes=5-10",
        "0-99/100",  # a total is not part of the registry grammar
    ],
)
def test_parse_range_unusable_values(value: str | None) -> None:
    assert parse_range(value, 42) is None


def test_parse_range_never_invents_offset_from_garbage_own() -> None:
    assert parse_range("0-9", 10**9) == 10


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("ghcr.io", ChunkLimits(maximum=4 * MiB)),
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", ChunkLimits(minimum=5 * MiB)),
        ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", ChunkLimits(minimum=5 * MiB)),
        ("europe-west1-docker.pkg.dev", ChunkLimits(chunked=False)),
        ("us-docker.pkg.dev", ChunkLimits(chunked=False)),
        ("gcr.io", ChunkLimits(chunked=False)),
        ("eu.gcr.io", ChunkLimits(chunked=False)),
        ("docker.io", ChunkLimits()),
        ("registry-1.docker.io", ChunkLimits()),
        ("quay.io", ChunkLimits()),
        ("127.0.0.1:5000", ChunkLimits()),
        ("s3.amazonaws.com", ChunkLimits()),  # not ECR
        ("notgcr.io", ChunkLimits()),
    ],
)
def test_registry_limits(host: str, expected: ChunkLimits) -> None:
    assert registry_limits(host) == expected


def test_default_limits_allow_any_chunk() -> None:
    limits = ChunkLimits()
    assert limits.minimum == 0
    assert limits.maximum is None
    assert limits.chunked is True


def chunks_of(sizer: ChunkSizer, size: int, seconds_per_mib: float = 0.0) -> list[int]:
    """The chunk sizes a whole blob gets, each chunk taking ``seconds_per_mib`` per MiB."""
    sizes, offset = [], 0
    while offset < size:
        chunk = min(sizer.chunk, size - offset)
        sizes.append(chunk)
        sizer.observe(chunk, chunk / MiB * seconds_per_mib)
        offset += chunk
    return sizes


def test_adaptive_grows_from_8_mib_to_a_quarter_of_the_blob() -> None:
    # A fast link: each chunk at most doubles, and none exceeds 96/4 = 24 MiB, so a cut loses
    # at most a quarter of the blob where the registry keeps acknowledged chunks.
    sizer = chunk_sizer(96 * MiB, None, ChunkLimits())
    assert sizer.adaptive
    assert chunks_of(sizer, 96 * MiB) == [m * MiB for m in (8, 16, 24, 24, 24)]


def test_adaptive_stops_at_64_mib_on_large_blobs() -> None:
    sizer = chunk_sizer(1024 * MiB, None, ChunkLimits())
    assert chunks_of(sizer, 1024 * MiB)[:6] == [m * MiB for m in (8, 16, 32, 64, 64, 64)]


def test_adaptive_follows_a_slow_link_down_to_1_mib() -> None:
    # 8 MiB took 8 s (1 MiB/s): the next chunk is what 2 s carry; at 0.25 MiB/s, the floor.
    sizer = chunk_sizer(96 * MiB, None, ChunkLimits())
    sizer.observe(8 * MiB, 8.0)
    assert sizer.chunk == 2 * MiB
    sizer.observe(2 * MiB, 8.0)
    assert sizer.chunk == MiB
    # ... and back up, at most doubling, when the link recovers.
    sizer.observe(MiB, 0.001)
    assert sizer.chunk == 2 * MiB


def test_a_short_last_chunk_does_not_change_the_size() -> None:
    sizer = chunk_sizer(96 * MiB, None, ChunkLimits())
    sizer.observe(MiB, 100.0)  # less than the 8 MiB asked: the end of the blob
    assert sizer.chunk == 8 * MiB


def test_configured_chunk_size_is_fixed() -> None:
    sizer = chunk_sizer(96 * MiB, 4 * MiB, ChunkLimits())
    assert not sizer.adaptive
    assert chunks_of(sizer, 96 * MiB, seconds_per_mib=10.0) == [4 * MiB] * 24


@pytest.mark.parametrize(
    ("host", "size", "expected"),
    [
        ("ghcr.io", 96 * MiB, [4 * MiB] * 24),  # the registry's maximum wins
        # ECR's 5 MiB minimum raises the floor above a quarter of a 12 MiB blob.
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", 12 * MiB, [5 * MiB, 5 * MiB, 2 * MiB]),
        ("127.0.0.1:5000", 20 * MiB, [5 * MiB] * 4),  # a quarter of the blob from the start
    ],
)
def test_adaptive_within_registry_limits(host: str, size: int, expected: list[int]) -> None:
    assert chunks_of(chunk_sizer(size, None, registry_limits(host)), size) == expected


def test_adaptive_respects_the_announced_minimum_and_the_part_count() -> None:
    assert chunk_sizer(96 * MiB, None, ChunkLimits(), announced_min=32 * MiB).chunk == 32 * MiB
    huge = 4000 * 64 * MiB * 2  # 4000 parts of 64 MiB would not cover it
    assert chunk_sizer(huge, None, ChunkLimits()).chunk == -(-huge // 4000)


def test_limit_to_keeps_later_chunks_within_the_limit() -> None:
    sizer = chunk_sizer(96 * MiB, None, ChunkLimits())
    assert sizer.limit_to(4 * MiB) and sizer.chunk == 4 * MiB
    sizer.observe(4 * MiB, 0.0)
    assert sizer.chunk == 4 * MiB  # adaptive growth stays under the limit
    assert sizer.limit_to(1) and sizer.chunk == 256 << 10  # never below the floor
    assert not sizer.limit_to(1)
