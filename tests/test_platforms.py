"""Platform selection: policies, matching, the host platform, which manifests a push sends."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

import pytest

from imagepushd.decide import platforms as platforms_mod
from imagepushd.decide.platforms import (
    PlatformPolicy,
    Selection,
    _descriptor_for,
    _matches,
    _rewrite_index,
    host_platform,
    select_manifests,
)
from imagepushd.errors import ImagepushdError, ManifestError, MissingContentError, UsageError
from imagepushd.oci import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from imagepushd.watch.content import ContentStore, ImageGraph
from tests.support.images import Blob, ImageBuilder

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
    monkeypatch.setattr(platforms_mod.host_platform_module, "machine", lambda: machine)
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


# ---------------------------------------------------------------------- selection: attestations


def graph_of(tmp_path: Path, b: ImageBuilder, root: Blob, drop: Collection[str] = ()) -> ImageGraph:
    """``root`` walked in a content store holding all its blobs but ``drop``."""
    store = ContentStore(tmp_path / "root")
    for blob in b.blobs_of(root):
        if blob.digest not in drop:
            path = store.path(blob.digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            with blob.open() as src:
                path.write_bytes(src.read())
    return store.walk(Descriptor(root.media_type, root.digest, root.size))


def first_layer(blob: Blob) -> str:
    digest: str = blob.json()["layers"][0]["digest"]
    return digest


def pushed(result: Selection) -> list[str]:
    """Digests of the manifests a selection PUTs by digest, then the top."""
    assert result.top is not None
    return [m.descriptor.digest for m in result.children] + [result.top.descriptor.digest]


def top_entries(result: Selection) -> list[dict[str, object]]:
    assert result.top is not None
    entries: list[dict[str, object]] = json.loads(result.top.data)["manifests"]
    return entries


@pytest.fixture
def attested(image_builder: ImageBuilder) -> dict[str, Blob]:
    """An index as BuildKit writes it with SBOM and provenance: two platforms, then their
    attestation manifests (platform unknown/unknown)."""
    b = image_builder
    images = {
        "amd": b.image([3000], "att/amd"),
        "arm": b.image([2000], "att/arm", architecture="arm64"),
    }
    images["amd-att"] = b.attestation(images["amd"])
    images["arm-att"] = b.attestation(images["arm"])
    images["index"] = b.index([images[k] for k in ("amd", "arm", "amd-att", "arm-att")])
    return images


def test_walk_keeps_attestations_out_of_platforms(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    graph = graph_of(tmp_path, image_builder, attested["index"])
    assert graph.platforms() == [AMD64, ARM64]
    assert [a.descriptor.digest for a in graph.attestations()] == [
        attested["amd-att"].digest,
        attested["arm-att"].digest,
    ]
    assert [a.attests for a in graph.attestations()] == [
        attested["amd"].digest,
        attested["arm"].digest,
    ]
    assert graph.attestations()[0].platform == Platform("unknown", "unknown")


def test_all_pushes_the_index_with_its_attestations(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    b = image_builder
    result = select_manifests(
        graph_of(tmp_path, b, attested["index"]), PlatformPolicy("all"), AMD64
    )
    assert result.top is not None
    assert result.top.data == attested["index"].data  # verbatim, from the walk
    assert result.reduced == []
    assert pushed(result) == [
        attested[k].digest for k in ("amd", "arm", "amd-att", "arm-att", "index")
    ]
    assert [m.data for m in result.children] == [
        attested[k].data for k in ("amd", "arm", "amd-att", "arm-att")
    ]
    assert result.platforms == [AMD64, ARM64]
    assert result.attestations == 2
    statements = {
        d.digest for d in result.blobs.values() if d.media_type == "application/vnd.in-toto+json"
    }
    assert len(statements) == 4  # SBOM and provenance of each platform


def test_all_refuses_a_missing_attestation_naming_it(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    statement = first_layer(attested["arm-att"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={statement})
    with pytest.raises(MissingContentError) as info:
        select_manifests(graph, PlatformPolicy("all"), AMD64)
    message = str(info.value)
    assert "platforms missing content: attestation of linux/arm64 (" in message
    assert statement in message
    assert info.value.missing == (statement,)


def test_all_refuses_a_missing_platform_as_before(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    layer = first_layer(attested["arm"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={layer})
    with pytest.raises(MissingContentError, match=r"platforms missing content: linux/arm64 \("):
        select_manifests(graph, PlatformPolicy("all"), AMD64)


def test_available_drops_the_attestation_of_a_dropped_platform(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    layer = first_layer(attested["arm"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={layer})
    result = select_manifests(graph, PlatformPolicy("available"), AMD64)
    entries = top_entries(result)
    assert [e["digest"] for e in entries] == [attested["amd"].digest, attested["amd-att"].digest]
    # Kept entries stay verbatim: platform unknown/unknown and the reference annotations.
    assert entries[1] == attested["index"].json()["manifests"][2]
    assert result.platforms == [AMD64]
    assert result.attestations == 1
    assert layer not in result.blobs
    assert not set(result.blobs) & {d["digest"] for d in attested["arm-att"].json()["layers"]}
    assert result.top is not None
    assert result.reduced == [(attested["index"].digest, 2, 4, result.top.descriptor.digest)]


def test_available_keeps_a_platform_whose_attestation_is_missing(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    statement = first_layer(attested["amd-att"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={statement})
    result = select_manifests(graph, PlatformPolicy("available"), AMD64)
    assert [e["digest"] for e in top_entries(result)] == [
        attested[k].digest for k in ("amd", "arm", "arm-att")
    ]
    assert result.platforms == [AMD64, ARM64]
    assert result.attestations == 1


def test_available_with_only_attestations_complete_pushes_nothing(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    drop = {first_layer(attested["amd"]), first_layer(attested["arm"])}
    graph = graph_of(tmp_path, image_builder, attested["index"], drop=drop)
    with pytest.raises(MissingContentError, match=r"no platform of .* is complete"):
        select_manifests(graph, PlatformPolicy("available"), AMD64)


def test_available_complete_keeps_the_index_verbatim(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    result = select_manifests(
        graph_of(tmp_path, image_builder, attested["index"]), PlatformPolicy("available"), AMD64
    )
    assert result.top is not None
    assert result.top.descriptor.digest == attested["index"].digest


def test_host_pushes_a_reduced_index_of_its_manifest_and_attestation(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    graph = graph_of(tmp_path, image_builder, attested["index"])
    result = select_manifests(graph, PlatformPolicy("host"), ARM64)
    assert result.top is not None
    assert result.top.descriptor.media_type == OCI_INDEX
    assert [e["digest"] for e in top_entries(result)] == [
        attested["arm"].digest,
        attested["arm-att"].digest,
    ]
    assert result.platforms == [ARM64]
    assert result.attestations == 1
    assert result.top.descriptor.digest == ("sha256:" + hashlib.sha256(result.top.data).hexdigest())


def test_host_without_attestations_pushes_the_plain_manifest(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    amd = b.image([3000], "plain/amd")
    arm = b.image([2000], "plain/arm", architecture="arm64")
    result = select_manifests(
        graph_of(tmp_path, b, b.index([amd, arm])), PlatformPolicy("host"), AMD64
    )
    assert pushed(result) == [amd.digest]
    assert result.attestations == 0


def test_host_whose_attestation_is_missing_pushes_the_plain_manifest(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    statement = first_layer(attested["amd-att"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={statement})
    result = select_manifests(graph, PlatformPolicy("host"), AMD64)
    assert pushed(result) == [attested["amd"].digest]
    assert result.platforms == [AMD64]


def test_host_never_takes_an_attestation_for_the_host_manifest(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    layer = first_layer(attested["amd"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={layer})
    with pytest.raises(MissingContentError) as info:
        select_manifests(graph, PlatformPolicy("host"), AMD64)
    assert "host platform linux/amd64; the image has linux/amd64, linux/arm64" in str(info.value)
    assert "unknown" not in str(info.value)


def test_platform_list_takes_the_attestations_of_the_listed_platforms(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    graph = graph_of(tmp_path, image_builder, attested["index"])
    result = select_manifests(graph, PlatformPolicy.parse("linux/arm64"), AMD64)
    assert [e["digest"] for e in top_entries(result)] == [
        attested["arm"].digest,
        attested["arm-att"].digest,
    ]
    assert result.platforms == [ARM64]
    assert result.attestations == 1


def test_platform_list_with_a_missing_attestation_keeps_the_platform(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    statement = first_layer(attested["arm-att"])
    graph = graph_of(tmp_path, image_builder, attested["index"], drop={statement})
    result = select_manifests(graph, PlatformPolicy.parse("linux/amd64,linux/arm64"), AMD64)
    assert [e["digest"] for e in top_entries(result)] == [
        attested[k].digest for k in ("amd", "arm", "amd-att")
    ]


def test_unknown_unknown_is_not_a_platform_to_ask_for(
    tmp_path: Path, image_builder: ImageBuilder, attested: dict[str, Blob]
) -> None:
    graph = graph_of(tmp_path, image_builder, attested["index"])
    with pytest.raises(MissingContentError, match="the image has no unknown/unknown manifest"):
        select_manifests(graph, PlatformPolicy.parse("unknown/unknown"), AMD64)


def test_an_orphan_attestation_goes_only_with_all(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    amd = b.image([3000], "orphan/amd")
    elsewhere = b.image([100], "orphan/elsewhere", architecture="arm64")
    orphan = b.attestation(elsewhere)  # names a manifest the index does not hold
    root = b.index([amd, orphan])
    graph = graph_of(tmp_path, b, root, drop={elsewhere.digest})
    assert pushed(select_manifests(graph, PlatformPolicy("all"), AMD64))[-1] == root.digest
    available = select_manifests(graph, PlatformPolicy("available"), AMD64)
    assert [e["digest"] for e in top_entries(available)] == [amd.digest]
    assert available.attestations == 0


# ---------------------------------------------------------------------- selection: other blobs


def test_non_manifest_children_follow_the_walk_presence(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    amd = b.image([3000], "other/amd")
    extra = b.json_blob("application/vnd.example.thing+json", {"thing": 1})
    root = b.index([amd, extra])
    present = select_manifests(
        graph_of(tmp_path / "a", b, root), PlatformPolicy("available"), AMD64
    )
    assert present.top is not None and present.top.descriptor.digest == root.digest
    assert extra.digest in present.blobs

    graph = graph_of(tmp_path / "b", b, root, drop={extra.digest})
    reduced = select_manifests(graph, PlatformPolicy("available"), AMD64)
    assert [e["digest"] for e in top_entries(reduced)] == [amd.digest]
    with pytest.raises(MissingContentError, match=f"image {root.digest} is missing content"):
        select_manifests(graph, PlatformPolicy("all"), AMD64)
