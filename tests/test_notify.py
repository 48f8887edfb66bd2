"""Notifier against real AF_UNIX datagram sockets; watchdog_interval parsing."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagepushd.notify import Notifier, watchdog_interval


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # tmp_path can exceed the 108-byte limit of AF_UNIX socket paths.
    with tempfile.TemporaryDirectory(prefix="ipd-") as name:
        yield Path(name)


@pytest.fixture
def listener(sock_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(sock_dir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_messages_are_exact_datagrams(listener) -> None:
    path, sock = listener
    with Notifier(path, monotonic_usec=lambda: 123456789) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert received(sock) == b"READY=1"
        assert notifier.reloading()
        assert received(sock) == b"RELOADING=1\nMONOTONIC_USEC=123456789"
        assert notifier.stopping()
        assert received(sock) == b"STOPPING=1"
        assert notifier.status("idle \u00b7 12 pushed\n1 retrying")
        assert received(sock) == "STATUS=idle \u00b7 12 pushed 1 retrying".encode()
        assert notifier.watchdog()
        assert received(sock) == b"WATCHDOG=1"
        assert notifier.send(READY=1, STATUS="up", MAINPID=42)
        assert received(sock) == b"READY=1\nSTATUS=up\nMAINPID=42"


def test_abstract_socket() -> None:
    name = f"imagepushd-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
        assert received(sock) == b"READY=1"


def test_default_monotonic_usec_is_clock_monotonic(listener) -> None:
    path, sock = listener
    with Notifier(path) as notifier:
        before = time_usec()
        notifier.reloading()
        after = time_usec()
    fields = dict(line.split("=", 1) for line in received(sock).decode().splitlines())
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def time_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
def test_no_address_is_a_no_op(env) -> None:
    notifier = Notifier.from_env(env)
    assert notifier.address is None
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("anything")
    notifier.close()


def test_unsupported_address_is_a_no_op(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = Notifier("vsock:2:1234")
    assert not notifier.enabled
    assert not notifier.ready()
    assert "not supported" in caplog.text


def test_send_errors_are_logged_once_and_never_raised(sock_dir: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING), Notifier(str(sock_dir / "gone")) as notifier:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert len(failures) == 1


def test_socket_coming_back_works_again(sock_dir: Path) -> None:
    path = str(sock_dir / "notify")
    with Notifier(path) as notifier:
        assert not notifier.ready()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            assert notifier.watchdog()
            assert received(sock) == b"WATCHDOG=1"


def test_bad_field_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        Notifier(None).send(ready=1)
    with pytest.raises(ValueError):
        Notifier(None).send(**{"A=B": 1})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "1_000"}, None),
        ({"WATCHDOG_USEC": "10s"}, None),
    ],
)
def test_watchdog_interval(env, expected) -> None:
    assert watchdog_interval(env, pid=4242) == expected


def test_watchdog_interval_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 1.0
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
