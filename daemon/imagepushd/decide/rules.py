"""Rules: which images to push where. Pure functions over names, no I/O.

Globs match the normalised reference ``host/path:tag``: ``*`` stays within one ``/``-separated
segment, ``**`` crosses segments, ``?`` is one character of a segment. Targets are templates
over ``{image}``, ``{registry}``, ``{repository}``, ``{tag}`` and ``{namespace}``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

from imagepushd.errors import InvalidReferenceError
from imagepushd.reference import DOCKER_HUB, Reference, parse_reference

_CONFIG_NAME = re.compile(r"sha256:[0-9a-f]{64}")
TEMPLATE_FIELDS = ("image", "registry", "repository", "tag", "namespace")


@dataclass(frozen=True)
class Glob:
    """A compiled name pattern."""

    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, pattern: str) -> Glob:
        """Compile ``pattern``; raise ValueError naming the problem."""
        if not pattern.strip():
            raise ValueError("empty pattern")
        if "***" in pattern:
            raise ValueError(f"{pattern!r}: '***' is not a pattern (use '**')")
        if any(c.isspace() for c in pattern):
            raise ValueError(f"{pattern!r}: patterns cannot contain white space")
        out = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out.append(".*")
                i += 2
            elif pattern[i] == "*":
                out.append("[^/]*")
                i += 1
            elif pattern[i] == "?":
                out.append("[^/]")
                i += 1
            else:
                out.append(re.escape(pattern[i]))
                i += 1
        return cls(pattern, re.compile("".join(out)))

    def matches(self, name: str) -> bool:
        """Whether the whole ``name`` matches."""
        return self.regex.fullmatch(name) is not None


def check_template(template: str) -> None:
    """Raise ValueError if ``template`` is malformed or yields an invalid reference."""
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{template!r}: {exc}") from None
    for name in fields:
        if name not in TEMPLATE_FIELDS:
            raise ValueError(
                f"{template!r}: unknown field {{{name}}} (use {', '.join(TEMPLATE_FIELDS)})"
            )
    sample = parse_reference("registry.example.com/team/app:1.0")
    try:
        render_target(template, sample, "default")
    except InvalidReferenceError as exc:
        raise ValueError(f"{template!r}: {exc}") from None


def render_target(template: str, source: Reference, namespace: str) -> Reference:
    """The target reference for ``source`` (a tagged reference) under ``template``."""
    text = template.format(
        image=str(source),
        registry=source.registry,
        repository=source.repository,
        tag=source.tag or "latest",
        namespace=namespace,
    )
    return parse_reference(text)


def push_target(target: str | None, source_name: str, namespace: str) -> Reference:
    """``imagepushd push``'s TARGET for ``source_name``: a reference, a template, a prefix.

    None pushes to the source's own name; a full reference needs no valid source name. A
    TARGET with ``{...}`` fields is a template, as a rule's ``target``. A TARGET ending in
    ``/`` is a prefix, as docker-image-pusher's ``--target`` (this project's ancestor): the
    source's path (Docker Hub's ``library/`` dropped) and tag go under it, so
    ``docker.io/nginx:v1`` with ``mirror.example.com/proj/`` goes to
    ``mirror.example.com/proj/nginx:v1``, and ``ghcr.io/org/app:1`` to
    ``mirror.example.com/proj/org/app:1`` (the whole path, so two sources never collide).
    """
    if target is None or not (target.endswith("/") or "{" in target):
        return parse_reference(target or source_name)
    source = parse_reference(source_name)
    if target.endswith("/"):
        path = source.repository
        if source.registry == DOCKER_HUB:
            path = path.removeprefix("library/")
        tag = source.tag or "latest"
        return parse_reference(f"{target}{path}:{tag}")
    try:
        check_template(target)
    except ValueError as exc:
        raise InvalidReferenceError(f"TARGET {exc}") from None
    return render_target(target, source, namespace)


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``: what to match, in which namespaces, and where to push it.

    ``referrers``: also push the signatures, attestations and SBOMs in containerd that refer
    to a pushed image (``referrers.py``).
    """

    index: int
    match: tuple[Glob, ...]
    exclude: tuple[Glob, ...] = ()
    namespaces: tuple[str, ...] | None = None
    targets: tuple[str, ...] = ("{image}",)
    referrers: bool = False

    def selects(self, namespace: str, name: str) -> bool:
        """Whether the image ``name`` (normalised) in ``namespace`` falls under this rule."""
        if self.namespaces is not None and namespace not in self.namespaces:
            return False
        if not any(g.matches(name) for g in self.match):
            return False
        return not any(g.matches(name) for g in self.exclude)


def source_reference(name: str) -> Reference | None:
    """The normalised tagged reference of a containerd image name, or None if it has none.

    CRI's ``sha256:<config>`` and ``repo@digest`` names, Docker's ``moby-dangling@...`` and
    anything unparseable are not pushable sources: the tagged name of the same image is.
    """
    if "@" in name or _CONFIG_NAME.fullmatch(name):
        return None
    try:
        ref = parse_reference(name)
    except InvalidReferenceError:
        return None
    return ref if ref.tag is not None else None


@dataclass(frozen=True)
class Match:
    """A rule selecting an image, with the targets it renders to."""

    rule: int
    targets: tuple[Reference, ...]


def match_image(rules: Sequence[Rule], namespace: str, name: str) -> list[Match]:
    """Every rule that selects the image, with rendered targets (each target once overall)."""
    source = source_reference(name)
    if source is None:
        return []
    normalised = str(source)
    seen: set[str] = set()
    out: list[Match] = []
    for rule in rules:
        if not rule.selects(namespace, normalised):
            continue
        targets = []
        for template in rule.targets:
            target = render_target(template, source, namespace)
            if str(target) not in seen:
                seen.add(str(target))
                targets.append(target)
        if targets:
            out.append(Match(rule.index, tuple(targets)))
    return out
