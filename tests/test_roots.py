"""Root discovery: every place containerd, Docker, k3s/RKE2 and rootless set-ups keep a root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagepushd.errors import RootNotFoundError
from imagepushd.watch.roots import candidates, discover_root, expected_root


def make_root(path: Path) -> Path:
    """A directory that looks like a containerd root (its meta.db exists)."""
    (path / "io.containerd.metadata.v1.bolt").mkdir(parents=True)
    (path / "io.containerd.metadata.v1.bolt" / "meta.db").write_bytes(b"")
    return path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fs(tmp_path: Path) -> Path:
    return tmp_path / "fs"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_defaults_in_order_of_likelihood(fs: Path, home: Path):
    places = candidates({}, home, fs)
    assert [p.path for p in places] == [
        fs / "var/lib/containerd",
        fs / "var/lib/docker/containerd/daemon",
        fs / "var/lib/rancher/k3s/agent/containerd",
        fs / "var/lib/rancher/rke2/agent/containerd",
        home / ".local/share/containerd",
        home / ".local/share/docker/containerd/daemon",
    ]
    assert [p.why for p in places] == [
        "containerd's default root",
        f"Docker Engine's managed containerd, data-root {fs}/var/lib/docker",
        f"k3s, data-dir {fs}/var/lib/rancher/k3s",
        f"RKE2, data-dir {fs}/var/lib/rancher/rke2",
        "rootless containerd's default root",
        f"rootless Docker, data-root {home}/.local/share/docker",
    ]


def test_containerd_config_root_and_imports(fs: Path, home: Path):
    """The last ``root`` set wins, imports load breadth-first, relative to their file, globbed."""
    write(
        fs / "etc/containerd/config.toml",
        'version = 2\nroot = "/srv/a"\nimports = ["conf.d/*.toml"]\n',
    )
    write(fs / "etc/containerd/conf.d/10-x.toml", 'imports = ["../late.toml"]\n')
    write(fs / "etc/containerd/conf.d/20-y.toml", 'root = "/srv/b"\n')
    write(fs / "etc/containerd/late.toml", 'root = "/srv/c"\n')
    first = candidates({}, home, fs)[0]
    assert first.path == fs / "srv/c"
    assert first.why == f"containerd: root = in {fs}/etc/containerd/late.toml"
    # A broken file is skipped like a missing one; the others still count.
    write(fs / "etc/containerd/late.toml", "root = [unclosed\n")
    assert candidates({}, home, fs)[0].path == fs / "srv/b"
    # Cycles end.
    write(fs / "etc/containerd/late.toml", 'imports = ["/etc/containerd/config.toml"]\n')
    assert candidates({}, home, fs)[0].path == fs / "srv/b"


def test_docker_managed_containerd(fs: Path, home: Path):
    write(fs / "etc/docker/daemon.json", json.dumps({"data-root": "/data/docker"}))
    place = candidates({}, home, fs)[1]
    assert place.path == fs / "data/docker/containerd/daemon"
    assert (
        place.why == f"Docker Engine's managed containerd, data-root in {fs}/etc/docker/daemon.json"
    )
    override = candidates({"DOCKER_CONTAINERD_ROOT": "/elsewhere"}, home, fs)[1]
    assert override.path == fs / "elsewhere"
    assert "DOCKER_CONTAINERD_ROOT" in override.why
    write(fs / "etc/docker/daemon.json", "{not json")
    assert candidates({}, home, fs)[1].path == fs / "var/lib/docker/containerd/daemon"


@pytest.mark.parametrize(
    "line",
    ["data-dir: /opt/k3s", 'data-dir: "/opt/k3s"  # moved', "data-dir: '/opt/k3s'"],
)
def test_k3s_data_dir(fs: Path, home: Path, line: str):
    write(fs / "etc/rancher/k3s/config.yaml", f"write-kubeconfig-mode: '0644'\n{line}\n")
    place = candidates({}, home, fs)[2]
    assert place.path == fs / "opt/k3s/agent/containerd"
    assert place.why == f"k3s, data-dir in {fs}/etc/rancher/k3s/config.yaml"


def test_rootless_places_follow_xdg(fs: Path, home: Path, tmp_path: Path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    places = candidates(env, home, fs)
    assert places[4].path == tmp_path / "data/containerd"
    assert places[5].path == tmp_path / "data/docker/containerd/daemon"
    write(tmp_path / "cfg/containerd/config.toml", 'root = "/rl/containerd"\n')
    write(tmp_path / "cfg/docker/daemon.json", json.dumps({"data-root": "/rl/docker"}))
    places = candidates(env, home, fs)
    assert places[4].path == fs / "rl/containerd"
    assert places[4].why.startswith("rootless containerd: root = in ")
    assert places[5].path == fs / "rl/docker/containerd/daemon"


def test_discovery_takes_the_first_present_and_names_the_others(fs: Path, home: Path):
    rootless = make_root(home / ".local/share/containerd")
    found = discover_root(None, None, {}, home, fs)
    assert found.path == rootless
    assert found.describe() == f"containerd root {rootless} (rootless containerd's default root)"
    k3s = make_root(fs / "var/lib/rancher/k3s/agent/containerd")
    found = discover_root(None, None, {}, home, fs)
    assert found.path == k3s
    assert found.describe() == (
        f"containerd root {k3s} (k3s, data-dir {fs}/var/lib/rancher/k3s); "
        f"also present: {rootless} (rootless containerd's default root)"
    )


def test_nothing_found_lists_every_place_tried(fs: Path, home: Path):
    with pytest.raises(RootNotFoundError) as exc:
        discover_root(None, None, {}, home, fs)
    assert len(exc.value.tried) == 6
    assert exc.value.tried[0] == f"{fs}/var/lib/containerd (containerd's default root: no meta.db)"
    message = str(exc.value)
    assert "\n" not in message
    for place in candidates({}, home, fs):
        assert str(place.path) in message


def test_explicit_or_configured_root_is_the_only_candidate(fs: Path, home: Path, tmp_path: Path):
    make_root(fs / "var/lib/containerd")
    configured = make_root(tmp_path / "configured")
    found = discover_root(None, configured, {}, home, fs)
    assert (found.path, found.others) == (configured, ())
    assert "[containerd] root" in found.place.why
    with pytest.raises(RootNotFoundError) as exc:
        discover_root(tmp_path / "nope", configured, {}, home, fs)
    assert exc.value.tried == (f"{tmp_path / 'nope'} (--root: no meta.db)",)


def test_waiting_place_is_the_configured_or_likeliest_root(fs: Path, home: Path, tmp_path: Path):
    assert expected_root(None, {}, home, fs).path == fs / "var/lib/containerd"
    assert expected_root(tmp_path / "r", {}, home, fs).path == tmp_path / "r"
