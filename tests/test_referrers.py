"""Referrers: finding cosign tags and OCI subject referrers, the tag-schema index, re-push jobs.

The registry here is the in-memory fake (tests/support/fakeregistry.py) with manifests added by
a hook, for what docker-registry 2.8 cannot do: answer the OCI 1.1 referrers API. Pushing to a
registry without it, the real one, is in tests/e2e/test_referrers.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagepushd.decide.planner import Job, repush_jobs
from imagepushd.decide.platforms import host_platform
from imagepushd.decide.rules import Glob, Rule
from imagepushd.errors import ManifestError, MissingContentError
from imagepushd.oci import OCI_INDEX, OCI_MANIFEST, Descriptor
from imagepushd.push.publish import ReferrersResult, fallback_tag, merge_index, push_referrers
from imagepushd.push.pusher import Pusher
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.upload import BlobUploader
from imagepushd.reference import parse_reference
from imagepushd.remember import Pushed
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import BlobRecord, ImageRecord, MetadataSnapshot
from imagepushd.watch.referrers import ReferrerFinder
from tests.support.fakeregistry import FakeRegistry, Network, error, make_client
from tests.support.images import Blob, ImageBuilder, sha256_digest

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SPDX = "application/spdx+json"
EMPTY = "application/vnd.oci.empty.v1+json"
HOST = "registry.test"
_MANIFEST = re.compile(r"/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)")
_REFERRERS = re.compile(r"/v2/(?P<repo>.+)/referrers/(?P<digest>[^/]+)")


# ---------------------------------------------------------------------- content


def signature(b: ImageBuilder, subject: Blob, seed: str) -> Blob:
    """A cosign-shaped signature manifest: a simplesigning payload with its signature."""
    payload = b.json_blob(
        SIMPLESIGNING,
        {"critical": {"image": {"docker-manifest-digest": subject.digest}}, "seed": seed},
    )
    config = b.json_blob("application/vnd.oci.image.config.v1+json", {"rootfs": {}})
    layer = payload.descriptor(annotations={"dev.cosignproject.cosign/signature": f"MEUC{seed}"})
    return b.json_blob(
        OCI_MANIFEST,
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer],
        },
    )


def sbom(b: ImageBuilder, subject: Blob, seed: str, **extra: Any) -> Blob:
    """An OCI 1.1 artifact manifest: an SPDX document whose ``subject`` is ``subject``."""
    empty = b.json_blob(EMPTY, {})
    document = b.json_blob(SPDX, {"spdxVersion": "SPDX-2.3", "name": seed})
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SPDX,
        "config": empty.descriptor(),
        "layers": [document.descriptor()],
        "subject": subject.descriptor(),
        "annotations": {"org.example.seed": seed},
    }
    doc.update(extra)
    return b.json_blob(OCI_MANIFEST, doc)


def store_with(tmp_path: Path, b: ImageBuilder, *roots: Blob) -> ContentStore:
    store = ContentStore(tmp_path / "root")
    for root in roots:
        for blob in b.blobs_of(root):
            path = store.path(blob.digest)
            path.parent.mkdir(parents=True, exist_ok=True)
            with blob.open() as src:
                path.write_bytes(src.read())
    return store


def snapshot(
    b: ImageBuilder, images: Mapping[str, Blob], namespace: str = "default"
) -> MetadataSnapshot:
    records = tuple(
        ImageRecord(namespace, name, Descriptor(root.media_type, root.digest, root.size))
        for name, root in images.items()
    )
    blobs = {
        blob.digest: BlobRecord(blob.digest, blob.size)
        for root in images.values()
        for blob in b.blobs_of(root)
    }
    return MetadataSnapshot(1, 3, (namespace,), records, {namespace: blobs})


# ---------------------------------------------------------------------- finding


def test_finder_finds_cosign_tags_and_subject_referrers_of_one_digest(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    app = b.image([100], "app")
    other = b.image([100], "other")
    sig = signature(b, app, "s")
    bom = sbom(b, app, "bom")
    other_bom = sbom(b, other, "other-bom")
    hex_ = app.digest.removeprefix("sha256:")
    images = {
        "example.com/team/app:1": app,
        "example.com/team/other:1": other,
        f"example.com/team/app:sha256-{hex_}.sig": sig,
        f"example.com/team/app:sha256-{hex_}.att": sig,
        f"example.com/team/app@{bom.digest}": bom,
        "example.com/team/app:sbom": bom,  # the same manifest under a second name: once
        f"example.com/team/other@{other_bom.digest}": other_bom,
        "example.com/team/app:sha256-nothex.sig": sig,  # not a cosign tag
    }
    store = store_with(tmp_path, b, *images.values())
    snap = snapshot(b, images)

    found = ReferrerFinder(store).referrers(snap, "default", app.digest, "team/app")

    by_key = {r.tag or r.descriptor.digest: r for r in found}
    assert sorted(by_key) == sorted([f"sha256-{hex_}.sig", f"sha256-{hex_}.att", bom.digest])
    assert len(found) == 3
    assert by_key[f"sha256-{hex_}.sig"].listed is False
    listed = by_key[bom.digest]
    assert listed.listed and listed.tag is None and listed.subject == app.digest
    assert listed.index_entry() == {
        "mediaType": OCI_MANIFEST,
        "digest": bom.digest,
        "size": bom.size,
        "artifactType": SPDX,
        "annotations": {"org.example.seed": "bom"},
    }
    assert ReferrerFinder(store).referrers(snap, "other-namespace", app.digest) == []


def test_finder_prefers_the_cosign_tag_in_the_subjects_own_repository(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    app = b.image([100], "app")
    mine, theirs = signature(b, app, "mine"), signature(b, app, "theirs")
    tag = f"sha256-{app.digest.removeprefix('sha256:')}.sig"
    images = {"example.com/a/app:1": app, f"example.com/a/app:{tag}": mine}
    images[f"example.com/0/copy:{tag}"] = theirs  # sorts first by name
    store = store_with(tmp_path, b, *images.values())

    found = ReferrerFinder(store).referrers(snapshot(b, images), "default", app.digest, "a/app")

    assert [(r.tag, r.descriptor.digest) for r in found] == [(tag, mine.digest)]


def test_artifact_type_falls_back_to_the_config_media_type(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    app = b.image([100], "app")
    bom = sbom(b, app, "x")
    doc = bom.json()
    del doc["artifactType"]
    del doc["annotations"]
    plain = b.json_blob(OCI_MANIFEST, doc)
    images = {"example.com/app:1": app, "example.com/app:bom": plain}
    store = store_with(tmp_path, b, *images.values())

    [found] = ReferrerFinder(store).referrers(snapshot(b, images), "default", app.digest)

    assert found.index_entry() == {
        "mediaType": OCI_MANIFEST,
        "digest": plain.digest,
        "size": plain.size,
        "artifactType": EMPTY,
    }


def test_a_manifest_outside_the_namespace_or_absent_is_not_read(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    app = b.image([100], "app")
    bom = sbom(b, app, "x")
    images = {"example.com/app:1": app, "example.com/app:bom": bom}
    snap = snapshot(b, images)
    finder = ReferrerFinder(store_with(tmp_path, b, app))  # bom's manifest file is absent
    assert finder.referrers(snap, "default", app.digest) == []
    # Once the file is there it is found: absence is not remembered.
    store = store_with(tmp_path, b, bom)
    assert [r.descriptor.digest for r in finder.referrers(snap, "default", app.digest)] == [
        bom.digest
    ]
    # A namespace whose blob records lack the manifest does not see it.
    hidden = MetadataSnapshot(1, 3, ("default",), snap.images, {"default": {}})
    assert ReferrerFinder(store).referrers(hidden, "default", app.digest) == []


# ---------------------------------------------------------------------- the tag-schema index


def entry(digest: str, artifact_type: str = SPDX) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": 10, "artifactType": artifact_type}


def test_fallback_tag_is_algorithm_dash_hex() -> None:
    assert fallback_tag("sha256:" + "ab" * 32) == "sha256-" + "ab" * 32
    assert fallback_tag("sha512:" + "c" * 128) == "sha512-" + "c" * 64


def test_merge_index_starts_an_index() -> None:
    data = merge_index(None, [entry("sha256:" + "1" * 64)])
    assert json.loads(data) == {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [entry("sha256:" + "1" * 64)],
    }


def test_merge_index_keeps_what_others_pushed_verbatim() -> None:
    theirs = {
        "mediaType": OCI_MANIFEST,
        "digest": "sha256:" + "2" * 64,
        "size": 99,
        "artifactType": "application/vnd.example.signature",
        "annotations": {"x": "y"},
        "vendor-field": [1, 2],
    }
    existing = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [theirs],
        "annotations": {"kept": "too"},
    }
    data = merge_index(
        (OCI_INDEX, json.dumps(existing).encode()),
        [entry("sha256:" + "1" * 64), entry(theirs["digest"], "ignored: already listed")],
    )
    doc = json.loads(data)
    assert doc["manifests"] == [theirs, entry("sha256:" + "1" * 64)]
    assert doc["annotations"] == {"kept": "too"}


@pytest.mark.parametrize(
    ("media_type", "doc"),
    [
        (OCI_MANIFEST, {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
        (OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": "nope"}),
    ],
)
def test_merge_index_refuses_to_overwrite_something_else(
    media_type: str, doc: dict[str, Any]
) -> None:
    with pytest.raises(ManifestError, match="not overwriting"):
        merge_index((media_type, json.dumps(doc).encode()), [entry("sha256:" + "1" * 64)])


# ---------------------------------------------------------------------- pushing


class Manifests:
    """Manifest routes for the fake registry; with ``api`` also the referrers API."""

    def __init__(self, fake: FakeRegistry, *, api: bool) -> None:
        self.api = api
        self.stored: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.puts: list[str] = []
        fake.hooks.append(self)

    def __call__(self, request: httpx.Request) -> httpx.Response | None:
        path = request.url.path
        referrers = _REFERRERS.fullmatch(path)
        if referrers is not None:
            if not self.api:
                return httpx.Response(404, text="404 page not found")
            return self.referrers(referrers["repo"], referrers["digest"])
        found = _MANIFEST.fullmatch(path)
        if found is None:
            return None
        repo, ref = found["repo"], found["ref"]
        if request.method == "PUT":
            data = request.read()
            digest = sha256_digest(data)
            media_type = request.headers["content-type"]
            self.stored[(repo, digest)] = self.stored[(repo, ref)] = (media_type, data)
            self.puts.append(f"{repo}:{ref}")
            headers = {"Docker-Content-Digest": digest}
            if self.api and "subject" in json.loads(data):
                headers["OCI-Subject"] = json.loads(data)["subject"]["digest"]
            return httpx.Response(201, headers=headers)
        held = self.stored.get((repo, ref))
        if held is None:
            return error(404, "MANIFEST_UNKNOWN")
        media_type, data = held
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256_digest(data)}
        return httpx.Response(
            200, headers=headers, content=b"" if request.method == "HEAD" else data
        )

    def referrers(self, repo: str, digest: str) -> httpx.Response:
        listed = []
        for (where, ref), (media_type, data) in self.stored.items():
            doc = json.loads(data)
            if (
                where == repo
                and ref.startswith("sha256:")
                and doc.get("subject", {}).get("digest") == digest
            ):
                listed.append({"mediaType": media_type, "digest": ref, "size": len(data)})
        body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": listed}
        return httpx.Response(200, json=body, headers={"Content-Type": OCI_INDEX})


@dataclass
class Setup:
    """An image with a cosign signature and an SBOM in a content store, and a fake registry."""

    fake: FakeRegistry
    manifests: Manifests
    client: RegistryClient
    store: ContentStore
    snap: MetadataSnapshot
    app: Blob
    sig: Blob
    bom: Blob

    def push(self, target: str = f"{HOST}/mirror/app:1", **kwargs: Any) -> ReferrersResult:
        """Push the referrers of ``app`` (found as the daemon finds them) next to ``target``."""
        found = ReferrerFinder(self.store).referrers(
            self.snap, "default", self.app.digest, "team/app"
        )
        return push_referrers(
            found,
            content=self.store,
            known=self.snap.blobs["default"],
            pusher=Pusher(self.store, self.client, BlobUploader(self.client), host=host_platform()),
            client=self.client,
            target=parse_reference(target),
            subject=self.app.digest,
            **kwargs,
        )


def pushed_world(tmp_path: Path, b: ImageBuilder, *, api: bool) -> Setup:
    app = b.image([100], "app")
    sig, bom = signature(b, app, "s"), sbom(b, app, "bom")
    images = {
        "example.com/team/app:1": app,
        f"example.com/team/app:sha256-{app.digest.removeprefix('sha256:')}.sig": sig,
        f"example.com/team/app@{bom.digest}": bom,
    }
    store = store_with(tmp_path, b, *images.values())
    fake = FakeRegistry(HOST)
    manifests = Manifests(fake, api=api)
    return Setup(
        fake, manifests, make_client(Network(fake)), store, snapshot(b, images), app, sig, bom
    )


def test_a_registry_with_the_referrers_api_gets_no_fallback_tag(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    s = pushed_world(tmp_path, b, api=True)
    recorded: list[str] = []

    result = s.push(on_pushed=lambda p: recorded.append(str(p.target)))

    tag = f"sha256-{s.app.digest.removeprefix('sha256:')}.sig"
    assert result.api is True and result.index is None
    assert sorted(recorded) == sorted(
        [f"{HOST}/mirror/app:{tag}", f"{HOST}/mirror/app@{s.bom.digest}"]
    )
    assert sorted(s.manifests.puts) == sorted([f"mirror/app:{tag}", f"mirror/app:{s.bom.digest}"])
    for blob in b.blobs_of(s.bom)[1:] + b.blobs_of(s.sig)[1:]:
        assert s.fake.has_blob("mirror/app", blob.digest)


def test_a_registry_without_it_gets_the_fallback_index_merged(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    s = pushed_world(tmp_path, image_builder, api=False)
    tag = fallback_tag(s.app.digest)
    theirs = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "e" * 64, "size": 5}
    existing = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [theirs]}
    s.manifests.stored[("mirror/app", tag)] = (OCI_INDEX, json.dumps(existing).encode())

    result = s.push()

    assert result.api is False
    assert str(result.index) == f"{HOST}/mirror/app:{tag}"
    media_type, data = s.manifests.stored[("mirror/app", tag)]
    assert media_type == OCI_INDEX
    assert json.loads(data)["manifests"] == [
        theirs,
        {
            "mediaType": OCI_MANIFEST,
            "digest": s.bom.digest,
            "size": s.bom.size,
            "artifactType": SPDX,
            "annotations": {"org.example.seed": "bom"},
        },
    ]
    # The tag-schema index goes after the referrer it lists.
    puts = s.manifests.puts
    assert puts.index(f"mirror/app:{tag}") > puts.index(f"mirror/app:{s.bom.digest}")
    # Again: everything is there, nothing is written.
    before = len(puts)
    again = s.push()
    assert again.index is None and all(p.result.up_to_date for p in again.pushed)
    assert len(puts) == before


def test_a_registry_reading_the_fallback_tag_as_the_digest_gets_no_index(
    tmp_path: Path, image_builder: ImageBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    """GitLab serves the subject at the tag ``sha256-<hex>`` (oras-project/oras-go#1396)."""
    s = pushed_world(tmp_path, image_builder, api=False)
    tag = fallback_tag(s.app.digest)
    s.manifests.stored[("mirror/app", tag)] = (OCI_MANIFEST, s.app.data)

    result = s.push()

    assert result.api is False and result.index is None
    assert f"mirror/app:{tag}" not in s.manifests.puts
    assert s.manifests.stored[("mirror/app", tag)] == (OCI_MANIFEST, s.app.data)
    assert "reads the tag as a digest" in caplog.text
    # The referrers themselves went.
    assert f"mirror/app:{s.bom.digest}" in s.manifests.puts


def test_a_referrer_with_missing_content_fails_after_the_others(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    s = pushed_world(tmp_path, image_builder, api=False)
    s.store.path(s.bom.json()["layers"][0]["digest"]).unlink()

    with pytest.raises(MissingContentError):
        s.push()

    # The signature went; the incomplete SBOM and therefore the index did not.
    assert [p.endswith(".sig") for p in s.manifests.puts] == [True]


# ---------------------------------------------------------------------- re-push jobs


def rule(index: int, pattern: str, *, referrers: bool, target: str = "{image}") -> Rule:
    return Rule(index, (Glob.compile(pattern),), targets=(target,), referrers=referrers)


def test_repush_jobs_for_a_referrer_that_came_after_its_subjects_push(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    b = image_builder
    app, moved = b.image([100], "app"), b.image([100], "moved")
    sig = signature(b, app, "s")
    tag = f"sha256-{app.digest.removeprefix('sha256:')}.sig"
    images = {
        f"{HOST}/team/app:1": app,
        f"{HOST}/team/app:2": moved,  # was app when pushed, moved since
        f"{HOST}/team/app:{tag}": sig,
    }
    store = store_with(tmp_path, b, *images.values())
    snap = snapshot(b, images)
    [referrer] = ReferrerFinder(store).among([snap.images[2]], snap)

    def pushed(target: str, name: str, namespace: str = "default") -> Pushed:
        return Pushed(target, app.digest, namespace, name, 0.0, 0, 0.0)

    records = [
        pushed(f"{HOST}/team/app:1", f"{HOST}/team/app:1"),
        pushed(f"{HOST}/team/app:2", f"{HOST}/team/app:2"),
        pushed(f"{HOST}/team/app:1", f"{HOST}/team/app:1", namespace="elsewhere"),
    ]
    with_referrers = [rule(0, f"{HOST}/team/app:1", referrers=True)]
    expected = Job("default", f"{HOST}/team/app:1", app.digest, f"{HOST}/team/app:1", 0)

    assert repush_jobs([referrer], records, set(), with_referrers, snap) == [expected]
    # Already at its target: nothing to do.
    holdings = {(f"{HOST}/team/app:{tag}", sig.digest)}
    assert repush_jobs([referrer], records, holdings, with_referrers, snap) == []
    # A rule without referrers, or one that renders another target, asks for nothing.
    assert repush_jobs([referrer], records, set(), [rule(0, "**", referrers=False)], snap) == []
    mirror = [rule(0, "**", referrers=True, target="mirror.test/{repository}:{tag}")]
    assert repush_jobs([referrer], records, set(), mirror, snap) == []
