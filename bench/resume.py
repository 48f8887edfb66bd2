"""Benchmark: what a connection cut in the middle of a layer upload costs, in bytes and time.

Run as root from the repository: ``.venv/bin/python bench/resume.py [--size-mib 96]
[--cut-mib 60]``.

Real part: one image (a ``--size-mib`` random layer and a small config) imported into a
private containerd, pushed by ``imagepushd push`` (a child process) to a real docker-registry
(2.8 here) through the fault proxy of tests/support/faultproxy.py, which cuts the connection
once the PATCH bodies reach ``--cut-mib`` (``reset_at_total``). Each client runs without a
fault and with the cut, each run to a fresh repository: the default (adaptive chunks) and
``--chunk-size 64MiB`` (the fixed size that was the default before). Printed per run: the
layer bytes the client put on the wire (PATCH and PUT bodies the proxy read), the ratio to the
layer size, wall time, the upload sessions and their chunk sizes. For comparison,
``ctr images push`` of the same image through the same cut (ctr has no resume: it is run again
once, as a build script would). Each pushed image is checked
with ``skopeo copy`` (every blob verified) and its manifest digest against the source.

Model part: the same blob, cut at the same offset, uploaded in-process by ``BlobUploader`` to
the fake registry of tests/support/fakeregistry.py in each of its after-a-cut behaviours:
``keep`` (distribution 3.x: GET status reports the bytes kept), ``drop`` (acknowledged chunks
kept, the partial one dropped) and ``invalidate`` (distribution 2.8: the session is refused).
Bytes only: its times are those of an in-memory server.

Target: the default client sends at most 1.25 x the layer with the real registry; exit status
1 if missed. On distribution 2.8 it cannot be met by any client: the cut session is refused,
so cut + layer is the least (see the log line printed with the result).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._proc import require_root, require_tools, verdict  # noqa: E402
from imagepushd.blobs import BlobSource  # noqa: E402
from imagepushd.oci import Descriptor  # noqa: E402
from imagepushd.push.registry.upload import BlobUploader  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.fakeregistry import FakeRegistry, Network, make_client  # noqa: E402
from tests.support.faultproxy import FaultProxy, ProxyRecord  # noqa: E402
from tests.support.images import FileBlob, ImageBuilder, sha256_digest  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20
TARGET = 1.25
CLIENTS = {"adaptive": (), "fixed64": ("--chunk-size", "64MiB")}
LABELS = {"adaptive": "default (adaptive)", "fixed64": "--chunk-size 64MiB"}


@dataclass
class Run:
    client: str
    cut: bool
    sent: int
    wall: float
    sessions: list[list[int]]
    client_bytes: int


def sessions_of(records: list[ProxyRecord]) -> list[list[int]]:
    """PATCH body sizes (MiB-rounded bytes the proxy read) per upload session, in order."""
    patches = sorted((r for r in records if r.method == "PATCH"), key=lambda r: r.started)
    paths = list(dict.fromkeys(r.path for r in patches))
    return [[r.received_bytes for r in patches if r.path == path] for path in paths]


def push_real(
    rnd: int,
    client: str,
    cut: int | None,
    containerd: Containerd,
    registry: Registry,
    image: str,
    manifest_digest: str,
    layer: FileBlob,
    workdir: Path,
) -> Run:
    repo = f"bench/resume-{client}-{'cut' if cut is not None else 'clean'}-r{rnd}"
    with FaultProxy(registry.host) as proxy:
        if cut is not None:
            proxy.reset_at_total(cut, method="PATCH")
        cmd = [str(REPO / ".venv/bin/imagepushd"), "push", image, f"{proxy.host}/{repo}:1"]
        cmd += ["--root", str(containerd.root), "--plain-http", "--json", *CLIENTS[client]]
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        wall = time.perf_counter() - started
        records = proxy.records
        errors = list(proxy.errors)
    if done.returncode != 0 or errors:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr[-3000:]}{errors}")
    result = json.loads(done.stdout)
    pushed = sha256_digest(registry.manifest(f"{repo}:1"))
    if pushed != manifest_digest or result.get("digest") != manifest_digest:
        raise SystemExit(f"{repo}: registry holds {pushed}, source is {manifest_digest}")
    registry.verify_image(f"{repo}:1", manifest_digest, workdir / f"pull-{client}")
    sent = sum(
        r.received_bytes
        for r in records
        if r.method == "PATCH" or (r.method == "PUT" and layer.hex in r.query)
    )
    return Run(client, cut is not None, sent, wall, sessions_of(records), result["bytes_sent"])


def push_ctr(
    cut: int | None, containerd: Containerd, registry: Registry, image: str
) -> tuple[list[int], int, float, str]:
    """``ctr images push`` of the same image through the proxy, run again once if it fails.

    ctr sends a layer in one PUT, so the cut counts every body. Returns the exit statuses,
    bytes, wall time and the first failure's last stderr line.
    """
    repo = f"bench/resume-ctr-{'cut' if cut is not None else 'clean'}"
    ctr = shutil.which("ctr")
    assert ctr is not None
    cmd = [ctr, "-a", str(containerd.socket), "-n", "default", "images", "push", "--plain-http"]
    statuses: list[int] = []
    failure = ""
    with FaultProxy(registry.host) as proxy:
        if cut is not None:
            proxy.reset_at_total(cut, method=None)
        started = time.perf_counter()
        for _attempt in range(2):
            done = subprocess.run(
                [*cmd, f"{proxy.host}/{repo}:1", image],
                capture_output=True,
                text=True,
                check=False,
                timeout=600,
            )
            statuses.append(done.returncode)
            if done.returncode == 0:
                break
            failure = failure or (done.stderr.strip().splitlines() or [""])[-1][:100]
        wall = time.perf_counter() - started
        records = proxy.records
    sent = sum(r.received_bytes for r in records if r.method in ("PATCH", "PUT"))
    return statuses, sent, wall, failure


def cut_hook(fake: FakeRegistry, cut: int) -> Callable[[httpx.Request], httpx.Response | None]:
    """Break the PATCH during which the PATCH bodies pass ``cut`` bytes, once."""
    counted = [0, 0]  # bytes so far, fired

    def hook(request: httpx.Request) -> httpx.Response | None:
        if request.method == "PATCH":
            length = int(request.headers.get("content-length", "0"))
            if not counted[1] and counted[0] + length > cut:
                fake.breaks = [cut - counted[0]]
                counted[1] = 1
            counted[0] += length
        return None

    return hook


def push_model(client: str, on_break: str, cut: int, layer: FileBlob) -> tuple[int, list[int]]:
    """Bytes the fake received for the blob and its PATCH sizes, for one after-a-cut mode."""
    fake = FakeRegistry("registry.test")
    fake.on_break = on_break
    fake.hooks.append(cut_hook(fake, cut))
    with make_client(Network(fake)) as http:
        chunk = 64 * MiB if client == "fixed64" else None
        uploader = BlobUploader(http, chunk_size=chunk)
        source = BlobSource(layer.path, Descriptor(layer.media_type, layer.digest, layer.size))
        uploader.upload("bench/model", source)
    if not fake.has_blob("bench/model", layer.digest):
        raise SystemExit(f"model {on_break}/{client}: the blob was not committed")
    return sum(r.received for r in fake.calls()), [r.received for r in fake.patches()]


def mib(sizes: list[int]) -> str:
    return "[" + ", ".join(f"{s / MiB:g}" for s in sizes) + "]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=96, help="layer size (default 96)")
    parser.add_argument("--cut-mib", type=int, default=60, help="cut offset (default 60)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    args = parser.parse_args()
    size, cut = args.size_mib * MiB, args.cut_mib * MiB
    if not 0 < cut < size:
        parser.error("--cut-mib must be inside the layer")
    tools = ("containerd", "ctr", "docker-registry", "skopeo")
    if not require_root("bench/resume.py") or not require_tools("bench/resume.py", tools):
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-resume-", dir=args.workdir))
    containerd = Containerd(workdir / "containerd")
    registry = Registry(workdir / "registry", log_level="warn")
    try:
        containerd.start()
        registry.start()
        b = ImageBuilder()
        layer = b.layer_file(workdir / "layer", size, "bench/resume")
        root = b.manifest([layer])
        image = "bench.local/resume:1"
        archive = workdir / "image.tar"
        b.write_oci_archive(archive, {image: root})
        containerd.import_archive(archive)
        archive.unlink()
        version = subprocess.check_output(["docker-registry", "--version"], text=True).strip()
        print(f"{args.size_mib} MiB layer, connection cut {args.cut_mib} MiB into it ({version})")
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            order = list(CLIENTS) if rnd % 2 else list(CLIENTS)[::-1]
            for client in order:
                for fault in (None, cut):
                    run = push_real(
                        rnd, client, fault, containerd, registry, image, root.digest, layer, workdir
                    )
                    runs.append(run)
        print("real registry behind the fault proxy (layer bytes = PATCH/PUT bodies sent):")
        print(
            f"  {'client':<20}{'fault':<7}{'MiB sent':>9}{'x layer':>9}{'wall s':>8}"
            "  chunks (MiB) per session"
        )
        for r in runs:
            print(
                f"  {LABELS[r.client]:<20}{'cut' if r.cut else 'none':<7}{r.sent / MiB:>9.1f}"
                f"{r.sent / size:>9.3f}{r.wall:>8.2f}  "
                + " | ".join(mib(s) for s in r.sessions)
                + f"  (client counted {r.client_bytes / MiB:.1f} MiB, all blobs)"
            )
        print("ctr images push of the same image through the same proxy (run again if it fails):")
        for fault in (None, cut):
            statuses, sent, wall, failure = push_ctr(fault, containerd, registry, image)
            outcome = "exit " + ", then ".join(map(str, statuses))
            print(
                f"  {'ctr images push':<20}{'cut' if fault else 'none':<7}{sent / MiB:>9.1f}"
                f"{sent / size:>9.3f}{wall:>8.2f}  {outcome}" + (f" ({failure})" if failure else "")
            )
        print("median wall s over the rounds:")
        for client in CLIENTS:
            walls = {
                cut_run: statistics.median(
                    r.wall for r in runs if r.client == client and r.cut == cut_run
                )
                for cut_run in (False, True)
            }
            print(f"  {LABELS[client]:<20} no fault {walls[False]:.2f}  cut {walls[True]:.2f}")
        # The in-process runs log their retries and restarts; the table says what happened.
        logging.getLogger("imagepushd").setLevel(logging.ERROR)
        print(
            f"model (in-process fake registry, same cut): bytes it received, x {args.size_mib} MiB"
        )
        print(
            f"  {'after a cut the registry':<44}{'default':>10}{'fixed 64':>10}"
            "  default chunks (MiB)"
        )
        modes = {
            "keep": "keeps the partial bytes (distribution 3.x)",
            "drop": "drops the partial chunk",
            "invalidate": "refuses the session (distribution 2.8)",
        }
        for mode, label in modes.items():
            adaptive, chunks = push_model("adaptive", mode, cut, layer)
            fixed, _ = push_model("fixed64", mode, cut, layer)
            print(f"  {label:<44}{adaptive / size:>10.3f}{fixed / size:>10.3f}  {mib(chunks)}")
        worst = max(r.sent for r in runs if r.client == "adaptive" and r.cut) / size
        ok = worst <= TARGET
        print(
            f"target: default client with the cut <= {TARGET} x the layer: "
            f"{verdict(ok)} ({worst:.3f})"
        )
        if not ok:
            print(
                "  distribution 2.8 answers 404 BLOB_UPLOAD_INVALID to every request on a session "
                "cut mid-body, so the bytes sent into it are lost whatever the chunk size: "
                f"{(cut + size) / size:.3f} x is the least any client can send."
            )
        return 0 if ok else 1
    finally:
        registry.close()
        containerd.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
