"""Debian's real Docker Engine (package docker.io) on a private data root and socket.

Only what ``docker load`` and ``docker image inspect`` need: no networking (``--bridge=none``,
no iptables), the ``vfs`` storage driver (no overlay mounts), its own managed containerd under
the private exec root. Everything lives under one directory; :meth:`Dockerd.docker` runs
Debian's ``/usr/bin/docker`` client against the private socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.support.process import tail_log, terminate

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"


class DockerError(AssertionError):
    """dockerd did not start, or a docker command failed."""


class Dockerd:
    """A private ``dockerd`` for tests; a context manager that starts and stops it."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        # unix socket paths are limited to 108 bytes: keep it short, under /tmp.
        self._run_dir = Path(f"/tmp/ipd-docker-{os.getpid()}-{id(self):x}")
        self.socket = self._run_dir / "docker.sock"
        self.log_path = base_dir / "dockerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        """Start dockerd and wait until ``docker version`` answers."""
        for binary in (DOCKERD, DOCKER):
            if not os.path.exists(binary):
                raise DockerError(f"{binary} not found: install the Debian package docker.io")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._run_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [
                DOCKERD,
                "--data-root", os.fspath(self.base_dir / "root"),
                "--exec-root", os.fspath(self._run_dir / "exec"),
                "--pidfile", os.fspath(self._run_dir / "dockerd.pid"),
                "-H", f"unix://{self.socket}",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                raise DockerError(f"dockerd exited on start:\n{tail_log(self.log_path)}")
            probe = self._run("version", check=False)
            if probe.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise DockerError(f"dockerd not ready after 60s:\n{tail_log(self.log_path)}")
            time.sleep(0.2)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [DOCKER, *args],
            env={**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "HOME": str(self.base_dir)},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def docker(self, *args: str) -> str:
        """Run ``docker ARGS`` against this daemon; its stdout (raise on failure)."""
        return self._run(*args).stdout

    def stop(self) -> None:
        """Stop dockerd (and the containerd it manages) and remove the run directory."""
        if self._proc is not None:
            terminate(self._proc, 30.0)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
