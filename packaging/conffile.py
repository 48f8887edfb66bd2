"""Write /etc/imagepushd/config.toml for the Debian package: the example, all commented out.

Usage: ``python3 packaging/conffile.py EXAMPLE OUTPUT``. Every line of the example that is
not already a comment or blank becomes one, so the shipped conffile sets nothing and has no
rule: the service starts and does nothing until rules are added. The result is checked to
parse as an empty TOML document.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

HEADER = """\
# imagepushd configuration: no rule is active, so the service does nothing.
# Uncomment and edit the lines below (see imagepushd(8) and
# /usr/share/doc/imagepushd/examples/config.example.toml), check the result with
# "imagepushd check-config", then run "systemctl reload imagepushd".

"""


def render(example: str) -> str:
    """The example with every active line commented out, under a short header."""
    lines = []
    for line in example.splitlines():
        active = line.strip() and not line.lstrip().startswith("#")
        lines.append(f"# {line}" if active else line)
    text = HEADER + "\n".join(lines) + "\n"
    leftover = tomllib.loads(text)
    if leftover:  # cannot happen with whole lines commented out; checked all the same
        raise ValueError(f"still active after commenting out: {leftover}")
    return text


def main(argv: list[str]) -> int:
    """Read the example at ``argv[0]``, write the conffile to ``argv[1]``."""
    example, output = (Path(a) for a in argv)
    output.write_text(render(example.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
