"""A real systemd, booted in a ``systemd-nspawn`` container from this machine's own ``/usr``.

systemd is not PID 1 on the test machines, so tests that need a real service manager and a
real journald boot one (see docs/real-systems.md, "A real systemd and journald")::

    systemd-nspawn --keep-unit --register=no --volatile=yes -D / -M NAME \\
        --overlay=/usr:<upper>:/usr --private-network --bind-ro=<repo> ... \\
        -b -- systemd.firstboot=off systemd.mask=systemd-networkd-wait-online.service

- ``--volatile=yes``: the root is a throwaway tmpfs with the host's ``/usr`` in it, so ``/etc``
  and ``/var`` start empty (systemd applies the unit presets on that first boot: Debian units
  of installed packages such as containerd start by themselves, others fail harmlessly and the
  system ends "degraded").
- ``--overlay=/usr:<upper>:/usr``: ``/usr`` is an overlay whose writes land in ``<upper>`` (a
  directory of this object), so a test can install ``/usr/bin/...``. This combination works with
  systemd-nspawn 252 (Debian 12): the overlay replaces the read-only ``/usr`` bind of
  ``--volatile=yes``.
- ``--keep-unit --register=no``: there is no system bus (and no systemd) on the host.
- ``--private-network``: the container gets its own loopback only. Without it the container
  shares the host's network namespace, and its units (a registry on ``:5000``, ``nftables``
  flushing the ruleset, a CNI DHCP daemon...) would act on the host's network.
- ``systemd.mask=systemd-networkd-wait-online.service``: the presets enable systemd-networkd,
  whose wait-online service would hold ``network-online.target`` for 2 minutes with only a
  loopback; everything ordered after it (``imagepushd.service`` is) would wait as long.
- The repository (from ``__file__``) is bound read-only at the same path, and so is the
  installation prefix of the venv's Python when it lives outside ``/usr`` (a pyenv build under
  ``/root/.pyenv`` for example; the container's ``/root`` is empty otherwise).

Commands run inside with ``nsenter -t PID -a`` where PID is the container's PID 1 (the
``systemd`` child of the ``systemd-nspawn`` process). :meth:`Machine.stop` asks for a poweroff
(SIGTERM to systemd-nspawn), then kills systemd-nspawn and the container's PID 1 (which takes
every process of the container's PID namespace with it), and removes this object's directories.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest

from tests.support.process import require_tools, tail_log, terminate

#: The repository checkout these tests belong to.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The environment of commands run inside (nothing of the host's leaks in).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
}


#: Units masked at boot (``systemd.mask=`` on PID 1's command line): with only a loopback,
#: systemd-networkd-wait-online would hold network-online.target (and every unit ordered after
#: it, such as imagepushd.service) for its 2-minute timeout.
DEFAULT_MASKS = ("systemd-networkd-wait-online.service",)


class MachineError(AssertionError):
    """The container did not boot, or a command inside it failed."""


def require_nspawn() -> None:
    """Fail the test (never skip) unless systemd-nspawn and nsenter are here and we are root."""
    require_tools(
        "systemd-nspawn",
        "nsenter",
        hint="install the Debian packages systemd-container and util-linux "
        "(apt-get install -y systemd-container)",
    )
    if os.geteuid() != 0:
        pytest.fail("booting systemd with systemd-nspawn needs root", pytrace=False)


def python_prefix(venv: Path) -> Path | None:
    """The installation prefix of ``venv``'s interpreter when it is outside ``/usr``, else None.

    A venv's ``bin/python`` is a symlink to the base interpreter; that one must be visible inside.
    """
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    real = python.resolve()
    prefix = real.parent.parent
    if prefix == Path("/usr") or Path("/usr") in prefix.parents:
        return None
    return prefix


class Machine:
    """A booted systemd in a volatile nspawn container; files under ``base_dir``.

    ``binds`` are ``(host_path, container_path)`` pairs bound read-write; ``binds_ro`` are
    bound read-only; ``masks`` are units masked for the whole boot. The repository and the
    venv's Python prefix are always bound read-only at their own paths. Use as a context
    manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        binds: Sequence[tuple[str | os.PathLike[str], str]] = (),
        binds_ro: Sequence[tuple[str | os.PathLike[str], str]] = (),
        masks: Sequence[str] = DEFAULT_MASKS,
        boot_timeout: float = 90.0,
    ) -> None:
        self._owns_base = base_dir is None
        self.base_dir = Path(
            tempfile.mkdtemp(prefix="nspawn-") if base_dir is None else base_dir
        ).resolve()
        self.name = name or f"ipd-{uuid.uuid4().hex[:10]}"
        self.binds = [(Path(h), c) for h, c in binds]
        self.binds_ro = [(Path(h), c) for h, c in binds_ro]
        self.masks = list(masks)
        self.boot_timeout = boot_timeout
        self.upper = self.base_dir / "usr-upper"
        self.log_path = self.base_dir / "console.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._pid1: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        """The systemd-nspawn command line."""
        argv = [
            "systemd-nspawn",
            "--keep-unit",
            "--register=no",
            "--volatile=yes",
            "--private-network",
            "-D",
            "/",
            "-M",
            self.name,
            f"--overlay=/usr:{self.upper}:/usr",
        ]
        ro = [(REPO_ROOT, os.fspath(REPO_ROOT))]
        prefix = python_prefix(REPO_ROOT / ".venv")
        if prefix is not None:
            ro.append((prefix, os.fspath(prefix)))
        ro += self.binds_ro
        argv += [f"--bind-ro={host}:{inside}" for host, inside in ro]
        argv += [f"--bind={host}:{inside}" for host, inside in self.binds]
        argv += ["-b", "--", "systemd.firstboot=off"]
        argv += [f"systemd.mask={unit}" for unit in self.masks]
        return argv

    def start(self) -> Self:
        """Boot the container and wait until ``systemctl is-system-running`` settles."""
        require_nspawn()
        if self._proc is not None:
            return self
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.upper.mkdir(exist_ok=True)
        for host, _ in [*self.binds, *self.binds_ro]:
            if not host.exists():
                raise MachineError(f"bind source {host} does not exist")
        self._log = self.log_path.open("ab")
        env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"}
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        try:
            self._wait_booted()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while self._pid1 is None:
            self._check_alive()
            self._pid1 = self._find_pid1()
            if self._pid1 is None:
                if time.monotonic() > deadline:
                    raise MachineError(f"no systemd in the container:\n{self.log_tail()}")
                time.sleep(0.05)
        state = ""
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MachineError(
                    f"the container did not finish booting in {self.boot_timeout}s "
                    f"(is-system-running: {state!r}):\n{self.log_tail()}"
                )
            # Fails with "Failed to connect to bus" until systemd's private socket is up.
            try:
                result = self.run(
                    "systemctl", "is-system-running", "--wait", check=False, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                continue
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise MachineError(
                f"systemd-nspawn exited with {self._proc.returncode}:\n{self.log_tail()}"
            )

    def _find_pid1(self) -> int | None:
        """The container's PID 1: the ``systemd`` process whose parent is systemd-nspawn."""
        assert self._proc is not None
        parent = self._proc.pid
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == parent and comm == "systemd":
                return int(entry.name)
        return None

    @property
    def pid(self) -> int:
        """The container's PID 1, as seen from the host."""
        if self._pid1 is None:
            raise MachineError("the container is not running")
        return self._pid1

    def stop(self, timeout: float = 10.0) -> None:
        """Power off (SIGTERM), then kill what is left; remove this object's directories."""
        proc = self._proc
        if proc is not None:
            terminate(proc, timeout)
            if self._pid1 is not None:
                # Normally gone with systemd-nspawn; killing PID 1 ends the whole PID namespace.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid1, signal.SIGKILL)
            self._proc = None
            self._pid1 = None
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.upper, ignore_errors=True)
        # systemd-nspawn puts the overlay's work directory next to the upper one.
        for leftover in self.base_dir.glob(".#*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self._owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ inside
    def run_bytes(
        self,
        *argv: str | os.PathLike[str],
        input: bytes | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside (all namespaces of PID 1, its root and cwd); bytes out."""
        args = [os.fspath(a) for a in argv]
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env=INSIDE_ENV,
            check=False,
        )
        if check and result.returncode != 0:
            raise MachineError(
                f"inside {self.name}: {shlex.join(args)} exited with {result.returncode}\n"
                f"stdout: {result.stdout.decode(errors='replace')}\n"
                f"stderr: {result.stderr.decode(errors='replace')}"
            )
        return result

    def run(
        self,
        *argv: str | os.PathLike[str],
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """As :meth:`run_bytes`, with text in and out (UTF-8)."""
        result = self.run_bytes(
            *argv,
            input=None if input is None else input.encode(),
            check=check,
            timeout=timeout,
        )
        return subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    def sh(self, script: str, *, check: bool = True, timeout: float = 60.0) -> str:
        """Run a ``sh -c`` script inside; its stdout."""
        return self.run("sh", "-c", script, check=check, timeout=timeout).stdout

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create or replace ``path`` inside (parents created) with ``text``."""
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "sh",
            path,
            f"{mode:o}",
            input=text,
        )

    def wait_for(
        self, argv: Sequence[str], *, timeout: float = 15.0, interval: float = 0.1
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside until it succeeds; the last result (MachineError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(*argv, check=False, timeout=max(timeout, 5.0))
            if result.returncode == 0:
                return result
            if time.monotonic() > deadline:
                raise MachineError(
                    f"inside {self.name}: {shlex.join(argv)} still failing after {timeout}s "
                    f"(exit {result.returncode})\nstdout: {result.stdout}\n"
                    f"stderr: {result.stderr}"
                )
            time.sleep(interval)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the container's console output."""
        return tail_log(self.log_path, lines, "(no console log)")
