"""BuildKit attestation manifests (SBOM, provenance) through every platform policy, for real.

The images are built here in the shape ``docker buildx build --attest type=sbom --attest
type=provenance`` gives them: an index of two platforms followed by one attestation manifest per
platform (entry platform ``unknown/unknown``, annotations ``vnd.docker.reference.type:
attestation-manifest`` and ``vnd.docker.reference.digest: <the platform manifest>``, in-toto
statement layers). They are imported into a real containerd with ``ctr images import``, partial
content is made with ``ctr content rm`` or a host-only import, and every push to the real
registry is checked from outside: ``skopeo inspect --raw`` serves the expected digest, ``skopeo
copy --all`` pulls every manifest and blob (verified), and every attestation served names a
manifest of the same index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imagepushd.blobs import BlobSource
from imagepushd.decide.platforms import PlatformPolicy, host_platform
from imagepushd.oci import Descriptor
from imagepushd.push.pusher import Pusher
from imagepushd.push.registry.client import HostSettings, RegistryClient
from imagepushd.push.registry.upload import BlobUploader
from imagepushd.reference import parse_reference
from imagepushd.watch.content import ContentStore
from tests.e2e.test_daemon import configure as configure_daemon
from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.images import IN_TOTO, Blob, ImageBuilder
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

NAME = "example.com/attested:1"
REFERENCE_TYPE = "vnd.docker.reference.type"
REFERENCE_DIGEST = "vnd.docker.reference.digest"


def push(containerd: Containerd, registry: Registry, ref: str, policy: str, home: Path) -> Outcome:
    """``imagepushd push NAME HOST/ref --platform policy --json`` in-process."""
    argv = ["push", NAME, f"{registry.host}/{ref}", "--root", str(containerd.root)]
    return run_cli([*argv, "--platform", policy, "--json"], home=home)


def layers(blob: Blob) -> list[str]:
    return [d["digest"] for d in blob.json()["layers"]]


def blobs(blob: Blob) -> list[str]:
    """The config and layers of an image or attestation manifest."""
    return [blob.json()["config"]["digest"], *layers(blob)]


def served_entries(registry: Registry, ref: str) -> list[dict[str, Any]]:
    """The index served for ``ref``, checked: every attestation names a manifest it holds."""
    entries: list[dict[str, Any]] = json.loads(registry.skopeo_inspect_raw(ref))["manifests"]
    digests = {e["digest"] for e in entries}
    for entry in entries:
        annotations = entry.get("annotations", {})
        if annotations.get(REFERENCE_TYPE) == "attestation-manifest":
            assert entry["platform"] == {"architecture": "unknown", "os": "unknown"}
            assert annotations[REFERENCE_DIGEST] in digests, entry
    return entries


def assert_served(registry: Registry, repo: str, manifests: list[Blob]) -> None:
    """Every manifest of ``manifests`` is served by digest with its config and layers."""
    for manifest in manifests:
        assert registry.skopeo_inspect_digest(f"{repo}@{manifest.digest}") == manifest.digest
        for digest in blobs(manifest):
            assert registry.blob_exists(repo, digest), digest


@pytest.fixture
def attested(image_builder: ImageBuilder) -> dict[str, Blob]:
    """linux/amd64 (this machine) and linux/arm64, then their attestation manifests."""
    b = image_builder
    images = {
        "amd": b.image([3000, 1200], "attested/amd"),
        "arm": b.image([2000], "attested/arm", architecture="arm64"),
    }
    images["amd-att"] = b.attestation(images["amd"])
    images["arm-att"] = b.attestation(images["arm"])
    images["index"] = b.index([images[k] for k in ("amd", "arm", "amd-att", "arm-att")])
    return images


@pytest.fixture
def arm_gone(
    containerd: Containerd, image_builder: ImageBuilder, attested: dict[str, Blob], tmp_path: Path
) -> dict[str, Blob]:
    """Everything imported, then arm64's layer removed: its attestation stays, complete."""
    load(containerd, image_builder, tmp_path, {NAME: attested["index"]})
    containerd.content_rm(layers(attested["arm"])[0])
    have = containerd.content_digests()
    assert all(d in have for d in [attested["arm-att"].digest, *blobs(attested["arm-att"])])
    return attested


def test_all_pushes_the_index_with_its_attestations(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    attested: dict[str, Blob],
    tmp_path: Path,
) -> None:
    load(containerd, image_builder, tmp_path, {NAME: attested["index"]})
    listing = run_cli(["images", "--root", str(containerd.root), "--json"], home=tmp_path)
    assert listing.code == 0, listing.stderr
    (row,) = [r for r in json.loads(listing.stdout) if r["name"] == NAME]
    assert row["platforms"] == ["linux/amd64", "linux/arm64"]
    assert row["attestations"] == 2 and row["complete"] is True

    result = push(containerd, registry, "att:all", "all", tmp_path).result

    assert result["digest"] == attested["index"].digest
    assert result["platforms"] == ["linux/amd64", "linux/arm64"]
    assert result["attestations"] == 2
    assert result["manifests"] == 5
    assert result["pushed_blobs"] == 3 + 2 + 3 + 3  # configs, layers, in-toto statements
    registry.verify_image("att:all", attested["index"].digest, tmp_path)
    entries = served_entries(registry, "att:all")
    assert [e["digest"] for e in entries] == [
        attested[k].digest for k in ("amd", "arm", "amd-att", "arm-att")
    ]
    assert_served(registry, "att", [attested[k] for k in ("amd", "arm", "amd-att", "arm-att")])
    statement = attested["amd-att"].json()["layers"][0]
    assert statement["mediaType"] == IN_TOTO
    assert statement["annotations"] == {"in-toto.io/predicate-type": "https://spdx.dev/Document"}


def test_all_refuses_a_missing_attestation(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    attested: dict[str, Blob],
    tmp_path: Path,
) -> None:
    load(containerd, image_builder, tmp_path, {NAME: attested["index"]})
    statement = layers(attested["arm-att"])[1]
    containerd.content_rm(statement)
    mark = registry.log_mark()

    run_ = push(containerd, registry, "att:all", "all", tmp_path)

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "platforms missing content: attestation of linux/arm64" in run_.stderr
    assert statement in run_.stderr and "unknown/unknown" not in run_.stderr
    assert [r for r in registry.requests(mark) if r["method"] in ("POST", "PUT", "PATCH")] == []
    assert registry.tags("att") == []


def test_available_drops_the_attestation_of_a_dropped_platform(
    containerd: Containerd, registry: Registry, arm_gone: dict[str, Blob], tmp_path: Path
) -> None:
    result = push(containerd, registry, "att:avail", "available", tmp_path).result

    assert result["digest"] != arm_gone["index"].digest
    assert result["platforms"] == ["linux/amd64"]
    assert result["attestations"] == 1
    registry.verify_image("att:avail", result["digest"], tmp_path)
    entries = served_entries(registry, "att:avail")
    assert [e["digest"] for e in entries] == [arm_gone["amd"].digest, arm_gone["amd-att"].digest]
    assert entries == [arm_gone["index"].json()["manifests"][i] for i in (0, 2)]  # verbatim
    assert_served(registry, "att", [arm_gone["amd"], arm_gone["amd-att"]])
    for digest in [arm_gone["arm-att"].digest, *layers(arm_gone["arm-att"])]:
        assert not registry.blob_exists("att", digest)


def test_host_pushes_its_manifest_with_its_attestation(
    containerd: Containerd, registry: Registry, arm_gone: dict[str, Blob], tmp_path: Path
) -> None:
    result = push(containerd, registry, "att:host", "host", tmp_path).result

    assert result["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert result["platforms"] == ["linux/amd64"]
    assert result["attestations"] == 1
    assert result["manifests"] == 3
    registry.verify_image("att:host", result["digest"], tmp_path)
    entries = served_entries(registry, "att:host")
    assert [e["digest"] for e in entries] == [arm_gone["amd"].digest, arm_gone["amd-att"].digest]
    assert_served(registry, "att", [arm_gone["amd"], arm_gone["amd-att"]])


def test_explicit_platform_takes_its_attestation_along(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    attested: dict[str, Blob],
    tmp_path: Path,
) -> None:
    load(containerd, image_builder, tmp_path, {NAME: attested["index"]})

    result = push(containerd, registry, "att:arm", "linux/arm64", tmp_path).result

    assert result["platforms"] == ["linux/arm64"]
    assert result["attestations"] == 1
    registry.verify_image("att:arm", result["digest"], tmp_path)
    entries = served_entries(registry, "att:arm")
    assert [e["digest"] for e in entries] == [attested["arm"].digest, attested["arm-att"].digest]
    assert_served(registry, "att", [attested["arm"], attested["arm-att"]])
    assert not registry.blob_exists("att", attested["amd-att"].digest)


def test_host_only_import_has_no_attestations_to_push(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    attested: dict[str, Blob],
    tmp_path: Path,
) -> None:
    """``ctr images import`` without ``--all-platforms`` keeps only this machine's content
    (its platform filter drops ``unknown/unknown`` too): host pushes the plain manifest as
    before, available a one-platform index without attestations."""
    archive = tmp_path / "attested.tar"
    image_builder.write_oci_archive(archive, {NAME: attested["index"]})
    containerd.ctr("images", "import", "--no-unpack", archive)
    # The other platforms' blobs go at containerd's next garbage collection: run one now.
    containerd.tag(NAME, "example.com/gc:now")
    containerd.rm("example.com/gc:now", sync=True)
    have = containerd.content_digests()
    assert attested["amd"].digest in have
    assert attested["amd-att"].digest not in have and attested["arm"].digest not in have

    host = push(containerd, registry, "att:host", "host", tmp_path).result
    available = push(containerd, registry, "att:avail", "available", tmp_path).result

    assert host["digest"] == attested["amd"].digest
    assert host["attestations"] == 0
    registry.verify_image("att:host", attested["amd"].digest, tmp_path)
    assert available["attestations"] == 0
    registry.verify_image("att:avail", available["digest"], tmp_path)
    assert [e["digest"] for e in served_entries(registry, "att:avail")] == [attested["amd"].digest]


class _Counting:
    """A content store that counts what the pusher asks of it."""

    def __init__(self, store: ContentStore) -> None:
        self.store = store
        self.calls: list[str] = []

    def has(self, descriptor: Descriptor) -> bool:
        self.calls.append("has")
        return self.store.has(descriptor)

    def read_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
        self.calls.append("read_bytes")
        return self.store.read_bytes(descriptor, limit)

    def source(self, descriptor: Descriptor) -> BlobSource:
        self.calls.append("source")
        return self.store.source(descriptor)


def test_push_reads_nothing_the_walk_read(
    containerd: Containerd, registry: Registry, arm_gone: dict[str, Blob], tmp_path: Path
) -> None:
    """The walk reads each manifest once; the push only streams blobs (one source each)."""
    store = ContentStore(containerd.root)
    counting = _Counting(store)
    target = parse_reference(f"{registry.host}/att:reads")
    root = arm_gone["index"]
    # The namespace's blob records, as the CLI uses: a removed blob's file lingers until GC.
    known = containerd.content_digests()
    graph = store.walk(Descriptor(root.media_type, root.digest, root.size), known)
    with RegistryClient(target.registry, settings=HostSettings(plain_http=True)) as client:
        pusher = Pusher(counting, client, BlobUploader(client), host=host_platform())
        result = pusher.push(graph, target, PlatformPolicy("available"))
    assert counting.calls == ["source"] * result.pushed_blobs
    assert result.pushed_blobs == len(blobs(arm_gone["amd"])) + len(blobs(arm_gone["amd-att"]))
    registry.verify_image("att:reads", result.digest, tmp_path)


# ---------------------------------------------------------------------- the daemon


def configure(daemon: Daemon, containerd: Containerd, registry: Registry, platforms: str) -> None:
    rules = [{"match": [NAME], "target": f"{registry.host}/team:{{tag}}"}]
    configure_daemon(daemon, containerd, registry.host, rules, platforms=platforms, on_start="all")


def test_daemon_waits_while_only_attestations_are_complete(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    attested: dict[str, Blob],
    tmp_path: Path,
) -> None:
    """``available``: an attestation alone is nothing to push, so the image waits (no job)."""
    load(containerd, image_builder, tmp_path, {NAME: attested["index"]})
    containerd.content_rm(layers(attested["amd"])[0], layers(attested["arm"])[0])
    configure(daemon, containerd, registry, "available")

    (row,) = daemon.plan()
    assert row["action"] == "wait", row
    assert "2 blob(s) missing" in row["reason"]
    result = daemon.cli("run", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert registry.tags("team") == []


def test_daemon_host_policy_pushes_manifest_and_attestation(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    arm_gone: dict[str, Blob],
    tmp_path: Path,
) -> None:
    configure(daemon, containerd, registry, "host")

    (row,) = daemon.plan()
    assert row["action"] == "push", row
    result = daemon.cli("run", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    entries = served_entries(registry, "team:1")
    assert [e["digest"] for e in entries] == [arm_gone["amd"].digest, arm_gone["amd-att"].digest]
    served = registry.skopeo_inspect_digest("team:1")
    registry.verify_image("team:1", served, tmp_path)
    assert daemon.status()["pushed_count"] == 1
