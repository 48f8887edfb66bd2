"""Where credentials come from: docker and podman auth files, helpers, secret files."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from imagepushd.errors import RegistryAuthError
from imagepushd.push.registry.credentials import (
    Credentials,
    CredentialSource,
    CredentialStore,
    read_secret_file,
    systemd_credential,
)

SECRET = "s3cret:with:colons-do-not-leak"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_json(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


class Helpers:
    """An injected credential-helper runner: answers per program, records every call."""

    def __init__(
        self, answers: dict[str, subprocess.CompletedProcess[str] | BaseException]
    ) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], str]] = []

    def __call__(self, argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        answer = self.answers[argv[0]]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def done(stdout: str = "", stderr: str = "", code: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["helper", "get"], code, stdout, stderr)


def helper_json(username: str, secret: str, server: str = "registry.test") -> str:
    return json.dumps({"ServerURL": server, "Username": username, "Secret": secret})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    return directory


def no_helpers(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"no helper should run, ran {argv}")


# ---- docker config.json ------------------------------------------------------------------------


def test_home_docker_config(home: Path) -> None:
    write_json(
        home / ".docker/config.json", {"auths": {"registry.test": {"auth": b64("alice:pw")}}}
    )

    creds = CredentialStore({}, home, runner=no_helpers).lookup("registry.test")

    assert creds == Credentials("alice", "pw")


def test_docker_config_env_wins_over_home(home: Path, tmp_path: Path) -> None:
    write_json(home / ".docker/config.json", {"auths": {"registry.test": {"auth": b64("home:pw")}}})
    write_json(tmp_path / "dc/config.json", {"auths": {"registry.test": {"auth": b64("env:pw")}}})

    store = CredentialStore({"DOCKER_CONFIG": str(tmp_path / "dc")}, home, runner=no_helpers)

    assert store.lookup("registry.test") == Credentials("env", "pw")
    assert store.config_files()[0] == tmp_path / "dc/config.json"


def test_password_with_colons_splits_at_the_first(home: Path) -> None:
    write_json(
        home / ".docker/config.json", {"auths": {"registry.test": {"auth": b64("alice:" + SECRET)}}}
    )

    creds = CredentialStore({}, home, runner=no_helpers).lookup("registry.test")

    assert creds is not None
    assert (creds.username, creds.password) == ("alice", SECRET)


def test_username_and_password_fields(home: Path) -> None:
    write_json(
        home / ".docker/config.json",
        {"auths": {"registry.test": {"username": "bob", "password": "pw"}}},
    )

    assert CredentialStore({}, home, runner=no_helpers).lookup("registry.test") == Credentials(
        "bob", "pw"
    )


@pytest.mark.parametrize(
    "key",
    [
        "https://registry.test:5000/v1/",
        "http://registry.test:5000",
        "registry.test:5000/v2/",
        "REGISTRY.TEST:5000",
    ],
)
def test_url_shaped_keys_match_by_host_and_port(home: Path, key: str) -> None:
    write_json(home / ".docker/config.json", {"auths": {key: {"auth": b64("alice:pw")}}})
    store = CredentialStore({}, home, runner=no_helpers)

    assert store.lookup("registry.test:5000") == Credentials("alice", "pw")
    assert store.lookup("registry.test") is None
    assert store.lookup("registry.test:5001") is None


def test_exact_key_wins_over_a_url_key(home: Path) -> None:
    write_json(
        home / ".docker/config.json",
        {
            "auths": {
                "https://registry.test/v1/": {"auth": b64("url:pw")},
                "registry.test": {"auth": b64("exact:pw")},
            }
        },
    )

    assert CredentialStore({}, home, runner=no_helpers).lookup("registry.test") == Credentials(
        "exact", "pw"
    )


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io"])
@pytest.mark.parametrize("host", ["docker.io", "registry-1.docker.io"])
def test_docker_hub_keys(home: Path, key: str, host: str) -> None:
    write_json(home / ".docker/config.json", {"auths": {key: {"auth": b64("hubuser:pw")}}})

    assert CredentialStore({}, home, runner=no_helpers).lookup(host) == Credentials("hubuser", "pw")


def test_identity_and_registry_tokens(home: Path) -> None:
    write_json(
        home / ".docker/config.json",
        {
            "auths": {
                "a.test": {
                    "auth": b64("00000000-0000-0000-0000-000000000000:"),
                    "identitytoken": "rt",
                },
                "b.test": {"registrytoken": "bearer-xyz"},
                "c.test": {"auth": ""},
                "d.test": {},
                "e.test": "not an object",
            }
        },
    )
    store = CredentialStore({}, home, runner=no_helpers)

    a = store.lookup("a.test")
    assert a is not None
    assert a.identity_token == "rt"
    assert store.lookup("b.test") == Credentials(registry_token="bearer-xyz")
    assert store.lookup("c.test") is None
    assert store.lookup("d.test") is None
    assert store.lookup("e.test") is None


def test_bad_base64_is_a_clear_error(home: Path) -> None:
    path = write_json(
        home / ".docker/config.json", {"auths": {"registry.test": {"auth": "%%%not base64"}}}
    )

    with pytest.raises(RegistryAuthError, match="not valid base64") as caught:
        CredentialStore({}, home, runner=no_helpers).lookup("registry.test")

    assert str(path) in str(caught.value)


def test_invalid_json_is_one_clear_error_without_content(home: Path) -> None:
    path = home / ".docker/config.json"
    path.parent.mkdir()
    path.write_text('{"auths": {"registry.test": {"password": "' + SECRET + '"}')

    with pytest.raises(RegistryAuthError) as caught:
        CredentialStore({}, home, runner=no_helpers).lookup("registry.test")

    assert str(caught.value) == f"{path}: not valid JSON"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_missing_files_mean_anonymous(home: Path) -> None:
    assert CredentialStore({}, home, runner=no_helpers).lookup("registry.test") is None


def test_unreadable_file_is_skipped(home: Path, tmp_path: Path) -> None:
    (home / ".docker/config.json").mkdir(parents=True)  # a directory: read fails with EISDIR
    write_json(tmp_path / "podman.json", {"auths": {"registry.test": {"auth": b64("p:pw")}}})
    store = CredentialStore(
        {"REGISTRY_AUTH_FILE": str(tmp_path / "podman.json")}, home, runner=no_helpers
    )

    assert store.lookup("registry.test") == Credentials("p", "pw")


# ---- podman ------------------------------------------------------------------------------------


def test_podman_registry_auth_file(home: Path, tmp_path: Path) -> None:
    write_json(tmp_path / "auth.json", {"auths": {"registry.test/team": {"auth": b64("pod:pw")}}})

    store = CredentialStore(
        {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}, home, runner=no_helpers
    )

    assert store.lookup("registry.test") == Credentials("pod", "pw")


def test_podman_runtime_auth_file(home: Path, tmp_path: Path) -> None:
    write_json(
        tmp_path / "run/containers/auth.json", {"auths": {"registry.test": {"auth": b64("xdg:pw")}}}
    )

    store = CredentialStore({"XDG_RUNTIME_DIR": str(tmp_path / "run")}, home, runner=no_helpers)

    assert store.lookup("registry.test") == Credentials("xdg", "pw")


def test_docker_first_then_podman_files_in_order(home: Path, tmp_path: Path) -> None:
    write_json(home / ".docker/config.json", {"auths": {"other.test": {"auth": b64("d:pw")}}})
    write_json(tmp_path / "auth.json", {"auths": {"registry.test": {"auth": b64("raf:pw")}}})
    write_json(
        tmp_path / "run/containers/auth.json", {"auths": {"registry.test": {"auth": b64("xdg:pw")}}}
    )
    write_json(
        home / ".config/containers/auth.json", {"auths": {"last.test": {"auth": b64("cfg:pw")}}}
    )
    env = {
        "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
    }
    store = CredentialStore(env, home, runner=no_helpers)

    assert store.config_files() == [
        home / ".docker/config.json",
        tmp_path / "auth.json",
        tmp_path / "run/containers/auth.json",
        home / ".config/containers/auth.json",
    ]
    assert store.lookup("other.test") == Credentials("d", "pw")
    assert store.lookup("registry.test") == Credentials("raf", "pw")
    assert store.lookup("last.test") == Credentials("cfg", "pw")


# ---- credential helpers ------------------------------------------------------------------------


def test_cred_helper_gets_the_server_on_stdin(home: Path) -> None:
    write_json(
        home / ".docker/config.json",
        {
            "credHelpers": {"registry.test": "pass"},
            "auths": {"registry.test": {"auth": b64("x:y")}},
        },
    )
    helpers = Helpers({"docker-credential-pass": done(helper_json("alice", SECRET))})

    creds = CredentialStore({}, home, runner=helpers).lookup("registry.test")

    assert creds == Credentials("alice", SECRET)
    assert helpers.calls == [(["docker-credential-pass", "get"], "registry.test")]


def test_creds_store_for_docker_hub_uses_the_index_url(home: Path) -> None:
    write_json(home / ".docker/config.json", {"credsStore": "desktop"})
    helpers = Helpers({"docker-credential-desktop": done(helper_json("hub", "pw"))})

    creds = CredentialStore({}, home, runner=helpers).lookup("docker.io")

    assert creds == Credentials("hub", "pw")
    assert helpers.calls == [(["docker-credential-desktop", "get"], "https://index.docker.io/v1/")]


def test_token_username_means_identity_token(home: Path) -> None:
    write_json(home / ".docker/config.json", {"credHelpers": {"registry.test": "acr"}})
    helpers = Helpers({"docker-credential-acr": done(helper_json("<token>", "refresh-xyz"))})

    creds = CredentialStore({}, home, runner=helpers).lookup("registry.test")

    assert creds == Credentials(identity_token="refresh-xyz")


@pytest.mark.parametrize(
    "answer",
    [
        done(stdout="credentials not found in native keychain\n", code=1),
        done(stderr="Credentials not found", code=1),
    ],
)
def test_helper_without_credentials_means_anonymous(
    home: Path, answer: subprocess.CompletedProcess[str]
) -> None:
    write_json(home / ".docker/config.json", {"credHelpers": {"registry.test": "pass"}})

    creds = CredentialStore({}, home, runner=Helpers({"docker-credential-pass": answer})).lookup(
        "registry.test"
    )

    assert creds is None


def test_creds_store_without_entry_falls_back_to_auths(home: Path) -> None:
    write_json(
        home / ".docker/config.json",
        {"credsStore": "secretservice", "auths": {"registry.test": {"auth": b64("file:pw")}}},
    )
    helpers = Helpers({"docker-credential-secretservice": done("credentials not found", code=1)})

    assert CredentialStore({}, home, runner=helpers).lookup("registry.test") == Credentials(
        "file", "pw"
    )


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            done(stdout=f"fatal: cannot unlock {SECRET}", stderr=SECRET, code=1),
            "failed for registry.test",
        ),
        (done(stdout=f"{{not json {SECRET}"), "invalid JSON"),
        (done(stdout="[1, 2]"), "invalid JSON"),
        (FileNotFoundError(2, "No such file"), "not found"),
        (PermissionError(13, "Permission denied"), "failed"),
        (subprocess.TimeoutExpired(["docker-credential-pass", "get"], 30), "failed"),
    ],
)
def test_helper_failures_are_auth_errors_without_secrets(
    home: Path, answer: subprocess.CompletedProcess[str] | BaseException, message: str
) -> None:
    write_json(home / ".docker/config.json", {"credHelpers": {"registry.test": "pass"}})
    store = CredentialStore({}, home, runner=Helpers({"docker-credential-pass": answer}))

    with pytest.raises(RegistryAuthError, match=message) as caught:
        store.lookup("registry.test")

    assert "docker-credential-pass" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None


def test_helper_argv_never_holds_the_server(home: Path) -> None:
    write_json(home / ".docker/config.json", {"credHelpers": {"registry.test:5000": "pass"}})
    helpers = Helpers({"docker-credential-pass": done(helper_json("a", "b"))})

    CredentialStore({}, home, runner=helpers).lookup("registry.test:5000")

    ((argv, stdin),) = helpers.calls
    assert argv == ["docker-credential-pass", "get"]
    assert stdin == "registry.test:5000"


# ---- secret files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"), [("pw\n", "pw"), ("pw", "pw"), ("p w \n\n", "p w "), ("", "")]
)
def test_read_secret_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)

    assert read_secret_file(path, "password_file") == expected


def test_read_secret_file_missing(tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError, match=r"password_file: cannot read .*nope.*No such file"):
        read_secret_file(tmp_path / "nope", "password_file")


def test_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "robot").write_text(SECRET + "\n")

    assert systemd_credential("robot", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == SECRET


def test_systemd_credential_without_directory() -> None:
    with pytest.raises(RegistryAuthError, match="LoadCredential="):
        systemd_credential("robot", {})


@pytest.mark.parametrize("name", ["../etc/shadow", "a/b", "", ".", ".."])
def test_systemd_credential_names_are_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(RegistryAuthError, match="not a credential name"):
        systemd_credential(name, {"CREDENTIALS_DIRECTORY": str(tmp_path)})


def test_systemd_credential_missing(tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError, match="password_credential 'robot': cannot read"):
        systemd_credential("robot", {"CREDENTIALS_DIRECTORY": str(tmp_path)})


# ---- a source: resolved at first use, again only when rejected --------------------------------


class Answers:
    """A resolver answering from a list in turn, counting its runs (a helper, a file read)."""

    def __init__(self, *answers: Credentials | BaseException | None) -> None:
        self.answers = list(answers)
        self.runs = 0

    def __call__(self) -> Credentials | None:
        answer = self.answers[min(self.runs, len(self.answers) - 1)]
        self.runs += 1
        if isinstance(answer, BaseException):
            raise answer
        return answer


def test_source_resolves_at_first_get_and_then_caches() -> None:
    resolve = Answers(Credentials("alice", "one"))
    source = CredentialSource(resolve)

    assert resolve.runs == 0  # nothing runs until a registry asks for credentials
    assert source.get() == Credentials("alice", "one")
    assert source.get() == Credentials("alice", "one")
    assert resolve.runs == 1


def test_source_renew_takes_changed_credentials() -> None:
    resolve = Answers(Credentials("alice", "one"), Credentials("alice", "two"))
    source = CredentialSource(resolve)
    rejected = source.get()

    assert source.renew(rejected) is True
    assert source.get() == Credentials("alice", "two")
    assert resolve.runs == 2


def test_source_renew_reports_unchanged_credentials() -> None:
    resolve = Answers(Credentials("alice", "one"))
    source = CredentialSource(resolve)
    rejected = source.get()

    assert source.renew(rejected) is False
    assert resolve.runs == 2
    # The next rejection of the answer now in use resolves again (the helper may be updated).
    assert source.renew(source.get()) is False
    assert resolve.runs == 3


def test_source_renews_once_for_requests_rejected_together() -> None:
    resolve = Answers(Credentials("alice", "one"), Credentials("alice", "two"))
    source = CredentialSource(resolve)
    rejected = source.get()
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def reject() -> None:
        barrier.wait()
        results.append(source.renew(rejected))

    threads = [threading.Thread(target=reject) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results == [True] * 8
    assert resolve.runs == 2


def test_source_renew_of_an_older_answer_does_not_resolve() -> None:
    resolve = Answers(Credentials("alice", "one"), Credentials("alice", "one"))
    source = CredentialSource(resolve)
    first = source.get()
    assert source.renew(first) is False  # resolved again: equal, but a new answer
    assert resolve.runs == 2

    # A request that was refused with the first answer comes late: nothing new to run.
    assert source.renew(first) is False
    assert resolve.runs == 2


def test_source_none_is_anonymous_and_may_turn_into_credentials() -> None:
    resolve = Answers(None, Credentials("alice", "one"))
    source = CredentialSource(resolve)

    assert source.get().anonymous
    assert source.renew(source.get()) is True  # someone logged in since
    assert source.get() == Credentials("alice", "one")


def test_source_resolve_failure_keeps_the_answer_and_tries_again_next_time() -> None:
    resolve = Answers(
        Credentials("alice", "one"),
        RegistryAuthError("credential helper docker-credential-x failed (exit 1)"),
        Credentials("alice", "two"),
    )
    source = CredentialSource(resolve)
    rejected = source.get()

    with pytest.raises(RegistryAuthError, match="docker-credential-x failed"):
        source.renew(rejected)
    assert source.renew(rejected) is True
    assert source.get() == Credentials("alice", "two")


def test_fixed_source_never_changes() -> None:
    source = CredentialSource.fixed(Credentials("alice", "one"))
    rejected = source.get()

    assert source.renew(rejected) is False
    assert source.get() == Credentials("alice", "one")
    assert CredentialSource.fixed(None).get().anonymous


def test_source_reads_a_rotated_secret_file_only_when_rejected(tmp_path: Path) -> None:
    path = tmp_path / "robot.password"
    path.write_text("one\n")
    source = CredentialSource(lambda: Credentials("robot", read_secret_file(path, "robot")))
    rejected = source.get()

    path.write_text("two\n")
    assert source.get() == Credentials("robot", "one")  # cached until rejected
    assert source.renew(rejected) is True
    assert source.get() == Credentials("robot", "two")
