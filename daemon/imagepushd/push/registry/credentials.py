"""Where registry credentials come from, and where ``imagepushd login`` puts them.

Docker's config.json, credential helpers, podman's auth files, and explicit ones
(``--password-stdin``, the config file, systemd credentials).

Writing (``login``/``logout``) goes where docker's tooling finds it: through the configured
``credHelpers``/``credsStore`` helper when there is one, else into ``auths`` of docker's
config.json (every other key kept; replaced atomically; mode 0600). No file of our own.

Secrets never reach logs, errors or argv: :class:`Credentials` hides them from ``repr`` and
helpers get the server URL (or the JSON holding the secret) on stdin.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from imagepushd.errors import OutputError, RegistryAuthError

log = logging.getLogger(__name__)

DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
DOCKER_HUB_KEYS = (DOCKER_HUB_SERVER, "index.docker.io", "docker.io")
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
HELPER_TIMEOUT = 30.0
CONFIG_FILE_MODE = 0o600
CONFIG_DIR_MODE = 0o700


@dataclass(frozen=True)
class Credentials:
    """A username/password pair, or an identity (refresh) token, or a ready bearer token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def basic(self) -> str:
        """``base64(username:password)``: the Basic auth value, and docker's ``auth`` field."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    @property
    def anonymous(self) -> bool:
        """Whether there is nothing to authenticate with."""
        return not (self.username or self.identity_token or self.registry_token)


class CredentialSource:
    """Credentials resolved on first use and again only when a registry rejects them.

    A daemon runs for months while helpers' tokens expire (ECR's after 12 h) and robot
    passwords rotate: resolving once at start would keep sending the refused ones, and
    resolving before every request would run a helper per request. ``resolve`` (a helper
    lookup, a secret file read) runs at the first :meth:`get` and then at most once per
    :meth:`renew` of the answer in use; it returns None for anonymous.
    """

    def __init__(self, resolve: Callable[[], Credentials | None]) -> None:
        self._resolve = resolve
        self._current: Credentials | None = None
        self._lock = threading.Lock()
        #: How many times ``resolve`` ran (helper runs, file reads).
        self.resolutions = 0

    @classmethod
    def fixed(cls, credentials: Credentials | None) -> CredentialSource:
        """A source whose answer never changes (``--password-stdin``, ``login``)."""
        return cls(lambda: credentials)

    def get(self) -> Credentials:
        """The credentials in use (resolved now if this is the first ask); empty: anonymous."""
        with self._lock:
            if self._current is None:
                self._current = self._fresh()
            return self._current

    def renew(self, rejected: Credentials) -> bool:
        """Resolve again because ``rejected`` (an answer of :meth:`get`) was refused.

        Returns whether the answer now in use differs from ``rejected``, that is whether
        sending again can succeed. Requests refused together hold the same answer object:
        only the first of them resolves again, the others take its result.
        """
        with self._lock:
            if self._current is rejected:
                self._current = self._fresh()
            return self._current != rejected

    def _fresh(self) -> Credentials:
        # A new object per resolution, even when equal, so renew() can tell them apart.
        self.resolutions += 1
        found = self._resolve()
        return replace(found) if found is not None else Credentials()


HelperRunner = Callable[[Sequence[str], str], "subprocess.CompletedProcess[str]"]


def helper_runner(env: Mapping[str, str]) -> HelperRunner:
    """A :data:`HelperRunner` that finds helpers on ``env``'s ``PATH`` and runs them in ``env``.

    The default for :class:`CredentialStore`, so a command's environment (the CLI's injected
    one, the daemon's) decides which ``docker-credential-*`` runs, not this process's globals.
    """

    def run(argv: Sequence[str], stdin: str) -> subprocess.CompletedProcess[str]:
        program = shutil.which(argv[0], path=env.get("PATH", os.defpath))
        if program is None:
            raise FileNotFoundError(errno.ENOENT, "not found on PATH", argv[0])
        return subprocess.run(
            [program, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=HELPER_TIMEOUT,
            check=False,
            env=dict(env),
        )

    return run


def _helper_for(doc: dict[str, Any], host: str) -> tuple[str, str] | None:
    """``(server key, helper name)`` from ``credHelpers`` for ``host``, if one is configured."""
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key in _auths_keys(host):
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                return key, helper
    return None


def _host_of(key: str) -> str:
    """The host[:port] of an ``auths`` key, which may be a URL (``https://host/v1/``)."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1]
    return key.split("/", 1)[0].lower()


def _auths_keys(host: str) -> list[str]:
    return list(DOCKER_HUB_KEYS) if host in ("docker.io", "registry-1.docker.io") else [host]


def _auths_entry(doc: dict[str, Any], host: str) -> dict[str, Any] | None:
    """``host``'s entry in ``auths``: under one of its own keys, else a key naming its host."""
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    entry = next((auths[k] for k in _auths_keys(host) if k in auths), None)
    if entry is None:
        entry = next((v for k, v in auths.items() if _host_of(k) == host), None)
    return entry if isinstance(entry, dict) else None


def _key_matches(key: str, host: str) -> bool:
    """Whether an ``auths`` key (a host or a URL) names ``host`` (Docker Hub under any name)."""
    found = _host_of(key)
    if host.lower() in DOCKER_HUB_HOSTS:
        return found in DOCKER_HUB_HOSTS
    return found == host.lower()


def server_key(host: str) -> str:
    """The key docker stores ``host``'s credentials under (Docker Hub's is its v1 index URL)."""
    return DOCKER_HUB_SERVER if host.lower() in DOCKER_HUB_HOSTS else host.lower()


@dataclass(frozen=True)
class Destination:
    """Where credentials for one registry are written: a helper, or docker's config.json."""

    #: docker's config.json (read for ``credsStore``/``credHelpers``; written without a helper).
    path: Path
    #: The ``ServerURL`` given to the helper, or the ``auths`` key.
    server: str
    #: ``docker-credential-<name>``, or None for the ``auths`` entry in :attr:`path`.
    helper: str | None = None

    def __str__(self) -> str:
        return self.helper if self.helper is not None else str(self.path)


@dataclass(frozen=True)
class CredentialUpdate:
    """docker's config.json as read once for a ``login``/``logout``, and where ``host`` goes.

    Reading it once means the check before the network round trip and the write after it see
    the same file, and an unreadable file fails before any traffic.
    """

    host: str
    destination: Destination
    doc: dict[str, Any]


def write_private_json(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``doc`` as JSON, mode 0600, directory 0700 if new.

    A temporary file in the same directory is written, fsynced and renamed over ``path``, so
    readers see the old file or the new one, never a torn one. A symlinked ``path`` stays a
    symlink (its target is replaced). Run as root on a file someone else owns (``sudo`` with
    their ``HOME``), the owner is kept.
    """
    target = path.resolve() if path.is_symlink() else path
    directory = target.parent
    try:
        directory.mkdir(mode=CONFIG_DIR_MODE, parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), CONFIG_FILE_MODE)
            try:
                old = target.stat()
            except FileNotFoundError:
                old = None
            if old is not None and os.geteuid() == 0:
                os.fchown(out.fileno(), old.st_uid, old.st_gid)
            out.write(json.dumps(doc, indent="\t") + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise OutputError(f"{target}: cannot write: {exc.strerror}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class CredentialStore:
    """Looks up credentials for a registry host in the usual files, in docker's order.

    :meth:`save` and :meth:`erase` write them back the way ``docker login``/``logout`` do.
    Helpers run through ``runner`` (default: found on ``env``'s ``PATH``, run in ``env``).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        home: Path,
        *,
        runner: HelperRunner | None = None,
    ) -> None:
        self._env = env
        self._home = home
        self._runner = runner if runner is not None else helper_runner(env)

    @property
    def docker_config(self) -> Path:
        """The docker config.json: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``."""
        return self.config_files()[0]

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
        per_host = _helper_for(doc, host)
        if per_host is not None:
            key, helper = per_host
            return self._from_helper(helper, key)
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            found = self._from_helper(store, _auths_keys(host)[0])
            if found is not None:
                return found
        entry = _auths_entry(doc, host)
        return None if entry is None else self._from_entry(entry, host, path)

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
        return None if creds.anonymous else creds

    def _from_helper(self, helper: str, server: str) -> Credentials | None:
        program = f"docker-credential-{helper}"
        proc = self._run_helper(program, "get", server)
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

    # ---- writing (login / logout) ----------------------------------------------------------

    def _load_for_update(self, path: Path) -> dict[str, Any]:
        """The docker config.json to rewrite: {} if absent; anything unreadable is an error.

        Unlike :meth:`_load`, nothing is skipped: a file we cannot read or parse is never
        overwritten.
        """
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise OutputError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            doc = json.loads(text) if text.strip() else {}
        except ValueError:
            raise OutputError(f"{path}: not valid JSON (not overwriting it)") from None
        if not isinstance(doc, dict):
            raise OutputError(f"{path}: not a JSON object (not overwriting it)")
        auths = doc.get("auths")
        if auths is not None and not isinstance(auths, dict):
            raise OutputError(f'{path}: "auths" is not an object (not overwriting it)')
        return doc

    def prepare(self, host: str) -> CredentialUpdate:
        """Read docker's config.json once and decide where ``host``'s credentials belong.

        ``credHelpers[host]`` first, then ``credsStore``, else ``auths`` in docker's config.json
        (the order :meth:`lookup` reads them in, so what is saved is what is found).
        """
        path = self.docker_config
        doc = self._load_for_update(path)
        per_host = _helper_for(doc, host)
        store = doc.get("credsStore")
        if per_host is not None:
            key, helper = per_host
            destination = Destination(path, key, f"docker-credential-{helper}")
        elif isinstance(store, str) and store:
            destination = Destination(path, server_key(host), f"docker-credential-{store}")
        else:
            destination = Destination(path, server_key(host))
        return CredentialUpdate(host, destination, doc)

    def destination(self, host: str) -> Destination:
        """Where :meth:`save` would put credentials for ``host`` (``docker.io`` for Hub)."""
        return self.prepare(host).destination

    def save(
        self, host: str, credentials: Credentials, update: CredentialUpdate | None = None
    ) -> Destination:
        """Store a username and password for ``host`` where docker's tooling finds them.

        Through the helper (``store``, JSON on stdin) when one is configured, else as
        ``auths[key] = {"auth": base64(user:pass)}`` in docker's config.json, replacing only
        that entry. ``update`` is what :meth:`prepare` read (default: read it now).
        """
        if not credentials.username or ":" in credentials.username:
            raise RegistryAuthError(f"{host}: cannot store a username that is empty or has ':'")
        if update is None or update.host != host:
            update = self.prepare(host)
        destination = update.destination
        if destination.helper is not None:
            payload = json.dumps(
                {
                    "ServerURL": destination.server,
                    "Username": credentials.username,
                    "Secret": credentials.password,
                }
            )
            proc = self._run_helper(destination.helper, "store", payload)
            if proc.returncode != 0:
                raise RegistryAuthError(
                    f"credential helper {destination.helper} could not store credentials for "
                    f"{destination.server} (exit {proc.returncode})"
                )
            log.debug("%s: credentials stored by %s", host, destination.helper)
            return destination
        doc = dict(update.doc)
        auths = dict(doc.get("auths") or {})
        auths[destination.server] = {"auth": credentials.basic()}
        doc["auths"] = auths
        write_private_json(destination.path, doc)
        log.debug("%s: credentials stored in %s", host, destination.path)
        return destination

    def erase(self, host: str) -> list[str]:
        """Forget ``host``'s credentials: erase from the helper, drop matching ``auths`` entries.

        Both, as ``docker logout`` does, so that no older ``auths`` entry is left to be found
        once the helper forgot. Returns where something was removed (empty: nothing was).
        """
        update = self.prepare(host)
        destination = update.destination
        removed: list[str] = []
        if destination.helper is not None:
            proc = self._run_helper(destination.helper, "erase", destination.server)
            if proc.returncode == 0:
                removed.append(destination.helper)
            elif "credentials not found" not in (proc.stdout + proc.stderr).lower():
                raise RegistryAuthError(
                    f"credential helper {destination.helper} could not erase credentials for "
                    f"{destination.server} (exit {proc.returncode})"
                )
        auths = update.doc.get("auths")
        if isinstance(auths, dict):
            kept = {k: v for k, v in auths.items() if not _key_matches(k, host)}
            if len(kept) != len(auths):
                write_private_json(destination.path, {**update.doc, "auths": kept})
                removed.append(str(destination.path))
        return removed

    def _run_helper(
        self, program: str, action: str, stdin: str
    ) -> subprocess.CompletedProcess[str]:
        try:
            return self._runner([program, action], stdin)
        except FileNotFoundError:
            raise RegistryAuthError(f"credential helper {program} not found") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RegistryAuthError(
                f"credential helper {program} {action} failed: {type(exc).__name__}"
            ) from None


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
