"""``login`` / ``logout`` without a real registry: config.json writing, helpers, verification.

The registry round trip runs against httpx.MockTransport here; tests/e2e/test_login.py does it
against docker-registry (htpasswd and token auth) and a real helper executable.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagepushd.cli import Context, run
from imagepushd.errors import OutputError, RegistryAuthError, UsageError
from imagepushd.push.registry.credentials import (
    Credentials,
    CredentialStore,
    helper_runner,
    write_private_json,
)
from imagepushd.push.registry.login import RegistryAddress, login, logout, parse_registry

SECRET = "pa:ss-w0rd-never-shown"
HOST = "registry.test:5000"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    return directory


@pytest.fixture
def config(home: Path) -> Path:
    return home / ".docker/config.json"


def write_config(path: Path, doc: Any) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path.read_bytes()


class Helpers:
    """A fake ``docker-credential-*`` runner keeping secrets in a dict, recording every call."""

    def __init__(self, fail: dict[str, subprocess.CompletedProcess[str]] | None = None) -> None:
        self.secrets: dict[str, tuple[str, str]] = {}
        self.calls: list[tuple[list[str], str]] = []
        self.fail = fail or {}

    def __call__(self, argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        action = argv[1]
        if action in self.fail:
            return self.fail[action]
        if action == "store":
            doc = json.loads(stdin)
            self.secrets[doc["ServerURL"]] = (doc["Username"], doc["Secret"])
            return subprocess.CompletedProcess(argv, 0, "", "")
        if action == "get":
            if stdin not in self.secrets:
                return subprocess.CompletedProcess(argv, 1, "credentials not found", "")
            user, secret = self.secrets[stdin]
            out = json.dumps({"ServerURL": stdin, "Username": user, "Secret": secret})
            return subprocess.CompletedProcess(argv, 0, out, "")
        if action == "erase":
            if self.secrets.pop(stdin, None) is None:
                return subprocess.CompletedProcess(argv, 1, "credentials not found", "")
            return subprocess.CompletedProcess(argv, 0, "", "")
        raise AssertionError(argv)


def no_helpers(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"no helper should run, ran {argv}")


# ---- REGISTRY argument ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("registry.test", RegistryAddress("registry.test")),
        ("Registry.Test:5000", RegistryAddress("registry.test:5000")),
        ("localhost:5000", RegistryAddress("localhost:5000")),
        ("127.0.0.1:5000", RegistryAddress("127.0.0.1:5000")),
        ("[::1]:5000", RegistryAddress("[::1]:5000")),
        ("registry.test:5000/v2/", RegistryAddress("registry.test:5000")),
        ("https://registry.test/", RegistryAddress("registry.test")),
        ("https://registry.test:5000/v1/", RegistryAddress("registry.test:5000")),
        ("http://registry.test:5000", RegistryAddress("registry.test:5000", plain_http=True)),
        ("docker.io", RegistryAddress("docker.io")),
        ("index.docker.io", RegistryAddress("docker.io")),
        ("registry-1.docker.io", RegistryAddress("docker.io")),
        ("https://index.docker.io/v1/", RegistryAddress("docker.io")),
    ],
)
def test_parse_registry(text: str, expected: RegistryAddress) -> None:
    assert parse_registry(text) == expected


@pytest.mark.parametrize(
    "text", ["", "https://", "ftp://registry.test", "https://u:p@registry.test", "a b", "-x", ":5"]
)
def test_parse_registry_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_registry(text)


# ---- writing config.json --------------------------------------------------------------------


def test_save_creates_config_0600_in_a_0700_directory(home: Path, config: Path) -> None:
    store = CredentialStore({}, home, runner=no_helpers)

    where = store.save(HOST, Credentials("alice", SECRET))

    assert where.path == config and where.helper is None and str(where) == str(config)
    assert json.loads(config.read_text()) == {"auths": {HOST: {"auth": b64(f"alice:{SECRET}")}}}
    assert mode(config) == 0o600
    assert mode(config.parent) == 0o700
    assert store.lookup(HOST) == Credentials("alice", SECRET)
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_docker_config_env_decides_the_file(home: Path, tmp_path: Path) -> None:
    store = CredentialStore({"DOCKER_CONFIG": str(tmp_path / "dc")}, home, runner=no_helpers)

    assert store.save(HOST, Credentials("alice", SECRET)).path == tmp_path / "dc/config.json"

    assert (tmp_path / "dc/config.json").exists()
    assert not (home / ".docker").exists()


def test_save_preserves_every_other_key_and_entry(home: Path, config: Path) -> None:
    original = {
        "auths": {
            "other.test": {"auth": b64("bob:pw")},
            "https://third.test/v1/": {"auth": b64("carol:pw"), "email": "c@example.com"},
            HOST: {"auth": b64("old:old"), "identitytoken": "stale-refresh-token"},
        },
        "HttpHeaders": {"User-Agent": "Docker-Client/x"},
        "proxies": {"default": {"httpProxy": "http://proxy:3128"}},
        "currentContext": "remote",
        "plugins": {"x": {"y": [1, 2, {"z": None}]}},
        "psFormat": "table {{.ID}}",
    }
    write_config(config, original)
    config.chmod(0o644)

    CredentialStore({}, home, runner=no_helpers).save(HOST, Credentials("alice", SECRET))

    doc = json.loads(config.read_text())
    expected = json.loads(json.dumps(original))
    # The entry is replaced whole: a stale identity token would shadow the new password.
    expected["auths"][HOST] = {"auth": b64(f"alice:{SECRET}")}
    assert doc == expected
    assert list(doc) == list(original)  # key order kept
    assert list(doc["auths"]) == list(original["auths"])
    assert mode(config) == 0o600  # tightened: it holds secrets


def test_save_replaces_the_file_atomically(home: Path, config: Path) -> None:
    write_config(config, {"auths": {}})
    before = config.stat().st_ino
    old_handle = config.open()  # a reader holding the old file keeps seeing the old content

    CredentialStore({}, home, runner=no_helpers).save(HOST, Credentials("alice", SECRET))

    assert config.stat().st_ino != before  # renamed over, not rewritten in place
    assert json.loads(old_handle.read()) == {"auths": {}}
    old_handle.close()
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_failed_write_leaves_the_file_and_no_temporary(config: Path) -> None:
    original = write_config(config, {"auths": {"x.test": {"auth": b64("x:y")}}})

    with pytest.raises(TypeError):
        write_private_json(config, {"auths": {"x.test": object()}})

    assert config.read_bytes() == original
    assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_rename_failure_is_an_output_error_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "dc/config.json"
    target.mkdir(parents=True)  # a directory where the file should be: rename fails

    with pytest.raises(OutputError, match=r"config\.json: cannot write"):
        write_private_json(target, {"auths": {}})

    assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"]


def test_symlinked_config_stays_a_symlink(home: Path, tmp_path: Path) -> None:
    real = tmp_path / "dotfiles/docker.json"
    write_config(real, {"auths": {}, "keep": 1})
    link = home / ".docker/config.json"
    link.parent.mkdir()
    link.symlink_to(real)

    CredentialStore({}, home, runner=no_helpers).save(HOST, Credentials("alice", SECRET))

    assert link.is_symlink()
    assert json.loads(real.read_text())["keep"] == 1
    assert HOST in json.loads(real.read_text())["auths"]
    assert mode(real) == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_keeps_the_owner_of_a_users_config(home: Path, config: Path) -> None:
    write_config(config, {"auths": {}})
    os.chown(config, 4321, 4321)

    CredentialStore({}, home, runner=no_helpers).save(HOST, Credentials("alice", SECRET))

    assert (config.stat().st_uid, config.stat().st_gid) == (4321, 4321)


@pytest.mark.parametrize("content", ['{"auths": {', "[1, 2]", '{"auths": ["not", "an", "object"]}'])
def test_unparsable_config_is_never_overwritten(home: Path, config: Path, content: str) -> None:
    config.parent.mkdir()
    config.write_text(content)

    with pytest.raises(OutputError, match="not overwriting"):
        CredentialStore({}, home, runner=no_helpers).save(HOST, Credentials("alice", SECRET))

    assert config.read_text() == content


def test_docker_hub_key(home: Path, config: Path) -> None:
    store = CredentialStore({}, home, runner=no_helpers)

    store.save("docker.io", Credentials("hubuser", SECRET))

    assert list(json.loads(config.read_text())["auths"]) == ["https://index.docker.io/v1/"]
    assert store.lookup("docker.io") == Credentials("hubuser", SECRET)
    assert store.lookup("registry-1.docker.io") == Credentials("hubuser", SECRET)


# ---- logout from config.json ----------------------------------------------------------------


def test_erase_removes_every_key_for_the_host_and_nothing_else(home: Path, config: Path) -> None:
    write_config(
        config,
        {
            "auths": {
                HOST: {"auth": b64("a:b")},
                f"https://{HOST}/v1/": {"auth": b64("a:b")},
                f"http://{HOST}": {"auth": b64("a:b")},
                "registry.test": {"auth": b64("other:port")},
                "other.test": {"auth": b64("c:d")},
            },
            "credHelpers": {"elsewhere.test": "pass"},
        },
    )
    store = CredentialStore({}, home, runner=no_helpers)

    assert store.erase(HOST) == [str(config)]

    doc = json.loads(config.read_text())
    assert doc == {
        "auths": {
            "registry.test": {"auth": b64("other:port")},
            "other.test": {"auth": b64("c:d")},
        },
        "credHelpers": {"elsewhere.test": "pass"},
    }
    assert mode(config) == 0o600
    assert store.lookup(HOST) is None


def test_erase_with_nothing_stored_writes_nothing(home: Path, config: Path) -> None:
    original = write_config(config, {"auths": {"other.test": {"auth": b64("c:d")}}})
    inode = config.stat().st_ino
    store = CredentialStore({}, home, runner=no_helpers)

    assert store.erase(HOST) == []
    assert config.read_bytes() == original
    assert config.stat().st_ino == inode
    assert CredentialStore({}, home / "nobody", runner=no_helpers).erase(HOST) == []
    assert not (home / "nobody").exists()


def test_erase_docker_hub_under_any_key(home: Path, config: Path) -> None:
    keys = ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    write_config(config, {"auths": {k: {"auth": b64("u:p")} for k in keys} | {"x.test": {}}})

    CredentialStore({}, home, runner=no_helpers).erase("docker.io")

    assert json.loads(config.read_text()) == {"auths": {"x.test": {}}}


# ---- credential helpers ---------------------------------------------------------------------


def test_creds_store_saves_through_the_helper(home: Path, config: Path) -> None:
    original = write_config(config, {"credsStore": "test", "auths": {"other.test": {}}})
    helpers = Helpers()
    store = CredentialStore({}, home, runner=helpers)

    where = store.save(HOST, Credentials("alice", SECRET))

    assert where.helper == "docker-credential-test" and str(where) == "docker-credential-test"
    ((argv, stdin),) = helpers.calls
    assert argv == ["docker-credential-test", "store"]
    assert json.loads(stdin) == {"ServerURL": HOST, "Username": "alice", "Secret": SECRET}
    assert config.read_bytes() == original  # no secret (and no change) in the file
    assert store.lookup(HOST) == Credentials("alice", SECRET)


def test_cred_helpers_entry_wins_over_creds_store(home: Path, config: Path) -> None:
    write_config(config, {"credsStore": "desktop", "credHelpers": {HOST: "pass"}})
    helpers = Helpers()

    CredentialStore({}, home, runner=helpers).save(HOST, Credentials("alice", SECRET))

    assert [argv for argv, _ in helpers.calls] == [["docker-credential-pass", "store"]]


def test_helper_for_docker_hub_gets_the_index_url(home: Path, config: Path) -> None:
    write_config(config, {"credsStore": "test"})
    helpers = Helpers()
    store = CredentialStore({}, home, runner=helpers)

    store.save("docker.io", Credentials("hub", SECRET))

    assert json.loads(helpers.calls[0][1])["ServerURL"] == "https://index.docker.io/v1/"
    assert store.lookup("docker.io") == Credentials("hub", SECRET)


def test_helper_store_failure_is_one_error_without_the_secret(home: Path, config: Path) -> None:
    original = write_config(config, {"credsStore": "test"})
    echo = subprocess.CompletedProcess(["x"], 1, f"bad input {SECRET}", f"cannot store {SECRET}")
    store = CredentialStore({}, home, runner=Helpers(fail={"store": echo}))

    with pytest.raises(RegistryAuthError, match="docker-credential-test could not store") as caught:
        store.save(HOST, Credentials("alice", SECRET))

    assert SECRET not in str(caught.value)
    assert config.read_bytes() == original


def test_logout_erases_from_the_helper_and_stale_file_entries(home: Path, config: Path) -> None:
    write_config(config, {"credsStore": "test", "auths": {HOST: {"auth": b64("old:pw")}}})
    helpers = Helpers()
    store = CredentialStore({}, home, runner=helpers)
    store.save(HOST, Credentials("alice", SECRET))

    assert logout(HOST, store) == ["docker-credential-test", str(config)]

    assert (["docker-credential-test", "erase"], HOST) in helpers.calls
    assert helpers.secrets == {}
    assert json.loads(config.read_text()) == {"credsStore": "test", "auths": {}}
    assert store.lookup(HOST) is None
    assert logout(HOST, store) == []


def test_helper_erase_failure_is_an_error(home: Path, config: Path) -> None:
    original = write_config(config, {"credsStore": "test", "auths": {HOST: {}}})
    broken = subprocess.CompletedProcess(["x"], 1, "", "keychain locked")
    store = CredentialStore({}, home, runner=Helpers(fail={"erase": broken}))

    with pytest.raises(RegistryAuthError, match="could not erase credentials for"):
        store.erase(HOST)

    assert config.read_bytes() == original


def test_missing_helper_is_a_clear_error(home: Path, config: Path) -> None:
    write_config(config, {"credsStore": "nonexistent"})
    store = CredentialStore({"PATH": str(home)}, home)

    with pytest.raises(RegistryAuthError, match="docker-credential-nonexistent not found"):
        store.save(HOST, Credentials("alice", SECRET))


def test_default_runner_uses_the_injected_environment(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-envtest"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "print(sys.argv[1], sys.stdin.read(), os.environ.get('MARKER'))\n"
    )
    script.chmod(0o755)

    proc = helper_runner({"PATH": str(bindir), "MARKER": "injected"})(
        ["docker-credential-envtest", "get"], "registry.test"
    )

    assert proc.stdout == "get registry.test injected\n"
    with pytest.raises(FileNotFoundError):
        helper_runner({"PATH": str(tmp_path)})(["docker-credential-envtest", "get"], "x")


# ---- verification against the registry (MockTransport) -------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]
REALM = "https://auth.registry.test/token"


def basic_registry(user: str, password: str, seen: list[httpx.Request]) -> Handler:
    expected = "Basic " + b64(f"{user}:{password}")

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") == expected:
            return httpx.Response(200, json={})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})

    return handle


def bearer_registry(user: str, password: str, seen: list[httpx.Request]) -> Handler:
    expected = "Basic " + b64(f"{user}:{password}")

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.registry.test":
            if request.headers.get("authorization") != expected:
                return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
            return httpx.Response(200, json={"token": "good-token", "expires_in": 300})
        if request.headers.get("authorization") == "Bearer good-token":
            return httpx.Response(200, json={})
        challenge = f'Bearer realm="{REALM}",service="registry.test"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    return handle


def test_basic_login_verifies_then_stores(home: Path, config: Path) -> None:
    seen: list[httpx.Request] = []
    store = CredentialStore({}, home, runner=no_helpers)
    transport = httpx.MockTransport(basic_registry("alice", SECRET, seen))

    result = login("registry.test", Credentials("alice", SECRET), store, transport=transport)

    assert result.verified and result.username == "alice" and result.destination.path == config
    assert [r.headers.get("authorization") is not None for r in seen] == [False, True]
    assert store.lookup("registry.test") == Credentials("alice", SECRET)


class CountingStore(CredentialStore):
    """Counts reads of docker's config.json for an update."""

    reads = 0

    def _load_for_update(self, path: Path) -> dict[str, Any]:
        self.reads += 1
        return super()._load_for_update(path)


def test_login_and_logout_read_config_json_once(home: Path, config: Path) -> None:
    write_config(config, {"auths": {"other.test": {"auth": b64("bob:x")}}, "psFormat": "t"})
    store = CountingStore({}, home, runner=no_helpers)
    transport = httpx.MockTransport(basic_registry("alice", SECRET, []))
    login("registry.test", Credentials("alice", SECRET), store, transport=transport)
    assert store.reads == 1
    doc = json.loads(config.read_text())
    assert doc["psFormat"] == "t" and set(doc["auths"]) == {"other.test", "registry.test"}
    assert logout("registry.test", store) == [str(config)]
    assert store.reads == 2
    assert set(json.loads(config.read_text())["auths"]) == {"other.test"}


def test_bearer_login_fetches_a_token_without_scope(home: Path, config: Path) -> None:
    seen: list[httpx.Request] = []
    store = CredentialStore({}, home, runner=no_helpers)
    transport = httpx.MockTransport(bearer_registry("alice", SECRET, seen))

    assert login("registry.test", Credentials("alice", SECRET), store, transport=transport).verified

    token_requests = [r for r in seen if r.url.host == "auth.registry.test"]
    assert len(token_requests) == 1
    assert dict(token_requests[0].url.params) == {"service": "registry.test"}
    assert seen[-1].headers["authorization"] == "Bearer good-token"
    assert store.lookup("registry.test") == Credentials("alice", SECRET)


@pytest.mark.parametrize("registry", [basic_registry, bearer_registry])
@pytest.mark.parametrize("existing", [None, {"auths": {"other.test": {"auth": b64("x:y")}}}])
def test_bad_credentials_write_nothing(
    home: Path,
    config: Path,
    registry: Callable[[str, str, list[httpx.Request]], Handler],
    existing: dict[str, Any] | None,
) -> None:
    original = write_config(config, existing) if existing is not None else None
    store = CredentialStore({}, home, runner=no_helpers)
    transport = httpx.MockTransport(registry("alice", "right", []))

    with pytest.raises(RegistryAuthError) as caught:
        login("registry.test", Credentials("alice", SECRET), store, transport=transport)

    assert str(caught.value) == "registry.test: login failed: credentials rejected"
    assert SECRET not in str(caught.value)
    if original is None:
        assert not (home / ".docker").exists()
    else:
        assert config.read_bytes() == original
        assert sorted(p.name for p in config.parent.iterdir()) == ["config.json"]


def test_bad_credentials_never_reach_the_helper(home: Path, config: Path) -> None:
    write_config(config, {"credsStore": "test"})
    helpers = Helpers()
    transport = httpx.MockTransport(basic_registry("alice", "right", []))

    with pytest.raises(RegistryAuthError):
        login(
            "registry.test",
            Credentials("alice", SECRET),
            CredentialStore({}, home, runner=helpers),
            transport=transport,
        )

    assert helpers.calls == []


def test_unreadable_config_fails_before_the_registry(home: Path, config: Path) -> None:
    config.parent.mkdir()
    config.write_text("{oops")
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(basic_registry("alice", SECRET, seen))

    with pytest.raises(OutputError):
        login(
            "registry.test",
            Credentials("alice", SECRET),
            CredentialStore({}, home),
            transport=transport,
        )

    assert seen == []


def test_registry_without_auth_stores_unverified(home: Path) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    store = CredentialStore({}, home, runner=no_helpers)

    result = login("registry.test", Credentials("alice", SECRET), store, transport=transport)

    assert result.verified is False
    assert store.lookup("registry.test") == Credentials("alice", SECRET)


# ---- CLI usage ------------------------------------------------------------------------------


def cli(
    *argv: str, home: Path, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env=env or {}, home=home, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    code = run(list(argv), ctx, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["login", HOST, "--username", "alice"], "", "no terminal to prompt"),
        (["login", HOST], "", "no terminal to prompt"),
        (["login", HOST, "--password-stdin"], SECRET, "--password-stdin needs --username"),
        (["login", HOST, "-u", "alice", "--password-stdin"], "\n", "empty password"),
        (["login", HOST, "-u", "a:b", "--password-stdin"], SECRET, "must not contain ':'"),
        (["login", "ftp://x", "-u", "alice", "--password-stdin"], SECRET, "only http"),
        (["logout", "not a host"], "", "expected host[:port]"),
    ],
)
def test_usage_errors_exit_2_in_one_line(
    home: Path, argv: list[str], stdin: str, message: str
) -> None:
    code, out, err = cli(*argv, home=home, stdin=stdin)

    assert code == 2
    assert out == ""
    assert err.startswith("imagepushd: error: ") and err.count("\n") == 1, err
    assert message in err
    assert SECRET not in err
    assert list(home.iterdir()) == []


def test_cli_logout(home: Path, config: Path) -> None:
    write_config(config, {"auths": {HOST: {"auth": b64("a:b")}, "o.test": {}}})

    assert cli("logout", f"https://{HOST}/", home=home) == (
        0,
        f"logged out of {HOST} (removed from {config})\n",
        "",
    )
    assert cli("logout", HOST, home=home) == (
        0,
        f"not logged in to {HOST}: nothing to remove\n",
        "",
    )
    assert json.loads(config.read_text()) == {"auths": {"o.test": {}}}
