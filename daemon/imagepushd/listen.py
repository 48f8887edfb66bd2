"""The metrics endpoint's address (``[metrics] listen``): checked with the configuration.

A module of its own so that the configuration need not import the metrics server to read it;
:mod:`imagepushd.metrics` binds it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

UNIX_PREFIX = "unix:"
#: ``sun_path`` holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_LISTEN_FORMS = '"HOST:PORT" with an IP address (127.0.0.1:9464, [::1]:9464) or "unix:/PATH"'


@dataclass(frozen=True)
class Listen:
    """Where the metrics endpoint listens: an IP ``host`` and ``port``, or a unix ``path``."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    @property
    def family(self) -> socket.AddressFamily:
        """The socket family to bind with."""
        if self.path is not None:
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        if self.path is not None:
            return f"{UNIX_PREFIX}{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """``127.0.0.1:9464``, ``[::1]:9464`` or ``unix:/run/imagepushd/metrics.sock``.

    Hosts are IP literals, not names: what a name resolves to would decide what is exposed.
    """
    if text.startswith(UNIX_PREFIX):
        return Listen(path=_socket_path(text[len(UNIX_PREFIX) :]))
    address, port = _ipv6_host_port(text) if text.startswith("[") else _ipv4_host_port(text)
    return Listen(host=str(address), port=_port(port))


def _socket_path(path: str) -> Path:
    if not path.startswith("/"):
        raise ValueError(f"unix socket path must be absolute, not {path!r}")
    if "\0" in path:
        raise ValueError("unix socket path must not contain NUL")
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ValueError(f"unix socket path is {size} bytes; at most {MAX_SOCKET_PATH} fit")
    return Path(path)


def _ipv6_host_port(text: str) -> tuple[ipaddress.IPv6Address, str]:
    """``[ADDRESS]:PORT``'s address and port text."""
    host, bracket, port = text[1:].partition("]:")
    if not bracket:
        raise ValueError(f"must be {_LISTEN_FORMS}, not {text!r}")
    try:
        return ipaddress.IPv6Address(host), port
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None


def _ipv4_host_port(text: str) -> tuple[ipaddress.IPv4Address, str]:
    """``ADDRESS:PORT``'s address and port text."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"must be {_LISTEN_FORMS}, not {text!r}")
    if ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9464), not {text!r}")
    try:
        return ipaddress.IPv4Address(host), port
    except ValueError:
        raise ValueError(f"host must be an IP address, not {host!r}") from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, not {text!r}")
    return int(text)
