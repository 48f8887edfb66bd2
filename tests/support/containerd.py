"""A real, private containerd for tests, driven through ``ctr``.

Each :class:`Containerd` has its own root, state, sockets and log under one directory, so it never
touches the machine's ``/var/lib/containerd``. It can be stopped and started again on the same
root (restart tests). containerd must run as root.
"""

from __future__ import annotations

import os
import shutil
import socket as socketlib
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Self

from tests.support.process import tail_log, terminate

if TYPE_CHECKING:
    from tests.support.images import Blob, ImageBuilder

#: Plugins switched off: CRI (needs a CNI setup, and is not used), ``opt`` (would create
#: ``/opt/containerd`` outside the private root), and the snapshotters that can only be skipped
#: or fail here (aufs, btrfs, zfs: wrong file system; devmapper: not configured).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)

#: Longest path a unix socket can have (sun_path is 108 bytes with the terminating NUL).
_MAX_SOCKET_PATH = 107


class ContainerdError(AssertionError):
    """containerd did not start, or a ``ctr`` command failed."""


def _toml_str(value: str | os.PathLike[str]) -> str:
    text = os.fspath(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Containerd:
    """A private containerd process with its files under ``base_dir``.

    Use as a context manager (starts on enter unless running, stops on exit) or call
    :meth:`start` / :meth:`stop` yourself; :meth:`close` also removes any socket directory
    that had to be created outside ``base_dir``.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        start_timeout: float = 15.0,
        ctr_timeout: float = 120.0,
        extra_config: str = "",
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.ctr_timeout = ctr_timeout
        self.extra_config = extra_config
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "containerd.log"
        self._state = self.base_dir / "state"
        self._root = self.base_dir / "root"
        self._sock_dir_owned: Path | None = None
        sock_dir = self.base_dir
        if len(os.fspath(sock_dir / "containerd.sock.ttrpc")) > _MAX_SOCKET_PATH:
            # Deep tmp dirs would overflow sun_path: keep the sockets in a short dir instead.
            self._sock_dir_owned = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
            sock_dir = self._sock_dir_owned
        self._socket = sock_dir / "containerd.sock"
        self.ttrpc_socket = sock_dir / "containerd.sock.ttrpc"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------ paths
    @property
    def root(self) -> Path:
        """containerd's persistent root directory."""
        return self._root

    @property
    def state(self) -> Path:
        """containerd's state directory."""
        return self._state

    @property
    def socket(self) -> Path:
        """The gRPC socket (what ``ctr -a`` and clients connect to)."""
        return self._socket

    @property
    def meta_db(self) -> Path:
        """The bolt metadata database (containerd holds an exclusive flock on it while running)."""
        return self._root / "io.containerd.metadata.v1.bolt" / "meta.db"

    @property
    def content_dir(self) -> Path:
        """The content store directory (blobs are under ``blobs/sha256/<hex>``)."""
        return self._root / "io.containerd.content.v1.content"

    def blob_path(self, digest: str) -> Path:
        """Return where the content store keeps the blob ``digest`` (``algo:hex``)."""
        algo, _, hexpart = digest.partition(":")
        return self.content_dir / "blobs" / algo / hexpart

    # ------------------------------------------------------------------ process
    @property
    def pid(self) -> int | None:
        """The containerd process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the containerd process started by this object is alive."""
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        """Write ``config.toml`` (version 2) for this instance."""
        disabled = ", ".join(_toml_str(p) for p in DISABLED_PLUGINS)
        text = (
            "version = 2\n"
            f"root = {_toml_str(self._root)}\n"
            f"state = {_toml_str(self._state)}\n"
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f"  address = {_toml_str(self._socket)}\n"
            "[ttrpc]\n"
            f"  address = {_toml_str(self.ttrpc_socket)}\n"
            "[debug]\n"
            '  level = "info"\n'
        )
        if self.extra_config:
            text += self.extra_config.rstrip("\n") + "\n"
        self.config_path.write_text(text)

    def start(self) -> Self:
        """Start containerd (on the existing root, if any) and wait until its socket answers."""
        if self.running:
            return self
        binary = shutil.which("containerd")
        if binary is None:
            raise ContainerdError(
                "containerd binary not found: install the Debian package containerd"
            )
        self.write_config()
        for sock in (self._socket, self.ttrpc_socket):
            sock.unlink(missing_ok=True)  # stale sockets from a killed instance
        self._log = self.log_path.open("ab")
        self._log.write(f"--- imagepushd tests: starting containerd at {time.ctime()}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            [binary, "--config", os.fspath(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._cleanup_process()
                raise ContainerdError(f"containerd exited with {rc} on start:\n{self.log_tail()}")
            if self._connectable():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ContainerdError(
                    f"containerd socket {self._socket} not ready after {self.start_timeout}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.02)

    def _connectable(self) -> bool:
        if not self._socket.exists():
            return False
        with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM) as s:
            try:
                s.connect(os.fspath(self._socket))
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop containerd: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        if self._proc is None:
            return
        terminate(self._proc, timeout)
        self._cleanup_process()

    def _cleanup_process(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        self._proc = None

    def restart(self) -> Self:
        """Stop and start again on the same root."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the short socket directory if one was made outside ``base_dir``."""
        self.stop()
        if self._sock_dir_owned is not None:
            shutil.rmtree(self._sock_dir_owned, ignore_errors=True)
            self._sock_dir_owned = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of containerd's log."""
        return tail_log(self.log_path, lines, "(no containerd log)")

    # ------------------------------------------------------------------ ctr
    def ctr(
        self,
        *args: str | os.PathLike[str],
        namespace: str = "default",
        input: bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS...`` and return its (text) result.

        With ``check`` a non-zero exit raises :class:`ContainerdError` with stderr in the
        message; a timeout always raises.
        """
        binary = shutil.which("ctr")
        if binary is None:
            raise ContainerdError("ctr binary not found: install the Debian package containerd")
        cmd = [
            binary,
            "-a",
            os.fspath(self._socket),
            "-n",
            namespace,
            *[os.fspath(a) for a in args],
        ]
        limit = self.ctr_timeout if timeout is None else timeout
        try:
            raw = subprocess.run(
                cmd,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=limit,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ContainerdError(
                f"{' '.join(cmd)} timed out after {limit}s\ncontainerd log:\n{self.log_tail()}"
            ) from e
        result = subprocess.CompletedProcess(
            raw.args,
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(cmd)} exited with {result.returncode}\n"
                f"stderr: {result.stderr.strip()}\nstdout: {result.stdout.strip()}"
            )
        return result

    def import_archive(self, path: str | os.PathLike[str], namespace: str = "default") -> None:
        """Import an OCI-layout or ``docker save`` tar with all platforms and no unpacking.

        OCI archives keep the names from ``io.containerd.image.name`` annotations with the
        index.json descriptor as target; docker archives get normalised names
        (``docker.io/library/...``) and a manifest that containerd writes itself.
        """
        self.ctr("images", "import", "--no-unpack", "--all-platforms", path, namespace=namespace)

    def tag(self, src: str, *dsts: str, namespace: str = "default", force: bool = False) -> None:
        """Create tags ``dsts`` pointing at image ``src`` (several per ctr call)."""
        if not dsts:
            return
        extra = ["--force"] if force else []
        self.ctr("images", "tag", *extra, src, *dsts, namespace=namespace)

    def rm(self, *names: str, namespace: str = "default", sync: bool = False) -> None:
        """Remove images by name (unknown names are ignored by ctr, with a warning)."""
        if not names:
            return
        extra = ["--sync"] if sync else []
        self.ctr("images", "rm", *extra, *names, namespace=namespace)

    def content_rm(self, *digests: str, namespace: str = "default") -> None:
        """Remove blobs from the namespace's content store (to make images with missing content)."""
        if digests:
            self.ctr("content", "rm", *digests, namespace=namespace)

    def content_digests(self, namespace: str = "default") -> set[str]:
        """Return the digests listed by ``ctr content ls`` in ``namespace``."""
        out = self.ctr("content", "ls", "-q", namespace=namespace).stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def label(
        self, name: str, *pairs: str, namespace: str = "default", **labels: str
    ) -> dict[str, str]:
        """Set labels on image ``name``; return all its labels afterwards.

        Give labels as ``"key=value"`` strings (for keys with dots or slashes) and/or keyword
        arguments. An empty value (``"key="``) removes the label.
        """
        args = [*pairs, *(f"{k}={v}" for k, v in labels.items())]
        for arg in args:
            if "=" not in arg:
                raise ValueError(f"label {arg!r} is not key=value")
        out = self.ctr("images", "label", name, *args, namespace=namespace).stdout
        return _parse_labels(out.strip())

    def labels(self, name: str, namespace: str = "default") -> dict[str, str]:
        """Return the labels of image ``name`` (KeyError if there is no such image)."""
        return self._image_rows(namespace)[name][1]

    def namespaces(self) -> set[str]:
        """Return the names of all namespaces."""
        out = self.ctr("namespaces", "ls", "-q").stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def create_namespace(self, namespace: str, exist_ok: bool = True) -> None:
        """Create ``namespace`` (no error if it exists and ``exist_ok``)."""
        if exist_ok and namespace in self.namespaces():
            return
        self.ctr("namespaces", "create", namespace)

    def images(self, namespace: str = "default") -> dict[str, str]:
        """Return ``{image name: target digest}`` for every image in ``namespace``."""
        return {name: row[0] for name, row in self._image_rows(namespace).items()}

    def _image_rows(self, namespace: str) -> dict[str, tuple[str, dict[str, str]]]:
        # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS. REF, TYPE and DIGEST contain no
        # blanks; SIZE does ("1.1 KiB"); PLATFORMS and LABELS are comma-joined ("-" if empty).
        out = self.ctr("images", "ls", namespace=namespace).stdout
        rows: dict[str, tuple[str, dict[str, str]]] = {}
        for line in out.splitlines()[1:]:
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 3 or not fields[2].startswith("sha256:"):
                raise ContainerdError(f"cannot parse ctr images ls line: {line!r}")
            rows[fields[0]] = (fields[2], _parse_labels(fields[-1]))
        return rows


def _parse_labels(text: str) -> dict[str, str]:
    if text in ("", "-"):
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def load(
    containerd: Containerd, b: ImageBuilder, workdir: Path, images: Mapping[str, Blob]
) -> None:
    """Import ``images`` (name -> root) into containerd's default namespace, via an archive."""
    archive = workdir / "images.tar"
    b.write_oci_archive(archive, images)
    containerd.import_archive(archive)
    archive.unlink()
