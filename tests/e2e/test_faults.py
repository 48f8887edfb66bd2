"""``imagepushd push`` through a fault-injecting proxy in front of a real docker-registry.

Every push goes to ``PROXYHOST/repo:tag`` with ``--plain-http`` (pings, HEADs, mounts and
uploads all pass the proxy, see tests/support/faultproxy.py); every pushed image is then
checked directly against the registry, not through the proxy: ``skopeo inspect --raw`` must
serve the source digest and ``skopeo copy --all`` must pull it (every blob verified) into an
OCI layout. Byte counts and timestamps come from the proxy's request log.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd
from tests.support.faultproxy import FaultProxy, describe
from tests.support.images import Blob, ImageBuilder
from tests.support.process import require_tools
from tests.support.registry import Registry
from tests.support.tokenserver import TokenServer

pytestmark = pytest.mark.e2e

MiB = 1 << 20
UPLOADS = r"/blobs/uploads/"


def push(
    containerd: Containerd,
    image: str,
    target: str,
    *args: str,
    home: Path,
    env: Mapping[str, str] | None = None,
    stdin: str = "",
) -> Outcome:
    """Run ``imagepushd push IMAGE TARGET --plain-http --json ARGS`` in-process."""
    argv = ["push", image, target, "--root", str(containerd.root), "--plain-http", "--json"]
    return run_cli([*argv, *args], home=home, env=env, stdin=stdin)


def load(containerd: Containerd, b: ImageBuilder, tmp_path: Path, name: str, root: Blob) -> None:
    """Import ``root`` as ``name`` into containerd through an OCI archive."""
    archive = tmp_path / "images.tar"
    b.write_oci_archive(archive, {name: root})
    containerd.import_archive(archive)


# ---------------------------------------------------------------------- connection resets


def test_reset_in_the_middle_of_a_patch_body(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """A PATCH body cut after 1.5 MiB: the client asks GET status, then needs a new session.

    distribution 2.8 keeps the 1.5 MiB it received, which the HMAC-signed ``_state`` of the
    session's newest Location does not cover: every later request on that session, the GET
    status included, answers 404 BLOB_UPLOAD_INVALID and cancels it. No client can resume
    such a session; the right move is one new session, and that is what is checked here.
    """
    b = image_builder
    big = b.layer_file(tmp_path / "big.layer", 24 * MiB, "reset/big")
    root = b.manifest([big, b.layer(1000, "reset/small")])
    load(containerd, b, tmp_path, "example.com/reset:1", root)
    # The third 4 MiB chunk (bytes 8-12 MiB) is cut after 1.5 MiB.
    cut = 3 * MiB // 2
    rule = proxy.reset_body(method="PATCH", nth=3, after=cut)

    outcome = push(
        containerd,
        "example.com/reset:1",
        f"{proxy.host}/reset:1",
        "--chunk-size",
        "4MiB",
        home=tmp_path,
    )

    records = proxy.records
    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("reset:1", root.digest, tmp_path)
    assert rule.fired == 1
    reset = next(r for r in records if r.fault == "reset")
    assert reset.body_bytes == cut
    # First the client asks where the session stands...
    following = sorted(
        (r for r in records if r.started > reset.answered and r.path == reset.path),
        key=lambda r: r.started,
    )
    assert [(r.method, r.status) for r in following[:1]] == [("GET", 404)], log
    assert "PATCH" not in {r.method for r in following}, log
    # ...then uploads the whole blob once more in exactly one new session.
    sessions = list(dict.fromkeys(r.path for r in proxy.requests("PATCH")))
    assert len(sessions) == 2, log
    assert proxy.body_bytes("PATCH", sessions[1]) == big.size
    sent = proxy.body_bytes("PATCH") + proxy.body_bytes("PUT", big.hex)
    assert sent == big.size + 8 * MiB + cut
    print(f"PATCH reset at 9.5 MiB: {sent / big.size:.3f} x the blob size forwarded")


def test_default_chunks_and_a_cut_at_five_eighths_of_the_layer(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Default (adaptive) chunks of a 40 MiB layer, the connection cut 25 MiB into it.

    The chunks start at 8 MiB and stay within a quarter of the layer. distribution 2.8 then
    refuses the cut session (404 BLOB_UPLOAD_INVALID: it kept the partial bytes, which its
    signed ``_state`` does not cover), so the 25 MiB sent into it are lost whatever the chunk
    size, and the least any client can send is 25 + 40 MiB (1.625x; a registry that reports
    what it kept, like distribution 3.x, would cost 1.0x, see tests/test_upload.py). Checked:
    exactly that, in one new session, nothing more.
    """
    b = image_builder
    size = 40 * MiB
    big = b.layer_file(tmp_path / "big.layer", size, "adaptive/big")
    root = b.manifest([big, b.layer(1000, "adaptive/small")])
    load(containerd, b, tmp_path, "example.com/adaptive:1", root)
    cut = size * 5 // 8
    rule = proxy.reset_at_total(cut, method="PATCH")

    outcome = push(containerd, "example.com/adaptive:1", f"{proxy.host}/adaptive:1", home=tmp_path)

    records = proxy.records
    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("adaptive:1", root.digest, tmp_path)
    assert rule.fired == 1
    patches = sorted(proxy.requests("PATCH"), key=lambda r: r.started)
    sessions = list(dict.fromkeys(r.path for r in patches))
    assert len(sessions) == 2, log
    for session in sessions:
        chunks = [r.received_bytes for r in patches if r.path == session and r.status == 202]
        assert chunks[0] == 8 * MiB, log
        assert max(chunks) <= size // 4, log
    reset = next(r for r in records if r.fault == "reset")
    following = [r for r in records if r.started > reset.answered and r.path == reset.path]
    assert [(r.method, r.status) for r in following] == [("GET", 404)], log
    sent = proxy.body_bytes("PATCH") + proxy.body_bytes("PUT", big.hex)
    print(
        f"adaptive chunks, cut at {cut / MiB:.0f} of {size / MiB:.0f} MiB: {sent / MiB:.1f} MiB "
        f"sent = {sent / size:.3f} x the layer; chunks {[r.body_bytes // MiB for r in patches]}"
    )
    assert proxy.body_bytes("PATCH", sessions[1]) == size
    assert sent == cut + size


def test_reset_before_any_patch_byte_resumes_the_session(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """A PATCH cut before its first body byte: GET status and resume, nothing sent twice."""
    b = image_builder
    big = b.layer_file(tmp_path / "big.layer", 24 * MiB, "resume/big")
    root = b.manifest([big, b.layer(1000, "resume/small")])
    load(containerd, b, tmp_path, "example.com/resume:1", root)
    rule = proxy.reset_body(method="PATCH", nth=3, after=0)

    outcome = push(
        containerd,
        "example.com/resume:1",
        f"{proxy.host}/resume:1",
        "--chunk-size",
        "4MiB",
        home=tmp_path,
    )

    records = proxy.records
    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("resume:1", root.digest, tmp_path)
    assert rule.fired == 1
    reset = next(r for r in records if r.fault == "reset")
    status = min(
        (r for r in records if r.started > reset.answered and r.path == reset.path),
        key=lambda r: r.started,
    )
    assert (status.method, status.status) == ("GET", 204), log
    assert len({r.path for r in proxy.requests("PATCH")}) == 1, log  # one session
    sent = proxy.body_bytes("PATCH") + proxy.body_bytes("PUT", big.hex)
    print(f"PATCH reset before its body: {sent / big.size:.3f} x the blob size forwarded")
    assert sent < 1.25 * big.size
    assert sent == big.size


def test_reset_during_a_monolithic_put(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    small = b.layer(MiB, "put/small")
    root = b.manifest([small, b.layer(1000, "put/tiny")])
    load(containerd, b, tmp_path, "example.com/put:1", root)
    rule = proxy.reset_body(method="PUT", match=small.hex, after=256 << 10)

    outcome = push(containerd, "example.com/put:1", f"{proxy.host}/put:1", home=tmp_path)

    log = describe(proxy.records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("put:1", root.digest, tmp_path)
    assert rule.fired == 1
    puts = proxy.requests("PUT", small.hex)
    assert (puts[0].status, puts[0].body_bytes) == (0, 256 << 10), log
    assert (puts[-1].status, puts[-1].body_bytes) == (201, MiB), log
    # It completed in a new session (the cut one holds bytes its signed state does not cover,
    # so distribution refuses it from then on), and without a retry storm.
    assert puts[-1].path != puts[0].path
    assert len(puts) <= 3, log
    assert proxy.body_bytes("PUT", small.hex) <= (256 << 10) + 2 * MiB


def test_lost_answer_to_the_closing_put(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """The registry commits the blob but its 201 is lost: the client must not upload again,
    and the blob still counts as pushed (with its bytes) in the result."""
    b = image_builder
    big = b.layer(3 * MiB, "lost/big")
    root = b.manifest([big, b.layer(1000, "lost/small")])
    load(containerd, b, tmp_path, "example.com/lost:1", root)
    rule = proxy.drop_answer(method="PUT", match=big.hex)

    outcome = push(
        containerd,
        "example.com/lost:1",
        f"{proxy.host}/lost:1",
        "--chunk-size",
        "1MiB",
        home=tmp_path,
    )

    log = describe(proxy.records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("lost:1", root.digest, tmp_path)
    assert rule.fired == 1
    # Nothing was uploaded twice: the retried PUT finds the session gone, a HEAD finds the blob.
    assert proxy.body_bytes("PATCH") == big.size, log
    assert len(proxy.requests("POST")) == 3, log
    result = outcome.result
    assert result["bytes_sent"] >= big.size
    assert (result["pushed_blobs"], result["skipped_blobs"]) == (3, 0), result
    print("lost 201:", json.dumps(result))


# ---------------------------------------------------------------------- error answers


def test_random_5xx_answers(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """500/502/503 to ~20% of requests (seeded; one blob at a time, so always the same ones)."""
    b = image_builder
    big = b.layer(6 * MiB, "5xx/big")
    root = b.manifest([big, b.layer(300_000, "5xx/a"), b.layer(2000, "5xx/b")])
    load(containerd, b, tmp_path, "example.com/flaky:1", root)
    # One PATCH fails for sure, whatever the RNG does; then ~20% of everything.
    patch = proxy.respond(503, method="PATCH", nth=5)
    rule = proxy.fail_randomly(0.2, (500, 502, 503))

    outcome = push(
        containerd,
        "example.com/flaky:1",
        f"{proxy.host}/flaky:1",
        "--chunk-size",
        "1MiB",
        "--concurrency",
        "1",
        home=tmp_path,
    )

    records = proxy.records
    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("flaky:1", root.digest, tmp_path)
    injected = [r for r in records if r.fault and r.fault.startswith("respond-")]
    print(f"5xx: {len(injected)} of {len(records)} requests failed: {outcome.seconds:.1f}s")
    assert len(injected) == rule.fired + patch.fired, log
    assert patch.fired == 1 and rule.fired >= 4, log
    assert {r.status for r in injected} <= {500, 502, 503}
    # A refused PATCH never reached the registry: the client resumed from GET status and no
    # chunk was forwarded twice.
    assert proxy.body_bytes("PATCH") == big.size, log


def test_429_retry_after_on_the_first_three_posts(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    root = b.image([3000, 200_000], "429")  # config + 2 layers: 3 blobs, 3 workers
    load(containerd, b, tmp_path, "example.com/busy:1", root)
    rule = proxy.respond(429, method="POST", first=3, headers={"Retry-After": "1"})

    outcome = push(containerd, "example.com/busy:1", f"{proxy.host}/busy:1", home=tmp_path)

    log = describe(proxy.records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    registry.verify_image("busy:1", root.digest, tmp_path)
    posts = proxy.requests("POST")
    refused = [r for r in posts if r.status == 429]
    retried = [r for r in posts if r.status != 429]
    assert rule.fired == len(refused) == 3
    assert len(retried) == 3
    assert max(r.started for r in refused) < min(r.started for r in retried)
    # Each blob's retry came at least Retry-After after its 429 (pairing sorted lists is
    # enough: if each retry waited its second, the k-th earliest retry did too).
    waits = [
        retry.started - answer.answered
        for answer, retry in zip(
            sorted(refused, key=lambda r: r.answered),
            sorted(retried, key=lambda r: r.started),
            strict=True,
        )
    ]
    print("429 waits:", [f"{w:.3f}" for w in waits])
    assert all(w >= 1.0 for w in waits), waits


def test_429_retry_after_on_a_monolithic_put(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    layer = b.layer(100_000, "429put/layer")
    root = b.manifest([layer])
    load(containerd, b, tmp_path, "example.com/busyput:1", root)
    rule = proxy.respond(429, method="PUT", match=layer.hex, first=3, headers={"Retry-After": "1"})

    outcome = push(containerd, "example.com/busyput:1", f"{proxy.host}/busyput:1", home=tmp_path)

    log = describe(proxy.records)
    assert rule.fired == 3
    puts = proxy.requests("PUT", layer.hex)
    gaps = [later.started - earlier.answered for earlier, later in itertools.pairwise(puts)]
    print("monolithic PUT 429 gaps:", [f"{g:.3f}" for g in gaps])
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    assert all(g >= 1.0 for g in gaps), log
    registry.verify_image("busyput:1", root.digest, tmp_path)


def test_503_on_the_first_ping(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """The very first request (GET /v2/) answered 503: retried like any other request."""
    b = image_builder
    root = b.image([1000], "ping503")
    load(containerd, b, tmp_path, "example.com/ping503:1", root)
    rule = proxy.respond(503, method="GET", match=r"^/v2/$", first=1)

    outcome = push(containerd, "example.com/ping503:1", f"{proxy.host}/ping503:1", home=tmp_path)

    assert rule.fired == 1
    assert outcome.code == 0, outcome.stderr
    assert [r.status for r in proxy.requests("GET", r"^/v2/$")] == [503, 200]
    registry.verify_image("ping503:1", root.digest, tmp_path)


# ---------------------------------------------------------------------- slow registry


def test_slow_registry(
    containerd: Containerd,
    registry: Registry,
    proxy: FaultProxy,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    b = image_builder
    root = b.image([3 * MiB, 2 * MiB, 5000], "slow")
    load(containerd, b, tmp_path, "example.com/slow:1", root)
    proxy.latency = 0.05
    proxy.bandwidth = 4 * MiB  # bytes per second, shared by all connections
    mark = registry.log_mark()

    outcome = push(
        containerd,
        "example.com/slow:1",
        f"{proxy.host}/slow:1",
        "--chunk-size",
        "1MiB",
        home=tmp_path,
    )

    records = proxy.records
    assert outcome.code == 0, outcome.stderr + describe(records)
    assert outcome.result["digest"] == root.digest
    # Every request reached the registry through the proxy (Locations were rewritten).
    assert len(registry.requests(mark)) == len(records)
    registry.verify_image("slow:1", root.digest, tmp_path)
    forwarded = sum(r.body_bytes for r in records)
    print(f"slow: {forwarded} bytes in {outcome.seconds:.1f}s, {len(records)} requests")
    assert forwarded >= 5 * MiB
    assert outcome.seconds >= forwarded / proxy.bandwidth
    assert all(r.answered - r.started >= 0.05 for r in records)


# ---------------------------------------------------------------------- token expiry

ALICE = ("alice", "secret")


@pytest.fixture
def short_token_registry(tmp_path: Path) -> Iterator[Registry]:
    """A token-auth registry whose tokens really expire after 3 s (``strict_expiry``)."""
    require_tools(
        "docker-registry",
        "skopeo",
        hint="install the Debian packages docker-registry and skopeo",
    )
    server = TokenServer(
        users=dict([ALICE]),
        grants={ALICE[0]: {"*": ["pull", "push"]}},
        expires_in=3,
        strict_expiry=True,
    )
    with server, Registry(tmp_path / "short-token-registry", token=server) as instance:
        yield instance


def test_token_expires_in_the_middle_of_an_upload(
    containerd: Containerd,
    short_token_registry: Registry,
    image_builder: ImageBuilder,
    tmp_path: Path,
) -> None:
    """Tokens live 3 s (the client assumes 60 s, the minimum), the upload takes ~5 s."""
    b = image_builder
    root = b.image([10 * MiB, 1000], "expiry")
    load(containerd, b, tmp_path, "example.com/expiry:1", root)
    server = short_token_registry.token_server
    assert server is not None

    with FaultProxy(short_token_registry.host) as proxy:
        proxy.bandwidth = 2 * MiB
        outcome = push(
            containerd,
            "example.com/expiry:1",
            f"{proxy.host}/expiry:1",
            "--chunk-size",
            "1MiB",
            "--username",
            ALICE[0],
            "--password-stdin",
            home=tmp_path,
            stdin=ALICE[1] + "\n",
        )
        records = proxy.records
        assert proxy.errors == []

    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert outcome.result["digest"] == root.digest
    issued = [r for r in server.requests if r.status == 200]
    unauthorized = sorted((r for r in records if r.status == 401), key=lambda r: r.started)
    print(f"expiry: {len(issued)} tokens, {len(unauthorized)} 401s, {outcome.seconds:.1f}s")
    assert len(issued) >= 2, log
    # The ping's 401, then one per expiry: every 401 was answered by a fresh token, and no
    # request was refused twice in a row (no loop).
    assert 2 <= len(unauthorized) <= len(issued) + 2, log
    for refused in unauthorized[1:]:
        again = min(
            (r for r in records if r.started > refused.answered and r.path == refused.path),
            key=lambda r: r.started,
        )
        assert again.status != 401, log
    server.expires_in = 300  # skopeo should not race the clock
    short_token_registry.verify_image("expiry:1", root.digest, tmp_path)


def test_injected_401_in_the_middle_of_an_upload(
    containerd: Containerd, token_registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """The proxy's own 401 (the registry's challenge) on the 3rd PATCH: re-auth, re-send."""
    b = image_builder
    root = b.image([4 * MiB, 1000], "inject401")
    load(containerd, b, tmp_path, "example.com/inject401:1", root)
    server = token_registry.token_server
    assert server is not None

    with FaultProxy(token_registry.host) as proxy:
        rule = proxy.unauthorized(method="PATCH", nth=3)
        outcome = push(
            containerd,
            "example.com/inject401:1",
            f"{proxy.host}/inject401:1",
            "--chunk-size",
            "1MiB",
            "--username",
            ALICE[0],
            "--password-stdin",
            home=tmp_path,
            stdin=ALICE[1] + "\n",
        )
        records = proxy.records
        assert proxy.errors == []

    log = describe(records)
    assert outcome.code == 0, outcome.stderr + log
    assert rule.fired == 1
    issued = [r for r in server.requests if r.status == 200]
    assert len(issued) == 2, log
    patches = [r for r in records if r.method == "PATCH"]
    assert [r.status for r in patches] == [202, 202, 401, 202, 202], log
    assert patches[2].path == patches[3].path and patches[2].query == patches[3].query
    token_registry.verify_image("inject401:1", root.digest, tmp_path)
