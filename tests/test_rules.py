"""Rule matching and target templates."""

from __future__ import annotations

import pytest

from imagepushd.decide.rules import (
    Glob,
    Rule,
    check_template,
    match_image,
    push_target,
    render_target,
    source_reference,
)
from imagepushd.errors import InvalidReferenceError
from imagepushd.reference import parse_reference


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("registry.example.com/team/**", "registry.example.com/team/app:1.0", True),
        ("registry.example.com/team/**", "registry.example.com/team/sub/app:1", True),
        ("registry.example.com/team/*", "registry.example.com/team/app:1.0", True),
        ("registry.example.com/team/*", "registry.example.com/team/sub/app:1", False),
        ("registry.example.com/team/*", "registry.example.com/other/app:1", False),
        ("**:latest", "docker.io/library/alpine:latest", True),
        ("**:latest", "docker.io/library/alpine:3.19", False),
        ("*/team/app:?.0", "registry.example.com/team/app:1.0", True),
        ("*/team/app:?.0", "registry.example.com/team/app:10.0", False),
        ("docker.io/library/alpine:3.19", "docker.io/library/alpine:3.19", True),
        ("docker.io/library/alpine:3.19", "docker.io/library/alpine:3.199", False),
        ("a.b/c:1", "aXb/c:1", False),
        ("**", "anything/at/all:x", True),
    ],
)
def test_glob(pattern: str, name: str, expected: bool):
    assert Glob.compile(pattern).matches(name) is expected


@pytest.mark.parametrize("pattern", ["", "  ", "a/***", "a b"])
def test_bad_globs(pattern: str):
    with pytest.raises(ValueError):
        Glob.compile(pattern)


def test_render_targets():
    src = parse_reference("registry.example.com/team/app:1.0")
    assert str(render_target("{image}", src, "default")) == "registry.example.com/team/app:1.0"
    assert (
        str(render_target("mirror.example.com/{repository}:{tag}", src, "ns"))
        == "mirror.example.com/team/app:1.0"
    )
    assert (
        str(render_target("localhost:5000/{namespace}/{repository}-{tag}", src, "k8s.io"))
        == "localhost:5000/k8s.io/team/app-1.0:latest"
    )
    assert render_target("{registry}/x/y:z", src, "d").registry == "registry.example.com"
    with pytest.raises(InvalidReferenceError):
        render_target("mirror.example.com/{namespace}", src, "UPPER")


@pytest.mark.parametrize(
    "template", ["{img}", "{image", "mirror/{0}", "UPPER.example.com/{repository}:{tag}}", "a b"]
)
def test_bad_templates(template: str):
    with pytest.raises(ValueError):
        check_template(template)


def test_source_reference_skips_untagged_names():
    assert source_reference("alpine") is not None
    assert str(source_reference("alpine")) == "docker.io/library/alpine:latest"
    assert source_reference("sha256:" + "a" * 64) is None
    assert source_reference("docker.io/library/alpine@sha256:" + "a" * 64) is None
    assert source_reference("moby-dangling@sha256:" + "a" * 64) is None
    assert source_reference("Not A Name") is None


def rule(index: int, match: list[str], **kw: object) -> Rule:
    return Rule(index, tuple(Glob.compile(m) for m in match), **kw)  # type: ignore[arg-type]


def test_match_image_namespaces_excludes_and_dedup():
    rules = [
        rule(0, ["example.com/**"], exclude=(Glob.compile("**:latest"),)),
        rule(
            1,
            ["example.com/team/**"],
            namespaces=("k8s.io",),
            targets=("{image}", "mirror.io/{repository}:{tag}"),
        ),
    ]
    got = match_image(rules, "default", "example.com/team/app:1")
    assert [(m.rule, [str(t) for t in m.targets]) for m in got] == [(0, ["example.com/team/app:1"])]
    got = match_image(rules, "k8s.io", "example.com/team/app:1")
    # Rule 1's "{image}" target duplicates rule 0's and is listed once.
    assert [(m.rule, [str(t) for t in m.targets]) for m in got] == [
        (0, ["example.com/team/app:1"]),
        (1, ["mirror.io/team/app:1"]),
    ]
    assert match_image(rules, "default", "example.com/team/app:latest") == []
    assert match_image(rules, "default", "other.com/app:1") == []


@pytest.mark.parametrize(
    ("target", "source", "expected"),
    [
        (None, "docker.io/library/nginx:v1", "docker.io/library/nginx:v1"),
        ("gitea.corp.com/proj/", "docker.io/library/nginx:v1", "gitea.corp.com/proj/nginx:v1"),
        ("gitea.corp.com/proj/", "nginx:v1", "gitea.corp.com/proj/nginx:v1"),
        ("gitea.corp.com/", "ghcr.io/org/app:1", "gitea.corp.com/org/app:1"),
        ("localhost:5000/m/", "ghcr.io/org/app:1", "localhost:5000/m/org/app:1"),
        ("r.io/{namespace}/{repository}:{tag}", "ghcr.io/org/app:1", "r.io/k8s.io/org/app:1"),
        ("r.io/x/y:2", "not a valid name", "r.io/x/y:2"),  # a full TARGET needs no source
    ],
)
def test_push_targets(target: str | None, source: str, expected: str) -> None:
    assert str(push_target(target, source, "k8s.io")) == expected


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("r.io/{nope}:1", "unknown field {nope}"),
        ("R.io/Proj/", "invalid"),
        ("r.io/proj//", "empty component"),
    ],
)
def test_bad_push_targets(target: str, problem: str) -> None:
    with pytest.raises(InvalidReferenceError, match=problem):
        push_target(target, "docker.io/library/nginx:v1", "default")
