"""The planner's view of an image: the content check asks the push's own platform selection.

The root is written as containerd lays it out (tests/test_service.py's rig).
"""

from __future__ import annotations

from pathlib import Path

from imagepushd.decide.platforms import PlatformPolicy
from imagepushd.decide.views import image_view
from imagepushd.oci import Platform
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import MetadataStore
from tests.support.images import Blob, ImageBuilder
from tests.test_service import NAME, Rig

AMD64 = Platform("linux", "amd64")


def _two_platforms_one_missing(tmp_path: Path, builder: ImageBuilder) -> tuple[Rig, Blob, Blob]:
    """An index of amd64 and arm64 whose arm64 layer is not in the content store."""
    rig = Rig(tmp_path, builder)
    amd = builder.image([100], "views-amd64")
    arm = builder.image([100], "views-arm64", architecture="arm64")
    rig.tag(NAME, builder.index([amd, arm]))
    layer = builder.blobs_of(arm)[-1]
    (rig.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / layer.hex).unlink()
    return rig, arm, layer


def _missing(rig: Rig, policy: PlatformPolicy) -> str | None:
    metadata = MetadataStore.at_root(rig.root)
    snap = metadata.read(blobs=True)
    metadata.close()
    (record,) = snap.images
    view = image_view(record, snap, ContentStore(rig.root), policy, AMD64)
    assert view.digest == record.target.digest
    return view.missing()


def test_an_incomplete_index_is_complete_enough_for_what_the_policy_selects(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    rig, _, layer = _two_platforms_one_missing(tmp_path, image_builder)
    assert _missing(rig, PlatformPolicy("all")) == f"1 blob(s) missing, e.g. {layer.digest}"
    assert _missing(rig, PlatformPolicy("available")) is None
    assert _missing(rig, PlatformPolicy("host")) is None  # the host is amd64, which is there
    arm = PlatformPolicy.parse("linux/arm64")
    assert _missing(rig, arm) == f"1 blob(s) missing, e.g. {layer.digest}"


def test_an_unreadable_index_is_the_reason(tmp_path: Path, image_builder: ImageBuilder) -> None:
    rig, _, _ = _two_platforms_one_missing(tmp_path, image_builder)
    index = rig.images[NAME]
    path = rig.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / index.hex
    path.write_bytes(b"{" * index.size)  # its size, not JSON
    reason = _missing(rig, PlatformPolicy("available"))
    assert reason is not None and index.digest in reason, reason
