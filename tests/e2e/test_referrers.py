"""Referrers against a real containerd and a real docker-registry 2.8 (no referrers API).

containerd holds an image, a cosign-shaped signature under ``<repo>:sha256-<hex>.sig`` (built
here: a simplesigning payload layer with its ``dev.cosignproject.cosign/signature``
annotation, no cosign needed) and an OCI 1.1 SBOM artifact whose ``subject`` is the image,
all imported with ``ctr images import``. Everything pushed is checked with skopeo from outside:
digests equal to the source, every blob pulled and verified, and the ``sha256-<hex>``
tag-schema index listing the artifact. With referrers off none of it may reach the registry.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_daemon import configure as configure_daemon
from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.images import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Blob, ImageBuilder
from tests.support.process import wait_until
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SPDX = "application/spdx+json"
EMPTY = "application/vnd.oci.empty.v1+json"
SOURCE = "example.com/team/app:1"


def cosign_signature(b: ImageBuilder, subject: Blob, identity: str) -> Blob:
    """A manifest shaped like cosign's ``.sig`` image for ``subject``."""
    payload = b.json_blob(
        SIMPLESIGNING,
        {
            "critical": {
                "identity": {"docker-reference": identity},
                "image": {"docker-manifest-digest": subject.digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
    )
    config = b.json_blob(
        OCI_CONFIG,
        {
            "architecture": "",
            "config": {},
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [payload.digest]},
        },
    )
    signature = base64.b64encode(b"not a real ECDSA signature of " + payload.digest.encode())
    return b.json_blob(
        OCI_MANIFEST,
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [payload.descriptor(annotations={SIGNATURE_ANNOTATION: signature.decode()})],
        },
    )


def sbom_artifact(b: ImageBuilder, subject: Blob, name: str) -> Blob:
    """An OCI 1.1 artifact: an SPDX document with ``artifactType`` and ``subject``."""
    empty = b.json_blob(EMPTY, {})
    document = b.json_blob(SPDX, {"spdxVersion": "SPDX-2.3", "name": name, "packages": []})
    return b.json_blob(
        OCI_MANIFEST,
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SPDX,
            "config": empty.descriptor(),
            "layers": [document.descriptor()],
            "subject": subject.descriptor(),
            "annotations": {"org.opencontainers.image.created": "2024-06-07T00:00:00Z"},
        },
    )


def cosign_tag(subject: Blob, suffix: str = "sig") -> str:
    return f"sha256-{subject.digest.removeprefix('sha256:')}.{suffix}"


def leaves(b: ImageBuilder, root: Blob) -> list[str]:
    """The config and layer digests of a manifest."""
    doc = root.json()
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def push(containerd: Containerd, target: str, *args: str, home: Path) -> Outcome:
    argv = ["push", SOURCE, target, "--root", str(containerd.root), "--plain-http", "--json"]
    return run_cli([*argv, *args], home=home)


@pytest.fixture
def signed(containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path) -> dict[str, Blob]:
    """In containerd: the image, its cosign signature, and an SBOM naming it as subject."""
    b = image_builder
    app = b.image([4000, 900], "referrers/app")
    sig = cosign_signature(b, app, "example.com/team/app")
    sbom = sbom_artifact(b, app, "app-sbom")
    images = {
        SOURCE: app,
        f"example.com/team/app:{cosign_tag(app)}": sig,
        # How containerd names what was pulled by digest: only an image name keeps it.
        f"example.com/team/app@{sbom.digest}": sbom,
        "example.com/team/unrelated:1": b.image([500], "referrers/unrelated"),
    }
    load(containerd, b, tmp_path, images)
    assert containerd.images()[f"example.com/team/app@{sbom.digest}"] == sbom.digest
    return {"app": app, "sig": sig, "sbom": sbom}


def check_pushed(
    registry: Registry, b: ImageBuilder, signed: Mapping[str, Blob], repo: str, pull: Path
) -> None:
    """Subject, signature and SBOM are in ``repo`` as in containerd; the index lists the SBOM."""
    app, sig, sbom = signed["app"], signed["sig"], signed["sbom"]
    registry.verify_image(f"{repo}:1", app.digest, pull)
    registry.verify_image(f"{repo}:{cosign_tag(app)}", sig.digest, pull)
    registry.verify_image(f"{repo}@{sbom.digest}", sbom.digest, pull)
    for blob in [*leaves(b, sig), *leaves(b, sbom)]:
        assert registry.blob_exists(repo, blob)
    fallback = f"{repo}:sha256-{app.digest.removeprefix('sha256:')}"
    index = json.loads(registry.skopeo_inspect_raw(fallback))
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": sbom.digest,
            "size": sbom.size,
            "artifactType": SPDX,
            "annotations": {"org.opencontainers.image.created": "2024-06-07T00:00:00Z"},
        }
    ]


def check_not_pushed(
    registry: Registry, b: ImageBuilder, signed: Mapping[str, Blob], repo: str
) -> None:
    app, sig, sbom = signed["app"], signed["sig"], signed["sbom"]
    registry.verify_image(f"{repo}:1", app.digest)
    assert registry.tags(repo) == ["1"]
    for blob in [*leaves(b, sig), *leaves(b, sbom)]:
        assert not registry.blob_exists(repo, blob)
    result = registry.skopeo(
        "inspect",
        "--raw",
        "--tls-verify=false",
        registry.docker_ref(f"{repo}@{sbom.digest}"),
        check=False,
    )
    assert result.returncode != 0 and "manifest unknown" in result.stderr


# ---------------------------------------------------------------------- imagepushd push


def test_push_with_referrers_pushes_signature_and_sbom_after_the_image(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    signed: dict[str, Blob],
    tmp_path: Path,
) -> None:
    app, sig, sbom = signed["app"], signed["sig"], signed["sbom"]
    mark = registry.log_mark()

    outcome = push(containerd, f"{registry.host}/mirror/app:1", "--referrers", home=tmp_path)

    result = outcome.result
    assert result["digest"] == app.digest
    referrers = result["referrers"]
    assert {(p["target"], p["digest"]) for p in referrers["pushed"]} == {
        (f"{registry.host}/mirror/app:{cosign_tag(app)}", sig.digest),
        (f"{registry.host}/mirror/app@{sbom.digest}", sbom.digest),
    }
    fallback = f"sha256-{app.digest.removeprefix('sha256:')}"
    assert referrers["referrers_api"] is False
    assert referrers["index"] == f"{registry.host}/mirror/app:{fallback}"
    check_pushed(registry, image_builder, signed, "mirror/app", tmp_path / "pull")
    # The subject went first, the index after what it lists.
    puts = [
        r["path"].rpartition("/")[2]
        for r in registry.requests(since=mark)
        if r["method"] == "PUT" and "/manifests/" in r["path"]
    ]
    assert puts[0] == "1"
    assert puts.index(fallback) > puts.index(sbom.digest)

    # Again: all there; nothing is written, the index is left as it is.
    mark = registry.log_mark()
    again = push(containerd, f"{registry.host}/mirror/app:1", "--referrers", home=tmp_path).result
    assert again["up_to_date"] is True
    assert all(p["up_to_date"] for p in again["referrers"]["pushed"])
    assert again["referrers"]["index"] is None
    assert not [r for r in registry.requests(since=mark) if r["method"] in ("PUT", "POST")]


def test_fallback_index_entries_pushed_by_others_are_kept(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    signed: dict[str, Blob],
    tmp_path: Path,
) -> None:
    """Another tool's referrer already in the tag-schema index stays listed beside ours."""
    b = image_builder
    app, sbom = signed["app"], signed["sbom"]
    # Someone else pushed the image and a second SBOM with its index entry (skopeo, from an
    # OCI layout written here).
    theirs = sbom_artifact(b, app, "their-sbom")
    layout = tmp_path / "theirs"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    fallback = f"sha256-{app.digest.removeprefix('sha256:')}"
    entry = {"mediaType": OCI_MANIFEST, "digest": theirs.digest, "size": theirs.size}
    their_index = b.json_blob(
        OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
    )
    for blob in {
        x.digest: x for x in [*b.blobs_of(app), *b.blobs_of(theirs), their_index]
    }.values():
        (layout / "blobs" / "sha256" / blob.hex).write_bytes(blob.data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    names = {"app": app, "theirs": theirs, "index": their_index}
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    x.descriptor(annotations={"org.opencontainers.image.ref.name": n})
                    for n, x in names.items()
                ],
            }
        )
    )
    registry.skopeo_push_oci(layout, "mirror/app:1", image="app")
    registry.skopeo_push_oci(layout, f"mirror/app@{theirs.digest}", image="theirs")
    registry.skopeo_push_oci(layout, f"mirror/app:{fallback}", image="index")

    outcome = push(containerd, f"{registry.host}/mirror/app:1", "--referrers", home=tmp_path)

    assert outcome.result["referrers"]["index"] == f"{registry.host}/mirror/app:{fallback}"
    index = json.loads(registry.skopeo_inspect_raw(f"mirror/app:{fallback}"))
    assert [m["digest"] for m in index["manifests"]] == [theirs.digest, sbom.digest]
    assert index["manifests"][0] == entry
    registry.verify_image(f"mirror/app@{sbom.digest}", sbom.digest, tmp_path / "pull")


def test_push_without_referrers_pushes_only_the_image(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    signed: dict[str, Blob],
    tmp_path: Path,
) -> None:
    outcome = push(containerd, f"{registry.host}/mirror/app:1", home=tmp_path)

    assert "referrers" not in outcome.result
    check_not_pushed(registry, image_builder, signed, "mirror/app")


def test_referrers_of_an_index_reduced_by_the_platform_policy_are_refused(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """The target gets a reduced index, a digest the signature does not name: one-line error."""
    b = image_builder
    amd = b.image([1000], "reduced/amd")
    arm = b.image([1000], "reduced/arm", architecture="arm64")
    index = b.index([amd, arm])
    sig = cosign_signature(b, index, "example.com/team/app")
    load(containerd, b, tmp_path, {SOURCE: index, f"example.com/team/app:{cosign_tag(index)}": sig})

    outcome = push(
        containerd,
        f"{registry.host}/mirror/app:1",
        "--referrers",
        "--platform",
        "linux/amd64",
        home=tmp_path,
    )

    assert outcome.code == 1
    [line] = outcome.error_lines
    assert line.startswith("imagepushd: error: --referrers: ")
    assert f"not {index.digest}, which the referrers refer to" in line
    reduced = registry.skopeo_inspect_digest("mirror/app:1")
    assert reduced != index.digest
    registry.verify_image("mirror/app:1", reduced, tmp_path / "pull")
    assert registry.tags("mirror/app") == ["1"]


# ---------------------------------------------------------------------- the daemon


def configure(daemon: Daemon, containerd: Containerd, host: str, **rule: Any) -> None:
    """One rule for ``example.com/team/app:1`` only (not its cosign tags) to ``host``."""
    rules = [{"match": [SOURCE], "target": f"{host}/mirror/app:{{tag}}", **rule}]
    configure_daemon(daemon, containerd, host, rules, on_start="all")


def test_daemon_rule_with_referrers_pushes_them_and_later_ones_too(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    signed: dict[str, Blob],
    tmp_path: Path,
) -> None:
    b = image_builder
    app = signed["app"]
    configure(daemon, containerd, registry.host, referrers=True)

    once = daemon.cli("run", "--once", timeout=60)
    assert once.returncode == 0, once.stderr
    check_pushed(registry, b, signed, "mirror/app", tmp_path / "pull")
    pushed = {(p["target"], p["digest"]) for p in daemon.status()["recent"]}
    host = registry.host
    assert pushed == {
        (f"{host}/mirror/app:1", app.digest),
        (f"{host}/mirror/app:{cosign_tag(app)}", signed["sig"].digest),
        (f"{host}/mirror/app@{signed['sbom'].digest}", signed["sbom"].digest),
    }

    # An attestation tagged after the push: the next scan sees it and pushes it.
    att = cosign_signature(b, app, "example.com/team/app-attested")
    load(containerd, b, tmp_path, {f"example.com/team/app:{cosign_tag(app, 'att')}": att})
    once = daemon.cli("run", "--once", timeout=60)
    assert once.returncode == 0, once.stderr
    registry.verify_image(f"mirror/app:{cosign_tag(app, 'att')}", att.digest, tmp_path / "pull")
    assert daemon.status()["pushed_count"] == 4
    # And nothing is due after that.
    mark = registry.log_mark()
    once = daemon.cli("run", "--once", timeout=60)
    assert once.returncode == 0, once.stderr
    assert not [r for r in registry.requests(since=mark) if r["method"] in ("PUT", "POST")]


def test_daemon_rule_without_referrers_pushes_only_the_image(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    signed: dict[str, Blob],
) -> None:
    configure(daemon, containerd, registry.host)

    once = daemon.cli("run", "--once", timeout=60)

    assert once.returncode == 0, once.stderr
    check_not_pushed(registry, image_builder, signed, "mirror/app")
    assert daemon.status()["pushed_count"] == 1


def test_running_daemon_pushes_a_signature_tagged_after_its_image(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """The build tags the image, the daemon pushes it; then the signature is tagged."""
    b = image_builder
    app = b.image([3000], "referrers/late")
    sig = cosign_signature(b, app, "example.com/team/app")
    load(containerd, b, tmp_path, {"build/app:1": app, "build/app:sig": sig})
    configure(daemon, containerd, registry.host, referrers=True)
    daemon.start()
    daemon.wait_notify("READY", "1")

    containerd.tag("build/app:1", SOURCE)
    assert wait_until(lambda: registry.tags("mirror/app") == ["1"], timeout=10)
    registry.verify_image("mirror/app:1", app.digest)
    containerd.tag("build/app:sig", f"example.com/team/app:{cosign_tag(app)}")

    assert wait_until(lambda: len(registry.tags("mirror/app")) == 2, timeout=10)
    registry.verify_image(f"mirror/app:{cosign_tag(app)}", sig.digest, tmp_path / "pull")
    daemon.wait_log("again for a new referrer")
