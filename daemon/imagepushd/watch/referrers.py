"""Signatures, attestations and SBOMs among containerd's images: what refers to an image.

Two shapes are found among the images of the subject's namespace:

- cosign tags: an image named ``<repo>:sha256-<hex>.sig`` (or ``.att``, ``.sbom``) belongs to
  the image whose digest is ``sha256:<hex>``. It goes to the subject's target repository under
  the same tag, which is where cosign looks for it.
- OCI 1.1 referrers: a manifest whose ``subject`` names the digest. containerd keeps one only
  while an image name points at it, so the manifests of the namespace's images are read (each
  digest once: a manifest's subject is part of its content and never changes). It is pushed by
  digest (see :func:`imagepushd.push.publish.push_referrers`).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from imagepushd.errors import ImagepushdError, InvalidReferenceError, ManifestError
from imagepushd.oci import (
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    is_digest,
    load_object,
)
from imagepushd.reference import Reference, parse_reference
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import ImageRecord, MetadataSnapshot

log = logging.getLogger(__name__)

#: cosign's tag for what belongs to ``sha256:<hex>``: signatures, attestations, SBOMs.
COSIGN_TAG = re.compile(r"sha256-([0-9a-f]{64})\.(sig|att|sbom)")
#: Only OCI manifests and indexes can carry a ``subject``.
_SUBJECT_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX})


@dataclass(frozen=True)
class _Refers:
    """What a manifest's own fields say it refers to."""

    subject: str
    artifact_type: str
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class Referrer:
    """A containerd image that refers to the image with digest ``subject``.

    ``tag`` is its cosign tag (pushed under it), None for a referrer pushed by digest;
    ``listed`` says its manifest names ``subject`` itself, so it belongs in the referrers index.
    """

    namespace: str
    name: str
    descriptor: Descriptor
    subject: str
    tag: str | None = None
    listed: bool = False
    artifact_type: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)

    def target(self, subject_target: Reference) -> Reference:
        """Where it goes: the subject's target repository, under its tag or by its digest."""
        base = Reference(subject_target.registry, subject_target.repository)
        if self.tag is not None:
            return replace(base, tag=self.tag)
        return replace(base, digest=self.descriptor.digest)

    def index_entry(self) -> dict[str, Any]:
        """Its descriptor in a referrers index, as the distribution spec lists it."""
        entry: dict[str, Any] = {
            "mediaType": self.descriptor.media_type,
            "digest": self.descriptor.digest,
            "size": self.descriptor.size,
        }
        if self.artifact_type:
            entry["artifactType"] = self.artifact_type
        if self.annotations:
            entry["annotations"] = dict(self.annotations)
        return entry


def _refers(data: bytes, descriptor: Descriptor) -> _Refers | None:
    doc = load_object(data, f"manifest {descriptor.digest}")
    subject = doc.get("subject")
    digest = subject.get("digest") if isinstance(subject, Mapping) else None
    if not isinstance(digest, str) or not is_digest(digest):
        return None
    artifact_type = doc.get("artifactType")
    if not isinstance(artifact_type, str) or not artifact_type:
        # The spec lists an image manifest without artifactType under its config's media type.
        config = doc.get("config")
        artifact_type = config.get("mediaType") if isinstance(config, Mapping) else ""
    raw = doc.get("annotations")
    annotations = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
    return _Refers(digest, artifact_type if isinstance(artifact_type, str) else "", annotations)


def _cosign(name: str) -> tuple[str, str] | None:
    """The cosign tag of image ``name`` and the digest it belongs to; None if not one."""
    try:
        tag = parse_reference(name, default_tag=None).tag
    except InvalidReferenceError:
        return None
    if tag is None or (match := COSIGN_TAG.fullmatch(tag)) is None:
        return None
    return tag, f"sha256:{match.group(1)}"


class ReferrerFinder:
    """Finds referrers among containerd's images, reading each manifest digest at most once.

    Thread-safe: the daemon's workers and its scan loop share one.
    """

    def __init__(self, content: ContentStore) -> None:
        self._content = content
        self._refers: dict[str, _Refers | None] = {}
        self._lock = threading.Lock()

    def _subject_of(self, target: Descriptor, known: Collection[str]) -> _Refers | None:
        if target.media_type not in _SUBJECT_TYPES or target.digest not in known:
            return None
        with self._lock:
            if target.digest in self._refers:
                return self._refers[target.digest]
        try:
            data = self._content.read_bytes(target, MAX_MANIFEST_SIZE)
        except ImagepushdError as exc:
            # Absent or unreadable now (maybe later): not remembered, and not a referrer today.
            log.debug("%s: not read for referrers: %s", target.digest, exc)
            return None
        try:
            refers = _refers(data, target)
        except ManifestError:
            refers = None  # verified bytes that are not a JSON object never will be
        with self._lock:
            self._refers[target.digest] = refers
        return refers

    def classify(self, record: ImageRecord, known: Collection[str]) -> Referrer | None:
        """The referrer ``record`` is (a cosign tag, or a manifest with a subject), or None.

        ``known`` is the namespace's blob digests: a manifest outside it is not read.
        """
        cosign = _cosign(record.name)
        refers = self._subject_of(record.target, known)
        listed: _Refers | None  # what the manifest itself says, when it names the subject
        if cosign is not None:
            tag, subject = cosign
            listed = refers if refers is not None and refers.subject == subject else None
        elif refers is not None:
            tag, subject, listed = None, refers.subject, refers
        else:
            return None
        return Referrer(
            record.namespace,
            record.name,
            record.target,
            subject,
            tag,
            listed is not None,
            listed.artifact_type if listed is not None else "",
            listed.annotations if listed is not None else {},
        )

    def among(self, records: Iterable[ImageRecord], snap: MetadataSnapshot) -> list[Referrer]:
        """The referrers among ``records`` (images of ``snap``)."""
        found = []
        for record in records:
            referrer = self.classify(record, snap.blobs.get(record.namespace, {}))
            if referrer is not None and referrer.descriptor.digest != referrer.subject:
                found.append(referrer)
        return found

    def referrers(
        self, snap: MetadataSnapshot, namespace: str, subject: str, repository: str = ""
    ) -> list[Referrer]:
        """The referrers of ``subject`` in ``namespace``: one per cosign tag, one per digest.

        Of several images with the same cosign tag, one in ``repository`` (the subject's own
        source repository) wins, then the first by name.
        """
        found = [
            r
            for r in self.among((i for i in snap.images if i.namespace == namespace), snap)
            if r.subject == subject
        ]

        def preference(r: Referrer) -> tuple[bool, bool, str]:
            try:
                same = parse_reference(r.name, default_tag=None).repository == repository
            except InvalidReferenceError:
                same = False
            return (r.tag is None, not same, r.name)

        chosen: dict[str, Referrer] = {}
        for referrer in sorted(found, key=preference):
            chosen.setdefault(referrer.tag or referrer.descriptor.digest, referrer)
        return list(chosen.values())
