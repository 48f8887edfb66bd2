"""Push one image from a blob store (containerd's content store, an image archive) to a registry.

Order matters to registries: every blob first (with bounded concurrency, each digest once),
then image manifests by digest, then nested indexes deepest first, then the top level by tag.
What goes out (which platforms, which attestations, a reduced index) is decided beforehand by
:func:`imagepushd.decide.platforms.select_manifests`; this module only sends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from imagepushd.blobs import BlobStore
from imagepushd.decide.platforms import PlatformPolicy, SelectedManifest, select_manifests
from imagepushd.errors import ManifestError
from imagepushd.oci import Descriptor, Platform
from imagepushd.push.registry.client import RegistryClient
from imagepushd.push.registry.upload import BlobUploader, Outcome, UploadResult
from imagepushd.reference import Reference
from imagepushd.watch.content import ImageGraph

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobProgress:
    """A progress event: ``position`` bytes of blob ``digest`` sent (or its outcome when done)."""

    digest: str
    size: int
    position: int
    outcome: Outcome | None = None


@dataclass(frozen=True)
class ManifestPushed:
    """A progress event: a manifest or index was written under ``reference``."""

    reference: str
    digest: str


Event = BlobProgress | ManifestPushed


@dataclass
class PushResult:
    """What one push did."""

    target: str
    digest: str
    media_type: str
    platforms: list[str] = field(default_factory=list)
    attestations: int = 0
    pushed_blobs: int = 0
    skipped_blobs: int = 0
    mounted_blobs: int = 0
    bytes_sent: int = 0
    manifests: int = 0
    up_to_date: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` result object."""
        return {
            "target": self.target,
            "digest": self.digest,
            "media_type": self.media_type,
            "platforms": self.platforms,
            "attestations": self.attestations,
            "pushed_blobs": self.pushed_blobs,
            "skipped_blobs": self.skipped_blobs,
            "mounted_blobs": self.mounted_blobs,
            "bytes_sent": self.bytes_sent,
            "manifests": self.manifests,
            "up_to_date": self.up_to_date,
        }


class Pusher:
    """Pushes images from one blob store to one registry.

    The store is containerd's content store or an image archive; either way each blob is
    uploaded as a byte range of a file by the one :class:`BlobUploader`. ``host`` is the
    platform a ``host`` policy selects; the caller reads it once (``platforms.host_platform``).
    """

    def __init__(
        self,
        content: BlobStore,
        client: RegistryClient,
        uploader: BlobUploader,
        *,
        host: Platform,
        concurrency: int = 3,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._content = content
        self._client = client
        self._uploader = uploader
        self._concurrency = max(1, concurrency)
        self._host = host
        self._on_event = on_event or (lambda event: None)
        self._lock = threading.Lock()

    def push(
        self,
        graph: ImageGraph,
        target: Reference,
        policy: PlatformPolicy,
        mount_sources: Callable[[Descriptor], Sequence[str]] = lambda d: (),
    ) -> PushResult:
        """Push ``graph`` to ``target`` under ``policy``; return what was done."""
        selection = select_manifests(graph, policy, self._host)
        assert selection.top is not None
        for original, kept, of, reduced in selection.reduced:
            log.info("index %s reduced to %d of %d children: %s", original, kept, of, reduced)
        top = selection.top.descriptor
        result = PushResult(
            str(target),
            top.digest,
            top.media_type,
            [str(p) for p in selection.platforms],
            attestations=selection.attestations,
        )
        repository = target.repository
        reference = target.tag or top.digest
        if target.digest is not None and target.digest != top.digest:
            raise ManifestError(
                f"target {target} names digest {target.digest}, but the image to push is "
                f"{top.digest} (platform policy {policy})"
            )
        accept = [top.media_type]
        if self._client.manifest_digest(repository, reference, accept) == top.digest:
            log.info("%s already holds %s", target, top.digest)
            result.up_to_date = True
            result.skipped_blobs = len(selection.blobs)
            return result
        self._push_blobs(repository, list(selection.blobs.values()), mount_sources, result)
        for manifest in selection.children:
            self._put(repository, manifest.descriptor.digest, manifest, result)
        self._put(repository, reference, selection.top, result)
        return result

    # ---- pushing -----------------------------------------------------------------------

    def _push_blobs(
        self,
        repository: str,
        blobs: list[Descriptor],
        mount_sources: Callable[[Descriptor], Sequence[str]],
        result: PushResult,
    ) -> None:
        def one(descriptor: Descriptor) -> UploadResult:
            source = self._content.source(descriptor)
            self._on_event(BlobProgress(descriptor.digest, descriptor.size, 0))
            outcome = self._uploader.upload(
                repository,
                source,
                mount_sources(descriptor),
                lambda pos: self._on_event(BlobProgress(descriptor.digest, descriptor.size, pos)),
            )
            self._on_event(
                BlobProgress(descriptor.digest, descriptor.size, descriptor.size, outcome.outcome)
            )
            with self._lock:
                result.bytes_sent += outcome.bytes_sent
                if outcome.outcome is Outcome.UPLOADED:
                    result.pushed_blobs += 1
                elif outcome.outcome is Outcome.MOUNTED:
                    result.mounted_blobs += 1
                else:
                    result.skipped_blobs += 1
            return outcome

        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="blob") as pool:
            futures = [pool.submit(one, d) for d in blobs]
            _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                error = None if future.cancelled() else future.exception()
                if error is not None:
                    raise error

    def _put(
        self, repository: str, reference: str, manifest: SelectedManifest, result: PushResult
    ) -> None:
        self._client.manifest_put(
            repository, reference, manifest.descriptor.media_type, manifest.data
        )
        result.manifests += 1
        self._on_event(ManifestPushed(f"{repository}:{reference}", manifest.descriptor.digest))
