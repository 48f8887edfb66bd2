"""Decoding of containerd's value encodings (varints, Go binary times, labels)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from imagepushd.containerd.metadata import BlobRecord, decode_time, decode_varint
from imagepushd.errors import BoltFormatError, MetadataFormatError


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
