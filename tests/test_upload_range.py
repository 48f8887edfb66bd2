"""``parse_range`` (the registry's ``Range`` header) and ``registry_limits`` (per-host chunks)."""

from __future__ import annotations

import pytest

from imagepushd.registry.upload import ChunkLimits, MiB, parse_range, registry_limits


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
