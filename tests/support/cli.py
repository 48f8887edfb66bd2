"""Running the imagepushd CLI in-process, with an injected environment, for e2e tests."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagepushd.cli import Context, run


@dataclass(frozen=True)
class Outcome:
    """What one CLI run returned."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def result(self) -> dict[str, Any]:
        """The ``--json`` document of a successful run."""
        assert self.code == 0, self.stderr
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc

    @property
    def error_lines(self) -> list[str]:
        """The non-empty lines on stderr."""
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli(
    argv: Sequence[str], *, home: Path, env: Mapping[str, str] | None = None, stdin: str = ""
) -> Outcome:
    """Run ``imagepushd ARGV`` in this process and capture what it printed."""
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env=dict(env or {}), home=home, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    started = time.monotonic()
    code = run(list(argv), ctx, err)
    return Outcome(code, out.getvalue(), err.getvalue(), time.monotonic() - started)
