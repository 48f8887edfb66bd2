"""Descriptors, manifests, indexes and platforms."""

from __future__ import annotations

import json

import pytest

from imagepushd.errors import ManifestError
from imagepushd.oci import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    is_digest,
    parse_manifest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_digest_validation():
    assert is_digest(D1)
    assert is_digest("sha512:" + "f" * 128)
    assert is_digest("sha384:" + "0a" * 48)
    for bad in (
        "sha256:" + "A" * 64,
        "sha256:../../etc",
        "md5:abc",
        D1 + "0",
        "",
        "sha384:" + "0" * 64,
        "blake3:" + "0" * 64,
    ):
        assert not is_digest(bad)


def test_platform_parse_and_str():
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    assert Platform.parse("linux/amd64") == Platform("linux", "amd64")
    for bad in ("linux", "linux//v8", "a/b/c/d"):
        with pytest.raises(ValueError):
            Platform.parse(bad)
    assert Platform.from_json({"os": "linux"}) is None


def test_descriptor_round_trip():
    obj = {
        "mediaType": OCI_MANIFEST,
        "digest": D1,
        "size": 5,
        "platform": {"os": "linux", "architecture": "arm", "variant": "v7"},
        "annotations": {"k": "v"},
    }
    desc = Descriptor.from_json(obj, "x")
    assert desc.platform == Platform("linux", "arm", "v7")
    assert desc.to_json() == obj


@pytest.mark.parametrize(
    "obj",
    [
        None,
        {"mediaType": OCI_MANIFEST, "digest": "sha256:zz", "size": 1},
        {"mediaType": OCI_MANIFEST, "digest": D1, "size": -1},
        {"mediaType": OCI_MANIFEST, "digest": D1, "size": True},
        {"mediaType": OCI_MANIFEST, "digest": D1},
    ],
)
def test_descriptor_rejects_bad_fields(obj: object):
    with pytest.raises(ManifestError):
        Descriptor.from_json(obj, "layers[0]")


def test_parse_manifest_and_index():
    manifest = {
        "schemaVersion": 2,
        "config": {"mediaType": "c", "digest": D1, "size": 1},
        "layers": [{"mediaType": "l", "digest": D2, "size": 2}],
    }
    parsed = parse_manifest(json.dumps(manifest).encode(), Descriptor(OCI_MANIFEST, D1, 1))
    assert isinstance(parsed, Manifest) and parsed.layers[0].digest == D2
    index = {"manifests": [{"mediaType": OCI_MANIFEST, "digest": D1, "size": 1}]}
    parsed_index = parse_manifest(json.dumps(index).encode(), Descriptor(DOCKER_LIST, D2, 1))
    assert isinstance(parsed_index, Index) and parsed_index.media_type == DOCKER_LIST
    # No media type anywhere: the shape decides.
    sniffed = parse_manifest(json.dumps(index).encode(), Descriptor("", D2, 1))
    assert isinstance(sniffed, Index) and sniffed.media_type == OCI_INDEX


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"}',
        b'{"mediaType": "application/vnd.oci.image.index.v1+json"}',
        b'{"mediaType": "application/vnd.oci.image.manifest.v1+json", "layers": []}',
        b"[" * 100000,
    ],
)
def test_parse_rejects_malformed(data: bytes):
    with pytest.raises(ManifestError):
        parse_manifest(data, Descriptor("", D1, len(data)))


@pytest.mark.parametrize(
    ("annotations", "is_attestation", "attests"),
    [
        (
            {
                "vnd.docker.reference.type": "attestation-manifest",
                "vnd.docker.reference.digest": D2,
            },
            True,
            D2,
        ),
        ({"vnd.docker.reference.type": "attestation-manifest"}, True, None),
        ({"vnd.docker.reference.type": "other", "vnd.docker.reference.digest": D2}, False, None),
        ({"vnd.docker.reference.digest": D2}, False, None),
        ({}, False, None),
    ],
)
def test_attestation_descriptors(
    annotations: dict[str, str], is_attestation: bool, attests: str | None
) -> None:
    entry = {"mediaType": OCI_MANIFEST, "digest": D1, "size": 10, "annotations": annotations}
    entry["platform"] = {"architecture": "unknown", "os": "unknown"}
    descriptor = Descriptor.from_json(entry, "test")
    assert descriptor.is_attestation is is_attestation
    assert descriptor.attests == attests
