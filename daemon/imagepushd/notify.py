"""sd_notify: tell systemd about readiness, reloads, shutdown, status and liveness.

The protocol is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``), so it is
implemented here rather than through systemd-python: the socket is the only side effect and a
test can read the exact datagrams. Without an address every method is a no-op, which is how
the daemon runs outside systemd and in tests (nobodd's ``Systemd(address=None)``).

Sending never raises: a daemon must not die because its notify socket went away. The first
failure is logged, later ones are not.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[A-Z0-9_]+")
_DECIMAL = re.compile(r"[0-9]+")
#: A wedged service manager must not hang the daemon.
_SEND_TIMEOUT = 2.0


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """A sender of sd_notify messages to ``address`` (None: do nothing).

    ``monotonic_usec`` returns CLOCK_MONOTONIC in microseconds, for ``RELOADING=1``.
    """

    def __init__(
        self,
        address: str | None,
        *,
        monotonic_usec: Callable[[], int] = _monotonic_usec,
    ) -> None:
        self.address = address or None
        self._monotonic_usec = monotonic_usec
        self._target: str | None = None
        if self.address is not None:
            if self.address.startswith("@"):
                self._target = "\0" + self.address[1:]
            elif self.address.startswith("/"):
                self._target = self.address
            else:
                log.warning("NOTIFY_SOCKET=%s is not supported; not notifying", self.address)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failure_logged = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Notifier:
        """A notifier for ``$NOTIFY_SOCKET`` in ``env`` (a no-op one when it is unset)."""
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self._target is not None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def send(self, **fields: str | int) -> bool:
        """Send ``fields`` as one message, in order; True if it was delivered to the socket.

        Field names must be upper-case sd_notify names (a ValueError otherwise: that is a bug,
        not a runtime condition); newlines in values become spaces to keep one field per line.
        """
        for name in fields:
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid sd_notify field name {name!r}")
        if self._target is None or not fields:
            return False
        message = "\n".join(
            f"{name}={str(value).replace(chr(10), ' ')}" for name, value in fields.items()
        )
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(_SEND_TIMEOUT)
                self._sock.sendto(message.encode(), self._target)
            except OSError as exc:
                if not self._failure_logged:
                    log.warning(
                        "sd_notify to %s failed: %s (further failures are not logged)",
                        self.address,
                        exc,
                    )
                    self._failure_logged = True
                return False
        return True

    def ready(self) -> bool:
        """``READY=1``: startup (or a reload) finished."""
        return self.send(READY=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd 253+, ignored before)."""
        return self.send(RELOADING=1, MONOTONIC_USEC=self._monotonic_usec())

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self.send(STOPPING=1)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive (see :func:`watchdog_interval`)."""
        return self.send(WATCHDOG=1)


def watchdog_interval(env: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None if disabled.

    As ``sd_watchdog_enabled()``: ``WATCHDOG_USEC`` must be a positive integer, and
    ``WATCHDOG_PID``, when set, must be this process (``pid``, default ``os.getpid()``) —
    otherwise the variables were inherited from a parent and are not ours.
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not _DECIMAL.fullmatch(usec) or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None and (
        not _DECIMAL.fullmatch(owner) or int(owner) != (os.getpid() if pid is None else pid)
    ):
        return None
    return int(usec) / 2 / 1_000_000
