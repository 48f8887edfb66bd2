"""The push use case: an image, then what refers to it, from a blob store to a registry.

:class:`Publisher` is what ``imagepushd push`` and the daemon share: take the host's client
from the pool, push, and push the referrers when the image went out as their subject.
:class:`JobRunner` is the daemon's use of it: a job in (walked from containerd's newest
snapshot, with the mount sources the state remembers), an :data:`Outcome` out, the pushes
recorded in the state.

Referrers go after their subject, and only when the subject went out unchanged: a platform
policy that reduces an index gives the target a digest no referrer names. A registry with the
referrers API indexes them itself; for one without (distribution 2.8 answers 404) the
``sha256-<hex>`` tag-schema index of the OCI distribution spec v1.1 is fetched, merged with what
this push adds (entries pushed by others are kept) and put back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagepushd.blobs import BlobStore
from imagepushd.config import LiveConfig
from imagepushd.decide.platforms import PlatformPolicy
from imagepushd.errors import ImagepushdError, ManifestError, PushInterrupted, RegistryError
from imagepushd.logs import push_fields
from imagepushd.metrics import Metrics
from imagepushd.oci import OCI_INDEX, Descriptor, Platform, load_object
from imagepushd.push.clients import RegistryClients
from imagepushd.push.pusher import Event, Pusher, PushResult
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.health import RegistryHealth
from imagepushd.reference import Reference, parse_reference
from imagepushd.remember import JobRecord, State
from imagepushd.units import human_size
from imagepushd.watch.content import ContentStore, ImageGraph
from imagepushd.watch.metadata import ImageRecord, MetadataSnapshot, MetadataStore
from imagepushd.watch.referrers import Referrer, ReferrerFinder

log = logging.getLogger(__name__)

#: A referrer's manifest must go out as it is, whatever the subject's platform policy.
_AS_IS = PlatformPolicy()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fallback_tag(subject: str) -> str:
    """The tag-schema tag of ``subject``'s referrers index: ``<alg>-<hex>`` (64 hex at most)."""
    algorithm, _, hex_ = subject.partition(":")
    return f"{algorithm}-{hex_[:64]}"


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
    doc = _index_to_extend(existing)
    have = {m.get("digest") for m in doc["manifests"] if isinstance(m, Mapping)}
    for entry in entries:
        if entry["digest"] not in have:
            doc["manifests"].append(dict(entry))
            have.add(entry["digest"])
    return json.dumps(doc, separators=(",", ":")).encode()


def _index_to_extend(existing: tuple[str, bytes] | None) -> dict[str, Any]:
    """A copy of the index the tag holds, an empty index when it holds nothing."""
    if existing is None:
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
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
    return doc


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
    pushed, failure = _push_each(
        referrers,
        content=content,
        known=known,
        pusher=pusher,
        target=target,
        subject=subject,
        on_pushed=on_pushed,
    )
    out = ReferrersResult(pushed)
    listed = [p.referrer for p in out.pushed if p.referrer.listed]
    if listed:
        out.api = client.referrers_get(target.repository, subject) is not None
        if not out.api:
            out.index = _update_tag_schema_index(client, target, subject, listed)
    if failure is not None:
        raise failure
    return out


def _push_each(
    referrers: Sequence[Referrer],
    *,
    content: ContentStore,
    known: Collection[str],
    pusher: Pusher,
    target: Reference,
    subject: str,
    on_pushed: Callable[[ReferrerPushed], None],
) -> tuple[list[ReferrerPushed], ImagepushdError | None]:
    """Push every referrer: those done, and the first failure, to raise once all were tried."""
    done: list[ReferrerPushed] = []
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
        done.append(pushed)
        on_pushed(pushed)
    return done, failure


def _update_tag_schema_index(
    client: RegistryClient, target: Reference, subject: str, listed: Sequence[Referrer]
) -> Reference | None:
    """Add ``listed`` to ``subject``'s tag-schema index; the index, None if left as it was."""
    repository = target.repository
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
        return None
    data = merge_index(existing, [r.index_entry() for r in listed])
    if existing is not None and data == existing[1]:
        return None
    client.manifest_put(repository, tag, OCI_INDEX, data)
    index = Reference(target.registry, repository, tag)
    log.info("referrers index %s lists %d new referrer(s)", index, len(listed))
    return index


def _no_sources(descriptor: Descriptor) -> Sequence[str]:
    return ()


@dataclass(frozen=True)
class Image:
    """One image to push: its blobs, its graph, where it goes and what of it goes."""

    content: BlobStore
    graph: ImageGraph
    target: Reference
    policy: PlatformPolicy
    #: Repositories of the target's registry that may hold a blob already (to mount from).
    mount_sources: Callable[[Descriptor], Sequence[str]] = _no_sources


@dataclass(frozen=True)
class Referrers:
    """The referrers of ``subject`` to push after it, found in containerd (``known``: blobs)."""

    subject: str
    content: ContentStore
    #: Read once the subject is out, so a referrer tagged during its push is found too.
    find: Callable[[], tuple[Sequence[Referrer], Collection[str]]]


@dataclass(frozen=True)
class Published:
    """What publishing did: the image's push, then its referrers'.

    ``referrers`` is None when none were asked for, or when the target holds another digest
    than ``subject`` (``subject_moved``: a platform policy reduced the image).
    """

    result: PushResult
    #: Seconds the image's own push took.
    duration: float
    referrers: ReferrersResult | None = None
    subject_moved: bool = False


class Publisher:
    """Pushes images with the pool's clients; ``host`` is the platform ``host`` selects."""

    def __init__(
        self,
        clients: RegistryClients,
        *,
        host: Platform,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._clients = clients
        self._host = host
        self._on_event = on_event

    def publish(
        self,
        image: Image,
        *,
        concurrency: int,
        referrers: Referrers | None = None,
        on_pushed: Callable[[PushResult, float], None] = lambda result, duration: None,
        on_referrer: Callable[[ReferrerPushed], None] = lambda pushed: None,
    ) -> Published:
        """Push ``image``, then ``referrers``; ``on_pushed`` hears of the image before them."""
        registry = self._clients.get(image.target.registry)
        pusher = Pusher(
            image.content,
            registry.client,
            registry.uploader,
            host=self._host,
            concurrency=concurrency,
            on_event=self._on_event,
        )
        started = time.monotonic()
        result = pusher.push(image.graph, image.target, image.policy, image.mount_sources)
        duration = time.monotonic() - started
        on_pushed(result, duration)
        if referrers is None:
            return Published(result, duration)
        if result.digest != referrers.subject:
            return Published(result, duration, subject_moved=True)
        found, known = referrers.find()
        if not found:
            return Published(result, duration, ReferrersResult())
        out = push_referrers(
            found,
            content=referrers.content,
            known=known,
            pusher=pusher,
            client=registry.client,
            target=image.target,
            subject=referrers.subject,
            on_pushed=on_referrer,
        )
        return Published(result, duration, out)


@dataclass(frozen=True)
class Pushed:
    """The job's image is at its target (pushed now, or found there)."""

    job: JobRecord
    result: PushResult


@dataclass(frozen=True)
class Failed:
    """The job failed.

    ``waits_for_registry``: the registry's fault (down, or holding requests), so the job
    waits for the registry rather than a backoff.
    """

    job: JobRecord
    error: ImagepushdError
    waits_for_registry: bool = False


@dataclass(frozen=True)
class Interrupted:
    """The daemon stopped during the push; the job runs again after the restart."""

    job: JobRecord
    error: PushInterrupted


@dataclass(frozen=True)
class Cancelled:
    """The job no longer applies (its source image changed)."""

    job: JobRecord
    reason: str


Outcome = Pushed | Failed | Interrupted | Cancelled


class JobRunner:
    """The daemon's pushes: a job in, an :data:`Outcome` out, what went out recorded.

    The configuration and the newest snapshot are read at each job (a reload or a rescan
    replaces them).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        config: LiveConfig,
        metadata: MetadataStore,
        content: ContentStore,
        finder: ReferrerFinder,
        state: State,
        health: RegistryHealth,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self._publisher = publisher
        self._config = config
        self._metadata = metadata
        self._content = content
        self._finder = finder
        self._state = state
        self._health = health
        self._metrics = metrics
        self._clock = clock

    def run(self, job: JobRecord) -> Outcome:
        """Push one job (worker thread); never raises for expected failures."""
        snap = self._metadata.latest  # one snapshot for the record and its blobs
        record = snap.image(job.namespace, job.name) if snap is not None else None
        if snap is None or record is None or record.target.digest != job.digest:
            return Cancelled(job, "source image changed before the push started")
        try:
            result, duration = self._push(job, record, snap)
        except PushInterrupted as exc:
            return Interrupted(job, exc)
        except RegistryError as exc:
            waits = self._health.job_failed(parse_reference(job.target).registry, exc)
            return Failed(job, exc, waits)
        except ImagepushdError as exc:
            return Failed(job, exc)
        self._health.reached(parse_reference(job.target).registry)
        log.info(
            "pushed %s/%s → %s %s (%s sent, %.1fs)",
            job.namespace,
            job.name,
            job.target,
            result.digest,
            human_size(result.bytes_sent),
            duration,
            extra=push_fields(
                image=job.name,
                target=job.target,
                digest=result.digest,
                namespace=job.namespace,
                bytes=result.bytes_sent,
                duration_ms=int(duration * 1000),
                rule=str(job.rule),
            ),
        )
        return Pushed(job, result)

    def _push(
        self, job: JobRecord, record: ImageRecord, snap: MetadataSnapshot
    ) -> tuple[PushResult, float]:
        """Push and record it; the result and the seconds the push took."""
        config = self._config.current
        target = parse_reference(job.target)
        blobs = snap.blobs.get(job.namespace, {})
        graph = self._content.walk(record.target, blobs)
        state = self._state

        def mount_sources(descriptor: Descriptor) -> list[str]:
            found = state.blobs.repositories(target.registry, descriptor.digest)
            blob = blobs.get(descriptor.digest)
            if blob is not None:
                found += [r for r in blob.sources_on(target.registry) if r not in found]
            return found

        def pushed(result: PushResult, duration: float) -> None:
            state.pushed.record(
                job.target,
                job.digest,
                job.namespace,
                job.name,
                bytes=result.bytes_sent,
                duration=duration,
            )
            state.blobs.record(
                target.registry, target.repository, [d.digest for d in graph.descriptors()]
            )

        settings = config.registry(target.registry)
        rule = next((r for r in config.rules if r.index == job.rule), None)
        wanted = rule is not None and rule.referrers
        published = self._publisher.publish(
            Image(self._content, graph, target, config.push.platforms, mount_sources),
            concurrency=settings.concurrency or config.push.concurrency,
            referrers=self._referrers(job) if wanted else None,
            on_pushed=pushed,
            on_referrer=lambda p: self._referrer_pushed(job, p),
        )
        if published.subject_moved:
            log.warning(
                "referrers of %s/%s not pushed: %s holds %s, which they do not refer to",
                job.namespace,
                job.name,
                job.target,
                published.result.digest,
            )
        return published.result, published.duration

    def _referrers(self, job: JobRecord) -> Referrers:
        def find() -> tuple[Sequence[Referrer], Collection[str]]:
            # The newest snapshot, not the job's: a referrer tagged during the push is seen
            # too (or the scan that sees it finds this push recorded, and runs it again).
            snap = self._metadata.latest
            assert snap is not None
            source = parse_reference(job.name, default_tag=None)
            found = self._finder.referrers(snap, job.namespace, job.digest, source.repository)
            return found, snap.blobs.get(job.namespace, {})

        return Referrers(job.digest, self._content, find)

    def _referrer_pushed(self, job: JobRecord, pushed: ReferrerPushed) -> None:
        self._state.pushed.record(
            str(pushed.target),
            pushed.result.digest,
            pushed.referrer.namespace,
            pushed.referrer.name,
            bytes=pushed.result.bytes_sent,
            duration=pushed.duration,
        )
        self._metrics.push_count(
            job.rule, "pushed", bytes_sent=pushed.result.bytes_sent, at=self._clock()
        )
