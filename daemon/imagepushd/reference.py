"""Image references, parsed and normalised the way docker and containerd do it.

The rules follow Go's ``github.com/distribution/reference`` (``ParseNormalizedNamed``
followed by ``TagNameOnly``) so that a name means here what it means to containerd, whose
image names are already in this form:

- ``alpine`` → ``docker.io/library/alpine:latest``; ``user/app`` → ``docker.io/user/app``.
- The first path component is a registry host only if it contains ``.`` or ``:``, is
  ``localhost``, or has an upper-case letter (upper case is illegal in repository paths,
  so Go reads ``Foo/bar`` as host ``Foo``). ``index.docker.io`` becomes ``docker.io``.
- Grammar: ``name[:tag][@digest]``; path components ``[a-z0-9]+`` joined by ``.``, ``_``,
  ``__`` or any run of ``-``; tag ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``.

Deliberate differences from Go (each checked against v0.6.0, all else agrees):

- The 255-character limit counts the whole name including the registry, as the OCI
  distribution spec words it; Go v0.6.0 counts only the path.
- Digest algorithms other than sha256/sha384/sha512 are accepted by grammar (the OCI
  grammar allows them) rather than refused as unregistered; those three are held to
  go-digest's exact length in lower-case hex.
- A first component that Go takes as a host but that is not a valid host
  (``foo_bar.com/x``) is refused: Go returns a reference with no registry, which cannot
  be pushed anywhere.
- ``familiar()`` keeps ``docker.io/`` (or ``library/``) where dropping it would change
  what the short form parses to.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from imagepushd.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
"""Docker Hub's name in normalised references."""

DOCKER_HUB_API = "registry-1.docker.io"
"""The host that actually serves Docker Hub's registry API."""

DEFAULT_TAG = "latest"
NAME_MAX = 255

_LEGACY_HUB = "index.docker.io"
_OFFICIAL_PREFIX = "library/"

# All patterns are ASCII-only and used with fullmatch: Python's \w and \d match Unicode and
# its $ matches before a trailing newline, where Go's do neither.
_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[a-fA-F0-9:]+\])"
_DOMAIN_RE = re.compile(rf"{_HOST}(?::[0-9]+)?", re.ASCII)
_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_PATH_CHARS_RE = re.compile(r"[a-z0-9._/-]*", re.ASCII)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(
    r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}", re.ASCII
)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}", re.ASCII)
# go-digest's registered algorithms: exact length, lower-case hex.
_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry, repository path, and tag and/or digest.

    Every instance is in normalised form (checked on construction), so ``str(ref)`` always
    parses back to an equal ``Reference``.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        text = _join(self.name, self.tag, self.digest)
        _check(text, self.registry, self.repository, self.tag, self.digest)
        if self.registry == _LEGACY_HUB:
            raise _invalid(text, f"registry {_LEGACY_HUB!r} is spelled {DOCKER_HUB!r}")
        if not _looks_like_host(self.registry):
            raise _invalid(
                text,
                f"registry {self.registry!r} would be read as a path component "
                "(a host has '.', ':' or upper case, or is 'localhost')",
            )
        if self.registry == DOCKER_HUB and "/" not in self.repository:
            raise _invalid(
                text, f"Docker Hub repository is spelled {_OFFICIAL_PREFIX + self.repository!r}"
            )

    @property
    def name(self) -> str:
        """Registry and repository: ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return _join(self.name, self.tag, self.digest)

    def familiar(self) -> str:
        """Docker's short form: ``alpine:latest``, ``user/app:1``, ``ghcr.io/x/y:1``.

        Unlike Go's ``FamiliarString``, keeps ``docker.io/`` when the first path component
        would otherwise be read as a host (``docker.io/foo.com/x``), and ``library/`` when
        the short form would be a bare 64-hex image ID, so the result always parses back.
        """
        name = self.name
        if self.registry == DOCKER_HUB:
            first = self.repository.split("/", 1)[0]
            if not _looks_like_host(first):
                name = self.repository
                short = name.removeprefix(_OFFICIAL_PREFIX)
                if "/" not in short and not (
                    self.tag is None and self.digest is None and _IDENTIFIER_RE.fullmatch(short)
                ):
                    name = short
        return _join(name, self.tag, self.digest)

    def with_tag(self, tag: str) -> Reference:
        """The same reference with ``tag`` (any digest is kept, as Go's ``WithTag`` does)."""
        return dataclasses.replace(self, tag=tag)

    def with_digest(self, digest: str) -> Reference:
        """The same reference pinned to ``digest`` (any tag is kept, as in ``WithDigest``)."""
        return dataclasses.replace(self, digest=digest)

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's is not ``docker.io``)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def tag_or_digest(self) -> str:
        """What goes in ``/v2/<repository>/manifests/<here>``: the digest if any, else the tag.

        The digest wins because it is what the caller pinned; a tag may have moved.
        """
        if self.digest is not None:
            return self.digest
        if self.tag is not None:
            return self.tag
        raise _invalid(str(self), "has neither a tag nor a digest")


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse and normalise an image reference, as ``docker pull`` would read it.

    ``default_tag`` is added only when neither a tag nor a digest is given; pass None to
    leave such a reference untagged. Raises ``InvalidReferenceError`` naming ``text`` and
    the first rule it breaks.
    """
    if not text:
        raise _invalid(text, "is empty")
    if _IDENTIFIER_RE.fullmatch(text):
        # Docker reads a bare 64-hex string as an image ID, never as a repository.
        raise _invalid(text, "cannot be a 64-character hexadecimal string (that is an image ID)")
    if text[0] in ":@":
        raise _invalid(text, "has no repository name before the tag or digest")
    registry, rest = _split_registry(text)
    name_part, at, digest = rest.partition("@")
    path, colon, tag = name_part.partition(":")
    ref_tag = tag if colon else None
    ref_digest = digest if at else None
    if ref_tag is None and ref_digest is None:
        ref_tag = default_tag
    try:
        return Reference(registry, path, ref_tag, ref_digest)  # checks the parts once
    except InvalidReferenceError:
        _check(text, registry, path, ref_tag, ref_digest)  # the same problem, named as typed
        raise


def _split_registry(text: str) -> tuple[str, str]:
    """Split off the registry, supplying Docker Hub and ``library/`` (``splitDockerDomain``)."""
    first, slash, rest = text.partition("/")
    if not slash:
        # A single component is always a Docker Hub name, even "localhost:5000" (name:tag).
        return DOCKER_HUB, _OFFICIAL_PREFIX + text
    if first == _LEGACY_HUB:
        registry = DOCKER_HUB
    elif _looks_like_host(first):
        registry = first
    else:
        registry, rest = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in rest:
        rest = _OFFICIAL_PREFIX + rest
    return registry, rest


def _looks_like_host(component: str) -> bool:
    """Go's test for "this first component is a host, not part of the path"."""
    return (
        component == "localhost"
        or any(c in component for c in ".:")
        or (component.lower() != component)
    )


def _check(text: str, registry: str, path: str, tag: str | None, digest: str | None) -> None:
    """Raise for the first rule the parts break; ``text`` is what the message names."""
    if not _DOMAIN_RE.fullmatch(registry):
        raise _invalid(text, f"{registry!r} is not a valid registry host")
    _check_path(text, path)
    if tag is not None and not _TAG_RE.fullmatch(tag):
        raise _invalid(
            text,
            f"invalid tag {tag!r} (want up to 128 of A-Z a-z 0-9 _ . -, not starting with . or -)",
        )
    if digest is not None:
        _check_digest(text, digest)
    name = f"{registry}/{path}"
    if len(name) > NAME_MAX:
        raise _invalid(text, f"name is {len(name)} characters long; the limit is {NAME_MAX}")


def _check_path(text: str, path: str) -> None:
    if not path:
        raise _invalid(text, "has no repository path")
    # A character that is wrong in any case is the real problem ("Bad Ref" has a space);
    # only then is an upper-case letter worth naming.
    bad = _PATH_CHARS_RE.match(path.lower())
    if bad is not None and bad.end() < len(path):
        raise _invalid(text, f"invalid character {path[bad.end()]!r} in repository path")
    if path.lower() != path:
        raise _invalid(text, f"repository name {path!r} must be lowercase")
    if path.startswith("/"):
        raise _invalid(text, f"repository path {path!r} starts with '/'")
    if path.endswith("/"):
        raise _invalid(text, f"repository path {path!r} ends with '/'")
    for component in path.split("/"):
        if not component:
            raise _invalid(text, f"repository path {path!r} has an empty component ('//')")
        if not _COMPONENT_RE.fullmatch(component):
            raise _invalid(
                text,
                f"invalid path component {component!r} (want lowercase letters and digits "
                "separated by one '.', one or two '_', or dashes)",
            )


def _check_digest(text: str, digest: str) -> None:
    if not _DIGEST_RE.fullmatch(digest):
        raise _invalid(text, f"invalid digest {digest!r} (want algorithm:hex, 32+ hex digits)")
    algorithm, _, encoded = digest.partition(":")
    if algorithm.lower() != algorithm:
        raise _invalid(text, f"digest algorithm {algorithm!r} must be lowercase")
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is not None and (len(encoded) != length or encoded.lower() != encoded):
        raise _invalid(text, f"invalid {algorithm} digest (want {length} lower-case hex digits)")


def _join(name: str, tag: str | None, digest: str | None) -> str:
    return (
        name + (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest is not None else "")
    )


def _invalid(text: str, problem: str) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid image reference {text!r}: {problem}")
