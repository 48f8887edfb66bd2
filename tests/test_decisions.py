"""The planner fed from a containerd root and the state: what is walked, what is said, what is kept.

The root is written as containerd lays it out (tests/test_service.py's rig: meta.db by the test
bbolt writer, blobs in the content store).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from imagepushd.config import load_config
from imagepushd.decisions import decide_snapshot, preview
from imagepushd.oci import Descriptor
from imagepushd.remember import State
from imagepushd.watch.content import ContentStore, ImageGraph
from imagepushd.watch.metadata import MetadataStore
from tests.support.images import ImageBuilder
from tests.test_service import HOST, NAME, Rig, rule

OTHER = f"{HOST}/elsewhere/tool:2"


class CountingStore(ContentStore):
    """A content store that counts the images it walks."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.walked: list[str] = []

    def walk(self, target: Descriptor, known: Collection[str] | None = None) -> ImageGraph:
        self.walked.append(target.digest)
        return super().walk(target, known)


def _rig(tmp_path: Path, builder: ImageBuilder) -> Rig:
    rig = Rig(tmp_path, builder)
    rig.configure(rule(), on_start="all", settle="0s")
    return rig


def test_only_images_a_rule_matches_are_walked_and_missing_blobs_are_named(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    rig = _rig(tmp_path, image_builder)
    app = rig.builder.image([100, 200], "decisions-app")
    rig.tag(NAME, app)
    rig.tag(OTHER, rig.builder.image([300], "decisions-other"))
    layer = rig.builder.blobs_of(app)[-1]
    (rig.root / "io.containerd.content.v1.content" / "blobs" / "sha256" / layer.hex).unlink()
    metadata = MetadataStore.at_root(rig.root)
    snap = metadata.read(blobs=True)
    metadata.close()
    content = CountingStore(rig.root)
    config = load_config(rig.config, {})

    decision = decide_snapshot(snap, content, config, None, now=0.0, settle=0.0)

    assert content.walked == [app.digest]  # the unmatched image is never read
    assert decision.enqueue == []
    (note,) = decision.waiting
    assert (note.namespace, note.name) == ("default", NAME)
    assert note.reason == f"content incomplete: 1 blob(s) missing, e.g. {layer.digest}"
    assert [(n.name, n.reason) for n in decision.skipped] == [(OTHER, "no rule matches")]


def test_preview_plans_from_the_state_without_writing_it(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    rig = _rig(tmp_path, image_builder)
    app = rig.builder.image([100], "decisions-preview")
    rig.tag(NAME, app)
    config = load_config(rig.config, {})

    rows = preview(config, {}, tmp_path)

    assert rows == [
        {"action": "push", "namespace": "default", "name": NAME, "target": NAME, "reason": ""}
    ]
    assert not rig.state.exists()  # no state: nothing remembered, nothing created
    with State(rig.state) as state:
        state.pushed.record(NAME, app.digest, "default", NAME, bytes=1, duration=0.1)
    rows = preview(config, {}, tmp_path)
    assert [(r["action"], r["reason"]) for r in rows] == [
        ("skip", "already pushed with this digest")
    ]
