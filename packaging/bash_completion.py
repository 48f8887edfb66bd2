"""Write a bash completion script for imagepushd, generated from ``build_parser()``.

Usage: ``PYTHONPATH=daemon python3 packaging/bash_completion.py [OUTPUT]``. It completes
subcommands, each subcommand's options, the choices of options that have them, and file
names for options and arguments whose type is a path. It uses only bash's own ``compgen``
and ``COMP_WORDS``, so it works without the bash-completion helpers too.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from imagepushd.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(parser: argparse.ArgumentParser) -> list[str]:
    words: list[str] = []
    for action in parser._actions:
        words.extend(o for o in action.option_strings if o.startswith("--") or len(o) == 2)
    return words


def _value_cases(scope: str, parser: argparse.ArgumentParser) -> list[str]:
    """``case`` branches on "SCOPE PREV" for options that take a value."""
    cases = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:
            continue
        pattern = "|".join(shlex.quote(f"{scope} {o}") for o in action.option_strings)
        if action.choices is not None:
            choices = " ".join(str(c) for c in action.choices)
            reply = f'COMPREPLY=($(compgen -W {shlex.quote(choices)} -- "$cur"))'
        elif action.type is Path:
            reply = 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            reply = "COMPREPLY=()"
        cases.append(f"        {pattern}) {reply}; return ;;")
    return cases


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The completion script."""
    parser = parser or build_parser()
    commands = _subcommands(parser)
    global_valued = [
        o for a in parser._actions if a.option_strings and a.nargs != 0 for o in a.option_strings
    ]
    lines = [
        "# bash completion for imagepushd(8); generated from its argparse definitions",
        "# by packaging/bash_completion.py: do not edit.",
        "_imagepushd() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        f"            {'|'.join(global_valued)}) ((i++)) ;;",
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[i]}"; break ;;',
        "        esac",
        "    done",
        '    case "$cmd $prev" in',
        *_value_cases("", parser),
    ]
    for name, sub in commands.items():
        lines += _value_cases(name, sub)
    lines += [
        "    esac",
        '    case "$cmd" in',
        f'        "") COMPREPLY=($(compgen -W {shlex.quote(" ".join([*_words(parser), *commands]))}'
        ' -- "$cur")) ;;',
    ]
    for name, sub in commands.items():
        words = " ".join(_words(sub))
        path_args = any(
            not a.option_strings and a.type is Path for a in sub._actions if a.dest != "help"
        )
        if path_args:
            reply = (
                f"if [[ $cur == -* ]]; then "
                f'COMPREPLY=($(compgen -W {shlex.quote(words)} -- "$cur")); '
                'else compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")); fi'
            )
        else:
            reply = f'COMPREPLY=($(compgen -W {shlex.quote(words)} -- "$cur"))'
        lines.append(f"        {shlex.quote(name)}) {reply} ;;")
    lines += [
        "    esac",
        "}",
        "complete -F _imagepushd imagepushd",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """Write the script to ``argv[0]``, or to stdout."""
    script = render()
    if argv:
        Path(argv[0]).write_text(script, encoding="utf-8")
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
