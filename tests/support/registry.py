"""A real, private CNCF distribution registry (``docker-registry``, 2.8) for tests.

Each :class:`Registry` has its config, storage, certificates and log under one directory and
listens on ``127.0.0.1`` on a free port. Modes (combinable where it makes sense):

- plain HTTP (default);
- ``tls=True``: HTTPS with a CA and server certificate (SANs ``127.0.0.1``, ``localhost``)
  generated here; the CA is :attr:`Registry.ca_file`, inside :attr:`Registry.cert_dir` (the
  layout skopeo's ``--cert-dir`` and ``/etc/docker/certs.d/HOST/`` expect);
- ``htpasswd={"user": "password"}``: Basic auth (bcrypt entries);
- ``token=TokenServer(...)``: Bearer token auth against a :class:`TokenServer`.

The registry logs in JSON (``log.formatter: json``) plus one Apache combined access-log line per
request; :meth:`Registry.requests` parses the access-log lines, which (unlike the JSON
``response completed`` entries) also cover requests refused by the auth layer.

Outside views of what the registry holds: ``skopeo`` (:meth:`Registry.skopeo_inspect_digest`,
:meth:`Registry.skopeo_copy_to_oci`, :meth:`Registry.skopeo_push_oci`) and plain httpx
(:meth:`Registry.manifest`, :meth:`Registry.blob_exists`, :meth:`Registry.tags`).
"""

from __future__ import annotations

import base64
import datetime
import enum
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypedDict

import bcrypt
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.images import DOCKER_MANIFEST_LIST, sha256_digest
from tests.support.process import log_size, read_log, tail_log, terminate
from tests.support.tokenserver import TokenServer, self_signed_ca

#: Accept header for manifest GETs: every manifest and index type we build.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)

# 127.0.0.1 - - [27/Nov/2026:22:08:10 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)


class RegistryError(AssertionError):
    """The registry did not start, or a check through skopeo or HTTP failed."""


class RequestRecord(TypedDict):
    """One request from the registry's access log."""

    method: str
    #: The path without the query string, e.g. ``/v2/app/blobs/uploads/<uuid>``.
    path: str
    #: The query string without ``?`` (``""`` if none).
    query: str
    #: The request URI as logged (path and query).
    uri: str
    status: int
    #: Response bytes written.
    size: int
    user_agent: str
    remote: str


class _Default(enum.Enum):
    CREDS = "default"


#: Use the registry's default credentials (first htpasswd user / first token-server user).
DEFAULT_CREDS = _Default.CREDS

Creds = tuple[str, str] | None | _Default


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to 0, then release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_ref(ref: str) -> tuple[str, str]:
    """Split ``repo:tag`` or ``repo@digest`` into ``(repo, tag-or-digest)`` (default tag latest)."""
    if "@" in ref:
        repo, _, reference = ref.partition("@")
        return repo, reference
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


# ---------------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_tls_files(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> None:
    """Write ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` (EC P-256) to ``directory``.

    The server certificate is signed by the CA and valid for ``hosts`` (IP or DNS SANs).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = self_signed_ca(ca_key, "imagepushd test CA", path_length=0, crl_sign=True)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "ca.key", ca_key)
    (directory / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / "server.key", server_key)


# ---------------------------------------------------------------------- the registry


class Registry:
    """A private ``docker-registry serve`` process with its files under ``base_dir``.

    Use as a context manager (starts on enter, :meth:`close` on exit) or call :meth:`start` /
    :meth:`stop` yourself. The port is chosen on the first start and kept across
    :meth:`restart`, as are the storage and the HTTP secret (so upload URLs stay valid).
    A token server passed as ``token`` is started by :meth:`start` if it is not running, and
    then stopped by :meth:`close` (not by :meth:`stop`).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        tls: bool = False,
        htpasswd: Mapping[str, str] | None = None,
        token: TokenServer | None = None,
        log_level: Literal["debug", "info", "warn", "error"] = "info",
        start_timeout: float = 20.0,
        skopeo_timeout: float = 300.0,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if htpasswd is not None and token is not None:
            raise ValueError("choose htpasswd or token auth, not both")
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.htpasswd = dict(htpasswd) if htpasswd is not None else None
        self.token_server = token
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.skopeo_timeout = skopeo_timeout
        self.extra_config = dict(extra_config or {})
        self.config_path = self.base_dir / "config.yml"
        self.log_path = self.base_dir / "registry.log"
        self._data_dir = self.base_dir / "data"
        self._tls_dir = self.base_dir / "tls"
        self._cert_dir = self.base_dir / "certs.d"
        self._htpasswd_path = self.base_dir / "htpasswd"
        self._token_root = self.base_dir / "token-root.pem"
        self._authfile = self.base_dir / "skopeo-auth.json"
        self._policy = self.base_dir / "skopeo-policy.json"
        self._secret = base64.b64encode(os.urandom(24)).decode()
        self._fixed_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._owns_token_server = False
        if tls:
            make_tls_files(self._tls_dir)
            self._cert_dir.mkdir(exist_ok=True)
            shutil.copyfile(self._tls_dir / "ca.crt", self._cert_dir / "ca.crt")
        if self.htpasswd is not None:
            self._write_htpasswd()
        if token is not None:
            self._token_root.write_bytes(token.cert_pem)
        self._authfile.write_text('{"auths": {}}\n')
        self._policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')

    def _write_htpasswd(self) -> None:
        assert self.htpasswd is not None
        lines = [
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, pw in self.htpasswd.items()
        ]
        temp = self._htpasswd_path.with_suffix(".tmp")
        temp.write_text("".join(lines))
        temp.replace(self._htpasswd_path)

    def set_password(self, user: str, password: str) -> None:
        """Change (or add) an htpasswd user's password, taking effect on the running registry.

        docker-registry re-reads its htpasswd file when the file's modification time changes
        (measured with 2.8: the old password is refused on the next request, no restart).
        The file is replaced whole, so the registry never reads half of it.
        """
        if self.htpasswd is None:
            raise ValueError("not an htpasswd registry")
        self.htpasswd[user] = password
        self._write_htpasswd()

    # ------------------------------------------------------------------ addresses and files
    @property
    def port(self) -> int:
        """The TCP port (chosen on the first :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("registry has not been started: no port yet")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry host as it appears in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def scheme(self) -> str:
        """``https`` with ``tls=True``, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT``."""
        return f"{self.scheme}://{self.host}"

    @property
    def data_dir(self) -> Path:
        """The filesystem storage root (``docker/registry/v2/...`` below it)."""
        return self._data_dir

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate (PEM) that signed the server certificate, in TLS mode."""
        return self._cert_dir / "ca.crt" if self.tls else None

    @property
    def cert_dir(self) -> Path | None:
        """A directory holding only ``ca.crt`` (for ``--cert-dir`` / ``certs.d``), in TLS mode."""
        return self._cert_dir if self.tls else None

    @property
    def auth_mode(self) -> Literal["none", "htpasswd", "token"]:
        """Which authentication the registry requires."""
        if self.htpasswd is not None:
            return "htpasswd"
        if self.token_server is not None:
            return "token"
        return "none"

    @property
    def default_creds(self) -> tuple[str, str] | None:
        """The credentials used when a method's ``creds`` is :data:`DEFAULT_CREDS`."""
        users = self.htpasswd if self.htpasswd is not None else None
        if users is None and self.token_server is not None:
            users = self.token_server.users
        if not users:
            return None
        user, password = next(iter(users.items()))
        return user, password

    def _creds(self, creds: Creds) -> tuple[str, str] | None:
        return self.default_creds if isinstance(creds, _Default) else creds

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        """Whether the registry process started by this object is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The registry process id while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    def config(self) -> dict[str, Any]:
        """The configuration written to ``config.yml`` (JSON, which is valid YAML)."""
        http: dict[str, Any] = {"addr": self.host, "secret": self._secret}
        if self.tls:
            http["tls"] = {
                "certificate": os.fspath(self._tls_dir / "server.crt"),
                "key": os.fspath(self._tls_dir / "server.key"),
            }
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": self.log_level, "formatter": "json"},
            "storage": {
                "filesystem": {"rootdirectory": os.fspath(self._data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
        }
        if self.htpasswd is not None:
            cfg["auth"] = {
                "htpasswd": {"realm": "test-registry", "path": os.fspath(self._htpasswd_path)}
            }
        elif self.token_server is not None:
            cfg["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.token_server.service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": os.fspath(self._token_root),
                }
            }
        _deep_update(cfg, self.extra_config)
        return cfg

    def start(self) -> Self:
        """Start the registry and wait until ``GET /v2/`` answers (200 or 401).

        Without a fixed port, a port taken between choosing and binding is retried with
        another one.
        """
        if self.running:
            return self
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RegistryError(
                "docker-registry not found: install the Debian package docker-registry"
            )
        if self.token_server is not None and not self.token_server.running:
            self.token_server.start()
            self._owns_token_server = True
        attempts = 1 if self._fixed_port is not None else 5
        for attempt in range(attempts):
            if self._port is None:
                self._port = free_port()
            try:
                self._start_once(binary)
                return self
            except _AddressInUse:
                if attempt == attempts - 1 or self._fixed_port is not None:
                    raise RegistryError(
                        f"port {self._port} is in use:\n{self.log_tail()}"
                    ) from None
                self._port = None
        raise AssertionError("unreachable")

    def _start_once(self, binary: str) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        log_start = log_size(self.log_path)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [binary, "serve", os.fspath(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.base_dir,
        )
        try:
            self.wait_ready(self.start_timeout)
        except RegistryError:
            exited = self._proc is not None and self._proc.poll() is not None
            self.stop()
            if exited and "address already in use" in self._log_text(log_start):
                raise _AddressInUse() from None
            raise

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Poll ``GET /v2/`` until it answers 200 or 401; raise if the process dies first."""
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        with self._client(timeout=2.0) as client:
            while True:
                if not self.running:
                    rc = self._proc.returncode if self._proc is not None else None
                    raise RegistryError(
                        f"docker-registry exited with {rc} on start:\n{self.log_tail()}"
                    )
                try:
                    status = client.get("/v2/").status_code
                    if status in (200, 401):
                        return
                    last_error = f"GET /v2/ answered {status}"
                except httpx.HTTPError as e:
                    last_error = repr(e)
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"registry at {self.url} not ready after {timeout}s ({last_error}):\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the registry: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self._proc is not None:
            terminate(self._proc, timeout)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> Self:
        """Stop and start again on the same port, storage and secret."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the registry, and the token server if :meth:`start` started it."""
        try:
            self.stop()
        finally:
            if self._owns_token_server and self.token_server is not None:
                self.token_server.stop()
                self._owns_token_server = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ log
    def _log_text(self, offset: int = 0) -> str:
        return read_log(self.log_path, offset)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the registry's log."""
        return tail_log(self.log_path, lines, "(no registry log)")

    def log_mark(self) -> int:
        """The current size of the log: pass it as ``since`` to see only later requests."""
        self._settle()
        return log_size(self.log_path)

    def _settle(self, settle: float = 0.1, limit: float = 5.0) -> None:
        # The access-log line is written just after the response is sent: wait until the log
        # has not grown for `settle` seconds (at most `limit` seconds in all).
        if settle <= 0:
            return
        deadline = time.monotonic() + limit
        size = -1
        while time.monotonic() < deadline:
            now = log_size(self.log_path)
            if now == size:
                return
            size = now
            time.sleep(settle)

    def requests(self, since: int = 0, settle: float = 0.1) -> list[RequestRecord]:
        """Parse the access log: one record per HTTP request, oldest first.

        ``since`` is a :meth:`log_mark`. ``settle`` waits until the log stops growing first
        (the line is written right after the response), 0 to read at once.
        """
        self._settle(settle)
        out: list[RequestRecord] = []
        for line in self._log_text(since).splitlines():
            m = _ACCESS_LINE.match(line)
            if m is None:
                continue
            uri = m["uri"]
            path, _, query = uri.partition("?")
            out.append(
                RequestRecord(
                    method=m["method"],
                    path=path,
                    query=query,
                    uri=uri,
                    status=int(m["status"]),
                    size=0 if m["size"] == "-" else int(m["size"]),
                    user_agent=m["agent"] or "",
                    remote=m["remote"],
                )
            )
        return out

    def log_entries(self, since: int = 0) -> list[dict[str, Any]]:
        """The registry's JSON log entries (``msg``, ``level``, ``http.request.*``, ``err.*``)."""
        self._settle()
        out: list[dict[str, Any]] = []
        for line in self._log_text(since).splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    # ------------------------------------------------------------------ skopeo
    def skopeo_flags(
        self, prefix: Literal["", "src-", "dest-"] = "", creds: Creds = DEFAULT_CREDS
    ) -> list[str]:
        """TLS and credential flags for skopeo talking to this registry.

        ``prefix`` is ``"src-"`` / ``"dest-"`` for ``skopeo copy``. ``creds=None`` is anonymous.
        TLS mode verifies against :attr:`cert_dir`; plain HTTP needs ``--tls-verify=false``.
        """
        flags = [f"--{prefix}authfile={self._authfile}"]
        if self.tls:
            flags += [f"--{prefix}tls-verify=true", f"--{prefix}cert-dir={self._cert_dir}"]
        else:
            flags.append(f"--{prefix}tls-verify=false")
        actual = self._creds(creds)
        if actual is not None:
            flags.append(f"--{prefix}creds={actual[0]}:{actual[1]}")
        elif self.auth_mode != "none":
            flags.append(f"--{prefix}no-creds")
        return flags

    def docker_ref(self, ref: str) -> str:
        """``docker://HOST/ref`` for a ``repo:tag`` / ``repo@digest`` relative to this registry."""
        return f"docker://{self.host}/{self._relative(ref)}"

    def _relative(self, ref: str) -> str:
        prefix = f"{self.host}/"
        return ref[len(prefix) :] if ref.startswith(prefix) else ref

    def skopeo(
        self, *args: str | os.PathLike[str], check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``skopeo --policy=<accept anything> ARGS...``; with ``check`` raise on failure."""
        raw = self._skopeo(args, check=check, timeout=timeout)
        return subprocess.CompletedProcess(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )

    def _skopeo(
        self, args: Sequence[str | os.PathLike[str]], check: bool, timeout: float | None
    ) -> subprocess.CompletedProcess[bytes]:
        binary = shutil.which("skopeo")
        if binary is None:
            raise RegistryError("skopeo not found: install the Debian package skopeo")
        cmd = [binary, f"--policy={self._policy}", *[os.fspath(a) for a in args]]
        limit = self.skopeo_timeout if timeout is None else timeout
        env = {**os.environ, "REGISTRY_AUTH_FILE": os.fspath(self._authfile)}
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=limit,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired as e:
            raise RegistryError(f"{' '.join(_redact(cmd))} timed out after {limit}s") from e
        if check and result.returncode != 0:
            raise RegistryError(
                f"{' '.join(_redact(cmd))} exited with {result.returncode}\n"
                f"stderr: {result.stderr.decode(errors='replace').strip()}\n"
                f"stdout: {result.stdout.decode(errors='replace').strip()}"
            )
        return result

    def skopeo_inspect_raw(self, ref: str, creds: Creds = DEFAULT_CREDS) -> bytes:
        """The manifest bytes at ``ref`` exactly as served (``skopeo inspect --raw``)."""
        args = ["inspect", "--raw", *self.skopeo_flags("", creds), self.docker_ref(ref)]
        return self._skopeo(args, check=True, timeout=None).stdout

    def skopeo_inspect_digest(self, ref: str, creds: Creds = DEFAULT_CREDS) -> str:
        """``sha256:<hex>`` of the manifest bytes served for ``ref`` (``repo:tag``, ``repo@d``)."""
        return sha256_digest(self.skopeo_inspect_raw(ref, creds))

    def skopeo_copy_to_oci(
        self,
        ref: str,
        dest_dir: str | os.PathLike[str],
        creds: Creds = DEFAULT_CREDS,
        tag: str | None = None,
    ) -> None:
        """Pull ``ref`` with every platform into the OCI layout ``dest_dir`` (blobs verified).

        Raises :class:`RegistryError` with skopeo's stderr on any failure.
        """
        dest = f"oci:{os.fspath(dest_dir)}" + (f":{tag}" if tag else "")
        self.skopeo(
            "copy",
            "--all",
            "--preserve-digests",
            *self.skopeo_flags("src-", creds),
            self.docker_ref(ref),
            dest,
        )

    def verify_image(self, ref: str, digest: str, pull_into: Path | None = None) -> None:
        """Assert that skopeo sees ``digest`` at ``ref``; with ``pull_into``, pull every blob.

        The pull (every platform, digests preserved, each blob verified by skopeo) lands in a
        fresh directory under ``pull_into``. A Docker manifest list goes to a ``dir:`` layout,
        because skopeo will not write one into an OCI layout without converting it.
        """
        raw = self.skopeo_inspect_raw(ref)
        assert sha256_digest(raw) == digest, ref
        if pull_into is None:
            return
        dest = pull_into / f"pulled-{ref.replace('/', '_').replace(':', '_').replace('@', '_')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if json.loads(raw).get("mediaType") == DOCKER_MANIFEST_LIST:
            flags = self.skopeo_flags("src-")
            self.skopeo(
                "copy", "--all", "--preserve-digests", *flags, self.docker_ref(ref), f"dir:{dest}"
            )
            served = sha256_digest((dest / "manifest.json").read_bytes())
            assert served == digest, ref
            return
        self.skopeo_copy_to_oci(ref, dest)
        index = json.loads((dest / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [digest], ref

    def skopeo_push_oci(
        self,
        oci_dir: str | os.PathLike[str],
        ref: str,
        creds: Creds = DEFAULT_CREDS,
        image: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Push the OCI layout ``oci_dir`` (its only image, or ref name ``image``) to ``ref``.

        Every platform and the exact manifest bytes are kept (``--all --preserve-digests``).
        """
        src = f"oci:{os.fspath(oci_dir)}" + (f":{image}" if image else "")
        return self.skopeo(
            "copy",
            "--all",
            "--preserve-digests",
            *self.skopeo_flags("dest-", creds),
            src,
            self.docker_ref(ref),
            check=check,
        )

    # ------------------------------------------------------------------ HTTP
    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context trusting only this registry's CA (TLS mode), else None."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=os.fspath(self._cert_dir / "ca.crt"))

    def _client(self, timeout: float = 30.0) -> httpx.Client:
        ctx = self.ssl_context()
        return httpx.Client(
            base_url=self.url,
            verify=ctx if ctx is not None else True,
            timeout=timeout,
            follow_redirects=True,
        )

    def auth_headers(
        self, repo: str | None, actions: Sequence[str] = ("pull",), creds: Creds = DEFAULT_CREDS
    ) -> dict[str, str]:
        """``Authorization`` header for requests on ``repo`` (token mode: fetched by GET)."""
        actual = self._creds(creds)
        if self.htpasswd is not None:
            if actual is None:
                return {}
            raw = f"{actual[0]}:{actual[1]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if self.token_server is not None:
            params: list[tuple[str, str | int | float | bool | None]] = [
                ("service", self.token_server.service)
            ]
            if repo is not None:
                params.append(("scope", f"repository:{repo}:{','.join(actions)}"))
            auth = httpx.BasicAuth(*actual) if actual is not None else None
            resp = httpx.get(self.token_server.realm, params=params, auth=auth, timeout=30)
            if resp.status_code != 200:
                raise RegistryError(f"token server answered {resp.status_code}: {resp.text}")
            return {"Authorization": "Bearer " + resp.json()["token"]}
        return {}

    def manifest(self, ref: str, creds: Creds = DEFAULT_CREDS) -> bytes:
        """GET the manifest bytes for ``repo:tag`` / ``repo@digest`` (raise unless 200)."""
        repo, reference = split_ref(self._relative(ref))
        headers = {"Accept": MANIFEST_ACCEPT, **self.auth_headers(repo, ("pull",), creds)}
        with self._client() as client:
            resp = client.get(f"/v2/{repo}/manifests/{reference}", headers=headers)
        if resp.status_code != 200:
            raise RegistryError(
                f"GET manifest {repo}:{reference} answered {resp.status_code}: {resp.text}"
            )
        return resp.content

    def blob_exists(self, repo: str, digest: str, creds: Creds = DEFAULT_CREDS) -> bool:
        """HEAD the blob: True on 200, False on 404, raise on anything else."""
        headers = self.auth_headers(repo, ("pull",), creds)
        with self._client() as client:
            resp = client.head(f"/v2/{repo}/blobs/{digest}", headers=headers)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise RegistryError(f"HEAD blob {repo}@{digest} answered {resp.status_code}")

    def tags(self, repo: str, creds: Creds = DEFAULT_CREDS) -> list[str]:
        """The repository's tags (empty if the repository is unknown)."""
        headers = self.auth_headers(repo, ("pull",), creds)
        with self._client() as client:
            resp = client.get(f"/v2/{repo}/tags/list", headers=headers)
        if resp.status_code == 404:
            return []
        if resp.status_code != 200:
            raise RegistryError(f"GET tags of {repo} answered {resp.status_code}: {resp.text}")
        return list(resp.json().get("tags") or [])


class _AddressInUse(Exception):
    pass


def _deep_update(target: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _redact(cmd: Sequence[str]) -> list[str]:
    return [re.sub(r"^(--(?:src-|dest-)?creds=[^:]*):.*$", r"\1:***", arg) for arg in cmd]
