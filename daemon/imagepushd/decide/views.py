"""The planner's view of containerd's images: name, digest, expiry, and a content check.

The check walks an image's content only when the planner asks (most images are decided on
their name and digest alone), and asks the push's own platform selection whether an incomplete
index still has something to push, so attestations and the host platform count as they will.
"""

from __future__ import annotations

from imagepushd.decide.planner import ImageView
from imagepushd.decide.platforms import PlatformPolicy, select_manifests
from imagepushd.errors import ImagepushdError, MissingContentError
from imagepushd.oci import Platform
from imagepushd.watch.content import ContentStore, ImageGraph
from imagepushd.watch.metadata import ImageRecord, MetadataSnapshot


class ContentCheck:
    """What keeps one image from being pushed under ``policy``: None, or why (blobs missing)."""

    def __init__(
        self,
        record: ImageRecord,
        snap: MetadataSnapshot,
        content: ContentStore,
        policy: PlatformPolicy,
        host: Platform,
    ) -> None:
        self._record = record
        self._blobs = snap.blobs.get(record.namespace, {})
        self._content = content
        self._policy = policy
        self._host = host

    def __call__(self) -> str | None:
        """None when the image (or what the policy selects of it) is all there."""
        try:
            graph = self._content.walk(self._record.target, self._blobs)
            if graph.complete or self._selectable(graph):
                return None
        except ImagepushdError as exc:
            return str(exc)
        return f"{len(graph.missing)} blob(s) missing, e.g. {graph.missing[0].digest}"

    def _selectable(self, graph: ImageGraph) -> bool:
        try:
            select_manifests(graph, self._policy, self._host)
        except MissingContentError:
            return False
        return True


def image_view(
    record: ImageRecord,
    snap: MetadataSnapshot,
    content: ContentStore,
    policy: PlatformPolicy,
    host: Platform,
) -> ImageView:
    """The planner's view of ``record``; its content is walked only if the planner asks."""
    check = ContentCheck(record, snap, content, policy, host)
    expires = record.expires_at(snap.db_version)
    return ImageView(record.namespace, record.name, record.target.digest, check, expires)
