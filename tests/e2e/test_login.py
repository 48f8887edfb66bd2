"""``imagepushd login`` / ``logout`` against a real docker-registry, then ``push`` with no flags.

htpasswd (Basic) and token (Bearer) registries; credentials in ``$DOCKER_CONFIG/config.json``
or in a real ``docker-credential-test`` executable found on the CLI's (injected) ``PATH``. Every
push is checked from outside with skopeo.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pty
import select
import signal
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagepushd.cli import Context, run
from tests.support.containerd import Containerd
from tests.support.images import Blob, ImageBuilder
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

IMAGE = "example.com/login:1"


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def cli(*argv: str, env: Mapping[str, str], home: Path, stdin: str = "") -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env=dict(env), home=home, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    code = run(list(argv), ctx, err)
    return Outcome(code, out.getvalue(), err.getvalue())


def login(
    registry: Registry, user: str, password: str, env: Mapping[str, str], home: Path
) -> Outcome:
    return cli(
        "login", registry.host, "--username", user, "--password-stdin",
        env=env, home=home, stdin=password + "\n",
    )  # fmt: skip


def push(containerd: Containerd, ref: str, env: Mapping[str, str], home: Path) -> Outcome:
    """``imagepushd push IMAGE REF`` with no credential flag: only what login stored."""
    return cli("push", IMAGE, ref, "--root", str(containerd.root), "--json", env=env, home=home)


@pytest.fixture
def image(containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path) -> Blob:
    root = image_builder.image([3000, 90_000], "login")
    archive = tmp_path / "images.tar"
    image_builder.write_oci_archive(archive, {IMAGE: root})
    containerd.import_archive(archive)
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    return directory


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    """``$DOCKER_CONFIG`` (not created: login creates it)."""
    return tmp_path / "docker-config"


@pytest.fixture
def env(docker_config: Path) -> dict[str, str]:
    return {"DOCKER_CONFIG": str(docker_config)}


def stored_auths(docker_config: Path) -> dict[str, str]:
    doc = json.loads((docker_config / "config.json").read_text())
    return {k: base64.b64decode(v["auth"]).decode() for k, v in doc["auths"].items()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- config.json


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_login_push_logout(
    kind: str,
    request: pytest.FixtureRequest,
    containerd: Containerd,
    image: Blob,
    docker_config: Path,
    env: dict[str, str],
    home: Path,
    tmp_path: Path,
) -> None:
    registry: Registry = request.getfixturevalue(f"{kind}_registry")
    config = docker_config / "config.json"

    done = login(registry, "alice", "secret", env, home)

    assert done.code == 0, done.stderr
    assert (
        done.stdout == f"logged in to {registry.host} as alice (credentials stored in {config})\n"
    )
    assert done.stderr == ""
    assert stored_auths(docker_config) == {registry.host: "alice:secret"}
    assert mode(config) == 0o600
    assert mode(docker_config) == 0o700
    assert sorted(p.name for p in docker_config.iterdir()) == ["config.json"]
    if kind == "token":
        server = registry.token_server
        assert server is not None
        verified = [r for r in server.requests if r.user == "alice" and r.status == 200]
        assert verified and verified[0].scopes == ()  # the login round trip asked no scope

    pushed = push(containerd, f"{registry.host}/team/login:1", env, home)

    assert pushed.code == 0, pushed.stderr
    assert json.loads(pushed.stdout)["digest"] == image.digest
    assert registry.skopeo_inspect_digest("team/login:1") == image.digest

    out = cli("logout", registry.host, env=env, home=home)

    assert out.code == 0, out.stderr
    assert out.stdout == f"logged out of {registry.host} (removed from {config})\n"
    assert json.loads(config.read_text()) == {"auths": {}}
    assert mode(config) == 0o600
    again = cli("logout", registry.host, env=env, home=home)
    assert again.stdout == f"not logged in to {registry.host}: nothing to remove\n"

    refused = push(containerd, f"{registry.host}/team/after-logout:1", env, home)

    assert refused.code == 1
    assert len(refused.error_lines) == 1, refused.stderr
    assert "imagepushd: error:" in refused.stderr
    expected = "no credentials" if kind == "htpasswd" else "not allowed"
    assert expected in refused.stderr
    assert registry.tags("team/after-logout") == []


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
@pytest.mark.parametrize("existing", [False, True])
def test_bad_credentials_are_rejected_and_nothing_written(
    kind: str,
    existing: bool,
    request: pytest.FixtureRequest,
    docker_config: Path,
    env: dict[str, str],
    home: Path,
) -> None:
    registry: Registry = request.getfixturevalue(f"{kind}_registry")
    config = docker_config / "config.json"
    original = None
    if existing:
        docker_config.mkdir()
        config.write_text('{"auths": {"other.test": {"auth": "b3RoZXI6cHc="}}, "x": [1]}')
        original = config.read_bytes()

    for user, password in [("alice", "wrong-password"), ("mallory", "secret")]:
        done = login(registry, user, password, env, home)

        assert done.code == 1
        assert done.error_lines == [
            f"imagepushd: error: {registry.host}: login failed: credentials rejected"
        ]
        assert done.stdout == ""
        assert password not in done.stderr
        if original is None:
            assert not docker_config.exists()
        else:
            assert config.read_bytes() == original
            assert sorted(p.name for p in docker_config.iterdir()) == ["config.json"]


def test_token_login_checks_credentials_not_push_rights(
    containerd: Containerd,
    image: Blob,
    token_registry: Registry,
    docker_config: Path,
    env: dict[str, str],
    home: Path,
) -> None:
    """bob's password is right (login stores it, as docker does); the push is refused."""
    assert login(token_registry, "bob", "hunter2", env, home).code == 0
    assert stored_auths(docker_config) == {token_registry.host: "bob:hunter2"}

    refused = push(containerd, f"{token_registry.host}/team/bob:1", env, home)

    assert refused.code == 1
    assert len(refused.error_lines) == 1, refused.stderr
    assert "not allowed" in refused.stderr
    server = token_registry.token_server
    assert server is not None
    assert {r.user for r in server.requests if r.status == 200} == {"bob"}


def test_login_keeps_other_entries_and_replaces_its_own(
    htpasswd_registry: Registry, docker_config: Path, env: dict[str, str], home: Path
) -> None:
    docker_config.mkdir()
    config = docker_config / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "other.test": {"auth": base64.b64encode(b"o:p").decode()},
                    htpasswd_registry.host: {"auth": base64.b64encode(b"old:pw").decode()},
                },
                "proxies": {"default": {"httpProxy": "http://proxy:3128"}},
            }
        )
    )
    config.chmod(0o644)

    assert login(htpasswd_registry, "alice", "secret", env, home).code == 0

    doc = json.loads(config.read_text())
    assert doc["proxies"] == {"default": {"httpProxy": "http://proxy:3128"}}
    assert stored_auths(docker_config) == {
        "other.test": "o:p",
        htpasswd_registry.host: "alice:secret",
    }
    assert mode(config) == 0o600


# ---------------------------------------------------------------------- credential helper

FAKE_HELPER = """\
#!{python}
# A docker credential helper keeping secrets in $FAKE_CREDENTIAL_STORE (JSON).
import json, os, sys

path = os.environ["FAKE_CREDENTIAL_STORE"]
with open(path + ".calls", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
try:
    with open(path) as f:
        data = json.load(f)
except FileNotFoundError:
    data = {{}}
action = sys.argv[1]
if action == "store":
    doc = json.load(sys.stdin)
    data[doc["ServerURL"]] = {{"Username": doc["Username"], "Secret": doc["Secret"]}}
elif action in ("get", "erase"):
    server = sys.stdin.read().strip()
    if server not in data:
        print("credentials not found in native keychain")
        sys.exit(1)
    if action == "get":
        print(json.dumps({{"ServerURL": server, **data[server]}}))
        sys.exit(0)
    del data[server]
else:
    sys.exit(2)
with open(path + ".tmp", "w") as f:
    json.dump(data, f)
os.replace(path + ".tmp", path)
"""


def test_creds_store_helper_login_push_logout(
    containerd: Containerd,
    image: Blob,
    htpasswd_registry: Registry,
    docker_config: Path,
    env: dict[str, str],
    home: Path,
    tmp_path: Path,
) -> None:
    registry = htpasswd_registry
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text(FAKE_HELPER.format(python=sys.executable))
    helper.chmod(0o755)
    secrets = tmp_path / "helper-secrets.json"
    # The helper is only on the CLI's PATH, not this process's: the runner must use ctx.env.
    env |= {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_CREDENTIAL_STORE": str(secrets)}
    docker_config.mkdir()
    config = docker_config / "config.json"
    config.write_text('{"credsStore": "test"}\n')
    original = config.read_bytes()

    bad = login(registry, "alice", "wrong-password", env, home)
    assert bad.code == 1 and len(bad.error_lines) == 1 and "login failed" in bad.stderr
    assert not secrets.exists()  # the helper was never asked to store

    done = login(registry, "alice", "secret", env, home)

    assert done.code == 0, done.stderr
    assert "credentials stored in docker-credential-test" in done.stdout
    assert json.loads(secrets.read_text()) == {
        registry.host: {"Username": "alice", "Secret": "secret"}
    }
    assert config.read_bytes() == original  # nothing in the file, no secret anywhere else

    pushed = push(containerd, f"{registry.host}/team/helper:1", env, home)

    assert pushed.code == 0, pushed.stderr
    assert registry.skopeo_inspect_digest("team/helper:1") == image.digest

    out = cli("logout", registry.host, env=env, home=home)

    assert out.code == 0, out.stderr
    assert out.stdout == f"logged out of {registry.host} (removed from docker-credential-test)\n"
    assert json.loads(secrets.read_text()) == {}
    assert config.read_bytes() == original

    refused = push(containerd, f"{registry.host}/team/helper-gone:1", env, home)

    assert refused.code == 1
    assert len(refused.error_lines) == 1 and "no credentials" in refused.stderr
    calls = [json.loads(line) for line in Path(f"{secrets}.calls").read_text().splitlines()]
    assert [c[0] for c in calls] == ["store", "get", "erase", "get"]
    assert all(len(c) == 1 for c in calls)  # argv is only the action: no secret, no server


# ---------------------------------------------------------------------- terminal prompt


def _read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r}; got {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            assert chunk, f"terminal closed before {needle!r}; got {bytes(seen)!r}"
            seen += chunk


def _reap(pid: int, timeout: float = 30.0) -> int:
    """Wait for the child; kill it if it is still waiting at a prompt (a failed test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def test_prompts_on_a_terminal(htpasswd_registry: Registry, docker_config: Path) -> None:
    """No --username and no --password-stdin on a real terminal: both are prompted for."""
    env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}
    argv = [sys.executable, "-m", "imagepushd", "login", htpasswd_registry.host]
    pid, fd = pty.fork()
    if pid == 0:  # child: exec at once (the parent has threads)
        try:
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        _read_until(fd, b"Username: ", seen)
        os.write(fd, b"alice\n")
        _read_until(fd, b"Password: ", seen)
        mark = len(seen)
        os.write(fd, b"secret\n")
        _read_until(fd, b"logged in to", seen)
    finally:
        status = _reap(pid)
        os.close(fd)

    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"secret" not in seen[mark:]  # not echoed
    assert stored_auths(docker_config) == {htpasswd_registry.host: "alice:secret"}
