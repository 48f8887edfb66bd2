"""The metrics endpoint's address: every form it takes, and back to text."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepushd.listen import Listen, parse_listen


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        ("127.0.0.1:9464", Listen(host="127.0.0.1", port=9464)),
        ("0.0.0.0:1", Listen(host="0.0.0.0", port=1)),
        ("[::1]:9464", Listen(host="::1", port=9464)),
        ("[0:0::1]:65535", Listen(host="::1", port=65535)),
        ("unix:/run/imagepushd/metrics.sock", Listen(path=Path("/run/imagepushd/metrics.sock"))),
    ],
)
def test_listen_forms(text: str, listen: Listen) -> None:
    assert parse_listen(text) == listen
    assert parse_listen(str(listen)) == listen
