"""Every big registry's documented habits, pushed through for real (the matrix of issue 14).

For each profile of tests/support/profiles.py a real docker-registry 2.8 with token auth runs
behind a :class:`ProfileProxy` that answers as that registry is documented to. containerd
holds a two-platform index with BuildKit attestations, a cosign signature (``.sig`` tag) and
an SBOM naming the index as its ``subject``; its layers claim to come from a repository
nobody pushed to (a ``distribution.source`` label), so every push tries a mount first. One
push goes through the CLI (``--referrers``, chunks of 1 MiB, 5 MiB on ECR, so that PATCH is
used), one through the daemon to two targets (the second mounts from the first). Each is
checked against the real registry with skopeo: digests equal, every manifest and blob pulled
and verified, the referrers listed where the profile says (its referrers API, or the
tag-schema index). containerd, registry and proxy are shared by a profile's tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOKEN_GRANTS, TOKEN_USERS
from tests.e2e.test_daemon import configure
from tests.e2e.test_referrers import SPDX, cosign_signature, cosign_tag, sbom_artifact
from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.images import OCI_INDEX, OCI_MANIFEST, Blob, ImageBuilder
from tests.support.process import require_tools
from tests.support.profiles import (
    ChunkTooLarge,
    CsrfCookie,
    ForbiddenAbsentManifest,
    Habit,
    MiB,
    MountFromMissingProject,
    MountNeedsSourcePull,
    NoPatch,
    NoReferrersApi,
    OffByOneStatus,
    PartTooSmall,
    Patch201,
    PlainTextRateLimit,
    ProfileProxy,
    RepositoryMustExist,
    StaleRange,
    StorageRedirect,
    profiles,
)
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.e2e

SOURCE = "example.com/team/app:1"
PASSWORD = TOKEN_USERS["alice"]
#: Where the layers claim to come from: a repository nobody pushed to on the registry.
GHOST = "ghost/app"
#: Repositories the tests push to (ECR's must exist first, as with `aws ecr create-repository`).
REPOSITORIES = {"cli/app", "daemon/app", "daemon/copy"}
#: Chunk sizes: ECR takes no part under 5 MiB but the last (the client knows that from ECR's
#: host names, which a proxy on 127.0.0.1 does not have); 1 MiB elsewhere, so the 6 MB layer
#: goes in several PATCHes.
CHUNK = {"ecr": "5MiB"}
#: The habits each profile's pushes must have met (others only answer what our client never
#: sends, such as ACR's refusals, or are checked separately).
EXERCISED: dict[str, tuple[type[Habit], ...]] = {
    "distribution": (),
    "dockerhub": (PlainTextRateLimit, MountNeedsSourcePull),
    "ghcr": (NoReferrersApi,),
    "ecr": (Patch201, StaleRange, StorageRedirect),
    "gar": (NoPatch,),
    "acr": (),
    "quay": (OffByOneStatus,),
    "harbor": (MountFromMissingProject, CsrfCookie),
    "artifactory": (ForbiddenAbsentManifest, NoReferrersApi),
    "gitlab": (NoReferrersApi,),
    "cdn": (StorageRedirect,),
}


@dataclass
class World:
    """One profile's registry, proxy, containerd and the image in it."""

    name: str
    registry: Registry
    proxy: ProfileProxy
    containerd: Containerd
    builder: ImageBuilder
    images: dict[str, Blob]

    @property
    def host(self) -> str:
        return self.proxy.host


def build(b: ImageBuilder) -> dict[str, Blob]:
    """A two-platform index with attestations, its cosign signature and an SBOM referrer."""
    amd = b.image([6_000_000, 1200], "profiles/amd")
    arm = b.image([2000], "profiles/arm", architecture="arm64")
    index = b.index([amd, arm, b.attestation(amd), b.attestation(arm)])
    return {
        "index": index,
        "sig": cosign_signature(b, index, "example.com/team/app"),
        "sbom": sbom_artifact(b, index, "profiles-sbom"),
    }


def leaves(b: ImageBuilder, root: Blob) -> list[str]:
    """The digests of every config and layer under ``root`` (what is uploaded as a blob)."""
    return [c.digest for c in b.blobs_of(root) if c.media_type not in (OCI_MANIFEST, OCI_INDEX)]


@contextmanager
def running(name: str, base: Path) -> Iterator[World]:
    """Registry (token auth), profile proxy and containerd holding the image, for ``name``."""
    require_tools(
        "containerd",
        "ctr",
        "docker-registry",
        "skopeo",
        hint="install the Debian packages containerd, docker-registry and skopeo",
    )
    profile = profiles()[name]()
    for habit in profile.habits:
        if isinstance(habit, RepositoryMustExist):
            habit.created.update(REPOSITORIES)
    registry = Registry(
        base / "registry", token=TokenServer(users=TOKEN_USERS, grants=TOKEN_GRANTS)
    )
    containerd = Containerd(base / "containerd")
    try:
        registry.start()
        containerd.start()
        b = ImageBuilder()
        images = build(b)
        index = images["index"]
        load(
            containerd,
            b,
            base,
            {
                SOURCE: index,
                f"example.com/team/app:{cosign_tag(index)}": images["sig"],
                f"example.com/team/app@{images['sbom'].digest}": images["sbom"],
            },
        )
        for digest in leaves(b, index):
            label = f"containerd.io/distribution.source.127.0.0.1={GHOST}"
            containerd.ctr("content", "label", digest, label)
        with ProfileProxy(
            registry.host,
            profile,
            storage_auth=lambda repo: registry.auth_headers(repo, ("pull",)),
        ) as proxy:
            yield World(name, registry, proxy, containerd, b, images)
            assert proxy.errors == []
            if proxy.storage is not None:
                sent = [r for r in proxy.storage.requests if r[2]]
                assert sent == [], "credentials went to the storage host"
    finally:
        containerd.close()
        registry.close()


@pytest.fixture(scope="module", params=sorted(profiles()))
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One profile's world, shared by the CLI and daemon tests of that profile."""
    name: str = request.param
    with running(name, tmp_path_factory.mktemp(f"profile-{name}")) as instance:
        yield instance


def push(world: World, target: str, *args: str, home: Path) -> Outcome:
    argv = [
        "push",
        SOURCE,
        f"{world.host}/{target}",
        "--root",
        str(world.containerd.root),
        "--plain-http",
        "--referrers",
        "--chunk-size",
        CHUNK.get(world.name, "1MiB"),
        "--username",
        "alice",
        "--password-stdin",
        "--json",
        *args,
    ]
    return run_cli(argv, home=home, stdin=PASSWORD + "\n")


def referrers_via_api(world: World, repo: str, subject: str) -> list[str]:
    """The digests the profile's referrers API lists for ``subject``."""
    headers = world.registry.auth_headers(repo, ("pull",))
    response = httpx.get(
        f"http://{world.host}/v2/{repo}/referrers/{subject}", headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    return [m["digest"] for m in response.json()["manifests"]]


def check(world: World, repo: str, pull: Path) -> None:
    """``repo`` holds the image, its attestations and referrers as containerd does."""
    registry, images = world.registry, world.images
    index, sig, sbom = images["index"], images["sig"], images["sbom"]
    registry.verify_image(f"{repo}:1", index.digest, pull)
    registry.verify_image(f"{repo}:{cosign_tag(index)}", sig.digest, pull)
    registry.verify_image(f"{repo}@{sbom.digest}", sbom.digest, pull)
    for digest in leaves(world.builder, index):
        assert registry.blob_exists(repo, digest), digest
    fallback = f"sha256-{index.digest.removeprefix('sha256:')}"
    tags = registry.tags(repo)
    if world.proxy.profile.referrers_api:
        assert referrers_via_api(world, repo, index.digest) == [sbom.digest]
        assert fallback not in tags
    elif world.name == "gitlab":
        assert fallback not in tags  # the tag is read as the digest there: no index kept
    else:
        listed = json.loads(registry.skopeo_inspect_raw(f"{repo}:{fallback}"))
        assert listed["mediaType"] == OCI_INDEX
        assert [(m["digest"], m.get("artifactType")) for m in listed["manifests"]] == [
            (sbom.digest, SPDX)
        ]


def test_cli_push_with_referrers(world: World, tmp_path: Path) -> None:
    outcome = push(world, "cli/app:1", home=tmp_path)

    result = outcome.result
    assert result["digest"] == world.images["index"].digest
    assert result["referrers"]["referrers_api"] is world.proxy.profile.referrers_api
    check(world, "cli/app", tmp_path / "pull")

    # A second tag: every blob is there already (a HEAD each, redirected where the profile
    # sends blobs to storage), nothing is uploaded.
    second = push(world, "cli/app:2", home=tmp_path).result
    assert (second["digest"], second["pushed_blobs"], second["mounted_blobs"]) == (
        world.images["index"].digest,
        0,
        0,
    )
    world.registry.verify_image("cli/app:2", world.images["index"].digest)
    for habit in EXERCISED[world.name]:
        assert world.proxy.records_of(habit), f"{world.name}: {habit.__name__} never answered"

    # Again: all there, nothing written (no PUT or POST reaches the registry).
    mark = world.registry.log_mark()
    again = push(world, "cli/app:1", home=tmp_path).result
    assert again["up_to_date"] is True
    assert not [r for r in world.registry.requests(since=mark) if r["method"] in ("PUT", "POST")]


def test_daemon_push_to_two_targets(world: World, daemon: Daemon, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD + "\n")
    rule = {
        "match": [SOURCE],
        "targets": [f"{world.host}/daemon/app:{{tag}}", f"{world.host}/daemon/copy:{{tag}}"],
        "referrers": True,
    }
    configure(
        daemon,
        world.containerd,
        world.host,
        [rule],
        registry={
            "username": "alice",
            "password_file": str(password),
            "chunk_size": CHUNK.get(world.name, "1MiB"),
        },
        on_start="all",
    )

    once = daemon.cli("run", "--once", timeout=120)

    assert once.returncode == 0, once.stderr + daemon.log_tail()
    check(world, "daemon/app", tmp_path / "pull")
    check(world, "daemon/copy", tmp_path / "pull")


def test_ecr_refusals_are_one_clear_line(tmp_path: Path) -> None:
    """A repository ECR does not have, and parts under 5 MiB: each a one-line error."""
    with running("ecr", tmp_path) as world:
        absent = push(world, "cli/absent:1", home=tmp_path)
        small = push(world, "cli/app:1", "--chunk-size", "1MiB", home=tmp_path)

        assert absent.code == 1
        [line] = absent.error_lines
        assert "POST /v2/cli/absent/blobs/uploads/" in line
        assert "NAME_UNKNOWN: The repository with name 'cli/absent' does not exist" in line
        assert "does not create it on push: create it first" in line
        assert world.proxy.records_of(RepositoryMustExist)
        assert world.registry.tags("cli/absent") == []

        assert small.code == 1
        errors = [x for x in small.error_lines if not x.startswith("imagepushd: WARNING")]
        [line] = errors
        assert "All layer parts except the last part should be at least 5MB" in line
        assert world.proxy.records_of(PartTooSmall)
        assert world.registry.tags("cli/app") == []


def test_ghcr_refuses_a_patch_over_4_mib(tmp_path: Path) -> None:
    """The profile itself: GHCR's 416 for a big chunk (the client keeps to 4 MiB on ghcr.io)."""
    with running("ghcr", tmp_path) as world:
        headers = world.registry.auth_headers("cli/big", ("pull", "push"))
        octets = {"Content-Type": "application/octet-stream"}
        with httpx.Client(base_url=f"http://{world.host}", headers=headers, timeout=30) as client:
            started = client.post("/v2/cli/big/blobs/uploads/")
            assert started.status_code == 202
            location = started.headers["location"]
            big = client.patch(
                location,
                content=b"\0" * (4 * MiB + 1),
                headers={"Content-Range": f"0-{4 * MiB}", **octets},
            )
            small = client.patch(
                location, content=b"\0" * 1024, headers={"Content-Range": "0-1023", **octets}
            )

        assert big.status_code == 416
        assert "maximum permissible limit of 4.00MiB" in big.text
        assert small.status_code == 202
        assert world.proxy.records_of(ChunkTooLarge)


def test_acr_refuses_other_content_range_forms(tmp_path: Path) -> None:
    """The profile itself: what ACR refuses (so a client passing through it sends N-M)."""
    with running("acr", tmp_path) as world:
        headers = world.registry.auth_headers("cli/acr", ("pull", "push"))
        octets = {"Content-Type": "application/octet-stream"}
        with httpx.Client(base_url=f"http://{world.host}", headers=headers, timeout=30) as client:
            location = client.post("/v2/cli/acr/blobs/uploads/").headers["location"]
            answers = [
                client.patch(location, content=b"x" * 16, headers={"Content-Range": r, **octets})
                for r in ("bytes 0-15/*", "bytes=0-15", "0-15")
            ]

        assert [a.status_code for a in answers] == [400, 400, 202]
        assert "the Content-Range header format is invalid" in answers[0].text


def test_artifactory_403_on_a_manifest_head_hides_no_real_denial(tmp_path: Path) -> None:
    """The 403 taken as "absent" on the existence check: a user who may only pull still gets
    one clear error from the first write, and nothing is pushed."""
    with running("artifactory", tmp_path) as world:
        argv = [
            "push",
            SOURCE,
            f"{world.host}/cli/app:1",
            "--root",
            str(world.containerd.root),
            "--plain-http",
            "--username",
            "bob",
            "--password-stdin",
            "--json",
        ]
        outcome = run_cli(argv, home=tmp_path, stdin=TOKEN_USERS["bob"] + "\n")

        assert outcome.code == 1
        [line] = outcome.error_lines
        # The scope is the registry's challenge, whose action order depends on the request.
        assert re.search(r"not allowed: repository:cli/app:(pull,push|push,pull)$", line), line
        assert world.proxy.records_of(ForbiddenAbsentManifest)
        assert world.registry.tags("cli/app") == []
