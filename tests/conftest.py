"""Shared pytest fixtures: a private containerd and an image builder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import ImageBuilder


def _require_binaries(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found on PATH: install the Debian package containerd "
            "(apt-get install -y containerd); real-system tests never skip",
            pytrace=False,
        )


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    """A fresh private containerd (root, state, sockets, log under tmp_path/containerd)."""
    _require_binaries("containerd", "ctr")
    instance = Containerd(tmp_path / "containerd")
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture
def image_builder() -> ImageBuilder:
    """A fresh, empty ImageBuilder."""
    return ImageBuilder()
