"""Reference parsing against distribution/reference's own test tables, plus round trips.

Cases come from normalize_test.go and reference_test.go (v0.6.0), read through
ParseNormalizedNamed + TagNameOnly, which is what ``parse_reference`` mirrors. Where this
module deliberately differs from Go the case says so.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagepushd.errors import ImagepushdError, InvalidReferenceError
from imagepushd.reference import Reference, parse_reference

F64 = "f" * 64
DBCC = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
BUSYBOX = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
HEX64 = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
SONG = "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev"
HUB = "docker.io"

# input, registry, repository, tag, digest
VALID: list[tuple[str, str, str, str | None, str | None]] = [
    ("alpine", HUB, "library/alpine", "latest", None),
    ("library/alpine", HUB, "library/alpine", "latest", None),
    ("docker.io/alpine", HUB, "library/alpine", "latest", None),
    ("index.docker.io/alpine", HUB, "library/alpine", "latest", None),
    ("docker.io/library/alpine", HUB, "library/alpine", "latest", None),
    ("localhost/foo", "localhost", "foo", "latest", None),
    ("localhost:5000/foo:1", "localhost:5000", "foo", "1", None),
    (f"127.0.0.1:5000/a/b@sha256:{DBCC}", "127.0.0.1:5000", "a/b", None, f"sha256:{DBCC}"),
    ("[::1]:5000/foo", "[::1]:5000", "foo", "latest", None),
    ("foo__bar", HUB, "library/foo__bar", "latest", None),
    ("foo:" + "t" * 128, HUB, "library/foo", "t" * 128, None),
    # normalize_test.go TestValidateReferenceName / TestValidateRemoteName
    ("docker/docker", HUB, "docker/docker", "latest", None),
    ("debian", HUB, "library/debian", "latest", None),
    ("index.docker.io/docker/docker", HUB, "docker/docker", "latest", None),
    ("127.0.0.1:5000/library/debian", "127.0.0.1:5000", "library/debian", "latest", None),
    ("192.168.0.1", HUB, "library/192.168.0.1", "latest", None),  # no '/': never a host
    ("192.168.0.1:80", HUB, "library/192.168.0.1", "80", None),  # ... so ':80' is a tag
    ("192.168.0.1:8/debian", "192.168.0.1:8", "debian", "latest", None),
    (SONG, HUB, f"library/{SONG}", "latest", None),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker", "latest", None),
    (
        "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
        "[fc00:1:2:3:4:5:6:7]:5000",
        "library/debian",
        "latest",
        None,
    ),
    (f"docker.io/{HEX64}", HUB, f"library/{HEX64}", "latest", None),
    ("Docker/docker", "Docker", "docker", "latest", None),  # upper case makes it a host
    ("DOCKER/docker", "DOCKER", "docker", "latest", None),
    ("LOCALDOMAIN/library/debian", "LOCALDOMAIN", "library/debian", "latest", None),
    ("localhost/library/debian", "localhost", "library/debian", "latest", None),
    ("docker---rules/docker", HUB, "docker---rules/docker", "latest", None),
    ("d/docker", HUB, "d/docker", "latest", None),
    ("dock__er/docker", HUB, "dock__er/docker", "latest", None),
    # TestParseRepositoryInfo / TestNormalizedSplitHostname
    ("library/foo/bar", HUB, "library/foo/bar", "latest", None),
    ("store/foo/bar", HUB, "store/foo/bar", "latest", None),
    ("Foo/bar", "Foo", "bar", "latest", None),
    ("test_com/foo", HUB, "test_com/foo", "latest", None),
    ("test.com:8080/foo", "test.com:8080", "foo", "latest", None),
    ("test-com:8080/foo", "test-com:8080", "foo", "latest", None),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None),
    ("index.docker.io/library/ubuntu-12.04-base", HUB, "library/ubuntu-12.04-base", "latest", None),
    # reference_test.go TestReferenceParse
    ("test.com:tag", HUB, "library/test.com", "tag", None),
    ("test.com:5000", HUB, "library/test.com", "5000", None),
    ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
    (f"test:5000/repo@sha256:{F64}", "test:5000", "repo", None, f"sha256:{F64}"),
    (f"test:5000/repo:tag@sha256:{F64}", "test:5000", "repo", "tag", f"sha256:{F64}"),
    ("lowercase:Uppercase", HUB, "library/lowercase", "Uppercase", None),
    (
        "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
        "sub-dom1.foo.com",
        "bar/baz/quux",
        "some-long-tag",
        None,
    ),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
        None,
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", None),
    (
        "xn--7o8h.com/myimage:xn--7o8h.com@sha512:" + "f" * 128,
        "xn--7o8h.com",
        "myimage",
        "xn--7o8h.com",
        "sha512:" + "f" * 128,
    ),
    ("foo_bar.com:8080", HUB, "library/foo_bar.com", "8080", None),
    ("foo/foo_bar.com:8080", HUB, "foo/foo_bar.com", "8080", None),
    ("192.168.1.1/repo", "192.168.1.1", "repo", "latest", None),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", "latest", None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", None),
    (
        f"[2001:db8::1]:5000/repo:tag@sha256:{F64}",
        "[2001:db8::1]:5000",
        "repo",
        "tag",
        f"sha256:{F64}",
    ),
    # TestParseAnyReference / TestParseReferenceWithTagAndDigest
    (f"redis@sha256:{DBCC}", HUB, "library/redis", None, f"sha256:{DBCC}"),
    (f"busybox:latest@sha256:{BUSYBOX}", HUB, "library/busybox", "latest", f"sha256:{BUSYBOX}"),
    (DBCC[:-1], HUB, f"library/{DBCC[:-1]}", "latest", None),  # 63 hex is a name
    ("dbcc1", HUB, "library/dbcc1", "latest", None),
    ("a:1/b", "a:1", "b", "latest", None),  # ':' makes "a:1" a host (port 1), not a tag
    # Only the bare 64-hex string is refused; with a tag it is a name.
    (f"{HEX64}:v1", HUB, f"library/{HEX64}", "v1", None),
    # 255 characters of name including the registry is the limit.
    ("example.com/" + "a" * 243, "example.com", "a" * 243, "latest", None),
    ("a" * 237, HUB, "library/" + "a" * 237, "latest", None),
    # Deliberate: Go refuses algorithms go-digest has not registered; any grammatical one
    # passes here.
    (f"validname@invaliddigest:{F64}", HUB, "library/validname", None, f"invaliddigest:{F64}"),
    ("a@multi+part.alg:" + "A0" * 16, HUB, "library/a", None, "multi+part.alg:" + "A0" * 16),
]

# input, a fragment the message must contain
INVALID: list[tuple[str, str]] = [
    ("", "is empty"),
    ("example.com/FOO", "must be lowercase"),
    ("Foo", "must be lowercase"),
    ("foo:bad:tag", "invalid tag"),
    ("foo@sha256:short", "invalid digest"),
    ("a" * 256, "limit is 255"),
    ("foo:" + "t" * 129, "invalid tag"),
    ("foo/", "ends with '/'"),
    ("/foo", "starts with '/'"),
    ("foo//bar", "empty component"),
    ("foo___bar", "invalid path component"),
    ("foo.-bar", "invalid path component"),
    # normalize_test.go
    ("https://github.com/docker/docker", "registry host"),
    ("docker/Docker", "must be lowercase"),
    ("-docker", "invalid path component"),
    ("-docker/docker", "invalid path component"),
    ("-docker.io/docker/docker", "registry host"),
    ("docker///docker", "empty component"),
    ("docker.io/docker/Docker", "must be lowercase"),
    ("docker.io/docker///docker", "empty component"),
    ("[fc00::1]", "invalid character"),
    ("[fc00::1]:5000", "invalid character"),
    ("fc00::1:5000/debian", "registry host"),
    ("[fe80::1%eth0]:5000/debian", "registry host"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "registry host"),
    (HEX64, "64-character hexadecimal"),
    ("docker-/docker", "invalid path component"),
    ("-docker-/docker", "invalid path component"),
    ("____/____", "invalid path component"),
    ("_docker/_docker", "invalid path component"),
    # A first component with "." is a host to Go too, so these fail as hosts.
    ("dock..er/docker", "registry host"),
    ("dock_.er/docker", "registry host"),
    ("dock-.er/docker", "registry host"),
    ("docker/", "ends with '/'"),
    ("this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255" * 4 + "/docker", "255"),
    # reference_test.go
    (":justtag", "has no repository name"),
    (f"@sha256:{F64}", "has no repository name"),
    ("repo@sha256:" + "f" * 34, "invalid sha256 digest"),
    ("Uppercase:tag", "must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "must be lowercase"),
    ("aa/asdf$$^/aa", "invalid character '$'"),
    ("[2001:db8::1]:tag", "invalid character"),
    ("[fe80::1%@invalidzone]:5000/repo", "registry host"),
    ("domain/" + "a" * 256 + ":tag", "limit is 255"),
    # Go v0.6.0 counts only the path (255 here); this module counts the whole name (265).
    ("a/" * 127 + "a:tag-puts-this-over-max", "limit is 255"),
    ("example.com/" + "a" * 244, "limit is 255"),
    ("a" * 238, "limit is 255"),
    # Tag and digest details.
    ("foo:", "invalid tag"),
    ("foo:-tag", "invalid tag"),
    ("foo:.tag", "invalid tag"),
    ("foo:tag\u00e9", "invalid tag"),  # \w is ASCII in Go
    ("foo@", "invalid digest"),
    ("foo@sha256:" + "F" * 64, "invalid sha256 digest"),  # registered: lower-case only
    ("foo@sha512:" + "f" * 64, "invalid sha512 digest"),
    ("foo@SHA256:" + "f" * 64, "digest algorithm 'SHA256' must be lowercase"),
    ("foo:1@sha256:" + "f" * 64 + "@x", "invalid digest"),
    # Go hands back a reference with an empty domain here; there is nowhere to push it.
    ("foo_bar.com/x", "'foo_bar.com' is not a valid registry host"),
    ("alpine\n", "invalid character"),  # Python's $ would accept the newline
    (" alpine", "invalid character"),
    ("localhost/", "has no repository path"),
    ("@a/b", "has no repository name"),
    # The character wrong in any case is named, not the upper-case letter before it.
    ("Bad Ref::x@@", "invalid character ' '"),
    ("Team/App Name:1", "invalid character ' '"),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID)
def test_valid(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert parse_reference(str(ref)) == ref
    assert parse_reference(ref.familiar()) == ref


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_invalid(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)
    message = str(caught.value)
    assert message.startswith(f"invalid image reference {text!r}: ")
    assert fragment in message
    assert "\n" not in message


def test_tables_are_large_enough() -> None:
    assert len(VALID) + len(INVALID) >= 40


def test_error_is_usage_class() -> None:
    assert issubclass(InvalidReferenceError, ImagepushdError)
    assert InvalidReferenceError.exit_code == 2


@pytest.mark.parametrize(
    ("text", "full", "familiar"),
    [
        ("alpine", "docker.io/library/alpine:latest", "alpine:latest"),
        ("user/app:1", "docker.io/user/app:1", "user/app:1"),
        ("ghcr.io/x/y:1", "ghcr.io/x/y:1", "ghcr.io/x/y:1"),
        ("library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
        ("other/library", "docker.io/other/library:latest", "other/library:latest"),
        (
            f"busybox:latest@sha256:{BUSYBOX}",
            f"docker.io/library/busybox:latest@sha256:{BUSYBOX}",
            f"busybox:latest@sha256:{BUSYBOX}",
        ),
        (f"redis@sha256:{DBCC}", f"docker.io/library/redis@sha256:{DBCC}", f"redis@sha256:{DBCC}"),
        ("127.0.0.1:8000/private/moonbase", *["127.0.0.1:8000/private/moonbase:latest"] * 2),
        ("Foo/bar", "Foo/bar:latest", "Foo/bar:latest"),
        # Go's FamiliarString would drop docker.io/ and so name another registry.
        ("docker.io/foo.com/x", "docker.io/foo.com/x:latest", "docker.io/foo.com/x:latest"),
        ("docker.io/localhost/x", "docker.io/localhost/x:latest", "docker.io/localhost/x:latest"),
        ("docker.io/library/foo.com", "docker.io/library/foo.com:latest", "foo.com:latest"),
    ],
)
def test_str_and_familiar(text: str, full: str, familiar: str) -> None:
    ref = parse_reference(text)
    assert str(ref) == full
    assert ref.familiar() == familiar


def test_name_api_host_and_manifest_reference() -> None:
    hub = parse_reference("alpine")
    assert hub.name == "docker.io/library/alpine"
    assert hub.api_host == "registry-1.docker.io"
    assert hub.tag_or_digest == "latest"
    local = parse_reference(f"localhost:5000/a/b:1@sha256:{DBCC}")
    assert local.api_host == "localhost:5000"
    assert local.tag_or_digest == f"sha256:{DBCC}"


def test_default_tag() -> None:
    assert parse_reference("alpine", default_tag=None).tag is None
    assert parse_reference("alpine", default_tag="edge").tag == "edge"
    assert parse_reference("alpine:3", default_tag="edge").tag == "3"
    assert parse_reference(f"alpine@sha256:{DBCC}").tag is None
    bare = parse_reference(f"docker.io/library/{HEX64}", default_tag=None)
    assert str(bare) == f"docker.io/library/{HEX64}"
    assert bare.familiar() == f"library/{HEX64}"  # the bare hex would be an image ID
    with pytest.raises(InvalidReferenceError, match="neither a tag nor a digest"):
        _ = bare.tag_or_digest
    with pytest.raises(InvalidReferenceError, match="invalid tag"):
        parse_reference("alpine", default_tag="-x")


def test_with_tag_and_digest() -> None:
    ref = parse_reference("example.com/app:1")
    pinned = ref.with_digest(f"sha256:{DBCC}")
    assert str(pinned) == f"example.com/app:1@sha256:{DBCC}"
    assert str(pinned.with_tag("2")) == f"example.com/app:2@sha256:{DBCC}"
    assert ref.with_tag("TAG5").tag == "TAG5"
    with pytest.raises(InvalidReferenceError, match="invalid tag"):
        ref.with_tag("-foo")
    with pytest.raises(InvalidReferenceError, match="invalid digest"):
        ref.with_digest("foo")


@pytest.mark.parametrize(
    ("registry", "repository", "fragment"),
    [
        ("index.docker.io", "library/x", "is spelled 'docker.io'"),
        ("docker.io", "x", "is spelled 'library/x'"),
        ("myhost", "x", "would be read as a path component"),
        ("example.com", "X", "must be lowercase"),
        ("exa_mple.com", "x", "not a valid registry host"),
    ],
)
def test_constructor_insists_on_normalised_form(
    registry: str, repository: str, fragment: str
) -> None:
    with pytest.raises(InvalidReferenceError, match=fragment):
        Reference(registry, repository, "latest")


# ---- round trips -----------------------------------------------------------------------

_ALNUM = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
_SEPARATOR = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def _components(draw: st.DrawFn) -> str:
    parts = [draw(_ALNUM)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_SEPARATOR), draw(_ALNUM)]
    return "".join(parts)


_LABEL = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
_PORT = st.integers(0, 99999).map(lambda port: f":{port}")
_HOSTS = st.one_of(
    st.just("docker.io"),
    st.sampled_from(["localhost", "[::1]", "[fc00:1:2:3:4:5:6:7]", "[2001:db8::]"]),
    st.lists(_LABEL, min_size=2, max_size=3).map(".".join),
    _LABEL.filter(lambda label: label.lower() != label),
    _LABEL,  # only with a port
)


@st.composite
def _registries(draw: st.DrawFn) -> str:
    host = draw(_HOSTS.filter(lambda host: host != "index.docker.io"))
    if ("." not in host and host.lower() == host and host != "localhost") or draw(st.booleans()):
        host += draw(_PORT)
    return host


_TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", fullmatch=True)
_DIGEST = st.one_of(
    st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True),
    st.from_regex(r"sha512:[a-f0-9]{128}", fullmatch=True),
    st.from_regex(
        r"[a-z][a-z0-9]{0,5}(?:[-_+.][a-z][a-z0-9]{0,5})?:[0-9a-fA-F]{32,70}", fullmatch=True
    ).filter(lambda d: d.partition(":")[0] not in ("sha256", "sha384", "sha512")),
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = draw(_registries())
    repository = "/".join(draw(st.lists(_components(), min_size=1, max_size=4)))
    if registry == "docker.io" and "/" not in repository:
        repository = "library/" + repository
    if draw(st.booleans()):
        repository = f"{HEX64}/{repository}" if draw(st.booleans()) else repository
    tag = draw(st.none() | _TAG)
    digest = draw(st.none() | _DIGEST)
    if len(f"{registry}/{repository}") > 255:
        repository = repository[: 255 - len(registry) - 1].rstrip("._-/")
    return Reference(registry, repository, tag, digest)


@given(references())
def test_round_trip(ref: Reference) -> None:
    assert parse_reference(str(ref), default_tag=None) == ref
    assert parse_reference(ref.familiar(), default_tag=None) == ref
    if ref.tag is not None or ref.digest is not None:
        assert parse_reference(str(ref)) == ref
        assert parse_reference(ref.familiar()) == ref
