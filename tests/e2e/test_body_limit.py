"""Pushing through Debian's real nginx with its default 1 MiB body limit (issue 14, part 1).

nginx sits in front of the real docker-registry as the distribution docs' recipe puts it (TLS
with a private CA, Basic auth), but keeps nginx's default ``client_max_body_size 1m``, so any
request body over 1 MiB gets HTTP 413. A push must learn the limit from the first refusals and
send every later body under it; what lands is checked against the registry itself with skopeo
(digest equal, every blob pulled back).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_daemon import wait_served
from tests.e2e.test_push import load, push
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon, render_config
from tests.support.images import ImageBuilder
from tests.support.nginx import Nginx
from tests.support.process import require_tools
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

MiB = 1 << 20
LIMIT = 1 * MiB


@pytest.fixture
def nginx(registry: Registry, tmp_path: Path) -> Iterator[Nginx]:
    """nginx with TLS, Basic auth (robot / s3cret) and the default 1 MiB body limit."""
    require_tools("nginx", hint="install the Debian package nginx (apt-get install -y nginx)")
    with Nginx(tmp_path / "nginx", registry, users={"robot": "s3cret"}) as proxy:
        yield proxy


def refused(proxy: Nginx) -> list[tuple[str, str, int, int]]:
    return [r for r in proxy.requests() if r[2] == 413]


def test_cli_push_behind_a_1mib_body_limit_lands_byte_exact(
    containerd: Containerd,
    registry: Registry,
    nginx: Nginx,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """5 MiB layers (one PUT each without a limit) and a 20 MiB one (chunked): the first
    refusals teach the limit, every other body fits, the image is byte-exact."""
    b = image_builder
    root = b.image([5 * MiB, 5 * MiB + 3, 20 * MiB, 700], "nginx/cli")
    load(containerd, b, tmp_path, {"example.com/big:1": root})
    result = push(
        containerd,
        "example.com/big:1",
        f"{nginx.host}/team/big:1",
        "--ca-file",
        str(nginx.ca_file),
        "--username",
        "robot",
        "--password-stdin",
        "--concurrency",
        "1",
        home=tmp_path,
        stdin="s3cret\n",
    )
    assert result.code == 0, result.stderr
    assert result.result["digest"] == root.digest
    registry.verify_image("team/big:1", root.digest, tmp_path / "pull")
    assert len(refused(nginx)) <= 4, refused(nginx)
    accepted = [r for r in nginx.requests() if r[2] != 413]
    assert max(r[3] for r in accepted) <= LIMIT


def test_daemon_learns_the_limit_once_and_keeps_it_across_restarts(
    containerd: Containerd,
    registry: Registry,
    nginx: Nginx,
    daemon: Daemon,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """The daemon, configured as a user would (ca_file, username, password_file), pushes
    through the 1 MiB limit; after a restart the next image costs no refused request."""
    b = image_builder
    first = b.image([5 * MiB, 2 * MiB + 1, 600], "nginx/daemon/1")
    second = b.image([6 * MiB, 3 * MiB, 700], "nginx/daemon/2")
    load(containerd, b, tmp_path, {"build/app:1": first, "build/app:2": second})
    password = tmp_path / "robot.password"
    password.write_text("s3cret\n")
    daemon.write_config(
        render_config(
            root=containerd.root,
            state=daemon.base_dir / "state.db",
            push={"settle": "0s"},
            rules=[{"match": [f"{nginx.host}/team/**"]}],
            registries={
                nginx.host: {
                    "ca_file": nginx.ca_file,
                    "username": "robot",
                    "password_file": password,
                }
            },
        )
    )
    daemon.start()
    containerd.tag("build/app:1", f"{nginx.host}/team/app:1")
    wait_served(registry, ["team/app:1"], first.digest, started=time.monotonic(), timeout=120)
    registry.verify_image("team/app:1", first.digest, tmp_path / "pull")
    learned = refused(nginx)
    assert 1 <= len(learned) <= 4, learned
    assert daemon.stop() == 0

    daemon.start()
    containerd.tag("build/app:2", f"{nginx.host}/team/app:2")
    wait_served(registry, ["team/app:2"], second.digest, started=time.monotonic(), timeout=120)
    registry.verify_image("team/app:2", second.digest, tmp_path / "pull")
    assert refused(nginx) == learned  # remembered in the state file: nothing refused again
    accepted = [r for r in nginx.requests() if r[2] != 413]
    assert max(r[3] for r in accepted) <= LIMIT
    assert "sending at most 1.0 MiB per request" in daemon.log_text()
