"""Logging set-up: journald with structured fields under systemd, plain stderr otherwise.

systemd says "your stderr is the journal" by setting ``$JOURNAL_STREAM`` to stderr's
``st_dev:st_ino``; only then do records go through ``systemd.journal.JournalHandler``, which
keeps the level as PRIORITY and sends every upper-case attribute of a record as a journal
field. Push events carry their fields through ``extra``::

    log.info("pushed %s to %s", image, target, extra=push_fields(...))

and end up as ``IMAGE=``, ``TARGET=``, ``DIGEST=``, ... in ``journalctl -o json``.
systemd-python is imported only when needed, so hosts and tests without it log to stderr.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
from collections.abc import Callable, Mapping
from typing import TextIO

#: SYSLOG_IDENTIFIER of every journal entry, whatever argv[0] is.
IDENTIFIER = "imagepushd"
#: stderr format; journald and terminals alike get no timestamp (journald adds its own).
STDERR_FORMAT = "imagepushd: %(levelname)s: %(message)s"


def push_fields(
    *,
    image: str,
    target: str,
    digest: str,
    namespace: str,
    bytes: int,
    duration_ms: int,
    rule: str,
) -> dict[str, str | int]:
    """Journal fields of one push event, for ``extra=`` of a logging call.

    Keyword-only: seven look-alike strings are too easy to pass in the wrong order.
    """
    return {
        "IMAGE": image,
        "TARGET": target,
        "DIGEST": digest,
        "NAMESPACE": namespace,
        "BYTES": bytes,
        "DURATION_MS": duration_ms,
        "RULE": rule,
    }


def is_journal_stream(env: Mapping[str, str], stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd announced in ``$JOURNAL_STREAM``."""
    announced = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = announced.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(
    level: str,
    env: Mapping[str, str],
    stream: TextIO,
    *,
    journal_sender: Callable[..., object] | None = None,
) -> None:
    """Send the root logger's records at ``level`` and above to the journal or to ``stream``.

    The journal is used when ``stream`` (normally stderr) is the journal stream and
    systemd-python imports; a failed import falls back to ``stream`` with a warning.
    ``journal_sender`` replaces ``systemd.journal.send`` (tests). Calling this again replaces
    the handler rather than adding one.
    """
    handler: logging.Handler | None = None
    problem = None
    if is_journal_stream(env, stream):
        try:
            journal = importlib.import_module("systemd.journal")
        except ImportError as exc:
            problem = f"systemd-python is not available ({exc}); logging to stderr"
        else:
            options: dict[str, object] = {"SYSLOG_IDENTIFIER": IDENTIFIER}
            if journal_sender is not None:
                options["sender_function"] = journal_sender
            handler = journal.JournalHandler(**options)
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: only worth seeing when debugging.
    chatty = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(chatty)
    if problem is not None:
        logging.getLogger(__name__).warning("%s", problem)
