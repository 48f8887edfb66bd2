"""The real-registry test support itself: every mode, proven with pushes done by skopeo."""

from __future__ import annotations

import socket
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

import tests.support.registry as registry_mod
from tests.support.images import Blob, ImageBuilder
from tests.support.registry import Registry, RegistryError, split_ref
from tests.support.tokenserver import Scope, TokenServer, decode_jwt

pytestmark = pytest.mark.e2e

ALICE = ("alice", "secret")
BOB = ("bob", "hunter2")


def _multiarch(b: ImageBuilder, seed: str) -> Blob:
    amd = b.image([3000, 0, 70_000], f"{seed}/amd")
    arm = b.image([2000], f"{seed}/arm", architecture="arm64", variant="v8")
    return b.index([amd, arm])


def _oci_dir(b: ImageBuilder, root: Blob, tmp_path: Path, name: str = "oci") -> Path:
    """Write ``root`` as an OCI layout directory (via the builder's archive)."""
    archive = tmp_path / f"{name}.tar"
    b.write_oci_archive(archive, {f"example.com/{name}:1": root})
    target = tmp_path / name
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def _leaf_blobs(b: ImageBuilder, root: Blob) -> list[str]:
    return [blob.digest for blob in b.blobs_of(root) if blob.digest != root.digest]


def _oci_layout_digests(layout: Path) -> set[str]:
    return {"sha256:" + p.name for p in (layout / "blobs" / "sha256").iterdir()}


# ---------------------------------------------------------------------- plain HTTP


def test_plain_push_inspect_pull_and_access_log(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    assert registry.url == f"http://{registry.host}"
    assert registry.host.startswith("127.0.0.1:")
    root = _multiarch(image_builder, "plain")
    src = _oci_dir(image_builder, root, tmp_path)

    mark = registry.log_mark()
    registry.skopeo_push_oci(src, "team/app:v1")
    pushed = registry.requests(since=mark)
    manifest_puts = [
        r for r in pushed if r["method"] == "PUT" and r["path"] == "/v2/team/app/manifests/v1"
    ]
    assert [r["status"] for r in manifest_puts] == [201]
    assert manifest_puts[0]["user_agent"].startswith("skopeo/")
    # every blob went up through POST + PATCH + PUT ?digest=
    blob_puts = [r for r in pushed if r["method"] == "PUT" and "/blobs/uploads/" in r["path"]]
    assert all("digest=sha256" in r["query"] for r in blob_puts)
    assert len(blob_puts) == len(_leaf_blobs(image_builder, root)) - 2  # 2 child manifests
    assert {r["method"] for r in pushed} >= {"HEAD", "POST", "PATCH", "PUT"}

    assert registry.skopeo_inspect_digest("team/app:v1") == root.digest
    assert registry.skopeo_inspect_digest(f"{registry.host}/team/app@{root.digest}") == root.digest
    assert registry.manifest("team/app:v1") == root.data
    assert registry.tags("team/app") == ["v1"]
    assert registry.tags("nothing/here") == []
    for digest in _leaf_blobs(image_builder, root):
        blob = image_builder.get(digest)
        if isinstance(blob, Blob) and blob.media_type.endswith("manifest.v1+json"):
            assert registry.manifest(f"team/app@{digest}") == blob.data
        else:
            assert registry.blob_exists("team/app", digest), digest
    assert not registry.blob_exists("team/app", "sha256:" + "0" * 64)

    out = tmp_path / "pulled"
    registry.skopeo_copy_to_oci("team/app:v1", out)
    assert _oci_layout_digests(out) == {root.digest, *_leaf_blobs(image_builder, root)}

    # the JSON log has the same requests, with error details
    entries = registry.log_entries()
    assert any(e.get("http.request.method") == "PUT" for e in entries)


def test_plain_copy_fails_loudly(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="manifest unknown"):
        registry.skopeo_copy_to_oci("missing/app:v1", tmp_path / "out")
    with pytest.raises(RegistryError, match="404"):
        registry.manifest("missing/app:v1")


def test_restart_keeps_port_and_content(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    root = image_builder.image([1234], "restart")
    registry.skopeo_push_oci(_oci_dir(image_builder, root, tmp_path), "r/app:1")
    host, pid = registry.host, registry.pid
    registry.restart()
    assert registry.host == host
    assert registry.pid != pid
    assert registry.skopeo_inspect_digest("r/app:1") == root.digest
    registry.stop()
    assert not registry.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/", timeout=2)
    registry.start()
    assert registry.host == host


def test_taken_port_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = iter([busy.getsockname()[1], registry_mod.free_port()])
        monkeypatch.setattr(registry_mod, "free_port", lambda: next(ports))
        with Registry(tmp_path / "reg") as reg:
            assert reg.port != busy.getsockname()[1]
            assert httpx.get(f"{reg.url}/v2/", timeout=5).status_code == 200
        assert not reg.running


def test_split_ref() -> None:
    assert split_ref("a/b:1") == ("a/b", "1")
    assert split_ref("a/b") == ("a/b", "latest")
    assert split_ref("a/b@sha256:00") == ("a/b", "sha256:00")


# ---------------------------------------------------------------------- TLS


def test_tls_needs_the_ca(
    tls_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = tls_registry
    assert reg.url == f"https://{reg.host}"
    assert reg.ca_file is not None and reg.cert_dir is not None
    assert reg.ca_file.parent == reg.cert_dir
    assert [p.name for p in reg.cert_dir.iterdir()] == ["ca.crt"]
    root = _multiarch(image_builder, "tls")
    src = _oci_dir(image_builder, root, tmp_path)

    flags = reg.skopeo_flags("dest-")
    assert "--dest-tls-verify=true" in flags
    assert not any("tls-verify=false" in f for f in flags)
    reg.skopeo_push_oci(src, "secure/app:1")
    assert reg.skopeo_inspect_digest("secure/app:1") == root.digest
    reg.skopeo_copy_to_oci("secure/app:1", tmp_path / "pulled")
    assert root.digest in _oci_layout_digests(tmp_path / "pulled")
    assert reg.manifest("secure/app:1") == root.data

    # without the CA: skopeo and httpx refuse the certificate
    no_ca = reg.skopeo(
        "inspect", "--raw", "--tls-verify=true", reg.docker_ref("secure/app:1"), check=False
    )
    assert no_ca.returncode != 0
    assert "x509: certificate signed by unknown authority" in no_ca.stderr, no_ca.stderr
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{reg.url}/v2/", timeout=5)
    # the certificate names both 127.0.0.1 and localhost
    ctx = reg.ssl_context()
    assert ctx is not None
    local = httpx.get(f"https://localhost:{reg.port}/v2/", verify=ctx, timeout=5)
    assert local.status_code == 200


# ---------------------------------------------------------------------- htpasswd


def test_htpasswd_accepts_alice_and_rejects_others(
    htpasswd_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = htpasswd_registry
    challenge = httpx.get(f"{reg.url}/v2/", timeout=5)
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith("Basic ")
    assert httpx.get(f"{reg.url}/v2/", auth=ALICE, timeout=5).status_code == 200

    root = image_builder.image([4000, 10], "htpasswd")
    src = _oci_dir(image_builder, root, tmp_path)
    mark = reg.log_mark()
    reg.skopeo_push_oci(src, "private/app:1")
    assert any(
        r["method"] == "PUT" and r["path"] == "/v2/private/app/manifests/1" and r["status"] == 201
        for r in reg.requests(since=mark)
    )
    assert reg.skopeo_inspect_digest("private/app:1") == root.digest
    reg.skopeo_copy_to_oci("private/app:1", tmp_path / "pulled")
    assert reg.manifest("private/app:1") == root.data

    with pytest.raises(RegistryError, match=r"(?i)unauthorized|authentication required"):
        reg.skopeo_inspect_digest("private/app:1", creds=("alice", "wrong"))
    with pytest.raises(RegistryError, match=r"(?i)unauthorized|authentication required"):
        reg.skopeo_inspect_digest("private/app:1", creds=None)
    bad_push = reg.skopeo_push_oci(src, "private/other:1", creds=("mallory", "x"), check=False)
    assert bad_push.returncode != 0
    assert reg.tags("private/other") == []
    with pytest.raises(RegistryError, match="401"):
        reg.manifest("private/app:1", creds=("alice", "wrong"))


# ---------------------------------------------------------------------- token


def test_token_alice_pushes_bob_only_pulls(
    token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = token_registry
    server = reg.token_server
    assert server is not None
    challenge = httpx.get(f"{reg.url}/v2/", timeout=5)
    assert challenge.status_code == 401
    www = challenge.headers["WWW-Authenticate"]
    assert www.startswith("Bearer ")
    assert f'realm="{server.realm}"' in www and 'service="test-registry"' in www

    root = _multiarch(image_builder, "token")
    src = _oci_dir(image_builder, root, tmp_path)
    reg.skopeo_push_oci(src, "shared/app:1")  # alice (the default creds)
    alice_reqs = [r for r in server.requests if r.user == "alice"]
    assert alice_reqs and all(r.status == 200 for r in alice_reqs)
    assert any("repository:shared/app:pull,push" in r.scopes for r in alice_reqs)
    push_grant = next(r for r in alice_reqs if "repository:shared/app:pull,push" in r.scopes)
    assert push_grant.access == (
        {"type": "repository", "name": "shared/app", "actions": ["pull", "push"]},
    )

    server.clear_requests()
    assert reg.skopeo_inspect_digest("shared/app:1", creds=BOB) == root.digest
    reg.skopeo_copy_to_oci("shared/app:1", tmp_path / "bob-pulled", creds=BOB)
    assert root.digest in _oci_layout_digests(tmp_path / "bob-pulled")
    assert reg.manifest("shared/app:1", creds=BOB) == root.data
    assert {r.user for r in server.requests} == {"bob"}

    server.clear_requests()
    mark = reg.log_mark()
    denied = reg.skopeo_push_oci(src, "bob/app:1", creds=BOB, check=False)
    assert denied.returncode != 0
    assert "requested access to the resource is denied" in denied.stderr, denied.stderr
    bob_push = [r for r in server.requests if "repository:bob/app:pull,push" in r.scopes]
    assert bob_push, server.requests
    # push was requested but never granted (skopeo may add mount-source pull scopes)
    assert all(r.status == 200 for r in bob_push)
    granted = [(a["name"], a["actions"]) for r in bob_push for a in r.access]
    assert ("bob/app", ["pull"]) in granted
    assert not any("push" in actions for _name, actions in granted), granted
    assert not any(
        r["method"] in ("POST", "PUT", "PATCH") and r["status"] < 300
        for r in reg.requests(since=mark)
    )
    assert reg.tags("bob/app") == []


def test_token_anonymous_and_wrong_password(token_registry: Registry) -> None:
    reg = token_registry
    server = reg.token_server
    assert server is not None
    with pytest.raises(RegistryError, match=r"(?i)unauthorized|authentication required"):
        reg.skopeo_inspect_digest("shared/app:1", creds=None)
    anon = [r for r in server.requests if r.user == ""]
    assert anon and all(r.status == 200 and r.access == () for r in anon)

    wrong = httpx.get(
        server.realm,
        params={"service": "test-registry", "scope": "repository:x:pull"},
        auth=("alice", "nope"),
        timeout=5,
    )
    assert wrong.status_code == 401
    assert server.requests[-1].status == 401 and server.requests[-1].user == "alice"
    with pytest.raises(RegistryError, match="token server answered 401"):
        reg.manifest("shared/app:1", creds=("alice", "nope"))
    result = reg.skopeo(
        "inspect",
        "--raw",
        *reg.skopeo_flags("", ("alice", "nope")),
        reg.docker_ref("shared/app:1"),
        check=False,
    )
    assert result.returncode != 0


def test_token_oauth2_post_refresh_and_get_scopes(
    token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = token_registry
    server = reg.token_server
    assert server is not None
    root = image_builder.image([100], "oauth")
    reg.skopeo_push_oci(_oci_dir(image_builder, root, tmp_path), "o/app:1")

    first = httpx.post(
        server.realm,
        data={
            "grant_type": "password",
            "username": "bob",
            "password": "hunter2",
            "service": "test-registry",
            "client_id": "imagepushd-tests",
            "access_type": "offline",
            "scope": "repository:o/app:pull,push repository:other:pull",
        },
        timeout=5,
    ).json()
    assert set(first) >= {"token", "access_token", "expires_in", "issued_at", "refresh_token"}
    assert first["expires_in"] == 300
    header, claims = decode_jwt(first["token"])
    assert header["alg"] == "ES256" and len(header["x5c"]) == 1
    assert claims["sub"] == "bob" and claims["aud"] == "test-registry"
    assert claims["iss"] == "test-issuer"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["access"] == [
        {"type": "repository", "name": "o/app", "actions": ["pull"]},
        {"type": "repository", "name": "other", "actions": ["pull"]},
    ]
    rec = server.requests[-1]
    assert (rec.method, rec.grant_type, rec.user, rec.client_id, rec.offline) == (
        "POST",
        "password",
        "bob",
        "imagepushd-tests",
        True,
    )

    # the registry accepts it
    resp = httpx.get(
        f"{reg.url}/v2/o/app/manifests/1",
        headers={"Authorization": f"Bearer {first['token']}", "Accept": root.media_type},
        timeout=5,
    )
    assert resp.status_code == 200 and resp.content == root.data

    refreshed = httpx.post(
        server.realm,
        data={
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "service": "test-registry",
            "scope": "repository:o/app:pull",
        },
        timeout=5,
    )
    assert refreshed.status_code == 200
    assert decode_jwt(refreshed.json()["token"])[1]["sub"] == "bob"
    bad = httpx.post(
        server.realm, data={"grant_type": "refresh_token", "refresh_token": "nope"}, timeout=5
    )
    assert bad.status_code == 401
    bad_pw = httpx.post(
        server.realm,
        data={"grant_type": "password", "username": "bob", "password": "x"},
        timeout=5,
    )
    assert bad_pw.status_code == 401

    server.allow_post = False
    assert httpx.post(server.realm, data={"grant_type": "password"}, timeout=5).status_code == 404


def test_token_signed_by_another_key_is_rejected(
    token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    reg = token_registry
    root = image_builder.image([100], "forged")
    reg.skopeo_push_oci(_oci_dir(image_builder, root, tmp_path), "f/app:1")
    impostor = TokenServer(users={"alice": "secret"}, grants={"alice": {"*": ["pull"]}})
    forged = impostor.issue(
        "alice", "test-registry", [{"type": "repository", "name": "f/app", "actions": ["pull"]}]
    )
    resp = httpx.get(
        f"{reg.url}/v2/f/app/manifests/1",
        headers={"Authorization": f"Bearer {forged}", "Accept": root.media_type},
        timeout=5,
    )
    assert resp.status_code == 401
    real = reg.auth_headers("f/app", ("pull",))
    ok = httpx.get(
        f"{reg.url}/v2/f/app/manifests/1",
        headers={**real, "Accept": root.media_type},
        timeout=5,
    )
    assert ok.status_code == 200


def test_token_strict_expiry_is_enforced_by_the_registry(tmp_path: Path) -> None:
    server = TokenServer(
        users={"alice": "secret"},
        grants={"alice": {"*": ["pull", "push"]}},
        expires_in=2,
        strict_expiry=True,
    )
    with server, Registry(tmp_path / "reg", token=server) as reg:
        headers = reg.auth_headers("any/repo", ("pull",))
        assert httpx.get(f"{reg.url}/v2/", headers=headers, timeout=5).status_code == 200
        time.sleep(3.2)
        expired = httpx.get(f"{reg.url}/v2/", headers=headers, timeout=5)
        assert expired.status_code == 401
        fresh = reg.auth_headers("any/repo", ("pull",))
        assert httpx.get(f"{reg.url}/v2/", headers=fresh, timeout=5).status_code == 200
    assert not server.running and not reg.running


def test_scope_parsing_and_grants() -> None:
    assert Scope.parse("repository:a/b:pull,push") == Scope("repository", "a/b", ("pull", "push"))
    assert Scope.parse("repository:127.0.0.1:5000/a:pull") == Scope(
        "repository", "127.0.0.1:5000/a", ("pull",)
    )
    assert Scope.parse("repository(plugin):a:pull") == Scope("repository", "a", ("pull",))
    assert Scope.parse("garbage") is None
    server = TokenServer(
        users={"u": "p"},
        grants={"u": {"team/*": ["pull", "push"]}, "": {"public/*": ["pull"]}, "x": {"*": ["*"]}},
    )
    scopes = [
        Scope("repository", "team/a", ("pull", "push", "delete")),
        Scope("repository", "public/b", ("pull", "push")),
        Scope("repository", "secret", ("pull",)),
        Scope("registry", "catalog", ("*",)),
    ]
    assert server.access_for("u", scopes) == [
        {"type": "repository", "name": "team/a", "actions": ["pull", "push"]},
        {"type": "repository", "name": "public/b", "actions": ["pull"]},
    ]
    assert server.access_for("", scopes) == [
        {"type": "repository", "name": "public/b", "actions": ["pull"]}
    ]
    assert server.access_for("x", scopes[:1])[0]["actions"] == ["pull", "push", "delete"]


def test_no_registry_left_running(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    with reg:
        pid = reg.pid
        assert pid is not None
    assert not reg.running
    ps = subprocess.run(
        ["ps", "-p", str(pid), "-o", "stat="], capture_output=True, text=True, check=False
    )
    assert ps.stdout.strip() in ("", "Z"), ps.stdout
