"""``imagepushd push`` against a real containerd and a real docker-registry.

Every pushed image is checked from outside: ``skopeo inspect --raw`` must serve the expected
digest and ``skopeo copy --all`` must pull it (every blob verified) into an OCI layout
(a ``dir:`` layout for Docker manifest lists, which skopeo will not write as OCI unchanged).
Request counts come from the registry's access log.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd
from tests.support.images import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Blob,
    ImageBuilder,
)
from tests.support.registry import Registry, RequestRecord, free_port

pytestmark = pytest.mark.e2e

SOURCE_LABEL = "containerd.io/distribution.source."
UPLOAD_METHODS = ("POST", "PATCH", "PUT")


def push(
    containerd: Containerd,
    image: str,
    target: str | None,
    *args: str,
    home: Path,
    env: Mapping[str, str] | None = None,
    stdin: str = "",
    json_output: bool = True,
) -> Outcome:
    """Run ``imagepushd push`` in-process against ``containerd``'s root."""
    argv = ["push", image, *([target] if target else []), "--root", str(containerd.root)]
    argv += [*args, *(["--json"] if json_output else [])]
    return run_cli(argv, home=home, env=env, stdin=stdin)


def load(
    containerd: Containerd, b: ImageBuilder, tmp_path: Path, images: Mapping[str, Blob]
) -> None:
    """Import ``images`` (containerd name -> root) through an OCI archive."""
    archive = tmp_path / "images.tar"
    b.write_oci_archive(archive, images)
    containerd.import_archive(archive)


def leaves(b: ImageBuilder, root: Blob) -> set[str]:
    """Digests of configs and layers (the blobs, not manifests) reachable from ``root``."""
    structural = MANIFEST_TYPES | INDEX_TYPES
    return {blob.digest for blob in b.blobs_of(root) if blob.media_type not in structural}


def uploads(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """Requests that write blobs or manifests (POST/PATCH/PUT)."""
    return [r for r in records if r["method"] in UPLOAD_METHODS]


def blob_uploads(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """Requests that write blobs (upload sessions), manifest PUTs excluded."""
    return [r for r in uploads(records) if "/blobs/uploads/" in r["path"]]


def served_platforms(registry: Registry, ref: str) -> list[str]:
    doc = json.loads(registry.skopeo_inspect_raw(ref))
    return sorted(
        "/".join(
            p
            for p in (
                m["platform"]["os"],
                m["platform"]["architecture"],
                m["platform"].get("variant"),
            )
            if p
        )
        for m in doc["manifests"]
    )


# ---------------------------------------------------------------------- image shapes


def test_single_platform_oci_manifest(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 70_000], "single")
    load(containerd, b, tmp_path, {"example.com/app:1": root})
    ref = "app/single:v1"

    run_ = push(containerd, "example.com/app:1", f"{registry.host}/{ref}", home=tmp_path)

    result = run_.result
    assert result["target"] == f"{registry.host}/{ref}"
    assert result["digest"] == root.digest
    assert result["media_type"] == root.media_type
    assert result["platforms"] == ["linux/amd64"]
    assert result["pushed_blobs"] == 3  # config + 2 layers
    assert result["skipped_blobs"] == result["mounted_blobs"] == 0
    assert result["bytes_sent"] == sum(b.get(d).size for d in leaves(b, root))
    assert result["manifests"] == 1
    assert result["up_to_date"] is False
    registry.verify_image(ref, root.digest, tmp_path)


def test_target_prefix_and_template(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """TARGET ending in / takes the image's path and tag (as docker-image-pusher's --target);
    a TARGET with fields renders as a rule's target does."""
    b = image_builder
    root = b.image([3000], "prefix")
    load(containerd, b, tmp_path, {"docker.io/library/nginx:v1": root})

    by_prefix = push(containerd, "nginx:v1", f"{registry.host}/proj/", home=tmp_path).result
    assert by_prefix["target"] == f"{registry.host}/proj/nginx:v1"
    registry.verify_image("proj/nginx:v1", root.digest, tmp_path / "prefix")

    template = f"{registry.host}/{{namespace}}/{{repository}}:{{tag}}-mirror"
    by_template = push(containerd, "nginx:v1", template, home=tmp_path).result
    assert by_template["target"] == f"{registry.host}/default/library/nginx:v1-mirror"
    registry.verify_image("default/library/nginx:v1-mirror", root.digest, tmp_path / "tpl")

    bad = push(containerd, "nginx:v1", f"{registry.host}/{{nope}}", home=tmp_path)
    assert bad.code == 2 and len(bad.error_lines) == 1 and "{nope}" in bad.stderr


def test_multi_platform_index_all(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    amd = b.image([3000, 70_000], "multi/amd")
    arm = b.image([2000], "multi/arm", architecture="arm64", variant="v8")
    root = b.index([amd, arm])
    load(containerd, b, tmp_path, {"example.com/multi:1": root})

    run_ = push(
        containerd,
        "example.com/multi:1",
        f"{registry.host}/multi:1",
        "--platform",
        "all",
        home=tmp_path,
    )

    result = run_.result
    assert result["digest"] == root.digest
    assert sorted(result["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    assert result["pushed_blobs"] == 5
    assert result["manifests"] == 3
    registry.verify_image("multi:1", root.digest, tmp_path)
    assert served_platforms(registry, "multi:1") == ["linux/amd64", "linux/arm64/v8"]


def test_docker_manifest_and_manifest_list(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    single = b.image([4000, 500], "docker/single", docker=True)
    amd = b.image([1000], "docker/amd", docker=True)
    arm = b.image([1500], "docker/arm", architecture="arm64", variant="v8", docker=True)
    listed = b.index([amd, arm], docker=True)
    load(containerd, b, tmp_path, {"example.com/d:single": single, "example.com/d:list": listed})

    one = push(containerd, "example.com/d:single", f"{registry.host}/d:single", home=tmp_path)
    many = push(containerd, "example.com/d:list", f"{registry.host}/d:list", home=tmp_path)

    assert one.result["digest"] == single.digest
    assert one.result["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert many.result["digest"] == listed.digest
    assert many.result["media_type"] == (
        "application/vnd.docker.distribution.manifest.list.v2+json"
    )
    registry.verify_image("d:single", single.digest, tmp_path)
    registry.verify_image("d:list", listed.digest, tmp_path)


def test_empty_layer_and_a_normal_one(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    empty = b.layer(0, "empty")
    root = b.manifest([empty, b.layer(5000, "normal")])
    load(containerd, b, tmp_path, {"example.com/e:1": root})

    result = push(containerd, "example.com/e:1", f"{registry.host}/e:1", home=tmp_path).result

    assert result["pushed_blobs"] == 3
    assert result["bytes_sent"] == 5000 + root.json()["config"]["size"]
    assert registry.blob_exists("e", empty.digest)
    registry.verify_image("e:1", root.digest, tmp_path)


def test_large_blob_is_uploaded_in_chunks(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    big = b.layer_file(tmp_path / "big.layer", 12 << 20, "big")
    root = b.manifest([big, b.layer(1000, "small")])
    load(containerd, b, tmp_path, {"example.com/big:1": root})
    mark = registry.log_mark()

    result = push(
        containerd,
        "example.com/big:1",
        f"{registry.host}/big:1",
        "--chunk-size",
        "1MiB",
        home=tmp_path,
    ).result

    patches = [r for r in registry.requests(mark) if r["method"] == "PATCH" and r["status"] == 202]
    assert len(patches) >= 12
    assert result["pushed_blobs"] == 3
    assert result["bytes_sent"] == sum(b.get(d).size for d in leaves(b, root))
    registry.verify_image("big:1", root.digest, tmp_path)


# ---------------------------------------------------------------------- what is already there


def test_repush_same_tag_is_up_to_date_and_uploads_nothing(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    amd = b.image([3000], "again/amd")
    arm = b.image([2000], "again/arm", architecture="arm64")
    root = b.index([amd, arm])
    load(containerd, b, tmp_path, {"example.com/again:1": root})
    target = f"{registry.host}/again:1"
    assert push(containerd, "example.com/again:1", target, home=tmp_path).result["manifests"] == 3
    mark = registry.log_mark()

    result = push(containerd, "example.com/again:1", target, home=tmp_path).result

    assert result["up_to_date"] is True
    assert result["digest"] == root.digest
    assert result["pushed_blobs"] == result["mounted_blobs"] == result["bytes_sent"] == 0
    assert result["skipped_blobs"] == 4
    assert result["manifests"] == 0
    assert uploads(registry.requests(mark)) == []
    registry.verify_image("again:1", root.digest, tmp_path)


def test_second_tag_of_one_digest_uploads_no_blob(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 4000], "twotags")
    load(containerd, b, tmp_path, {"example.com/tt:1": root})
    first = push(containerd, "example.com/tt:1", f"{registry.host}/tt:a", home=tmp_path)
    assert first.result["pushed_blobs"] == 3
    mark = registry.log_mark()

    result = push(containerd, "example.com/tt:1", f"{registry.host}/tt:b", home=tmp_path).result

    assert result["up_to_date"] is False
    assert result["skipped_blobs"] == 3
    assert result["pushed_blobs"] == result["mounted_blobs"] == result["bytes_sent"] == 0
    assert result["manifests"] == 1
    assert blob_uploads(registry.requests(mark)) == []
    registry.verify_image("tt:a", root.digest, tmp_path)
    registry.verify_image("tt:b", root.digest, tmp_path)


def test_cross_repository_mount_from_source_labels(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 4000, 0], "mount")
    load(containerd, b, tmp_path, {"example.com/m:1": root})
    assert (
        push(containerd, "example.com/m:1", f"{registry.host}/first/repo:1", home=tmp_path).result[
            "pushed_blobs"
        ]
        == 4
    )
    blobs = leaves(b, root)
    for digest in blobs:
        # The label's host part is the registry host without its port (containerd's rule).
        containerd.ctr("content", "label", digest, f"{SOURCE_LABEL}127.0.0.1=first/repo")
    mark = registry.log_mark()

    result = push(
        containerd, "example.com/m:1", f"{registry.host}/second/repo:1", home=tmp_path
    ).result

    assert result["mounted_blobs"] == len(blobs) == 4
    assert result["pushed_blobs"] == result["skipped_blobs"] == result["bytes_sent"] == 0
    mounts = [
        r
        for r in registry.requests(mark)
        if r["method"] == "POST" and "mount=" in r["query"] and "from=first%2Frepo" in r["query"]
    ]
    assert len(mounts) == 4
    assert {r["status"] for r in mounts} == {201}
    assert [r for r in registry.requests(mark) if r["method"] in ("PATCH",)] == []
    registry.verify_image("second/repo:1", root.digest, tmp_path)


def test_mount_from_unknown_source_falls_back_to_upload_in_same_session(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 4000], "nomount")
    load(containerd, b, tmp_path, {"example.com/nm:1": root})
    blobs = leaves(b, root)
    for digest in blobs:
        containerd.ctr("content", "label", digest, f"{SOURCE_LABEL}127.0.0.1=never/pushed")
    mark = registry.log_mark()

    result = push(containerd, "example.com/nm:1", f"{registry.host}/nm:1", home=tmp_path).result

    assert result["pushed_blobs"] == len(blobs) == 3
    assert result["mounted_blobs"] == 0
    posts = [r for r in registry.requests(mark) if r["method"] == "POST"]
    # The refused mount (202) opened a normal session that the upload used: one POST per blob.
    assert len(posts) == 3
    assert all("mount=" in r["query"] and r["status"] == 202 for r in posts)
    registry.verify_image("nm:1", root.digest, tmp_path)


def test_push_by_digest_and_digest_mismatch(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000], "bydigest")
    other = b.image([3000], "other")
    load(containerd, b, tmp_path, {"example.com/bd:1": root, "example.com/other:1": other})

    result = push(
        containerd, "example.com/bd:1", f"{registry.host}/bd@{root.digest}", home=tmp_path
    ).result
    wrong = push(
        containerd, "example.com/bd:1", f"{registry.host}/bd@{other.digest}", home=tmp_path
    )

    assert result["digest"] == root.digest
    assert registry.tags("bd") == []  # pushed by digest only
    registry.verify_image(f"bd@{root.digest}", root.digest, tmp_path)
    assert wrong.code == 1
    assert len(wrong.error_lines) == 1, wrong.stderr
    assert other.digest in wrong.stderr and root.digest in wrong.stderr


def test_token_mount_asks_for_pull_on_the_source(
    containerd: Containerd, token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 4000], "tokmount")
    load(containerd, b, tmp_path, {"example.com/tm:1": root})
    login = ("--username", "alice", "--password-stdin")
    first = push(
        containerd,
        "example.com/tm:1",
        f"{token_registry.host}/first/repo:1",
        *login,
        home=tmp_path,
        stdin="secret\n",
    )
    assert first.result["pushed_blobs"] == 3
    for digest in leaves(b, root):
        containerd.ctr("content", "label", digest, f"{SOURCE_LABEL}127.0.0.1=first/repo")
    server = token_registry.token_server
    assert server is not None
    server.clear_requests()

    result = push(
        containerd,
        "example.com/tm:1",
        f"{token_registry.host}/second/repo:1",
        *login,
        home=tmp_path,
        stdin="secret\n",
    ).result

    assert result["mounted_blobs"] == 3
    assert result["pushed_blobs"] == result["bytes_sent"] == 0
    assert any(
        {"type": "repository", "name": "first/repo", "actions": ["pull"]} in r.access
        for r in server.requests
    ), server.requests
    token_registry.verify_image("second/repo:1", root.digest, tmp_path)


# ---------------------------------------------------------------------- platform policies


@pytest.fixture
def partial_index(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
) -> dict[str, Blob]:
    """An index over amd64, arm64/v8 and s390x whose s390x layer is gone from containerd."""
    b = image_builder
    images = {
        "amd": b.image([3000], "partial/amd"),
        "arm": b.image([2000], "partial/arm", architecture="arm64", variant="v8"),
        "s390x": b.image([1000], "partial/s390x", architecture="s390x"),
    }
    images["index"] = b.index([images["amd"], images["arm"], images["s390x"]])
    load(containerd, b, tmp_path, {"example.com/partial:1": images["index"]})
    s390x_layer = images["s390x"].json()["layers"][0]["digest"]
    containerd.content_rm(s390x_layer)
    return images


def test_platform_all_refuses_missing_platform(
    containerd: Containerd, registry: Registry, partial_index: dict[str, Blob], tmp_path: Path
) -> None:
    mark = registry.log_mark()
    run_ = push(
        containerd,
        "example.com/partial:1",
        f"{registry.host}/p:all",
        "--platform",
        "all",
        home=tmp_path,
    )
    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "linux/s390x" in run_.stderr
    assert "linux/amd64" not in run_.stderr
    assert uploads(registry.requests(mark)) == []
    assert registry.tags("p") == []


def test_platform_available_pushes_reduced_index(
    containerd: Containerd, registry: Registry, partial_index: dict[str, Blob], tmp_path: Path
) -> None:
    result = push(
        containerd,
        "example.com/partial:1",
        f"{registry.host}/p:avail",
        "--platform",
        "available",
        home=tmp_path,
    ).result
    assert result["digest"] != partial_index["index"].digest
    assert sorted(result["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    registry.verify_image("p:avail", result["digest"], tmp_path)
    assert served_platforms(registry, "p:avail") == ["linux/amd64", "linux/arm64/v8"]
    doc = json.loads(registry.skopeo_inspect_raw("p:avail"))
    assert [m["digest"] for m in doc["manifests"]] == [
        partial_index["amd"].digest,
        partial_index["arm"].digest,
    ]
    assert doc["mediaType"] == partial_index["index"].media_type


def test_platform_host_pushes_the_amd64_manifest(
    containerd: Containerd, registry: Registry, partial_index: dict[str, Blob], tmp_path: Path
) -> None:
    result = push(
        containerd,
        "example.com/partial:1",
        f"{registry.host}/p:host",
        "--platform",
        "host",
        home=tmp_path,
    ).result
    assert result["digest"] == partial_index["amd"].digest
    assert result["platforms"] == ["linux/amd64"]
    assert result["pushed_blobs"] == 2
    assert result["manifests"] == 1
    registry.verify_image("p:host", partial_index["amd"].digest, tmp_path)


def test_platform_explicit_arm64_pushes_index_of_that_platform(
    containerd: Containerd, registry: Registry, partial_index: dict[str, Blob], tmp_path: Path
) -> None:
    result = push(
        containerd,
        "example.com/partial:1",
        f"{registry.host}/p:arm",
        "--platform",
        "linux/arm64",
        home=tmp_path,
    ).result
    assert result["platforms"] == ["linux/arm64/v8"]
    assert result["digest"] != partial_index["index"].digest
    registry.verify_image("p:arm", result["digest"], tmp_path)
    assert served_platforms(registry, "p:arm") == ["linux/arm64/v8"]
    assert not registry.blob_exists("p", partial_index["amd"].digest)


def test_platform_explicit_missing_platform_fails(
    containerd: Containerd, registry: Registry, partial_index: dict[str, Blob], tmp_path: Path
) -> None:
    run_ = push(
        containerd,
        "example.com/partial:1",
        f"{registry.host}/p:x",
        "--platform",
        "linux/s390x",
        home=tmp_path,
    )
    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "linux/s390x" in run_.stderr


def test_explicit_plain_http_one_at_a_time(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    amd = b.image([3000, 2000], "plain/amd")
    arm = b.image([1000], "plain/arm", architecture="arm64", variant="v8")
    root = b.index([amd, arm])
    load(containerd, b, tmp_path, {"example.com/plain:1": root})
    mark = registry.log_mark()

    result = push(
        containerd,
        "example.com/plain:1",
        f"{registry.host}/plain:1",
        "--plain-http",
        "--concurrency",
        "1",
        "--platform",
        "available",
        home=tmp_path,
    ).result

    assert result["digest"] == root.digest  # nothing missing: "available" keeps the index
    assert result["pushed_blobs"] == 5
    registry.verify_image("plain:1", root.digest, tmp_path)
    assert registry.requests(mark)[0]["path"] == "/v2/"


def test_bad_platform_value_is_a_usage_error(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/app:1": b.image([100], "badplat")})
    run_ = push(
        containerd,
        "example.com/app:1",
        f"{registry.host}/app:1",
        "--platform",
        "linux",
        home=tmp_path,
    )
    assert len(run_.error_lines) == 1, run_.stderr
    assert "linux" in run_.stderr
    assert run_.code == 2


def test_platform_available_reduces_a_nested_index(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    amd = b.image([3000], "nested/amd")
    s390x = b.image([1000], "nested/s390x", architecture="s390x")
    arm = b.image([2000], "nested/arm", architecture="arm64", variant="v8")
    inner = b.index([amd, s390x])
    outer = b.index([inner, arm])
    load(containerd, b, tmp_path, {"example.com/nested:1": outer})
    containerd.content_rm(s390x.json()["layers"][0]["digest"])

    result = push(
        containerd,
        "example.com/nested:1",
        f"{registry.host}/nested:1",
        "--platform",
        "available",
        home=tmp_path,
    ).result

    assert result["digest"] != outer.digest
    assert sorted(result["platforms"]) == ["linux/amd64", "linux/arm64/v8"]
    assert result["manifests"] == 4  # two manifests, the reduced inner index, the top
    assert registry.skopeo_inspect_digest("nested:1") == result["digest"]
    top = json.loads(registry.skopeo_inspect_raw("nested:1"))
    new_inner, arm_entry = top["manifests"]
    assert arm_entry["digest"] == arm.digest
    assert new_inner["digest"] != inner.digest
    reduced = json.loads(registry.skopeo_inspect_raw(f"nested@{new_inner['digest']}"))
    assert [m["digest"] for m in reduced["manifests"]] == [amd.digest]
    # skopeo cannot copy nested indexes: pull each reachable level that it can handle.
    registry.verify_image(f"nested@{new_inner['digest']}", new_inner["digest"], tmp_path)
    registry.verify_image(f"nested@{arm.digest}", arm.digest, tmp_path)


def test_platform_host_refuses_single_foreign_image(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(
        containerd,
        b,
        tmp_path,
        {"example.com/arm:1": b.image([100], "armonly", architecture="s390x")},
    )
    explicit = push(
        containerd,
        "example.com/arm:1",
        f"{registry.host}/arm:1",
        "--platform",
        "linux/amd64",
        home=tmp_path,
    )
    assert explicit.code == 1 and "linux/s390x" in explicit.stderr

    run_ = push(
        containerd,
        "example.com/arm:1",
        f"{registry.host}/arm:1",
        "--platform",
        "host",
        home=tmp_path,
    )

    assert run_.code == 1, run_.stdout
    assert registry.tags("arm") == []


def test_platform_mismatch_message_is_clean(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/z:1": b.image([100], "z", architecture="s390x")})

    run_ = push(
        containerd,
        "example.com/z:1",
        f"{registry.host}/z:1",
        "--platform",
        "linux/amd64",
        home=tmp_path,
    )

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "linux/s390x" in run_.stderr
    assert "blob(s) missing" not in run_.stderr, run_.stderr


# ---------------------------------------------------------------------- TLS


def test_tls_with_ca_file(
    containerd: Containerd, tls_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000], "tls")
    load(containerd, b, tmp_path, {"example.com/tls:1": root})
    assert tls_registry.ca_file is not None

    result = push(
        containerd,
        "example.com/tls:1",
        f"{tls_registry.host}/tls:1",
        "--ca-file",
        str(tls_registry.ca_file),
        home=tmp_path,
    ).result

    assert result["digest"] == root.digest
    tls_registry.verify_image("tls:1", root.digest, tmp_path)


def test_tls_without_ca_fails_fast(
    containerd: Containerd, tls_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/tls:1": b.image([3000], "tls")})

    run_ = push(containerd, "example.com/tls:1", f"{tls_registry.host}/tls:1", home=tmp_path)

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "certificate verification" in run_.stderr
    assert run_.seconds < 5, run_.seconds
    assert tls_registry.tags("tls") == []


# ---------------------------------------------------------------------- htpasswd


def test_htpasswd_password_stdin(
    containerd: Containerd,
    htpasswd_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    root = b.image([3000, 200_000], "basic")
    load(containerd, b, tmp_path, {"example.com/basic:1": root})

    result = push(
        containerd,
        "example.com/basic:1",
        f"{htpasswd_registry.host}/basic:1",
        "--username",
        "alice",
        "--password-stdin",
        home=tmp_path,
        stdin="secret\n",
    ).result

    assert result["digest"] == root.digest
    htpasswd_registry.verify_image("basic:1", root.digest, tmp_path)


def test_htpasswd_wrong_password_fails_without_retry_storm(
    containerd: Containerd,
    htpasswd_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/basic:1": b.image([3000], "basic")})
    mark = htpasswd_registry.log_mark()

    run_ = push(
        containerd,
        "example.com/basic:1",
        f"{htpasswd_registry.host}/basic:1",
        "--username",
        "alice",
        "--password-stdin",
        home=tmp_path,
        stdin="wrong\n",
    )

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "credentials rejected" in run_.stderr
    assert "wrong" not in run_.stderr
    records = htpasswd_registry.requests(mark)
    assert len([r for r in records if r["status"] == 401]) <= 3, records
    assert len(records) <= 4, records
    assert uploads(records) == []


def test_htpasswd_without_credentials_fails_clearly(
    containerd: Containerd,
    htpasswd_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/basic:1": b.image([3000], "basic")})

    run_ = push(
        containerd, "example.com/basic:1", f"{htpasswd_registry.host}/basic:1", home=tmp_path
    )

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "no credentials" in run_.stderr
    assert len(htpasswd_registry.requests()) <= 6


def test_htpasswd_password_stdin_with_crlf(
    containerd: Containerd,
    htpasswd_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    root = b.image([3000], "crlf")
    load(containerd, b, tmp_path, {"example.com/basic:1": root})

    run_ = push(
        containerd,
        "example.com/basic:1",
        f"{htpasswd_registry.host}/basic:1",
        "--username",
        "alice",
        "--password-stdin",
        home=tmp_path,
        stdin="secret\r\n",
    )

    assert run_.code == 0, run_.stderr
    htpasswd_registry.verify_image("basic:1", root.digest, tmp_path)


# ---------------------------------------------------------------------- token auth


def docker_config(directory: Path, host: str, user: str, password: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return directory


def test_token_alice_from_docker_config(
    containerd: Containerd, token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([3000, 50_000], "token")
    load(containerd, b, tmp_path, {"example.com/tok:1": root})
    config_dir = docker_config(tmp_path / "dockercfg", token_registry.host, "alice", "secret")
    server = token_registry.token_server
    assert server is not None
    server.clear_requests()

    result = push(
        containerd,
        "example.com/tok:1",
        f"{token_registry.host}/team/tok:1",
        home=tmp_path,
        env={"DOCKER_CONFIG": str(config_dir)},
    ).result

    assert result["digest"] == root.digest
    issued = [r for r in server.requests if r.status == 200]
    assert issued and all(r.user == "alice" for r in issued)
    assert any(
        a["type"] == "repository" and a["name"] == "team/tok" and "push" in a["actions"]
        for r in issued
        for a in r.access
    ), issued
    token_registry.verify_image("team/tok:1", root.digest, tmp_path)


def test_token_bob_may_not_push(
    containerd: Containerd, token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/tok:1": b.image([3000], "token")})
    mark = token_registry.log_mark()

    run_ = push(
        containerd,
        "example.com/tok:1",
        f"{token_registry.host}/tok:1",
        "--username",
        "bob",
        "--password-stdin",
        home=tmp_path,
        stdin="hunter2\n",
    )

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "not allowed" in run_.stderr or "insufficient" in run_.stderr
    records = token_registry.requests(mark)
    # Each blob's upload POST is refused twice at most (fresh token, then final): no storm.
    refused = [r for r in records if r["status"] == 401 and r["method"] == "POST"]
    assert 1 <= len(refused) <= 2 * 2, records
    assert len([r for r in records if r["status"] == 401]) <= 2 * 2 + 1, records
    assert token_registry.tags("tok") == []


# ---------------------------------------------------------------------- bad input


def test_nonexistent_image(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/app:1": b.image([100], "exists")})
    mark = registry.log_mark()

    run_ = push(containerd, "example.com/nope:1", f"{registry.host}/nope:1", home=tmp_path)

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "example.com/nope:1" in run_.stderr and "not found" in run_.stderr
    assert registry.requests(mark) == []


def test_invalid_target_reference(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/app:1": b.image([100], "bad")})
    run_ = push(containerd, "example.com/app:1", "127.0.0.1:5000/UPPER:tag", home=tmp_path)
    assert run_.code == 2
    assert len(run_.error_lines) == 1, run_.stderr
    assert "UPPER" in run_.stderr


def test_unreachable_registry_fails_after_bounded_retries(
    containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    load(containerd, b, tmp_path, {"example.com/app:1": b.image([100], "down")})
    port = free_port()  # nothing listens there: connection refused

    run_ = push(containerd, "example.com/app:1", f"127.0.0.1:{port}/app:1", home=tmp_path)

    assert run_.code == 1
    # One error line, the last; before it one warning per retried attempt (4 of 5).
    errors = [line for line in run_.error_lines if "error:" in line]
    assert errors == [run_.error_lines[-1]], run_.stderr
    assert "Connection refused" in errors[0]
    assert len(run_.error_lines) == 5, run_.stderr
    assert all("WARNING" in line and "retrying" in line for line in run_.error_lines[:-1])
    # The retry policy (5 attempts, backoff from 0.5 s doubling, jittered) cannot be shortened
    # from the command line: this costs about 4-8 s (measured 6.5 s).
    assert 3 < run_.seconds < 20, run_.seconds


@pytest.mark.parametrize("size", [300_000, 3 << 20], ids=["monolithic", "chunked"])
def test_corrupt_blob_is_refused_and_not_pushed(
    containerd: Containerd,
    registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
    size: int,
) -> None:
    b = image_builder
    bad = b.layer(size, "corrupt")
    root = b.manifest([b.layer(1000, "fine"), bad])
    load(containerd, b, tmp_path, {"example.com/bad:1": root})
    path = containerd.blob_path(bad.digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))

    run_ = push(
        containerd,
        "example.com/bad:1",
        f"{registry.host}/bad:1",
        "--chunk-size",
        "1MiB",
        home=tmp_path,
    )

    assert run_.code == 1
    assert len(run_.error_lines) == 1, run_.stderr
    assert "corrupt" in run_.stderr
    assert bad.digest in run_.stderr
    assert not registry.blob_exists("bad", bad.digest)
    assert registry.tags("bad") == []


def test_default_target_and_human_output(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([1000], "default")
    name = f"{registry.host}/dflt:1"
    load(containerd, b, tmp_path, {name: root})

    run_ = push(containerd, name, None, home=tmp_path, json_output=False)

    assert run_.code == 0, run_.stderr
    assert run_.stdout.startswith(f"pushed {name} {root.digest}: 2 blobs uploaded"), run_.stdout
    registry.verify_image("dflt:1", root.digest, tmp_path)
