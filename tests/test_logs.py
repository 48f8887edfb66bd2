"""configure_logging: journald through systemd's own JournalHandler, or stderr."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest

from imagepushd.logs import configure_logging, is_journal_stream, push_fields

log = logging.getLogger("imagepushd.test")

FIELDS = {
    "image": "registry.example.com/team/app:1.2",
    "target": "mirror.example.com/team/app:1.2",
    "digest": "sha256:" + "ab" * 32,
    "namespace": "default",
    "bytes": 123456,
    "duration_ms": 789,
    "rule": "team",
}


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stderr_file(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stderr").open("w+", encoding="utf-8") as f:
        yield f


def journal_stream_of(stream: TextIO) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


class Sender:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, message: str, /, **fields: Any) -> None:
        # Positional-only like journal.send(MESSAGE, ...): records carry a "message" attribute.
        self.calls.append((message, fields))


def test_push_fields() -> None:
    assert push_fields(**FIELDS) == {
        "IMAGE": "registry.example.com/team/app:1.2",
        "TARGET": "mirror.example.com/team/app:1.2",
        "DIGEST": "sha256:" + "ab" * 32,
        "NAMESPACE": "default",
        "BYTES": 123456,
        "DURATION_MS": 789,
        "RULE": "team",
    }


def test_journal_gets_structured_fields(stderr_file: TextIO) -> None:
    pytest.importorskip("systemd.journal")
    sender = Sender()
    env = {"JOURNAL_STREAM": journal_stream_of(stderr_file)}
    configure_logging("info", env, stderr_file, journal_sender=sender)
    from systemd.journal import JournalHandler

    assert isinstance(logging.getLogger().handlers[0], JournalHandler)

    log.debug("not at info")
    log.info("pushed %s", "app", extra=push_fields(**FIELDS))
    log.warning("plain")

    assert [message for message, _ in sender.calls] == ["pushed app", "plain"]
    fields = sender.calls[0][1]
    assert fields["SYSLOG_IDENTIFIER"] == "imagepushd"
    assert fields["PRIORITY"] == "6"
    assert fields["LOGGER"] == "imagepushd.test"
    for name, value in push_fields(**FIELDS).items():
        assert fields[name] == value
    assert sender.calls[1][1]["PRIORITY"] == "4"
    assert "IMAGE" not in sender.calls[1][1]
    stderr_file.seek(0)
    assert stderr_file.read() == ""


def test_stderr_format(stderr_file: TextIO) -> None:
    configure_logging("info", {}, stderr_file)
    log.debug("hidden")
    log.info("pushed %s", "app", extra=push_fields(**FIELDS))
    log.error("failed")
    stderr_file.seek(0)
    assert stderr_file.read() == "imagepushd: INFO: pushed app\nimagepushd: ERROR: failed\n"


def test_stream_without_a_file_descriptor() -> None:
    stream = io.StringIO()
    configure_logging("debug", {"JOURNAL_STREAM": "8:12345"}, stream)
    log.debug("hello")
    assert stream.getvalue() == "imagepushd: DEBUG: hello\n"


@pytest.mark.parametrize("announced", ["1:2", "", "junk", "8:", ":9", "a:b"])
def test_journal_stream_mismatch_means_stderr(stderr_file: TextIO, announced: str) -> None:
    sender = Sender()
    configure_logging("info", {"JOURNAL_STREAM": announced}, stderr_file, journal_sender=sender)
    log.info("hello")
    assert sender.calls == []
    stderr_file.seek(0)
    assert stderr_file.read() == "imagepushd: INFO: hello\n"


def test_is_journal_stream(stderr_file: TextIO, tmp_path: Path) -> None:
    announced = journal_stream_of(stderr_file)
    assert is_journal_stream({"JOURNAL_STREAM": announced}, stderr_file)
    assert not is_journal_stream({}, stderr_file)
    with (tmp_path / "other").open("w") as other:
        assert not is_journal_stream({"JOURNAL_STREAM": announced}, other)


def test_missing_systemd_python_falls_back_with_a_warning(
    stderr_file: TextIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # makes the import fail
    env = {"JOURNAL_STREAM": journal_stream_of(stderr_file)}
    configure_logging("info", env, stderr_file)
    log.info("still logged")
    stderr_file.seek(0)
    lines = stderr_file.read().splitlines()
    assert lines[0].startswith("imagepushd: WARNING: systemd-python is not available")
    assert lines[1] == "imagepushd: INFO: still logged"


def test_reconfiguring_replaces_the_handler(stderr_file: TextIO) -> None:
    configure_logging("info", {}, stderr_file)
    configure_logging("warning", {}, stderr_file)
    assert len(logging.getLogger().handlers) == 1
    log.info("hidden")
    log.warning("shown")
    stderr_file.seek(0)
    assert stderr_file.read() == "imagepushd: WARNING: shown\n"
