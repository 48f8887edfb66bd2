"""Which manifests of an image graph a push sends, under a platform policy: pure, no I/O.

The policy decides what an index with missing platforms becomes. BuildKit's attestation
manifests (SBOM, provenance: index entries of platform ``unknown/unknown`` naming the manifest
they describe) are part of the image, not platforms: ``all`` keeps them (and refuses if one is
incomplete, like any gap); ``available`` and a platform list keep a complete attestation exactly
when the manifest it describes is kept; ``host`` selects the host's manifest alone when it has
no complete attestation (a plain manifest, as without attestations), else a reduced index of
the manifest and its attestations, so they are not lost.

The host platform is always an argument: :func:`host_platform` reads it from the machine once,
at the edge (the CLI, the service), so the selection is the same on every machine for a test.
"""

from __future__ import annotations

import hashlib
import json
import platform as host_platform_module
from collections.abc import Sequence
from dataclasses import dataclass, field

from imagepushd.errors import ManifestError, MissingContentError, UsageError
from imagepushd.oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Platform
from imagepushd.watch.content import (
    BlobNode,
    GraphNode,
    ImageGraph,
    IndexNode,
    ManifestNode,
)

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
class SelectedManifest:
    """A manifest or index to PUT: its descriptor and exact bytes."""

    descriptor: Descriptor
    data: bytes


@dataclass
class Selection:
    """What to push: blobs, child manifests (children before parents), and the top level."""

    blobs: dict[str, Descriptor] = field(default_factory=dict)
    children: list[SelectedManifest] = field(default_factory=list)
    platforms: list[Platform] = field(default_factory=list)
    attestations: int = 0
    top: SelectedManifest | None = None
    #: Indexes that lost children: (original digest, kept, of, new digest). The push logs them;
    #: selecting alone (the daemon's wait-or-push check) stays silent.
    reduced: list[tuple[str, int, int, str]] = field(default_factory=list)


def select_manifests(graph: ImageGraph, policy: PlatformPolicy, host: Platform) -> Selection:
    """What pushing ``graph`` under ``policy`` sends, from what the graph walk found and read.

    Nothing is read again: manifest bytes come from the walk, presence from its missing list.
    Raises :class:`MissingContentError` when the policy refuses the gaps or keeps nothing.
    """
    root = graph.root
    if isinstance(root, ManifestNode):
        return _from_manifest(graph, root, policy, host)
    if not isinstance(root, IndexNode):
        raise ManifestError(f"{root.descriptor.digest}: not an image manifest or index")
    return _from_index(graph, root, policy, host)


def _from_manifest(
    graph: ImageGraph, root: ManifestNode, policy: PlatformPolicy, host: Platform
) -> Selection:
    """A plain manifest goes whole, if complete and of a platform the policy asks for."""
    if not graph.complete:
        raise MissingContentError(
            f"image {root.descriptor.digest}", [d.digest for d in graph.missing]
        )
    wanted = policy.platforms if policy.mode == "list" else (host,)
    if policy.mode in ("list", "host") and not any(_matches(p, root.platform) for p in wanted):
        raise MissingContentError(
            f"image is {root.platform or 'of unknown platform'}, not {policy}", []
        )
    return _alone(root)


def _from_index(
    graph: ImageGraph, root: IndexNode, policy: PlatformPolicy, host: Platform
) -> Selection:
    kept = _kept(graph, policy, host)
    chosen = [m for m in graph.manifests() if m.descriptor.digest in kept]
    if policy.mode == "host" and not any(m.is_attestation for m in chosen):
        # Without attestations the host's manifest goes alone, as a plain manifest.
        return _alone(chosen[0])
    out = Selection()
    top = _add_index(out, graph, root, kept)
    if top is None:
        raise MissingContentError(f"no platform of {root.descriptor.digest} is complete", [])
    out.top = top
    out.children.remove(top)
    return out


def _alone(node: ManifestNode) -> Selection:
    """One image manifest as the top level."""
    out = Selection()
    _add_manifest(out, node)
    out.top = out.children.pop()
    return out


def _kept(graph: ImageGraph, policy: PlatformPolicy, host: Platform) -> set[str]:
    """The digests of the manifests ``policy`` keeps: image manifests and their attestations.

    An attestation goes along only with the manifest it describes, and only if complete:
    a reduced index never holds an attestation of a manifest it dropped.
    """
    if policy.mode == "all":
        _require_complete(graph)
        return {m.descriptor.digest for m in graph.manifests()}
    if policy.mode == "available":
        chosen = [m for m in _images(graph) if graph.manifest_complete(m)]
    elif policy.mode == "host":
        chosen = [_host_manifest(graph, host)]
    else:
        chosen = _listed(graph, policy.platforms)
    subjects = {m.descriptor.digest for m in chosen}
    return subjects | _attestations_of(graph, subjects)


def _images(graph: ImageGraph) -> list[ManifestNode]:
    """The image manifests of ``graph``: every manifest that is not an attestation."""
    return [m for m in graph.manifests() if not m.is_attestation]


def _attestations_of(graph: ImageGraph, subjects: set[str]) -> set[str]:
    """The complete attestations describing one of ``subjects``."""
    return {
        m.descriptor.digest
        for m in graph.manifests()
        if m.is_attestation and m.attests in subjects and graph.manifest_complete(m)
    }


def _require_complete(graph: ImageGraph) -> None:
    """``all`` takes nothing less than the whole graph; name what is missing."""
    if graph.complete:
        return
    absent = [m for m in graph.manifests() if not graph.manifest_complete(m)]
    what = (
        "platforms missing content: " + ", ".join(_describe(graph, m) for m in absent)
        if absent
        else f"image {graph.root.descriptor.digest} is missing content"
    )
    raise MissingContentError(
        f'{what} (use platforms = "available" or --platform available to push the rest)',
        [d.digest for d in graph.missing],
    )


def host_manifest(graph: ImageGraph, host: Platform) -> ManifestNode | None:
    """The first complete image manifest of ``graph`` for ``host``, if any."""
    for m in _images(graph):
        if graph.manifest_complete(m) and _matches(host, m.platform):
            return m
    return None


def _host_manifest(graph: ImageGraph, host: Platform) -> ManifestNode:
    """:func:`host_manifest`, or the refusal that names the platforms the image has."""
    found = host_manifest(graph, host)
    if found is not None:
        return found
    raise MissingContentError(
        f"no complete manifest for the host platform {host}; the image has "
        + (", ".join(str(p) for p in graph.platforms()) or "no platforms"),
        [],
    )


def _listed(graph: ImageGraph, wanted: tuple[Platform, ...]) -> list[ManifestNode]:
    """The complete image manifests of the listed platforms; each must have one."""
    images = _images(graph)
    for want in wanted:
        _require_listed(graph, images, want)
    return [
        m
        for m in images
        if graph.manifest_complete(m) and any(_matches(w, m.platform) for w in wanted)
    ]


def _require_listed(graph: ImageGraph, images: list[ManifestNode], want: Platform) -> None:
    candidates = [m for m in images if _matches(want, m.platform)]
    if not candidates:
        raise MissingContentError(f"the image has no {want} manifest", [])
    if not any(graph.manifest_complete(m) for m in candidates):
        raise MissingContentError(
            f"platform {want} is missing content",
            sorted({d.digest for d in graph.missing}),
        )


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


def _add_manifest(out: Selection, node: ManifestNode) -> None:
    assert node.manifest is not None and node.data is not None
    for blob in (node.manifest.config, *node.manifest.layers):
        out.blobs.setdefault(blob.digest, blob)
    if node.is_attestation:
        out.attestations += 1
    elif node.platform is not None:
        out.platforms.append(node.platform)
    out.children.append(SelectedManifest(node.descriptor, node.data))


def _add_index(
    out: Selection, graph: ImageGraph, node: IndexNode, kept: set[str]
) -> SelectedManifest | None:
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
    manifest = SelectedManifest(descriptor, data)
    out.children.append(manifest)
    return manifest


def _add_child(
    out: Selection, graph: ImageGraph, child: GraphNode, kept: set[str]
) -> Descriptor | None:
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
