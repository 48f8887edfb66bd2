"""Write the man page imagepushd(8) as roff, generated from ``imagepushd.cli.build_parser()``.

Usage: ``PYTHONPATH=daemon python3 packaging/manpage.py [OUTPUT]`` (stdout without OUTPUT).
Options, commands and their help come from the argparse definitions, so the page cannot
drift from the CLI; the prose sections (files, environment, journal fields) are below.
The date is ``$SOURCE_DATE_EPOCH`` when set (reproducible builds), else today.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from imagepushd import __version__
from imagepushd.cli import build_parser

DESCRIPTION = """\
imagepushd watches containerd's metadata database for images that are newly tagged and match
the rules of its configuration file, and pushes them to OCI and Docker registries: every blob
first, with resumable chunked uploads, retries and bounded memory, then the manifests.
It reads containerd's bolt database and content store directly (read-only, without taking
containerd's lock), so it needs read access to containerd's root, normally as root.
Under systemd it runs as the service imagepushd.service (Type=notify): it reports readiness
and a one-line STATUS= shown by systemctl status, logs to the journal with structured fields,
and reloads its configuration on SIGHUP (systemctl reload imagepushd).
The other commands do one-shot work: list, export or push images, show the plan and state."""

FILES = [
    (
        "/etc/imagepushd/config.toml",
        "The configuration (TOML): containerd root and namespaces, the state file, push "
        "settings, the [[rule]] tables that select images and name their targets, and "
        "per-registry settings (CA file, user, password file or systemd credential). "
        "The packaged file has no active rule, so the service starts and does nothing.",
    ),
    (
        "/usr/share/doc/imagepushd/examples/config.example.toml",
        "A commented example configuration (also printed by imagepushd print-config).",
    ),
    (
        "/var/lib/imagepushd/state.db",
        "SQLite state: pushed targets, queued and failing jobs, resumable upload sessions.",
    ),
    (
        "/lib/systemd/system/imagepushd.service",
        "The systemd unit (also printed by imagepushd print-unit).",
    ),
    (
        "/var/lib/containerd",
        "containerd's root, read for io.containerd.metadata.v1.bolt/meta.db and "
        "io.containerd.content.v1.content/blobs.",
    ),
]

ENVIRONMENT = [
    ("IMAGEPUSHD_CONFIG", "Configuration file when --config is not given."),
    ("CONTAINERD_NAMESPACE", "Default namespace of images, export and push."),
    (
        "DOCKER_CONFIG",
        "Directory of docker's config.json, read for registry credentials (default ~/.docker).",
    ),
    (
        "CREDENTIALS_DIRECTORY",
        "Set by systemd for LoadCredential=; password_credential names a file in it.",
    ),
    ("STATE_DIRECTORY", "Set by systemd for StateDirectory=; the state file lives there."),
    (
        "NOTIFY_SOCKET, WATCHDOG_USEC, JOURNAL_STREAM",
        "Set by systemd: readiness and status notification, watchdog, journal logging.",
    ),
]

JOURNAL_FIELDS = [
    ("IMAGE", "the image name in containerd"),
    ("TARGET", "the reference it was pushed to"),
    ("DIGEST", "the digest of the pushed manifest or index"),
    ("NAMESPACE", "the containerd namespace"),
    ("BYTES", "bytes sent"),
    ("DURATION_MS", "duration of the push in milliseconds"),
    ("RULE", "the rule that selected the image"),
]

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Failure (a push, export or read failed; run --once with failed pushes)."),
    ("2", "Usage or configuration error."),
    ("130", "Interrupted."),
]

SEE_ALSO = "systemctl(1), journalctl(1), systemd.exec(5), containerd(8), ctr(8)"


def roff(text: str) -> str:
    """Escape ``text`` for roff: backslashes, hyphens, and control characters at line starts."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    if "%" not in action.help:
        return action.help
    return parser._get_formatter()._expand_help(action)


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper()


def _options(parser: argparse.ArgumentParser) -> Iterable[str]:
    """``.TP`` entries for every option and positional of ``parser`` (help excluded)."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        takes_value = action.nargs != 0
        if action.option_strings:
            names = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
            if takes_value:
                names += f" \\fI{roff(_metavar(action))}\\fR"
        else:
            names = f"\\fI{roff(_metavar(action))}\\fR"
            if action.nargs in ("+", "*"):
                names += " ..."
        yield f".TP\n{names}\n{roff(_help(parser, action))}"


def _usage(parser: argparse.ArgumentParser) -> str:
    """``parser``'s usage on one line, whatever the terminal width."""
    formatter = argparse.HelpFormatter(parser.prog, width=100_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return " ".join(formatter.format_help().strip().removeprefix("usage: ").split())


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise SystemExit("build_parser() has no subcommands")


def _date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


def _table(rows: Iterable[tuple[str, str]], bold: bool = True) -> list[str]:
    font = "B" if bold else "I"
    return [f".TP\n\\f{font}{roff(key)}\\fR\n{roff(text)}" for key, text in rows]


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole man page."""
    parser = parser or build_parser()
    sub = _subcommands(parser)
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    out = [
        f'.TH IMAGEPUSHD 8 "{_date()}" "imagepushd {__version__}" "System Administration"',
        ".SH NAME",
        f"imagepushd \\- {roff(_lower_first(parser.description or '')).rstrip('.')}",
        ".SH SYNOPSIS",
        f"{roff(_usage(parser))}",
    ]
    for subparser in sub.choices.values():
        out += [".br", roff(_usage(subparser))]
    out += [".SH DESCRIPTION", roff(DESCRIPTION), ".SH OPTIONS"]
    out += list(_options(parser))
    out.append(".SH COMMANDS")
    for name, subparser in sub.choices.items():
        func = subparser.get_default("func")
        doc = (func.__doc__ or "").strip().split("\n\n")[0] if func is not None else ""
        text = " ".join(doc.split()) or helps.get(name, "")
        text = text.replace("``", "")
        out += [f".SS {roff(name)}", roff(text[:1].upper() + text[1:])]
        entries = list(_options(subparser))
        if entries:
            out += [".PP", "Options:", *entries]
    out += [".SH FILES", *_table(FILES)]
    out += [".SH ENVIRONMENT", *_table(ENVIRONMENT)]
    out += [
        ".SH JOURNAL FIELDS",
        roff(
            "Each push is logged with these fields; see them with journalctl -u imagepushd "
            "-o json and filter with, for example, journalctl -u imagepushd IMAGE=NAME."
        ),
        *_table(JOURNAL_FIELDS),
    ]
    out += [".SH EXIT STATUS", *_table(EXIT_STATUS)]
    out += [".SH SEE ALSO", roff(SEE_ALSO)]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    """Write the page to ``argv[0]``, or to stdout."""
    page = render()
    if argv:
        Path(argv[0]).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
