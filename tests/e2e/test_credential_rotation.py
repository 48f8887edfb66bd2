"""Credentials that rotate under a running daemon, against a real docker-registry.

The registry's password changes while ``imagepushd run`` keeps running; the operator updates
what the daemon reads (a ``password_file``, a docker credential helper's answer) and sends no
SIGHUP. The next image must push: the daemon resolves its credentials
again when the registry (or its token server) refuses them, and sends once more. The helper
is a real executable on the daemon's ``PATH`` that counts its runs, so the test can tell that
it ran only when a refusal asked for it. Every pushed image is checked with skopeo (the
source digest served, every blob pulled).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_daemon import _one_rule, configure, small, state_path
from tests.support.cli import run_cli
from tests.support.containerd import Containerd, load
from tests.support.daemon import Daemon
from tests.support.faultproxy import FaultProxy, describe
from tests.support.images import ImageBuilder
from tests.support.process import wait_until
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

#: Hang guard only: a push of these small images takes well under a second here.
PUSH_TIMEOUT = 120.0
ROTATED = "rotated-Pw-do-not-leak"
MiB = 1 << 20

HELPER = """\
#!{python}
# docker-credential-test: answers "get" with the first entry of the JSON list in $HELPER_ANSWER
# (dropping it while others follow, so a list of two answers is a rotation at the second run);
# one line per run in $HELPER_RUNS.
import json, os, sys

with open(os.environ["HELPER_RUNS"], "a") as runs:
    runs.write(json.dumps(sys.argv[1:]) + "\\n")
server = sys.stdin.read().strip()
if sys.argv[1:] != ["get"]:
    sys.exit(2)
path = os.environ["HELPER_ANSWER"]
with open(path) as f:
    answers = json.load(f)
if len(answers) > 1:
    with open(path + ".tmp", "w") as f:
        json.dump(answers[1:], f)
    os.replace(path + ".tmp", path)
print(json.dumps({{"ServerURL": server, **answers[0]}}))
"""


def wait_pushed(daemon: Daemon, target: str, digest: str) -> None:
    """Wait until the daemon recorded ``target`` at ``digest``; fail at its first push error."""

    def outcome() -> str | None:
        status = daemon.status()
        if any((p["target"], p["digest"]) == (target, digest) for p in status["recent"]):
            return "pushed"
        errors = [j["last_error"] for j in status["pending"] if j["target"] == target]
        return next((f"failed: {e}" for e in errors if e), None)

    result = wait_until(outcome, PUSH_TIMEOUT, interval=0.2)
    assert result == "pushed", f"{target}: {result or 'not pushed in time'}\n{daemon.log_tail()}"


def rotate(registry: Registry, password: str) -> None:
    """Change alice's password on the registry (htpasswd file, or the token server's users)."""
    if registry.token_server is not None:
        registry.token_server.users["alice"] = password
    else:
        registry.set_password("alice", password)


def assert_no_secret_leaked(daemon: Daemon, *secrets: str) -> None:
    texts = [daemon.log_text(), state_path(daemon).read_bytes().decode(errors="replace")]
    for secret in secrets:
        for text in texts:
            assert secret not in text


def push_before_and_after_rotation(
    containerd: Containerd,
    registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
    settings: dict[str, Any],
    update: Callable[[str], None],
) -> None:
    """Push one image, rotate the password (``update`` tells the daemon's side), push another.

    The second image goes to another repository: on a token registry it needs a new token,
    which the token server only gives for the new password.
    """
    b = image_builder
    host = registry.host
    first, second = small(b, "rotation/first"), small(b, "rotation/second")
    load(containerd, b, tmp_path, {"build/first:1": first, "build/second:1": second})
    configure(daemon, containerd, host, _one_rule(host), registry=settings)
    daemon.start()
    containerd.tag("build/first:1", f"{host}/team/app:1")
    wait_pushed(daemon, f"{host}/team/app:1", first.digest)
    registry.verify_image("team/app:1", first.digest, tmp_path / "pull")

    rotate(registry, ROTATED)
    update(ROTATED)
    mark, since = registry.log_mark(), daemon.mark()
    containerd.tag("build/second:1", f"{host}/team/other:1")
    wait_pushed(daemon, f"{host}/team/other:1", second.digest)

    registry.verify_image("team/other:1", second.digest, tmp_path / "pull")
    assert "RELOADING" not in [k for n in daemon.notifications(since) for k in n.fields]
    assert "resolved them again: changed, sending again" in daemon.log_text()
    if registry.token_server is None:
        refused = [r for r in registry.requests(mark) if r["status"] == 401]
        assert refused, "the old password was never refused: the test rotated nothing"
    else:
        refused_tokens = [r for r in registry.token_server.requests if r.status == 401]
        assert refused_tokens, "the token server never refused the old password"


def test_rotated_password_file_is_read_again_without_a_reload(
    containerd: Containerd,
    htpasswd_registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """``password_file`` replaced by the operator (or a secrets agent) after the change.

    (``password_credential`` goes through the same re-read, but systemd never changes
    ``$CREDENTIALS_DIRECTORY`` under a running service: https://systemd.io/CREDENTIALS/.)
    """
    secret = tmp_path / "robot.password"
    secret.write_text("secret\n")

    def update(password: str) -> None:
        temp = secret.with_suffix(".tmp")
        temp.write_text(password + "\n")
        temp.replace(secret)

    settings = {"username": "alice", "password_file": str(secret)}
    push_before_and_after_rotation(
        containerd, htpasswd_registry, daemon, image_builder, tmp_path, settings, update
    )
    assert_no_secret_leaked(daemon, ROTATED)


class Helper:
    """``docker-credential-test`` in a private bin directory, named by ``credHelpers`` for ``host``.

    :attr:`env` puts it on ``PATH`` with its own ``DOCKER_CONFIG``; :meth:`answer` sets what
    ``get`` answers; :attr:`runs` lists each run's argv.
    """

    def __init__(self, directory: Path, host: str) -> None:
        bindir = directory / "bin"
        bindir.mkdir()
        program = bindir / "docker-credential-test"
        program.write_text(HELPER.format(python=sys.executable))
        program.chmod(0o755)
        self.answer_path = directory / "helper-answer.json"
        self.runs_path = directory / "helper-runs"
        self.runs_path.touch()
        self.answer(("alice", "secret"))
        docker_config = directory / "docker-config"
        docker_config.mkdir()
        (docker_config / "config.json").write_text(json.dumps({"credHelpers": {host: "test"}}))
        self.env = {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "DOCKER_CONFIG": str(docker_config),
            "HELPER_ANSWER": str(self.answer_path),
            "HELPER_RUNS": str(self.runs_path),
        }

    def answer(self, *answers: tuple[str, str]) -> None:
        """Answer ``(username, secret)``; with several, one per run, the last one for good."""
        temp = self.answer_path.with_suffix(".tmp")
        temp.write_text(json.dumps([{"Username": u, "Secret": s} for u, s in answers]))
        temp.replace(self.answer_path)

    @property
    def runs(self) -> list[list[str]]:
        """The argv (after the program) of every run so far."""
        return [json.loads(line) for line in self.runs_path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["htpasswd", "token"])
def test_credential_helper_runs_again_only_when_refused(
    kind: str,
    request: pytest.FixtureRequest,
    containerd: Containerd,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """``credHelpers`` names a helper on the daemon's PATH; its answer changes with the password.

    It runs once at the first push and once more when the registry (htpasswd) or the token
    server (token) refuses the old password: twice in all, however many requests were sent.
    """
    registry: Registry = request.getfixturevalue(f"{kind}_registry")
    helper = Helper(tmp_path, registry.host)
    daemon.extra_env.update(helper.env)

    def update(password: str) -> None:
        helper.answer(("alice", password))
        assert len(helper.runs) == 1  # the first push resolved once, then used what it had

    push_before_and_after_rotation(
        containerd, registry, daemon, image_builder, tmp_path, {}, update
    )

    assert helper.runs == [["get"], ["get"]]  # argv holds no secret and no server
    assert_no_secret_leaked(daemon, ROTATED)


def test_expired_token_is_fetched_again_without_running_the_helper(
    containerd: Containerd,
    token_registry: Registry,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Tokens that really expire after 3 s (the client assumes 60 s): an expired token asks
    the token server again with the credentials in hand, not the helper."""
    registry = token_registry
    server = registry.token_server
    assert server is not None
    server.expires_in = 3
    server.strict_expiry = True
    helper = Helper(tmp_path, registry.host)
    daemon.extra_env.update(helper.env)
    b = image_builder
    host = registry.host
    first, second = small(b, "expiry/first"), small(b, "expiry/second")
    load(containerd, b, tmp_path, {"build/first:1": first, "build/second:1": second})
    configure(daemon, containerd, host, _one_rule(host))
    daemon.start()
    containerd.tag("build/first:1", f"{host}/team/app:1")
    wait_pushed(daemon, f"{host}/team/app:1", first.digest)
    issued = len([r for r in server.requests if r.status == 200])
    expired_at = time.monotonic() + server.expires_in + 1
    wait_until(lambda: time.monotonic() > expired_at, server.expires_in + 5)

    mark = registry.log_mark()
    containerd.tag("build/second:1", f"{host}/team/app:2")
    wait_pushed(daemon, f"{host}/team/app:2", second.digest)

    assert any(r["status"] == 401 for r in registry.requests(mark)), "no token expired"
    assert len([r for r in server.requests if r.status == 200]) > issued
    assert not [r for r in server.requests if r.status == 401]
    assert helper.runs == [["get"]]
    server.expires_in = 300  # skopeo should not race the clock
    registry.verify_image("team/app:1", first.digest, tmp_path / "pull")
    registry.verify_image("team/app:2", second.digest, tmp_path / "pull")


def test_cli_push_runs_the_helper_again_when_refused_mid_push(
    containerd: Containerd,
    htpasswd_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """``imagepushd push`` (the same credential path as the daemon) refused in the middle.

    The proxy answers the 2nd PATCH with 401 and the registry's own challenge, as the registry
    does once a robot's password is revoked; the helper's next answer is the robot that took
    over (a user the registry knows). The CLI runs the helper once more, sends the PATCH again
    with the new credentials, and the push completes.
    """
    registry = htpasswd_registry
    registry.set_password("robot2", ROTATED)
    b = image_builder
    root = b.image([3 * MiB, 1000], "cli-rotation")
    load(containerd, b, tmp_path, {"example.com/cli-rotation:1": root})

    with FaultProxy(registry.host) as proxy:
        helper = Helper(tmp_path, proxy.host)
        helper.answer(("alice", "secret"), ("robot2", ROTATED))
        rule = proxy.unauthorized(method="PATCH", nth=2)
        outcome = run_cli(
            ["push", "example.com/cli-rotation:1", f"{proxy.host}/team/cli:1",
             "--root", str(containerd.root), "--plain-http", "--json", "--chunk-size", "1MiB"],
            home=tmp_path, env=helper.env,
        )  # fmt: skip
        records = proxy.records
        assert proxy.errors == []

    assert outcome.code == 0, outcome.stderr + describe(records)
    assert outcome.result["digest"] == root.digest
    assert rule.fired == 1
    assert helper.runs == [["get"], ["get"]]
    patches = [r for r in records if r.method == "PATCH"]
    assert [r.status for r in patches][:3] == [202, 401, 202], describe(records)
    assert patches[1].path == patches[2].path and patches[1].query == patches[2].query
    assert ROTATED not in outcome.stdout + outcome.stderr
    registry.verify_image("team/cli:1", root.digest, tmp_path / "pull")
