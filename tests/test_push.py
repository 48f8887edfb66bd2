"""The pure parts of the push path: platform policies, matching, index rewriting, results."""

from __future__ import annotations

import hashlib
import json

import pytest

from imagepushd import push as push_mod
from imagepushd.errors import ImagepushdError, ManifestError, UsageError
from imagepushd.oci import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from imagepushd.push import (
    PlatformPolicy,
    PushResult,
    _descriptor_for,
    _matches,
    _rewrite_index,
    host_platform,
)

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARM64_V8 = Platform("linux", "arm64", "v8")
ARM_V7 = Platform("linux", "arm", "v7")


# ---------------------------------------------------------------------- PlatformPolicy.parse


@pytest.mark.parametrize("word", ["all", "available", "host"])
def test_parse_keywords(word: str) -> None:
    policy = PlatformPolicy.parse(word)
    assert policy == PlatformPolicy(word)
    assert policy.platforms == ()
    assert str(policy) == word


@pytest.mark.parametrize("value", [" all ", "all,", ",all", ["all"], [" all", ""]])
def test_parse_keyword_with_blanks_and_commas(value: str | list[str]) -> None:
    assert PlatformPolicy.parse(value) == PlatformPolicy("all")


def test_default_policy_is_all() -> None:
    assert PlatformPolicy() == PlatformPolicy("all")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("linux/amd64", (AMD64,)),
        ("linux/arm64/v8", (ARM64_V8,)),
        ("linux/amd64,linux/arm/v7", (AMD64, ARM_V7)),
        (" linux/amd64 , linux/arm64 ", (AMD64, ARM64)),
        (["linux/amd64", "linux/arm64"], (AMD64, ARM64)),
        (["linux/amd64,linux/arm64", "linux/arm/v7"], (AMD64, ARM64, ARM_V7)),
        (("linux/amd64",), (AMD64,)),
    ],
)
def test_parse_platform_lists(value: str | list[str], expected: tuple[Platform, ...]) -> None:
    policy = PlatformPolicy.parse(value)
    assert policy.mode == "list"
    assert policy.platforms == expected


def test_list_policy_str_round_trips() -> None:
    policy = PlatformPolicy.parse("linux/amd64,linux/arm/v7")
    assert str(policy) == "linux/amd64,linux/arm/v7"
    assert PlatformPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize(
    "value",
    [
        "linux",  # no architecture
        "linux/amd64/v1/extra",
        "linux//v7",
        "/amd64",
        "all,linux/amd64",  # a keyword only alone
        "host,host",
        "ALL-PLATFORMS",
        ["linux/amd64", "everything"],
    ],
)
def test_parse_rejects_bad_values(value: str | list[str]) -> None:
    with pytest.raises(UsageError) as info:
        PlatformPolicy.parse(value)
    message = str(info.value)
    assert message.startswith("platforms: ")
    assert "all, available, host" in message


@pytest.mark.parametrize("value", ["", " ", ",", []])
def test_parse_rejects_empty(value: str | list[str]) -> None:
    with pytest.raises(ImagepushdError):
        PlatformPolicy.parse(value)


def test_bad_platform_is_a_usage_error() -> None:
    with pytest.raises(ImagepushdError) as info:
        PlatformPolicy.parse("linux")
    assert info.value.exit_code == 2


# ---------------------------------------------------------------------- matching and host


@pytest.mark.parametrize(
    ("want", "have", "expected"),
    [
        (AMD64, AMD64, True),
        (ARM64, ARM64_V8, True),  # no variant wanted: any variant
        (ARM64_V8, ARM64_V8, True),
        (ARM64_V8, ARM64, False),  # a variant wanted: must be there
        (ARM_V7, Platform("linux", "arm", "v6"), False),
        (AMD64, ARM64, False),
        (AMD64, Platform("windows", "amd64"), False),
        (AMD64, None, False),
    ],
)
def test_matches(want: Platform, have: Platform | None, expected: bool) -> None:
    assert _matches(want, have) is expected


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", AMD64),
        ("aarch64", ARM64),
        ("armv7l", ARM_V7),
        ("ppc64le", Platform("linux", "ppc64le")),
        ("s390x", Platform("linux", "s390x")),
        ("i686", Platform("linux", "386")),
        ("mips64", Platform("linux", "mips64")),
    ],
)
def test_host_platform(monkeypatch: pytest.MonkeyPatch, machine: str, expected: Platform) -> None:
    monkeypatch.setattr(push_mod.host_platform_module, "machine", lambda: machine)
    assert host_platform() == expected


def test_host_platform_here_matches_itself() -> None:
    here = host_platform()
    assert here.os == "linux"
    assert _matches(here, here)


# ---------------------------------------------------------------------- index rewriting


def _child(
    digest_seed: str, platform: dict[str, object] | None, **extra: object
) -> dict[str, object]:
    entry: dict[str, object] = {
        "mediaType": OCI_MANIFEST,
        "digest": "sha256:" + hashlib.sha256(digest_seed.encode()).hexdigest(),
        "size": 100 + len(digest_seed),
    }
    if platform is not None:
        entry["platform"] = platform
    entry.update(extra)
    return entry


def _index(children: list[dict[str, object]], **extra: object) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children, **extra}
    return json.dumps(doc).encode()


def test_rewrite_index_keeps_only_given_children_and_top_level_fields() -> None:
    amd = _child("amd", {"architecture": "amd64", "os": "linux"})
    arm = _child(
        "arm", {"architecture": "arm64", "os": "linux", "variant": "v8"}, annotations={"a": "b"}
    )
    data = _index([amd, arm], annotations={"org.example": "x"})

    kept = [Descriptor.from_json(arm, "test")]
    doc = json.loads(_rewrite_index(data, kept))

    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == OCI_INDEX
    assert doc["annotations"] == {"org.example": "x"}
    assert doc["manifests"] == [arm]


def test_rewrite_index_keeps_child_descriptors_verbatim() -> None:
    win2019 = _child(
        "w2019",
        {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.5329"},
        urls=["https://example.com/blob"],
    )
    win2022 = _child(
        "w2022",
        {
            "architecture": "amd64",
            "os": "windows",
            "os.version": "10.0.20348.2227",
            "os.features": ["win32k"],
        },
        artifactType="application/vnd.example",
    )
    gone = _child("gone", {"architecture": "arm64", "os": "windows"})
    data = _index([win2019, win2022, gone])

    kept = [Descriptor.from_json(c, "test") for c in (win2019, win2022)]
    doc = json.loads(_rewrite_index(data, kept))

    assert doc["manifests"] == [win2019, win2022]


def test_descriptor_for_hashes_the_new_bytes() -> None:
    original = Descriptor(OCI_INDEX, "sha256:" + "0" * 64, 10, None, {"x": "y"})
    data = b'{"schemaVersion":2}'
    out = _descriptor_for(original, data)
    assert out.media_type == OCI_INDEX
    assert out.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert out.size == len(data)


def test_descriptor_for_refuses_other_media_types() -> None:
    original = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 10)
    with pytest.raises(ManifestError, match="unexpected media type"):
        _descriptor_for(original, b"{}")


# ---------------------------------------------------------------------- result


def test_push_result_json() -> None:
    result = PushResult("reg/app:1", "sha256:" + "a" * 64, OCI_MANIFEST, ["linux/amd64"])
    result.pushed_blobs = 2
    result.bytes_sent = 1234
    assert result.to_json() == {
        "target": "reg/app:1",
        "digest": "sha256:" + "a" * 64,
        "media_type": OCI_MANIFEST,
        "platforms": ["linux/amd64"],
        "attestations": 0,
        "pushed_blobs": 2,
        "skipped_blobs": 0,
        "mounted_blobs": 0,
        "bytes_sent": 1234,
        "manifests": 0,
        "up_to_date": False,
    }
    json.dumps(result.to_json())  # serialisable as it is
