"""Where containerd keeps its root: containerd, Docker, k3s/RKE2 and rootless set-ups.

A root is found by its ``io.containerd.metadata.v1.bolt/meta.db``. The places, in order of
likelihood on a build machine or node:

1. containerd's own configuration, ``/etc/containerd/config.toml``: its ``root`` (the last one
   set wins, following ``imports`` breadth-first as containerd's ``LoadConfig`` does), else
   containerd's default ``/var/lib/containerd``. Docker Engine uses this containerd when its
   socket exists (the usual docker-ce and containerd.io packages), with namespace ``moby``.
2. Docker Engine's managed containerd, which dockerd starts when no system containerd runs:
   ``$DOCKER_CONTAINERD_ROOT``, else ``<data-root>/containerd/daemon`` with ``data-root`` from
   ``/etc/docker/daemon.json`` (default ``/var/lib/docker``) (moby v29.0.0
   ``daemon/command/daemon.go:1042`` and ``libcontainerd/supervisor/remote_daemon.go:69``;
   v29.7.2 ``daemon/command/daemon.go:1183-1196``).
3. k3s and RKE2: ``<data-dir>/agent/containerd`` with ``data-dir`` from
   ``/etc/rancher/{k3s,rke2}/config.yaml`` (default ``/var/lib/rancher/{k3s,rke2}``).
4. Rootless containerd: the ``root`` of ``$XDG_CONFIG_HOME/containerd/config.toml``, else
   ``$XDG_DATA_HOME/containerd`` (``~/.local/share/containerd``).
5. Rootless Docker: ``<data-root>/containerd/daemon`` with ``data-root`` from
   ``$XDG_CONFIG_HOME/docker/daemon.json`` (default ``$XDG_DATA_HOME/docker``).

Everything outside is injected: ``fs`` is the file system's root (absolute paths read from
system files resolve under it), ``env`` and ``home`` are the user's, so tests use tmp dirs.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imagepushd.errors import RootNotFoundError
from imagepushd.watch.metadata import META_DB

DEFAULT_ROOT = Path("/var/lib/containerd")
CONTAINERD_CONFIG = PurePosixPath("/etc/containerd/config.toml")
DOCKER_CONFIG = PurePosixPath("/etc/docker/daemon.json")
DOCKER_DATA_ROOT = PurePosixPath("/var/lib/docker")
#: k3s and RKE2: (product, config file, default data-dir).
RANCHER = (
    ("k3s", PurePosixPath("/etc/rancher/k3s/config.yaml"), PurePosixPath("/var/lib/rancher/k3s")),
    (
        "RKE2",
        PurePosixPath("/etc/rancher/rke2/config.yaml"),
        PurePosixPath("/var/lib/rancher/rke2"),
    ),
)
#: The top-level ``data-dir:`` of a k3s/RKE2 config.yaml (a flat YAML map of flags).
_DATA_DIR = re.compile(
    r"""^data-dir:[ \t]*(?:"([^"]*)"|'([^']*)'|([^#\s][^#]*?))[ \t]*(?:#.*)?$""", re.M
)
_MAX_IMPORTS = 64
CONFIGURED = "[containerd] root in imagepushd's configuration"


@dataclass(frozen=True)
class Place:
    """A candidate root and why it is one (shown when it is chosen, or when none was found)."""

    path: Path
    why: str

    def __str__(self) -> str:
        return f"{self.path} ({self.why})"


@dataclass(frozen=True)
class Found:
    """The root chosen, and the other candidates that hold a meta.db too."""

    place: Place
    others: tuple[Place, ...] = ()

    @property
    def path(self) -> Path:
        """The containerd root directory."""
        return self.place.path

    def describe(self) -> str:
        """One line: which root and why, and any other root present."""
        text = f"containerd root {self.place}"
        if self.others:
            text += "; also present: " + ", ".join(str(p) for p in self.others)
        return text


class _Host:
    """The machine as seen from ``fs``, with the user's ``env`` and ``home``."""

    def __init__(self, fs: Path, env: Mapping[str, str], home: Path) -> None:
        self.fs = fs
        self.env = env
        self.home = home

    def system(self, path: PurePosixPath | str) -> Path:
        """An absolute path of the machine, under ``fs``."""
        return self.fs / str(path).lstrip("/")

    def named(self, text: str, base: Path) -> Path:
        """A path read from a file: absolute ones are the machine's, relative ones ``base``'s."""
        path = PurePosixPath(os.path.normpath(text))  # Go's filepath.Clean, as containerd does
        return self.system(path) if path.is_absolute() else Path(os.path.normpath(base / path))

    def xdg(self, variable: str, default: str) -> Path:
        value = self.env.get(variable)
        return Path(value) if value and Path(value).is_absolute() else self.home / default


def _containerd_root(host: _Host, config: Path) -> tuple[Path, str] | None:
    """The ``root`` containerd would use from ``config`` and its imports; None if none set.

    Like containerd's ``LoadConfig`` (cmd/containerd/server/config/config.go, v2.1.9:288-338):
    files load breadth-first, each import relative to its file's directory and glob-expanded,
    and a later non-empty ``root`` overrides an earlier one. Unreadable files are skipped.
    """
    pending, loaded = [config], set[Path]()
    found: tuple[Path, str] | None = None
    while pending and len(loaded) < _MAX_IMPORTS:
        path = pending.pop(0)
        if path in loaded:
            continue
        loaded.add(path)
        doc = _toml(path)
        if doc is None:
            continue
        root = doc.get("root")
        if isinstance(root, str) and root:
            found = host.named(root, path.parent), f"root = in {path}"
        pending.extend(_imports(host, doc.get("imports"), path.parent))
    return found


def _toml(path: Path) -> dict[str, Any] | None:
    """The document in ``path``; None if it cannot be read or parsed."""
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def _imports(host: _Host, imports: object, base: Path) -> list[Path]:
    """The files an ``imports`` list names, in order, globs expanded (sorted)."""
    out: list[Path] = []
    for item in imports if isinstance(imports, list) else []:
        if not isinstance(item, str) or not item:
            continue
        target = host.named(item, base)
        if "*" in item:
            out.extend(sorted(target.parent.glob(target.name)))
        else:
            out.append(target)
    return out


def _docker_data_root(host: _Host, config: Path, default: Path) -> tuple[Path, str]:
    """The ``data-root`` of dockerd from its daemon.json (``graph`` is its old name)."""
    try:
        doc = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return default, f"data-root {default}"
    if isinstance(doc, dict):
        for key in ("data-root", "graph"):
            value = doc.get(key)
            if isinstance(value, str) and value:
                return host.named(value, config.parent), f"{key} in {config}"
    return default, f"data-root {default}"


def _rancher_data_dir(host: _Host, config: Path, default: Path) -> tuple[Path, str]:
    try:
        match = _DATA_DIR.search(config.read_text())
    except (OSError, UnicodeDecodeError):
        match = None
    if match is not None:
        value = next(g for g in match.groups() if g is not None)
        if value:
            return host.named(value, config.parent), f"data-dir in {config}"
    return default, f"data-dir {default}"


def candidates(env: Mapping[str, str], home: Path, fs: Path = Path("/")) -> list[Place]:
    """Every place a containerd root may be on this machine, most likely first."""
    host = _Host(fs, env, home)
    out: list[Place] = []

    config = host.system(CONTAINERD_CONFIG)
    configured = _containerd_root(host, config)
    if configured is not None:
        out.append(Place(configured[0], f"containerd: {configured[1]}"))
    else:
        out.append(Place(host.system(DEFAULT_ROOT.as_posix()), "containerd's default root"))

    override = env.get("DOCKER_CONTAINERD_ROOT")
    if override and PurePosixPath(override).is_absolute():
        out.append(
            Place(
                host.system(override), "Docker Engine's managed containerd: DOCKER_CONTAINERD_ROOT"
            )
        )
    else:
        data_root, why = _docker_data_root(
            host, host.system(DOCKER_CONFIG), host.system(DOCKER_DATA_ROOT)
        )
        out.append(
            Place(data_root / "containerd" / "daemon", f"Docker Engine's managed containerd, {why}")
        )

    for product, rancher_config, default in RANCHER:
        data_dir, why = _rancher_data_dir(host, host.system(rancher_config), host.system(default))
        out.append(Place(data_dir / "agent" / "containerd", f"{product}, {why}"))

    rootless_config = host.xdg("XDG_CONFIG_HOME", ".config") / "containerd" / "config.toml"
    data_home = host.xdg("XDG_DATA_HOME", ".local/share")
    rootless = _containerd_root(host, rootless_config)
    if rootless is not None:
        out.append(Place(rootless[0], f"rootless containerd: {rootless[1]}"))
    else:
        out.append(Place(data_home / "containerd", "rootless containerd's default root"))

    docker_config = host.xdg("XDG_CONFIG_HOME", ".config") / "docker" / "daemon.json"
    data_root, why = _docker_data_root(host, docker_config, data_home / "docker")
    out.append(Place(data_root / "containerd" / "daemon", f"rootless Docker, {why}"))
    return out


def _state(place: Place) -> str | None:
    """None if ``place`` holds a meta.db, else why not (shown in the not-found error)."""
    try:
        return None if (place.path / META_DB).is_file() else "no meta.db"
    except PermissionError:
        return "permission denied: run as root or as its rootless user"


def expected_root(
    configured: Path | None, env: Mapping[str, str], home: Path, fs: Path = Path("/")
) -> Place:
    """Where to wait for a containerd not started yet: the configured root, else the likeliest."""
    return Place(configured, CONFIGURED) if configured is not None else candidates(env, home, fs)[0]


def discover_root(
    explicit: Path | None,
    configured: Path | None,
    env: Mapping[str, str],
    home: Path,
    fs: Path = Path("/"),
) -> Found:
    """The containerd root to read: ``--root``, else ``[containerd] root``, else discovered.

    An explicit or configured root is the only candidate. Otherwise the first of
    :func:`candidates` holding a meta.db wins; none found is a :class:`RootNotFoundError`
    listing every place tried and why it did not qualify.
    """
    places: Sequence[Place]
    if explicit is not None:
        places = [Place(explicit, "--root")]
    elif configured is not None:
        places = [Place(configured, CONFIGURED)]
    else:
        places = candidates(env, home, fs)
    states = [_state(p) for p in places]
    present = [p for p, s in zip(places, states, strict=True) if s is None]
    if not present:
        raise RootNotFoundError(
            [f"{p.path} ({p.why}: {s})" for p, s in zip(places, states, strict=True)]
        )
    return Found(present[0], tuple(present[1:]))
