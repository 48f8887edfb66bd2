"""Push one image from a blob store (containerd's content store, an image archive) to a registry.

Order matters to registries: every blob first (with bounded concurrency, each digest once),
then image manifests by digest, then nested indexes deepest first, then the top level by tag.
The ``platforms`` policy decides what an index with missing platforms becomes.

BuildKit's attestation manifests (SBOM, provenance: index entries of platform
``unknown/unknown`` naming the manifest they describe) are part of the image, not platforms:
``all`` pushes them (and refuses if one is incomplete, like any gap); ``available`` and a
platform list keep a complete attestation exactly when the manifest it describes is kept;
``host`` pushes the host's manifest alone when it has no complete attestation (a plain
manifest, as without attestations), else a reduced index of the manifest and its attestations,
so they are not lost.
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
from imagepushd.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Platform
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


@dataclass(frozen=True)
class PlannedManifest:
    """A manifest or index to PUT: its descriptor and exact bytes."""

    descriptor: Descriptor
    data: bytes


@dataclass
class Plan:
    """What to push: blobs, child manifests (children before parents), and the top level."""

    blobs: dict[str, Descriptor] = field(default_factory=dict)
    children: list[PlannedManifest] = field(default_factory=list)
    platforms: list[Platform] = field(default_factory=list)
    attestations: int = 0
    top: PlannedManifest | None = None
    #: Indexes that lost children: (original digest, kept, of, new digest). The push logs them;
    #: planning alone (the daemon's wait-or-push check) stays silent.
    reduced: list[tuple[str, int, int, str]] = field(default_factory=list)


def plan(graph: ImageGraph, policy: PlatformPolicy, host: Platform) -> Plan:
    """What pushing ``graph`` under ``policy`` sends, from what the graph walk found and read.

    Nothing is read again: manifest bytes come from the walk, presence from its missing list.
    Raises :class:`MissingContentError` when the policy refuses the gaps or keeps nothing.
    """
    out = Plan()
    root = graph.root
    if isinstance(root, ManifestNode):
        if not graph.complete:
            raise MissingContentError(
                f"image {root.descriptor.digest}", [d.digest for d in graph.missing]
            )
        wanted = policy.platforms if policy.mode == "list" else (host,)
        if policy.mode in ("list", "host") and not any(_matches(p, root.platform) for p in wanted):
            raise MissingContentError(
                f"image is {root.platform or 'of unknown platform'}, not {policy}", []
            )
        _add_manifest(out, root)
        out.top = out.children.pop()
        return out
    if not isinstance(root, IndexNode):
        raise ManifestError(f"{root.descriptor.digest}: not an image manifest or index")
    kept = _select(graph, policy, host)
    chosen = [m for m in graph.manifests() if m.descriptor.digest in kept]
    if policy.mode == "host" and not any(m.is_attestation for m in chosen):
        # Without attestations the host's manifest goes alone, as a plain manifest.
        _add_manifest(out, chosen[0])
        out.top = out.children.pop()
        return out
    top = _add_index(out, graph, root, kept)
    if top is None:
        raise MissingContentError(f"no platform of {root.descriptor.digest} is complete", [])
    out.top = top
    out.children.remove(top)
    return out


def _select(graph: ImageGraph, policy: PlatformPolicy, host: Platform) -> set[str]:
    """The digests of the manifests ``policy`` keeps: image manifests and their attestations.

    An attestation goes along only with the manifest it describes, and only if complete:
    a reduced index never holds an attestation of a manifest it dropped.
    """
    manifests = graph.manifests()
    complete = graph.manifest_complete
    if policy.mode == "all":
        if not graph.complete:
            absent = [m for m in manifests if not complete(m)]
            what = (
                "platforms missing content: " + ", ".join(_describe(graph, m) for m in absent)
                if absent
                else f"image {graph.root.descriptor.digest} is missing content"
            )
            raise MissingContentError(
                f'{what} (use platforms = "available" or --platform available to push the rest)',
                [d.digest for d in graph.missing],
            )
        return {m.descriptor.digest for m in manifests}
    images = [m for m in manifests if not m.is_attestation]
    if policy.mode == "available":
        chosen = [m for m in images if complete(m)]
    elif policy.mode == "host":
        here = next((m for m in images if complete(m) and _matches(host, m.platform)), None)
        if here is None:
            raise MissingContentError(
                f"no complete manifest for the host platform {host}; the image has "
                + (", ".join(str(p) for p in graph.platforms()) or "no platforms"),
                [],
            )
        chosen = [here]
    else:
        wanted = policy.platforms
        for want in wanted:
            candidates = [m for m in images if _matches(want, m.platform)]
            if not candidates:
                raise MissingContentError(f"the image has no {want} manifest", [])
            if not any(complete(m) for m in candidates):
                raise MissingContentError(
                    f"platform {want} is missing content",
                    sorted({d.digest for d in graph.missing}),
                )
        chosen = [m for m in images if complete(m) and any(_matches(w, m.platform) for w in wanted)]
    subjects = {m.descriptor.digest for m in chosen}
    attestations = {
        m.descriptor.digest
        for m in manifests
        if m.is_attestation and m.attests in subjects and complete(m)
    }
    return subjects | attestations


def _describe(graph: ImageGraph, node: ManifestNode) -> str:
    """A manifest for messages: its platform, or which platform's attestation it is."""
    if not node.is_attestation:
        return str(node.platform or node.descriptor.digest)
    subject = next(
        (m for m in graph.manifests() if m.descriptor.digest == node.attests and m.platform),
        None,
    )
    if subject is None:
        return f"attestation {node.descriptor.digest}"
    return f"attestation of {subject.platform}"


def _add_manifest(out: Plan, node: ManifestNode) -> None:
    assert node.manifest is not None and node.data is not None
    for blob in (node.manifest.config, *node.manifest.layers):
        out.blobs.setdefault(blob.digest, blob)
    if node.is_attestation:
        out.attestations += 1
    elif node.platform is not None:
        out.platforms.append(node.platform)
    out.children.append(PlannedManifest(node.descriptor, node.data))


def _add_index(
    out: Plan, graph: ImageGraph, node: IndexNode, kept: set[str]
) -> PlannedManifest | None:
    """Add what ``node`` keeps; return its manifest (rewritten if children were dropped)."""
    if node.index is None or node.data is None:
        return None
    children: list[Descriptor] = []
    changed = False
    for child in node.children:
        descriptor = _add_child(out, graph, child, kept)
        if descriptor is None:
            changed = True
            continue
        changed = changed or descriptor.digest != child.descriptor.digest
        children.append(descriptor)
    if not children:
        return None
    data = node.data
    if changed:
        data = _rewrite_index(data, children)
        descriptor = _descriptor_for(node.descriptor, data)
        out.reduced.append(
            (node.descriptor.digest, len(children), len(node.children), descriptor.digest)
        )
    else:
        descriptor = node.descriptor
    manifest = PlannedManifest(descriptor, data)
    out.children.append(manifest)
    return manifest


def _add_child(out: Plan, graph: ImageGraph, child: GraphNode, kept: set[str]) -> Descriptor | None:
    if isinstance(child, ManifestNode):
        if child.descriptor.digest not in kept:
            return None
        _add_manifest(out, child)
        return child.descriptor
    if isinstance(child, IndexNode):
        nested = _add_index(out, graph, child, kept)
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
    if not graph.present(child.descriptor):
        return None
    out.blobs.setdefault(child.descriptor.digest, child.descriptor)
    return child.descriptor


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
        planned = plan(graph, policy, self._host)
        assert planned.top is not None
        for original, kept, of, reduced in planned.reduced:
            log.info("index %s reduced to %d of %d children: %s", original, kept, of, reduced)
        top = planned.top.descriptor
        result = PushResult(
            str(target),
            top.digest,
            top.media_type,
            [str(p) for p in planned.platforms],
            attestations=planned.attestations,
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
            result.skipped_blobs = len(planned.blobs)
            return result
        self._push_blobs(repository, list(planned.blobs.values()), mount_sources, result)
        for manifest in planned.children:
            self._put(repository, manifest.descriptor.digest, manifest, result)
        self._put(repository, reference, planned.top, result)
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
        self, repository: str, reference: str, manifest: PlannedManifest, result: PushResult
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
