"""Where registry credentials come from.

Docker's config.json, credential helpers, podman's auth files, and explicit ones
(``--password-stdin``, the config file, systemd credentials).

Secrets never reach logs, errors or argv: :class:`Credentials` hides them from ``repr`` and
helpers get the server URL on stdin.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagepushd.errors import RegistryAuthError

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
HELPER_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """A username/password pair, or an identity (refresh) token, or a ready bearer token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)


HelperRunner = Callable[[Sequence[str], str], "subprocess.CompletedProcess[str]"]


def run_helper(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
    """Run a docker credential helper (the default :data:`HelperRunner`)."""
    return subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=HELPER_TIMEOUT, check=False
    )


def _host_of(key: str) -> str:
    """The host[:port] of an ``auths`` key, which may be a URL (``https://host/v1/``)."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _auths_keys(host: str) -> list[str]:
    return list(DOCKER_HUB_KEYS) if host in ("docker.io", "registry-1.docker.io") else [host]


class CredentialStore:
    """Looks up credentials for a registry host in the usual files, in docker's order."""

    def __init__(
        self,
        env: Mapping[str, str],
        home: Path,
        *,
        runner: HelperRunner = run_helper,
    ) -> None:
        self._env = env
        self._home = home
        self._runner = runner

    def config_files(self) -> list[Path]:
        """Candidate auth files: docker's config.json first, then podman's auth files."""
        docker_dir = self._env.get("DOCKER_CONFIG")
        files = [
            Path(docker_dir) / "config.json" if docker_dir else self._home / ".docker/config.json"
        ]
        if self._env.get("REGISTRY_AUTH_FILE"):
            files.append(Path(self._env["REGISTRY_AUTH_FILE"]))
        if self._env.get("XDG_RUNTIME_DIR"):
            files.append(Path(self._env["XDG_RUNTIME_DIR"]) / "containers/auth.json")
        files.append(self._home / ".config/containers/auth.json")
        return files

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (``docker.io`` for Docker Hub), or None for anonymous."""
        for path in self.config_files():
            doc = self._load(path)
            if doc is None:
                continue
            found = self._from_config(doc, host, path)
            if found is not None:
                return found
        return None

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read (%s); ignoring it", path, exc.strerror)
            return None
        try:
            doc = json.loads(text)
        except ValueError:
            raise RegistryAuthError(f"{path}: not valid JSON") from None
        return doc if isinstance(doc, dict) else None

    def _from_config(self, doc: dict[str, Any], host: str, path: Path) -> Credentials | None:
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key in _auths_keys(host):
                helper = helpers.get(key)
                if isinstance(helper, str) and helper:
                    return self._from_helper(helper, key)
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            found = self._from_helper(store, _auths_keys(host)[0])
            if found is not None:
                return found
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            return None
        entry = next((auths[k] for k in _auths_keys(host) if k in auths), None)
        if entry is None:
            entry = next((v for k, v in auths.items() if _host_of(k) == host), None)
        if not isinstance(entry, dict):
            return None
        return self._from_entry(entry, host, path)

    @staticmethod
    def _from_entry(entry: dict[str, Any], host: str, path: Path) -> Credentials | None:
        username, password = entry.get("username", ""), entry.get("password", "")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                username, _, password = base64.b64decode(encoded).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise RegistryAuthError(
                    f"{path}: the auth entry for {host} is not valid base64"
                ) from None
        identity = entry.get("identitytoken", "")
        registry_token = entry.get("registrytoken", "")
        creds = Credentials(
            username=username if isinstance(username, str) else "",
            password=password if isinstance(password, str) else "",
            identity_token=identity if isinstance(identity, str) else "",
            registry_token=registry_token if isinstance(registry_token, str) else "",
        )
        if not (creds.username or creds.identity_token or creds.registry_token):
            return None
        return creds

    def _from_helper(self, helper: str, server: str) -> Credentials | None:
        program = f"docker-credential-{helper}"
        try:
            proc = self._runner([program, "get"], server)
        except FileNotFoundError:
            raise RegistryAuthError(f"credential helper {program} not found") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RegistryAuthError(f"credential helper {program} failed: {exc}") from None
        if proc.returncode != 0:
            if "credentials not found" in (proc.stdout + proc.stderr).lower():
                return None
            raise RegistryAuthError(
                f"credential helper {program} failed for {server} (exit {proc.returncode})"
            )
        try:
            doc = json.loads(proc.stdout)
            username, secret = str(doc.get("Username", "")), str(doc.get("Secret", ""))
        except (ValueError, AttributeError):
            raise RegistryAuthError(f"credential helper {program} printed invalid JSON") from None
        if username == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(username=username, password=secret)


def read_secret_file(path: Path, what: str) -> str:
    """A secret from a file (``password_file``, a systemd credential); drops the newline."""
    try:
        return path.read_text().rstrip("\n")
    except OSError as exc:
        raise RegistryAuthError(f"{what}: cannot read {path}: {exc.strerror}") from None


def systemd_credential(name: str, env: Mapping[str, str]) -> str:
    """The systemd credential ``name`` from ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``)."""
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise RegistryAuthError(
            f"password_credential {name!r}: $CREDENTIALS_DIRECTORY is not set "
            "(add LoadCredential= to the unit)"
        )
    if "/" in name or name in ("", ".", ".."):
        raise RegistryAuthError(f"password_credential {name!r}: not a credential name")
    return read_secret_file(Path(directory) / name, f"password_credential {name!r}")
