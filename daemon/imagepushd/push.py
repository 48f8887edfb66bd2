"""Push one image from a blob store (containerd's content store, an image archive) to a registry.

Order matters to registries: every blob first (with bounded concurrency, each digest once),
then image manifests by digest, then nested indexes deepest first, then the top level by tag.
The ``platforms`` policy decides what an index with missing platforms becomes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform as host_platform_module
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from imagepushd.blobs import BlobStore
from imagepushd.containerd.content import (
    BlobNode,
    GraphNode,
    ImageGraph,
    IndexNode,
    ManifestNode,
)
from imagepushd.errors import ManifestError, MissingContentError, UsageError
from imagepushd.oci import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_SIZE, Descriptor, Platform
from imagepushd.reference import Reference
from imagepushd.registry.client import RegistryClient
from imagepushd.registry.upload import BlobUploader, Outcome, UploadResult

log = logging.getLogger(__name__)

_MACHINE_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}


def host_platform() -> Platform:
    """The platform of this machine in OCI terms (``linux/amd64``, ``linux/arm64``, ...)."""
    machine = host_platform_module.machine()
    arch = _MACHINE_ARCH.get(machine, machine)
    return Platform("linux", arch, "v7" if machine == "armv7l" else "")


@dataclass(frozen=True)
class PlatformPolicy:
    """``all`` | ``available`` | ``host`` | an explicit list of platforms."""

    mode: str = "all"
    platforms: tuple[Platform, ...] = ()

    @classmethod
    def parse(cls, value: str | Sequence[str]) -> PlatformPolicy:
        """From the config value or ``--platform``: a keyword or comma-separated platforms."""
        items = [value] if isinstance(value, str) else list(value)
        words = [w.strip() for item in items for w in item.split(",") if w.strip()]
        if not words:
            raise UsageError("platforms: empty; use all, available, host or os/arch[,...]")
        if len(words) == 1 and words[0] in ("all", "available", "host"):
            return cls(words[0])
        try:
            return cls("list", tuple(Platform.parse(w) for w in words))
        except ValueError as exc:
            raise UsageError(f"platforms: {exc}; or use all, available, host") from None

    def __str__(self) -> str:
        return self.mode if self.mode != "list" else ",".join(map(str, self.platforms))


def _matches(want: Platform, have: Platform | None) -> bool:
    if have is None:
        return False
    if (want.os, want.architecture) != (have.os, have.architecture):
        return False
    return not want.variant or want.variant == have.variant


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
            "pushed_blobs": self.pushed_blobs,
            "skipped_blobs": self.skipped_blobs,
            "mounted_blobs": self.mounted_blobs,
            "bytes_sent": self.bytes_sent,
            "manifests": self.manifests,
            "up_to_date": self.up_to_date,
        }


@dataclass(frozen=True)
class _Manifest:
    """A manifest or index to PUT: its descriptor and exact bytes."""

    descriptor: Descriptor
    data: bytes


@dataclass
class _Plan:
    """What to push: blobs, child manifests (children before parents), and the top level."""

    blobs: dict[str, Descriptor] = field(default_factory=dict)
    children: list[_Manifest] = field(default_factory=list)
    platforms: list[Platform] = field(default_factory=list)
    top: _Manifest | None = None


class Pusher:
    """Pushes images from one blob store to one registry.

    The store is containerd's content store or an image archive; either way each blob is
    uploaded as a byte range of a file by the one :class:`BlobUploader`.
    """

    def __init__(
        self,
        content: BlobStore,
        client: RegistryClient,
        uploader: BlobUploader,
        *,
        concurrency: int = 3,
        host: Platform | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._content = content
        self._client = client
        self._uploader = uploader
        self._concurrency = max(1, concurrency)
        self._host = host or host_platform()
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
        plan = self._plan(graph, policy)
        assert plan.top is not None
        top = plan.top.descriptor
        result = PushResult(
            str(target), top.digest, top.media_type, [str(p) for p in plan.platforms]
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
            result.skipped_blobs = len(plan.blobs)
            return result
        self._push_blobs(repository, list(plan.blobs.values()), mount_sources, result)
        for manifest in plan.children:
            self._put(repository, manifest.descriptor.digest, manifest, result)
        self._put(repository, reference, plan.top, result)
        return result

    # ---- planning ----------------------------------------------------------------------

    def _read(self, descriptor: Descriptor) -> bytes:
        return self._content.read_bytes(descriptor, MAX_MANIFEST_SIZE)

    def _plan(self, graph: ImageGraph, policy: PlatformPolicy) -> _Plan:
        plan = _Plan()
        root = graph.root
        if isinstance(root, ManifestNode):
            if not graph.complete:
                raise MissingContentError(
                    f"image {root.descriptor.digest}", [d.digest for d in graph.missing]
                )
            wanted = policy.platforms if policy.mode == "list" else (self._host,)
            if policy.mode in ("list", "host") and not any(
                _matches(p, root.platform) for p in wanted
            ):
                raise MissingContentError(
                    f"image is {root.platform or 'of unknown platform'}, not {policy}", []
                )
            self._add_manifest(plan, root)
            plan.top = plan.children.pop()
            return plan
        if not isinstance(root, IndexNode):
            raise ManifestError(f"{root.descriptor.digest}: not an image manifest or index")
        keep = self._selector(graph, policy)
        if policy.mode == "host":
            chosen = next((m for m in graph.manifests() if keep(m)), None)
            if chosen is None:
                raise MissingContentError(
                    f"no complete manifest for the host platform {self._host}; the image has "
                    + (", ".join(str(p) for p in graph.platforms()) or "no platforms"),
                    [],
                )
            self._add_manifest(plan, chosen)
            plan.top = plan.children.pop()
            return plan
        top = self._add_index(plan, root, keep)
        if top is None:
            raise MissingContentError(f"no platform of {root.descriptor.digest} is complete", [])
        plan.top = top
        plan.children.remove(top)
        return plan

    def _selector(
        self, graph: ImageGraph, policy: PlatformPolicy
    ) -> Callable[[ManifestNode], bool]:
        missing = {d.digest for d in graph.missing}

        def complete(node: ManifestNode) -> bool:
            if node.manifest is None:
                return False
            parts = (node.manifest.config, *node.manifest.layers)
            return not any(d.digest in missing for d in parts)

        manifests = graph.manifests()
        if policy.mode == "all":
            absent = [m for m in manifests if not complete(m)]
            if absent:
                names = ", ".join(str(m.platform or m.descriptor.digest) for m in absent)
                raise MissingContentError(
                    f'platforms missing content: {names} (use platforms = "available" or '
                    "--platform available to push the rest)",
                    [d.digest for d in graph.missing],
                )
            return complete
        if policy.mode == "available":
            return complete
        if policy.mode == "host":
            return lambda m: complete(m) and _matches(self._host, m.platform)
        wanted = policy.platforms
        for want in wanted:
            candidates = [m for m in manifests if _matches(want, m.platform)]
            if not candidates:
                raise MissingContentError(f"the image has no {want} manifest", [])
            if not any(complete(m) for m in candidates):
                raise MissingContentError(
                    f"platform {want} is missing content",
                    sorted({d.digest for d in graph.missing}),
                )
        return lambda m: complete(m) and any(_matches(w, m.platform) for w in wanted)

    def _add_manifest(self, plan: _Plan, node: ManifestNode) -> None:
        assert node.manifest is not None
        for blob in (node.manifest.config, *node.manifest.layers):
            plan.blobs.setdefault(blob.digest, blob)
        if node.platform is not None:
            plan.platforms.append(node.platform)
        plan.children.append(_Manifest(node.descriptor, self._read(node.descriptor)))

    def _add_index(
        self, plan: _Plan, node: IndexNode, keep: Callable[[ManifestNode], bool]
    ) -> _Manifest | None:
        """Add what ``node`` keeps; return its manifest (rewritten if children were dropped)."""
        if node.index is None:
            return None
        kept: list[Descriptor] = []
        changed = False
        for child in node.children:
            descriptor = self._add_child(plan, child, keep)
            if descriptor is None:
                changed = True
                continue
            changed = changed or descriptor.digest != child.descriptor.digest
            kept.append(descriptor)
        if not kept:
            return None
        data = self._read(node.descriptor)
        if changed:
            data = _rewrite_index(data, kept)
            descriptor = _descriptor_for(node.descriptor, data)
            log.info(
                "index %s reduced to %d of %d children: %s",
                node.descriptor.digest,
                len(kept),
                len(node.children),
                descriptor.digest,
            )
        else:
            descriptor = node.descriptor
        manifest = _Manifest(descriptor, data)
        plan.children.append(manifest)
        return manifest

    def _add_child(
        self, plan: _Plan, child: GraphNode, keep: Callable[[ManifestNode], bool]
    ) -> Descriptor | None:
        if isinstance(child, ManifestNode):
            if not keep(child):
                return None
            self._add_manifest(plan, child)
            return child.descriptor
        if isinstance(child, IndexNode):
            nested = self._add_index(plan, child, keep)
            if nested is None:
                return None
            return Descriptor(
                nested.descriptor.media_type,
                nested.descriptor.digest,
                nested.descriptor.size,
                child.descriptor.platform,
                child.descriptor.annotations,
            )
        assert isinstance(child, BlobNode)
        if not self._content.has(child.descriptor):
            return None
        plan.blobs.setdefault(child.descriptor.digest, child.descriptor)
        return child.descriptor

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
        self, repository: str, reference: str, manifest: _Manifest, result: PushResult
    ) -> None:
        self._client.manifest_put(
            repository, reference, manifest.descriptor.media_type, manifest.data
        )
        result.manifests += 1
        self._on_event(ManifestPushed(f"{repository}:{reference}", manifest.descriptor.digest))


def _rewrite_index(data: bytes, children: list[Descriptor]) -> bytes:
    """The index with only ``children``; kept entries stay verbatim (os.version, urls, ...)."""
    doc = json.loads(data)
    original = {e.get("digest"): e for e in doc.get("manifests", []) if isinstance(e, dict)}
    doc["manifests"] = [original.get(c.digest, c.to_json()) for c in children]
    return json.dumps(doc, separators=(",", ":")).encode()


def _descriptor_for(original: Descriptor, data: bytes) -> Descriptor:
    media_type = original.media_type
    if media_type not in INDEX_TYPES | MANIFEST_TYPES:
        raise ManifestError(f"{original.digest}: unexpected media type {media_type}")
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
