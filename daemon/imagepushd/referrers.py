"""Signatures, attestations and SBOMs in containerd that refer to a pushed image, pushed after it.

Two shapes are found among the images of the subject's namespace:

- cosign tags: an image named ``<repo>:sha256-<hex>.sig`` (or ``.att``, ``.sbom``) belongs to
  the image whose digest is ``sha256:<hex>``. It goes to the subject's target repository under
  the same tag, which is where cosign looks for it.
- OCI 1.1 referrers: a manifest whose ``subject`` names the digest. containerd keeps one only
  while an image name points at it, so the manifests of the namespace's images are read (each
  digest once: a manifest's subject is part of its content and never changes). It is pushed by
  digest. A registry with the referrers API indexes it itself; for one without (distribution
  2.8 answers 404) the ``sha256-<hex>`` tag-schema index of the OCI distribution spec v1.1 is
  fetched, merged with what this push adds (entries pushed by others are kept) and put back.

Referrers go after their subject, and only when the subject went out unchanged: a platform
policy that reduces an index gives the target a digest no referrer names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

from imagepushd.containerd.content import ContentStore
from imagepushd.containerd.metadata import ImageRecord, MetadataSnapshot
from imagepushd.errors import ImagepushdError, InvalidReferenceError, ManifestError, PushInterrupted
from imagepushd.oci import (
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    is_digest,
    load_object,
)
from imagepushd.planner import Job
from imagepushd.platforms import PlatformPolicy
from imagepushd.push import Pusher, PushResult
from imagepushd.reference import Reference, parse_reference
from imagepushd.registry.client import RegistryClient
from imagepushd.rules import Rule, match_image
from imagepushd.state import Pushed

log = logging.getLogger(__name__)

#: cosign's tag for what belongs to ``sha256:<hex>``: signatures, attestations, SBOMs.
COSIGN_TAG = re.compile(r"sha256-([0-9a-f]{64})\.(sig|att|sbom)")
#: Only OCI manifests and indexes can carry a ``subject``.
_SUBJECT_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX})
#: A referrer's manifest must go out as it is, whatever the subject's platform policy.
_AS_IS = PlatformPolicy()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fallback_tag(subject: str) -> str:
    """The tag-schema tag of ``subject``'s referrers index: ``<alg>-<hex>`` (64 hex at most)."""
    algorithm, _, hex_ = subject.partition(":")
    return f"{algorithm}-{hex_[:64]}"


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
        try:
            tag = parse_reference(record.name, default_tag=None).tag
        except InvalidReferenceError:
            tag = None
        cosign = COSIGN_TAG.fullmatch(tag) if tag is not None else None
        refers = self._subject_of(record.target, known)
        if cosign is not None:
            subject = f"sha256:{cosign.group(1)}"
            listed = refers is not None and refers.subject == subject
        elif refers is not None:
            subject, listed = refers.subject, True
        else:
            return None
        return Referrer(
            record.namespace,
            record.name,
            record.target,
            subject,
            tag if cosign is not None else None,
            listed,
            refers.artifact_type if listed and refers is not None else "",
            refers.annotations if listed and refers is not None else {},
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


@dataclass(frozen=True)
class ReferrerPushed:
    """One referrer pushed (or found already there) and where."""

    referrer: Referrer
    target: Reference
    result: PushResult
    duration: float


@dataclass
class ReferrersResult:
    """What pushing the referrers of one subject did.

    ``api``: whether the registry has the referrers API (None: nothing needed indexing);
    ``index``: the tag-schema index written, None when none was needed or it already listed all.
    """

    pushed: list[ReferrerPushed] = field(default_factory=list)
    api: bool | None = None
    index: Reference | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        return {
            "pushed": [
                {
                    "source": p.referrer.name,
                    "target": str(p.target),
                    "digest": p.result.digest,
                    "up_to_date": p.result.up_to_date,
                    "bytes_sent": p.result.bytes_sent,
                }
                for p in self.pushed
            ],
            "referrers_api": self.api,
            "index": None if self.index is None else str(self.index),
        }


def merge_index(existing: tuple[str, bytes] | None, entries: Sequence[Mapping[str, Any]]) -> bytes:
    """The tag-schema index holding ``entries``, added to ``existing`` (kept verbatim).

    ``existing`` is what the tag holds (media type and bytes), None when nothing. Something
    other than an image index there is a :class:`ManifestError`: it is not overwritten.
    """
    if existing is None:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        media_type, data = existing
        loaded = load_object(data, "referrers tag-schema index")
        own = loaded.get("mediaType")
        if (own or media_type) != OCI_INDEX or not isinstance(loaded.get("manifests"), list):
            raise ManifestError(
                f"the referrers tag holds {own or media_type or 'a manifest'}, not an OCI image "
                "index; not overwriting it"
            )
        doc = dict(loaded)
        doc["manifests"] = list(loaded["manifests"])
    have = {m.get("digest") for m in doc["manifests"] if isinstance(m, Mapping)}
    for entry in entries:
        if entry["digest"] not in have:
            doc["manifests"].append(dict(entry))
            have.add(entry["digest"])
    return json.dumps(doc, separators=(",", ":")).encode()


def push_referrers(
    referrers: Sequence[Referrer],
    *,
    content: ContentStore,
    known: Collection[str],
    pusher: Pusher,
    client: RegistryClient,
    target: Reference,
    subject: str,
    on_pushed: Callable[[ReferrerPushed], None] = lambda p: None,
) -> ReferrersResult:
    """Push ``referrers`` of ``subject`` (already at ``target``) to ``target``'s repository.

    Every referrer is tried; the first failure is raised after the rest (a stopping daemon's
    :class:`PushInterrupted` at once). ``on_pushed`` hears of each one as it is done.
    """
    out = ReferrersResult()
    failure: ImagepushdError | None = None
    for referrer in referrers:
        where = referrer.target(target)
        started = time.monotonic()
        try:
            graph = content.walk(referrer.descriptor, known)
            result = pusher.push(graph, where, _AS_IS)
        except PushInterrupted:
            raise
        except ImagepushdError as exc:
            log.error("referrer %s/%s → %s: %s", referrer.namespace, referrer.name, where, exc)
            failure = failure or exc
            continue
        pushed = ReferrerPushed(referrer, where, result, time.monotonic() - started)
        log.info(
            "referrer %s/%s of %s → %s %s",
            referrer.namespace,
            referrer.name,
            subject,
            where,
            "(already there)" if result.up_to_date else "pushed",
        )
        out.pushed.append(pushed)
        on_pushed(pushed)
    listed = [p.referrer for p in out.pushed if p.referrer.listed]
    if listed:
        repository = target.repository
        out.api = client.referrers_get(repository, subject) is not None
        if not out.api:
            tag = fallback_tag(subject)
            existing = client.manifest_get(repository, tag, [OCI_INDEX])
            if existing is not None and _digest(existing[1]) == subject:
                # GitLab reads the tag sha256-<hex> as the digest sha256:<hex> and serves the
                # subject itself (oras-project/oras-go#1396): no tag-schema index can live
                # there, and merging the subject's own children into one would list them as
                # its referrers.
                log.warning(
                    "%s: %s:%s is the image itself (the registry reads the tag as a digest); "
                    "no referrers index is kept there",
                    target.registry,
                    repository,
                    tag,
                )
            else:
                data = merge_index(existing, [r.index_entry() for r in listed])
                if existing is None or data != existing[1]:
                    client.manifest_put(repository, tag, OCI_INDEX, data)
                    out.index = Reference(target.registry, repository, tag)
                    log.info("referrers index %s lists %d new referrer(s)", out.index, len(listed))
    if failure is not None:
        raise failure
    return out


def repush_jobs(
    referrers: Iterable[Referrer],
    pushed: Iterable[Pushed],
    holdings: Set[tuple[str, str]],
    rules: Sequence[Rule],
    snap: MetadataSnapshot,
) -> list[Job]:
    """Pushes to run again so that their referrer step takes referrers that came after them.

    A referrer is due when its subject was pushed (per the state) from an image that still
    holds that digest, by a rule with ``referrers = true`` rendering that target, and the
    referrer's own target does not hold it yet. Pure.
    """
    by_subject: dict[str, list[Pushed]] = {}
    for record in pushed:
        by_subject.setdefault(record.digest, []).append(record)
    with_referrers = {r.index for r in rules if r.referrers}
    jobs: dict[tuple[str, str, str, str], Job] = {}
    for referrer in referrers:
        for record in by_subject.get(referrer.subject, ()):
            if record.namespace != referrer.namespace:
                continue
            image = snap.image(record.namespace, record.name)
            if image is None or image.target.digest != record.digest:
                continue
            try:
                matches = match_image(rules, record.namespace, record.name)
                where = referrer.target(parse_reference(record.target))
            except InvalidReferenceError:
                continue  # the planner reports bad targets
            rule = next(
                (
                    m.rule
                    for m in matches
                    if m.rule in with_referrers and any(str(t) == record.target for t in m.targets)
                ),
                None,
            )
            if rule is None:
                continue
            if (str(where), referrer.descriptor.digest) in holdings:
                continue
            key = (record.namespace, record.name, record.digest, record.target)
            jobs.setdefault(key, Job(*key, rule))
    return list(jobs.values())
