"""The push use case: an image, then what refers to it, from a blob store to a registry.

:class:`Publisher` is what ``imagepushd push`` and the daemon share: take the host's client
from the pool, push, and push the referrers when the image went out as their subject.
:class:`JobRunner` is the daemon's use of it: a job in (walked from containerd's newest
snapshot, with the mount sources the state remembers), an :data:`Outcome` out, the pushes
recorded in the state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from imagepushd.blobs import BlobStore
from imagepushd.clients import RegistryClients
from imagepushd.config import Config
from imagepushd.containerd.content import ContentStore, ImageGraph
from imagepushd.containerd.metadata import ImageRecord, MetadataSnapshot
from imagepushd.errors import ImagepushdError, PushInterrupted, RegistryError
from imagepushd.logs import push_fields
from imagepushd.metrics import Metrics
from imagepushd.oci import Descriptor, Platform
from imagepushd.platforms import PlatformPolicy
from imagepushd.push import Event, Pusher, PushResult
from imagepushd.reference import Reference, parse_reference
from imagepushd.referrers import (
    Referrer,
    ReferrerFinder,
    ReferrerPushed,
    ReferrersResult,
    push_referrers,
)
from imagepushd.registry.health import RegistryHealth
from imagepushd.state import JobRecord, State
from imagepushd.units import human_size

log = logging.getLogger(__name__)


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

    ``config`` and ``snapshot`` are read at each job (a reload or a rescan may swap them).
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        content: ContentStore,
        finder: ReferrerFinder,
        state: State,
        health: RegistryHealth,
        metrics: Metrics,
        config: Callable[[], Config],
        snapshot: Callable[[], MetadataSnapshot | None],
        clock: Callable[[], float],
    ) -> None:
        self._publisher = publisher
        self._content = content
        self._finder = finder
        self._state = state
        self._health = health
        self._metrics = metrics
        self._config = config
        self._snapshot = snapshot
        self._clock = clock

    def run(self, job: JobRecord) -> Outcome:
        """Push one job (worker thread); never raises for expected failures."""
        snap = self._snapshot()  # one snapshot for the record and its blobs
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
        config = self._config()
        target = parse_reference(job.target)
        blobs = snap.blobs.get(job.namespace, {})
        graph = self._content.walk(record.target, blobs)
        state = self._state

        def mount_sources(descriptor: Descriptor) -> list[str]:
            found = state.blob_repositories(target.registry, descriptor.digest)
            blob = blobs.get(descriptor.digest)
            if blob is not None:
                found += [r for r in blob.sources_on(target.registry) if r not in found]
            return found

        def pushed(result: PushResult, duration: float) -> None:
            state.record_push(
                job.target,
                job.digest,
                job.namespace,
                job.name,
                bytes=result.bytes_sent,
                duration=duration,
            )
            state.record_blobs(
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
            snap = self._snapshot()
            assert snap is not None
            source = parse_reference(job.name, default_tag=None)
            found = self._finder.referrers(snap, job.namespace, job.digest, source.repository)
            return found, snap.blobs.get(job.namespace, {})

        return Referrers(job.digest, self._content, find)

    def _referrer_pushed(self, job: JobRecord, pushed: ReferrerPushed) -> None:
        self._state.record_push(
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
