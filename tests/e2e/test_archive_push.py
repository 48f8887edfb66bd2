"""``imagepushd push --archive``: docker save and OCI-layout tars pushed to a real docker-registry.

Every pushed image is checked from outside: ``skopeo inspect --raw`` must serve the expected
digest (for OCI archives the archive's own; for docker save the manifest containerd's importer
would write, stable across runs) and ``skopeo copy --all`` must pull it, every blob verified.
Archives also round-trip: ``imagepushd export`` and ``ctr images export`` of containerd images
push to the digests containerd pushes, and a docker save archive pushes to the digest of the
same archive imported with ``ctr images import``. Pushes that must be watched from outside
(temporary files, open files, peak RSS) run as child processes.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Outcome, run_cli
from tests.support.containerd import Containerd
from tests.support.faultproxy import FaultProxy, describe
from tests.support.images import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Blob,
    ImageBuilder,
    write_large_docker_archive,
)
from tests.support.process import require_tools
from tests.support.registry import Registry

pytestmark = pytest.mark.e2e

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def push_archive(
    archive: Path, *words: str, home: Path, env: Mapping[str, str] | None = None
) -> Outcome:
    """Run ``imagepushd push --archive ARCHIVE WORDS... --plain-http --json`` in-process."""
    argv = ["push", "--archive", str(archive), *words, "--plain-http", "--json"]
    return run_cli(argv, home=home, env=env)


def push_containerd(containerd: Containerd, image: str, target: str, home: Path) -> Outcome:
    """Run ``imagepushd push IMAGE TARGET`` from ``containerd``'s content store in-process."""
    argv = ["push", image, target, "--root", str(containerd.root), "--plain-http", "--json"]
    return run_cli(argv, home=home)


def export(containerd: Containerd, out: Path, *images: str) -> None:
    outcome = run_cli(
        ["export", "--root", str(containerd.root), *images, "-o", str(out)],
        home=Path("/nonexistent"),
    )
    assert outcome.code == 0, outcome.stderr


def leaf_bytes(b: ImageBuilder, root: Blob) -> int:
    """Bytes of the configs and layers reachable from ``root``."""
    structural = MANIFEST_TYPES | INDEX_TYPES
    return sum(blob.size for blob in b.blobs_of(root) if blob.media_type not in structural)


# ---------------------------------------------------------------------- OCI archives


def test_oci_archive_with_several_images(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """A multi-platform index, a 0-byte layer, a layer of 5 chunks, a Docker manifest list."""
    b = image_builder
    amd = b.manifest([b.layer(3000, "oci/amd"), b.layer(0, "oci/empty")])
    arm = b.manifest([b.layer(2000, "oci/arm")], architecture="arm64", variant="v8")
    big = b.layer_file(tmp_path / "big.layer", 5 * MiB + 123, "oci/big")
    roots = {
        "example.com/multi:1": b.index([amd, arm]),
        "example.com/big:1": b.manifest([big, b.layer(100, "oci/small")]),
        "example.com/list:1": b.index(
            [b.image([700], "oci/d1", docker=True), b.image([800], "oci/d2", docker=True)],
            docker=True,
        ),
    }
    archive = tmp_path / "images.tar"
    b.write_oci_archive(archive, roots)
    big.path.unlink()

    alone = push_archive(archive, f"{registry.host}/x:1", home=tmp_path)
    assert alone.code == 2
    assert "holds 3 images; name one before the target" in alone.stderr
    assert all(name in alone.stderr for name in roots)

    mark = registry.log_mark()
    results = {
        name: push_archive(
            archive,
            name,
            f"{registry.host}/{name.split('/')[1]}",
            "--chunk-size",
            "1MiB",
            home=tmp_path,
        ).result
        for name in roots
    }
    for name, root in roots.items():
        ref = name.split("/")[1]
        assert results[name]["digest"] == root.digest
        assert results[name]["media_type"] == root.media_type
        registry.verify_image(ref, root.digest, tmp_path)
    assert results["example.com/multi:1"]["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert results["example.com/multi:1"]["pushed_blobs"] == 5  # 2 configs, 3 layers
    assert results["example.com/multi:1"]["manifests"] == 3
    assert registry.blob_exists("multi", b.layer(0, "oci/empty").digest)
    assert results["example.com/big:1"]["bytes_sent"] == leaf_bytes(b, roots["example.com/big:1"])
    # Only the big layer is over the 1 MiB chunk size: it alone is sent in PATCHes.
    patches = [r for r in registry.requests(mark) if r["method"] == "PATCH"]
    assert len([p for p in patches if p["status"] == 202]) >= 5


def test_archive_push_is_up_to_date_the_second_time(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    root = b.image([1000, 2000], "again")
    archive = tmp_path / "again.tar"
    b.write_oci_archive(archive, {"example.com/again:1": root})
    first = push_archive(archive, f"{registry.host}/again:1", home=tmp_path).result
    second = push_archive(archive, f"{registry.host}/again:1", home=tmp_path).result
    assert first["pushed_blobs"] == 3 and not first["up_to_date"]
    assert second["up_to_date"] and second["bytes_sent"] == 0
    assert first["digest"] == second["digest"] == root.digest


def test_corrupt_layer_in_an_archive_is_refused(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    layer = b.layer(300_000, "corrupt")
    root = b.manifest([layer])
    archive = tmp_path / "corrupt.tar"
    b.write_oci_archive(archive, {"example.com/corrupt:1": root})
    with tarfile.open(archive) as tar:
        offset = tar.getmember(f"blobs/sha256/{layer.hex}").offset_data
    with archive.open("r+b") as file:
        file.seek(offset + 1000)
        file.write(b"\x00" * 16)

    outcome = push_archive(archive, f"{registry.host}/corrupt:1", home=tmp_path)

    assert outcome.code == 1
    lines = [line for line in outcome.stderr.splitlines() if line.startswith("imagepushd: error")]
    assert len(lines) == 1 and layer.digest in lines[0] and "corrupt" in lines[0], outcome.stderr
    assert not registry.blob_exists("corrupt", layer.digest)
    assert registry.tags("corrupt") == []


# ---------------------------------------------------------------------- docker save archives


def test_docker_save_archive_pushes_to_stable_digests(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """Two images sharing a layer; a gzip layer, a 0-byte one, one of 5 chunks."""
    b = image_builder
    shared = b.layer(4000, "ds/shared", docker=True)
    gzipped = b.add(
        Blob(
            "application/vnd.docker.image.rootfs.diff.tar.gzip", gzip.compress(b"x" * 5000, mtime=0)
        )
    )
    big = b.layer_file(tmp_path / "big.layer", 5 * MiB + 7, "ds/big", docker=True)
    roots = {
        "example.com/ds/one:1": b.manifest(
            [shared, gzipped, b.layer(0, "ds/0", docker=True)], docker=True
        ),
        "busybox:latest": b.manifest([shared, big], docker=True),
    }
    archive = tmp_path / "saved.tar"
    b.write_docker_archive(archive, roots)
    expected = {name: b.docker_import_manifest(root) for name, root in roots.items()}
    assert b"diff.tar.gzip" in expected["example.com/ds/one:1"].data

    for run_no in (1, 2):
        for name, manifest in expected.items():
            ref = f"{name.split('/')[-1].split(':')[0]}:run{run_no}"
            result = push_archive(
                archive,
                name,
                f"{registry.host}/{ref}",
                "--chunk-size",
                "1MiB",
                home=tmp_path,
            ).result
            assert result["digest"] == manifest.digest
            assert result["media_type"] == "application/vnd.docker.distribution.manifest.v2+json"
            assert registry.skopeo_inspect_raw(ref) == manifest.data
            registry.verify_image(ref, manifest.digest, tmp_path)

    # The same archive through ctr images import, pushed from containerd: the same digests.
    containerd.import_archive(archive)
    imported = containerd.images()
    assert imported["docker.io/library/busybox:latest"] == expected["busybox:latest"].digest
    assert imported["example.com/ds/one:1"] == expected["example.com/ds/one:1"].digest
    from_store = push_containerd(
        containerd, "docker.io/library/busybox:latest", f"{registry.host}/bb:ctr", tmp_path
    ).result
    assert from_store["digest"] == expected["busybox:latest"].digest


# ---------------------------------------------------------------------- round trips


def test_exports_push_to_the_digests_containerd_pushes(
    containerd: Containerd, registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    b = image_builder
    amd = b.manifest([b.layer(1000, "rt/amd"), b.layer(0, "rt/empty")])
    arm = b.manifest([b.layer(2000, "rt/arm")], architecture="arm64", variant="v8")
    roots = {
        "example.com/rt/multi:1": b.index([amd, arm]),
        "example.com/rt/single:1": b.image([3 * MiB], "rt/single"),
    }
    b.write_oci_archive(tmp_path / "src.tar", roots)
    containerd.import_archive(tmp_path / "src.tar")
    (tmp_path / "src.tar").unlink()

    ours = tmp_path / "export.tar"
    export(containerd, ours, *roots)
    theirs = tmp_path / "ctr-export.tar"
    containerd.ctr("images", "export", "--all-platforms", theirs, *roots)
    host_only = tmp_path / "ctr-host.tar"
    containerd.ctr("images", "export", host_only, "example.com/rt/multi:1")

    for name, root in roots.items():
        repo = name.rsplit("/", 1)[1].split(":")[0]
        direct = push_containerd(containerd, name, f"{registry.host}/{repo}:store", tmp_path)
        assert direct.result["digest"] == root.digest
        for tag, archive in (("export", ours), ("ctr", theirs)):
            pushed = push_archive(archive, name, f"{registry.host}/{repo}:{tag}", home=tmp_path)
            assert pushed.result["digest"] == root.digest
            registry.verify_image(f"{repo}:{tag}", root.digest, tmp_path)

    # ctr exports only the host platform's content by default: the platform policy decides,
    # exactly as for an image pulled for one platform.
    refused = push_archive(host_only, f"{registry.host}/multi:host", home=tmp_path)
    assert refused.code == 1
    assert "platforms missing content: linux/arm64/v8" in refused.stderr
    reduced = push_archive(
        host_only, f"{registry.host}/multi:host", "--platform", "host", home=tmp_path
    ).result
    assert reduced["digest"] == amd.digest
    registry.verify_image("multi:host", amd.digest, tmp_path)


# ---------------------------------------------------------------------- resume


def test_archive_push_resumes_after_refused_and_dropped_chunks(
    registry: Registry, proxy: FaultProxy, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """PATCHes 3 and 4 answered 503, PATCH 6 cut before its body: resumed, never resent."""
    b = image_builder
    big = b.layer_file(tmp_path / "big.layer", 24 * MiB, "resume/big", docker=True)
    root = b.manifest([big, b.layer(1000, "resume/small", docker=True)], docker=True)
    archive = tmp_path / "resume.tar"
    b.write_docker_archive(archive, {"example.com/resume:1": root})
    refused = [proxy.respond(503, method="PATCH", nth=n) for n in (3, 4)]
    dropped = proxy.reset_body(method="PATCH", nth=6, after=0)

    outcome = push_archive(archive, f"{proxy.host}/resume:1", "--chunk-size", "4MiB", home=tmp_path)

    log = describe(proxy.records)
    assert outcome.code == 0, outcome.stderr + log
    digest = b.docker_import_manifest(root).digest
    assert outcome.result["digest"] == digest
    registry.verify_image("resume:1", digest, tmp_path)
    assert [r.fired for r in refused] == [1, 1] and dropped.fired == 1, log
    assert len({r.path for r in proxy.requests("PATCH")}) == 1, log  # one session throughout
    sent = proxy.body_bytes("PATCH") + proxy.body_bytes("PUT", big.hex)
    print(f"archive push, 2 refused and 1 dropped chunk: {sent / big.size:.3f} x the layer sent")
    assert sent < 1.25 * big.size
    assert sent == big.size


# ---------------------------------------------------------------------- in place, flat memory


@dataclass
class ChildPush:
    """A push run as a child process, watched from outside."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_kib: int
    open_files: set[str]


# Read-only code and data Python and httpx open while importing (modules, CA bundle, zoneinfo).
_CODE_PREFIXES = tuple(
    {sys.prefix, sys.base_prefix, str(REPO / "daemon"), "/usr/lib/", "/usr/share/", "/etc/"}
)


def _open_regular_files(pid: int) -> set[str]:
    """Regular files ``pid`` holds open now, other than code and read-only system data."""
    found: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/", *_CODE_PREFIXES)):
            found.add(target)
    return found


def child_env(tmp_path: Path, tmpdir: Path) -> dict[str, str]:
    (tmp_path / "docker-config").mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DOCKER_CONFIG": str(tmp_path / "docker-config"),
        "TMPDIR": str(tmpdir),
        "PYTHONPATH": str(REPO / "daemon"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def vm_hwm_kib(pid: int) -> int:
    """The peak resident set of process ``pid`` so far (KiB), 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def push_child(
    argv: Sequence[str], env: Mapping[str, str], prefix: Sequence[str] = ()
) -> ChildPush:
    """Run ``python -m imagepushd ARGV`` as a child; poll its open files and its peak RSS.

    The peak is the kernel's high-water mark of the child's own memory (``VmHWM``), polled
    every 5 ms: ``ru_maxrss`` from ``wait4`` cannot be used, because Linux carries the RSS of
    the forked copy of this (large) pytest process over the exec into the child's maxrss.
    """
    cmd = [*prefix, sys.executable, "-m", "imagepushd", *argv]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env), cwd=REPO
    )
    seen: set[str] = set()
    outputs: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        with stream:
            outputs[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=(n, s))
        for n, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    watch = proc.pid
    peak = 0
    while True:
        pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if prefix:  # strace: watch its child, the python process
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with_kids = children.read_text().split() if children.exists() else []
            watch = int(with_kids[0]) if with_kids else proc.pid
        seen |= _open_regular_files(watch)
        peak = max(peak, vm_hwm_kib(watch))
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    return ChildPush(
        proc.returncode,
        outputs["out"].decode(),
        outputs["err"].decode(),
        time.monotonic() - started,
        peak,
        seen,
    )


def test_no_temporary_files_and_flat_memory(registry: Registry, tmp_path: Path) -> None:
    """64 MiB and 1 GiB docker save archives: peak RSS within 10 MiB, nothing written aside.

    The child's TMPDIR must stay empty, and the only regular file it ever holds open (polled
    every 5 ms from /proc/PID/fd) is the archive.
    """
    tmpdir = tmp_path / "private-tmp"
    tmpdir.mkdir()
    env = child_env(tmp_path, tmpdir)
    runs: dict[str, ChildPush] = {}
    try:
        for label, size in (("64MiB", 64 * MiB), ("1GiB", 1024 * MiB)):
            archive = tmp_path / f"{label}.tar"
            ref = f"flat:{label.lower()}"
            write_large_docker_archive(archive, size, f"example.com/{ref}")
            try:
                argv = ["push", "--archive", str(archive), f"{registry.host}/{ref}"]
                child = runs[label] = push_child([*argv, "--plain-http", "--json"], env)
            finally:
                archive.unlink()
            assert child.code == 0, child.stderr
            result = json.loads(child.stdout)
            assert result["bytes_sent"] >= size
            assert registry.skopeo_inspect_digest(ref) == result["digest"]
            assert child.open_files == {str(archive)}, child.open_files
            assert list(tmpdir.iterdir()) == []
    finally:
        # The registry's copy of the layers too: pytest keeps recent tmp_path trees.
        shutil.rmtree(registry.data_dir / "docker/registry/v2/blobs", ignore_errors=True)
    small, big = runs["64MiB"], runs["1GiB"]
    print(
        f"peak RSS: 64 MiB archive {small.peak_rss_kib / 1024:.1f} MiB in {small.seconds:.1f}s, "
        f"1 GiB archive {big.peak_rss_kib / 1024:.1f} MiB in {big.seconds:.1f}s"
    )
    assert 20 * 1024 < small.peak_rss_kib < 200 * 1024  # measured, not a stray value
    assert big.peak_rss_kib <= small.peak_rss_kib + 10 * 1024


def test_archive_push_opens_nothing_for_writing(
    registry: Registry, image_builder: ImageBuilder, tmp_path: Path
) -> None:
    """Under strace: no file is created, written, renamed or removed by an archive push."""
    (strace,) = require_tools("strace", hint="install the Debian package strace")
    b = image_builder
    big = b.layer_file(tmp_path / "big.layer", 3 * MiB, "strace/big", docker=True)
    root = b.manifest([big, b.layer(0, "strace/empty", docker=True)], docker=True)
    archive = tmp_path / "strace.tar"
    b.write_docker_archive(archive, {"example.com/strace:1": root})
    tmpdir = tmp_path / "private-tmp"
    tmpdir.mkdir()
    trace = tmp_path / "trace.txt"
    calls = "openat,open,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,link,linkat"

    child = push_child(
        [
            "push",
            "--archive",
            str(archive),
            f"{registry.host}/strace:1",
            "--plain-http",
            "--json",
            "--chunk-size",
            "1MiB",
        ],
        child_env(tmp_path, tmpdir),
        prefix=[strace, "-f", "-qq", "-o", str(trace), "-e", f"trace={calls}"],
    )

    assert child.code == 0, child.stderr
    assert json.loads(child.stdout)["digest"] == b.docker_import_manifest(root).digest
    lines = trace.read_text().splitlines()
    opened = [line for line in lines if re.search(r"\bopen(at)?\(", line)]
    assert any(str(archive) in line for line in opened)
    writes = [
        line
        for line in lines
        if not re.search(r"\bopen(at)?\(", line)
        or re.search(r"O_(WRONLY|RDWR|CREAT|TRUNC|TMPFILE)", line)
    ]
    # The only file opened for writing may be /dev/null or a tty; nothing is created anywhere.
    unexpected = [
        line for line in writes if "resumed>" not in line and not re.search(r'"/dev/', line)
    ]
    assert unexpected == [], "\n".join(unexpected)
    assert list(tmpdir.iterdir()) == []
