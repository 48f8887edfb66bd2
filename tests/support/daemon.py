"""``imagepushd run`` as a real subprocess, with a notify socket the test reads.

:class:`Daemon` writes the configuration file, runs ``python -m imagepushd --config CFG run``
with stderr (and stdout) appended to a log file, and plays systemd's part of the sd_notify
protocol: it binds an ``AF_UNIX`` datagram socket, passes it as ``$NOTIFY_SOCKET`` and records
every datagram (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``) with the time it
arrived, so a test can wait for readiness and assert the order of what was sent. The same
socket serves every run of the daemon (restarts), so :meth:`Daemon.mark` positions tell runs
apart. :meth:`Daemon.cli` runs the other subcommands (``status``, ``plan``) against the same
configuration.

:func:`render_config` turns plain dicts into the TOML the daemon reads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tests.support.process import log_size, read_log, tail_log, terminate

#: Variables of the test's own environment that would change how the daemon behaves.
_SCRUBBED = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "IMAGEPUSHD_CONFIG",
    "DOCKER_CONFIG",
    "REGISTRY_AUTH_FILE",
)


class DaemonError(AssertionError):
    """The daemon did not start, did not notify in time, or did not stop as asked."""


# ---------------------------------------------------------------------- configuration


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        # A JSON string of printable text is a valid TOML basic string.
        return json.dumps(os.fspath(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _table(header: str, values: Mapping[str, Any]) -> str:
    lines = [header]
    lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def render_config(
    *,
    root: str | os.PathLike[str],
    state: str | os.PathLike[str],
    push: Mapping[str, Any] | None = None,
    rules: Sequence[Mapping[str, Any]] = (),
    registries: Mapping[str, Mapping[str, Any]] | None = None,
    namespaces: Sequence[str] | None = None,
) -> str:
    """The TOML text of a configuration (values: str, path, bool, int, float, lists of them)."""
    containerd: dict[str, Any] = {"root": root}
    if namespaces is not None:
        containerd["namespaces"] = list(namespaces)
    parts = [
        _table("[containerd]", containerd),
        _table("[state]", {"path": state}),
        _table("[push]", dict(push or {})),
    ]
    parts += [_table("[[rule]]", rule) for rule in rules]
    for host, settings in (registries or {}).items():
        parts.append(_table(f"[registries.{json.dumps(host)}]", settings))
    return "\n".join(parts)


# ---------------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class Notification:
    """One sd_notify datagram as received."""

    #: ``time.monotonic()`` on arrival.
    at: float
    fields: dict[str, str]
    raw: str


def _parse(raw: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in raw.split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class Daemon:
    """A ``imagepushd run`` subprocess with its config, log and notify socket.

    Use as a context manager (:meth:`close` on exit stops a running daemon). The notify socket
    lives in a short directory under ``/tmp`` (``sun_path`` holds 107 bytes), removed by
    :meth:`close`.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        config: str | None = None,
        *,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.base_dir / "config.toml"
        self.log_path = self.base_dir / "daemon.log"
        self.home = self.base_dir / "home"
        self.home.mkdir(exist_ok=True)
        self.python = python
        self.extra_env = dict(env or {})
        if config is not None:
            self.write_config(config)
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ipd-", dir="/tmp"))
        self.notify_socket = self._sock_dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.fspath(self.notify_socket))
        self._sock.settimeout(0.05)
        self._messages: list[Notification] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        #: Exit codes of finished runs, oldest first.
        self.exit_codes: list[int] = []

    # ------------------------------------------------------------------ configuration
    def write_config(self, text: str) -> None:
        """Write the configuration file (atomically, as an operator's editor would)."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def command(self, *args: str) -> list[str]:
        """``python -m imagepushd --config CFG ARGS...``."""
        return [self.python, "-m", "imagepushd", "--config", os.fspath(self.config_path), *args]

    def environment(self) -> dict[str, str]:
        """The environment of every command: ours without systemd's variables, HOME private."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env["HOME"] = os.fspath(self.home)
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ notify socket
    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            raw = data.decode(errors="replace")
            note = Notification(time.monotonic(), _parse(raw), raw)
            with self._cond:
                self._messages.append(note)
                self._cond.notify_all()

    def mark(self) -> int:
        """A position in the notification list: pass it as ``since``."""
        with self._cond:
            return len(self._messages)

    def notifications(self, since: int = 0) -> list[Notification]:
        """Datagrams received since ``since``, oldest first."""
        with self._cond:
            return list(self._messages[since:])

    def statuses(self, since: int = 0) -> list[str]:
        """The ``STATUS=`` texts received since ``since``."""
        return [n.fields["STATUS"] for n in self.notifications(since) if "STATUS" in n.fields]

    def wait_notify(
        self,
        key: str,
        value: str | Callable[[str], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 15.0,
    ) -> Notification:
        """Wait for a datagram (after ``since``) with ``key`` (equal to, or accepted by, value).

        Fails early, with the log tail, if the daemon exits first.
        """

        def accepts(note: Notification) -> bool:
            if key not in note.fields:
                return False
            if value is None:
                return True
            if callable(value):
                return value(note.fields[key])
            return note.fields[key] == value

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for note in self._messages[since:]:
                    if accepts(note):
                        return note
                if self._proc is not None and self._proc.poll() is not None:
                    raise DaemonError(
                        f"daemon exited with {self._proc.returncode} before {key}="
                        f"{value if isinstance(value, str) else '...'}:\n{self.log_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [n.raw for n in self._messages[since:]]
                    raise DaemonError(
                        f"no {key}= notification within {timeout}s (got {got}):\n{self.log_tail()}"
                    )
                self._cond.wait(min(remaining, 0.1))

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        """Whether the daemon process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The daemon's process id (it must have been started)."""
        if self._proc is None:
            raise DaemonError("the daemon was not started")
        return self._proc.pid

    def start(
        self, *args: str, wait_ready: bool = True, timeout: float = 30.0
    ) -> Notification | None:
        """Start ``imagepushd run ARGS...``; with ``wait_ready`` wait for ``READY=1``.

        Returns the READY notification (None without ``wait_ready``).
        """
        if self.running:
            raise DaemonError("the daemon is already running")
        since = self.mark()
        self._log = self.log_path.open("ab")
        self._log.write(f"--- tests: starting imagepushd run at {time.ctime()}\n".encode())
        self._log.flush()
        env = {**self.environment(), "NOTIFY_SOCKET": os.fspath(self.notify_socket)}
        self._proc = subprocess.Popen(
            self.command("run", *args),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        if not wait_ready:
            return None
        return self.wait_notify("READY", "1", since=since, timeout=timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit by itself; its exit code."""
        proc = self._proc
        if proc is None:
            raise DaemonError("the daemon was not started")
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DaemonError(
                f"daemon still running after {timeout}s:\n{self.log_tail()}"
            ) from None
        self._finished(code)
        return code

    def _finished(self, code: int) -> None:
        self.exit_codes.append(code)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the running daemon."""
        if not self.running:
            raise DaemonError(f"daemon not running:\n{self.log_tail()}")
        os.kill(self.pid, signum)

    def reload(self) -> None:
        """``kill -HUP``, as ``systemctl reload`` does (ExecReload)."""
        self.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL (and fail) if it is not gone within ``timeout``."""
        proc = self._proc
        if proc is None:
            raise DaemonError("the daemon was not started")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                self._finished(-signal.SIGKILL)
                raise DaemonError(
                    f"daemon ignored SIGTERM for {timeout}s (killed):\n{self.log_tail()}"
                ) from None
        code = proc.returncode
        self._finished(code)
        return code

    def kill(self) -> int:
        """SIGKILL (no chance to clean up) and reap."""
        proc = self._proc
        if proc is None:
            raise DaemonError("the daemon was not started")
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        code = proc.returncode
        self._finished(code)
        return code

    def close(self) -> None:
        """Stop a running daemon (SIGTERM, then SIGKILL), close the socket, remove its dir."""
        try:
            if self._proc is not None:
                terminate(self._proc, 10)
                self._finished(self._proc.returncode)
        finally:
            self._closing.set()
            self._reader.join(5)
            self._sock.close()
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ other commands
    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``imagepushd --config CFG ARGS...`` (not the daemon) and return its result."""
        return subprocess.run(
            self.command(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environment(),
            check=False,
        )

    def status(self) -> dict[str, Any]:
        """``imagepushd status --json`` (it must succeed)."""
        result = self.cli("status", "--json")
        if result.returncode != 0:
            raise DaemonError(f"status --json exited {result.returncode}: {result.stderr}")
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def plan(self) -> list[dict[str, str]]:
        """``imagepushd plan --json`` (it must succeed)."""
        result = self.cli("plan", "--json")
        if result.returncode != 0:
            raise DaemonError(f"plan --json exited {result.returncode}: {result.stderr}")
        rows: list[dict[str, str]] = json.loads(result.stdout)
        return rows

    # ------------------------------------------------------------------ log
    def log_mark(self) -> int:
        """The log's current size: pass it as ``since``."""
        return log_size(self.log_path)

    def log_text(self, since: int = 0) -> str:
        """The log from offset ``since``."""
        return read_log(self.log_path, since)

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the log."""
        return tail_log(self.log_path, lines, "(no daemon log)")

    def wait_log(self, text: str, *, since: int = 0, timeout: float = 15.0) -> None:
        """Wait until ``text`` appears in the log after offset ``since``."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text(since):
            if time.monotonic() > deadline:
                raise DaemonError(f"{text!r} not logged within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)
