"""Benchmark: pushing large images with ``imagepushd push`` against ``ctr images push`` and curl.

Run as root from the repository: ``.venv/bin/python bench/push.py [--sizes 1,8] [--rounds 2]``.

For each size in GiB it builds one single-platform image of random, incompressible layers
(1 GiB: 4 x 256 MiB; N GiB otherwise: N x 1 GiB), file-backed so that no layer is ever held in
memory, and imports it into a private containerd (tests/support/containerd.py) with
``ctr images import --no-unpack`` (the archive and the layer files are deleted right after).
One real docker-registry (tests/support/registry.py) then receives, per size and round:

- ``imagepushd push IMAGE HOST/repo:latest --root ROOT --plain-http --json`` (default: adaptive
  chunks, 8 MiB growing to 64 MiB), and the same with ``--chunk-size 64MiB`` (variant ``ipd64``);
- ``ctr -a SOCK images push --plain-http HOST/repo:latest IMAGE``;
- parallel ``curl -T``: one monolithic PUT per blob file, 3 at a time (``xargs -P``), then the
  manifest; the upload sessions are opened before the measured child starts. A client that
  neither hashes nor chunks: the floor for wall time and CPU.

alternating the order every round (round 1: variants in order, round 2: reversed). Every run
goes to a fresh repository, so no blob is skipped (HEAD answers 404) and none is mounted
(imported images carry no ``distribution.source`` labels; the registry's access log is checked
for ``mount=`` requests and for one committed upload per blob). Each run is a child process:
wall time, CPU time (user+sys from ``os.wait4`` of that child) and its peak RSS (``VmHWM`` from
``/proc/PID/status``, polled every 10 ms: ``ru_maxrss`` would start from this script's own RSS,
see bench/_proc.py); containerd's and the registry's own CPU time over the run are read from
/proc as well (``ctr`` reads content through containerd's gRPC content service; imagepushd reads
the blob files). The pushed manifest is fetched back and its sha256 compared with the source
digest.

Each client's CPU is also printed per GiB pushed, with its ratios to ctr and to curl, and
``openssl dgst -sha256`` of the same blob files gives what hashing every byte costs alone
(curl + that: the floor for a client that verifies what it sends).

Targets, on the medians of the rounds: wall(imagepushd)/wall(ctr) <= 1.0, CPU(imagepushd)/
CPU(ctr) <= 1.2 (client processes only), imagepushd CPU <= 1.0 s per GiB, wall(imagepushd)/
wall(curl) <= 1.15, imagepushd peak RSS <= 80 MiB. Everything (containerd
root, registry storage, archives) lives in one temporary directory removed at the end; the run
refuses to start with less than 4x the total image size free there. Exit status 1 if a target
is missed.

``--variants ipd,ctr,curl`` drops the 64 MiB variant. ``--profile`` (needs ``.venv/bin/pip
install py-spy``) pushes the first image once more under ``py-spy record --idle`` and prints
how the main and blob worker threads spend their time (waiting for the registry's answer,
socket send, hashing, file reads, imports, pool waits) and the busiest lines.

``--compete`` then measures what a push costs a build on the same machine: a CPU-bound busy
loop (the "build", ~``--compete-seconds`` alone) and an imagepushd push of the first image,
both pinned to one CPU, each in its own sibling CPU cgroup (as two system services are); the
registry is left where the kernel puts it, like any other load. The build's wall time alone,
under a push with default scheduling, and under a push with the unit's (``CPUWeight=``,
``Nice=``, I/O class read from systemd/imagepushd.service and applied as systemd does:
bench/_sched.py), ``--compete-rounds`` times in alternating order. Printed: the build's
slowdown both ways and the push's own wall and CPU; a target missed if the unit's settings do
not slow the build less. Wall times here move with the machine's other load: compare the two
slowdowns of one run, over several rounds. ``--skip-comparison`` runs only ``--profile`` and
``--compete``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._proc import proc_cpu, require_root, require_tools, verdict, wait_measured  # noqa: E402
from bench._sched import Placement, Scheduling, cpu_groups  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.images import Blob, ImageBuilder, sha256_digest  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
DISK_FACTOR = 4
WALL_TARGET = 1.0
CPU_TARGET = 1.2
RSS_TARGET_MIB = 80.0
CPU_PER_GIB_TARGET = 1.0
CURL_WALL_TARGET = 1.15
CURL_CONCURRENCY = 3  # imagepushd's default --concurrency
VARIANTS = ("ipd", "ipd64", "ctr", "curl")
LABELS = {
    "ipd": "imagepushd",
    "ipd64": "imagepushd 64MiB",
    "ctr": "ctr images push",
    "curl": "parallel curl -T",
}


@dataclass
class SourceImage:
    size_gib: int
    name: str
    manifest: Blob
    blobs: int
    #: (digest, size) of every layer and the config: what the parallel curl run PUTs.
    contents: list[tuple[str, int]]
    layer_count: int
    layer_size: int
    content_bytes: int


@dataclass
class Run:
    variant: str
    round: int
    repo: str
    wall: float
    user: float
    sys: float
    rss_mib: float
    containerd_cpu: float
    registry_cpu: float
    uploads: int
    patches: int
    mounts: int
    detail: dict[str, object] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def layout(size_gib: int) -> tuple[int, int]:
    """(layer count, layer size) for an image of ``size_gib`` GiB."""
    if size_gib == 1:
        return 4, 256 * MiB
    return size_gib, GiB


def build_and_import(containerd: Containerd, workdir: Path, size_gib: int) -> SourceImage:
    count, layer_size = layout(size_gib)
    b = ImageBuilder()
    started = time.perf_counter()
    layers = [
        b.layer_file(workdir / f"layer-{size_gib}g-{i}", layer_size, f"bench/push/{size_gib}/{i}")
        for i in range(count)
    ]
    manifest = b.manifest(layers)
    name = f"bench.local/push/{size_gib}g:1"
    archive = workdir / f"image-{size_gib}g.tar"
    b.write_oci_archive(archive, {name: manifest})
    for layer in layers:
        layer.path.unlink()
    built = time.perf_counter()
    try:
        containerd.import_archive(archive)
    finally:
        archive.unlink(missing_ok=True)
    imported = time.perf_counter()
    blobs = b.blobs_of(manifest)
    print(
        f"built {name}: {count} x {layer_size // MiB} MiB layers in {built - started:.1f}s, "
        f"imported in {imported - built:.1f}s",
        flush=True,
    )
    return SourceImage(
        size_gib=size_gib,
        name=name,
        manifest=manifest,
        blobs=len(blobs) - 1,  # layers and config, not the manifest itself
        contents=[(blob.digest, blob.size) for blob in blobs if blob.digest != manifest.digest],
        layer_count=count,
        layer_size=layer_size,
        content_bytes=sum(blob.size for blob in blobs),
    )


def run_child(
    cmd: list[str],
    out: Path,
    placed: Placement | None = None,
    during: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> tuple[int, float, float, float, float]:
    """Run ``cmd``; return (exit code, wall s, user s, sys s, peak RSS MiB) of that child.

    ``placed`` (for --compete) pins and places the child; ``during`` is called with the
    running child before it is waited for (the competing build).
    """
    if placed is not None:
        cmd = placed.command(cmd)
    with out.open("wb") as sink:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        if placed is not None:
            placed.join(proc.pid)
        if during is not None:
            during(proc)
        code, usage, peak = wait_measured(proc.pid)
        wall = time.perf_counter() - started
    proc.returncode = code  # reaped here, not by Popen
    return code, wall, usage.ru_utime, usage.ru_stime, peak / MiB


def curl_command(
    image: SourceImage, containerd: Containerd, registry: Registry, repo: str, workdir: Path
) -> list[str]:
    """The parallel curl run: one ``curl -T`` PUT per blob (CURL_CONCURRENCY at a time,
    ``xargs -P``), then the manifest; what a client that neither hashes nor chunks costs.

    The upload sessions are opened here (POST), outside the measured child, so the child is
    only the streaming of the blob files and the manifest PUT. ``Expect:`` is emptied so curl
    does not wait for ``100 Continue`` before each body.
    """
    lines = []
    with httpx.Client(base_url=registry.url, timeout=60) as client:
        for digest, _ in image.contents:
            response = client.post(f"/v2/{repo}/blobs/uploads/")
            response.raise_for_status()
            url = httpx.URL(registry.url).join(response.headers["location"])
            url = url.copy_merge_params({"digest": digest})
            path = (
                containerd.root
                / "io.containerd.content.v1.content/blobs"
                / digest.replace(":", "/")
            )
            lines.append(f"{path} {url}\n")
    jobs = workdir / f"{repo.replace('/', '_')}.jobs"
    jobs.write_text("".join(lines))
    manifest = workdir / f"{repo.replace('/', '_')}.manifest"
    manifest.write_bytes(image.manifest.data)
    curl = "curl -sS -f -o /dev/null -H Expect: -X PUT"
    script = (
        f"xargs -P {CURL_CONCURRENCY} -L 1 sh -c "
        f'\'exec {curl} -H "Content-Type: application/octet-stream" -T "$1" "$2"\' sh '
        f"< {jobs} && "
        f"exec {curl} -H 'Content-Type: {image.manifest.media_type}' --data-binary @{manifest} "
        f"{registry.url}/v2/{repo}/manifests/latest"
    )
    return ["sh", "-c", script]


def push_once(
    variant: str,
    rnd: int,
    image: SourceImage,
    containerd: Containerd,
    registry: Registry,
    workdir: Path,
    *,
    repo: str | None = None,
    placed: Placement | None = None,
    during: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Run:
    """One push by ``variant`` to a fresh repository, measured and checked.

    For --compete: ``placed`` pins the push to a CPU, in a cgroup, under the scheduling to
    compare, and ``during`` runs the competing build while the push runs.
    """
    repo = repo or f"bench/push-{image.size_gib}g-{variant}-r{rnd}"
    target = f"{registry.host}/{repo}:latest"
    if variant == "ctr":
        ctr = shutil.which("ctr")
        assert ctr is not None
        cmd = [ctr, "-a", str(containerd.socket), "-n", "default"]
        cmd += ["images", "push", "--plain-http", target, image.name]
    elif variant == "curl":
        cmd = curl_command(image, containerd, registry, repo, workdir)
    else:
        cmd = [str(REPO / ".venv/bin/imagepushd"), "push", image.name, target]
        cmd += ["--root", str(containerd.root), "--plain-http", "--json"]
        if variant == "ipd64":
            cmd += ["--chunk-size", "64MiB"]
    os.sync()  # flush the previous run's registry writes outside the timing
    mark = registry.log_mark()
    ctrd0, reg0 = proc_cpu(containerd.pid), proc_cpu(registry.pid)
    out = workdir / f"{repo.replace('/', '_')}.out"
    code, wall, user, system, rss = run_child(cmd, out, placed, during)
    ctrd1, reg1 = proc_cpu(containerd.pid), proc_cpu(registry.pid)
    text = out.read_text(errors="replace")
    out.unlink()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{text[-3000:]}")
    pushed = registry.manifest(f"{repo}:latest")
    digest = sha256_digest(pushed)
    if digest != image.manifest.digest:
        raise SystemExit(f"{repo}: registry holds {digest}, source is {image.manifest.digest}")
    requests = registry.requests(since=mark)
    uploads = sum(
        1
        for r in requests
        if r["method"] == "PUT" and "/blobs/uploads/" in r["path"] and r["status"] == 201
    )
    patches = sum(1 for r in requests if r["method"] == "PATCH")
    mounts = sum(1 for r in requests if "mount=" in r["query"])
    if mounts or uploads != image.blobs:
        raise SystemExit(
            f"{repo}: {uploads} blob uploads committed (expected {image.blobs}), "
            f"{mounts} mount requests: the run did not upload everything"
        )
    detail: dict[str, object] = {}
    if variant in ("ipd", "ipd64"):
        result = json.loads(text)
        detail = {k: result.get(k) for k in ("pushed_blobs", "mounted_blobs", "skipped_blobs")}
        if detail != {"pushed_blobs": image.blobs, "mounted_blobs": 0, "skipped_blobs": 0}:
            raise SystemExit(f"{repo}: imagepushd reports {detail}, expected every blob pushed")
        if result.get("digest") != image.manifest.digest:
            raise SystemExit(f"{repo}: imagepushd reports digest {result.get('digest')}")
    return Run(
        variant=variant,
        round=rnd,
        repo=repo,
        wall=wall,
        user=user,
        sys=system,
        rss_mib=rss,
        containerd_cpu=ctrd1 - ctrd0,
        registry_cpu=reg1 - reg0,
        uploads=uploads,
        patches=patches,
        mounts=mounts,
        detail=detail,
    )


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def hash_cpu(image: SourceImage, containerd: Containerd, workdir: Path) -> float:
    """CPU seconds of ``openssl dgst -sha256`` over the image's blob files (OpenSSL's SHA-256,
    the one Python's hashlib uses): what verifying every byte costs by itself."""
    blobs = containerd.root / "io.containerd.content.v1.content/blobs"
    cmd = ["openssl", "dgst", "-sha256"]
    cmd += [str(blobs / digest.replace(":", "/")) for digest, _ in image.contents]
    out = workdir / "sha256.out"
    code, _, user, system, _ = run_child(cmd, out)
    text = out.read_text()
    out.unlink()
    if code != 0 or any(digest.split(":")[1] not in text for digest, _ in image.contents):
        raise SystemExit(f"openssl dgst exited {code}:\n{text[-2000:]}")
    return user + system


def report(
    image: SourceImage, runs: list[Run], registry: Registry, expected: int, hashing: float
) -> bool:
    print(
        f"\n=== {image.size_gib} GiB image: {image.layer_count} x {image.layer_size // MiB} MiB "
        f"layers + config ({image.content_bytes / GiB:.3f} GiB), "
        f"{max(r.round for r in runs)} rounds ==="
    )
    print("runs (in order):")
    print(
        f"  {'rnd':>3} {'client':<17}{'wall s':>8}{'CPU s':>8}{'user':>7}{'sys':>6}{'RSS MiB':>9}"
        f"{'ctrd CPU':>10}{'reg CPU':>9}{'PATCH':>7}{'PUT':>5}{'mount':>6}"
    )
    for r in runs:
        print(
            f"  {r.round:>3} {LABELS[r.variant]:<17}{r.wall:>8.2f}{r.cpu:>8.2f}{r.user:>7.2f}"
            f"{r.sys:>6.2f}{r.rss_mib:>9.1f}"
            f"{r.containerd_cpu:>10.2f}{r.registry_cpu:>9.2f}{r.patches:>7}{r.uploads:>5}"
            f"{r.mounts:>6}"
        )
    med: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        mine = [r for r in runs if r.variant == variant]
        med[variant] = {
            "wall": statistics.median(r.wall for r in mine),
            "cpu": statistics.median(r.cpu for r in mine),
            "rss": max(r.rss_mib for r in mine),
            "ctrd": statistics.median(r.containerd_cpu for r in mine),
            "reg": statistics.median(r.registry_cpu for r in mine),
        }
    base = med["ctr"]
    floor = med.get("curl")
    gib = image.content_bytes / GiB
    print(
        "medians (peak RSS: max over rounds); ratios against ctr images push (x ctr) and "
        "the parallel curl floor (x curl):"
    )
    print(
        f"  {'client':<17}{'wall s':>8}{'CPU s':>8}{'CPU/GiB':>9}{'RSS MiB':>9}{'ctrd CPU':>10}"
        f"{'reg CPU':>9}{'MB/s':>7}{'wall x ctr':>11}{'CPU x ctr':>10}{'CPU+ctrd x ctr':>15}"
        + (f"{'wall x curl':>12}{'CPU x curl':>11}" if floor else "")
    )
    for variant, m in med.items():
        own = m["cpu"] + m["ctrd"]
        print(
            f"  {LABELS[variant]:<17}{m['wall']:>8.2f}{m['cpu']:>8.2f}{m['cpu'] / gib:>9.2f}"
            f"{m['rss']:>9.1f}{m['ctrd']:>10.2f}{m['reg']:>9.2f}"
            f"{image.content_bytes / m['wall'] / 1e6:>7.0f}"
            f"{m['wall'] / base['wall']:>11.2f}{m['cpu'] / base['cpu']:>10.2f}"
            f"{own / (base['cpu'] + base['ctrd']):>15.2f}"
            + (
                f"{m['wall'] / floor['wall']:>12.2f}{m['cpu'] / floor['cpu']:>11.2f}"
                if floor
                else ""
            )
        )
    if floor:
        verified = floor["cpu"] + hashing
        print(
            f"verification: openssl dgst -sha256 of the same blobs {hashing:.2f} CPU s "
            f"({hashing / gib:.2f}/GiB); parallel curl + that = {verified / gib:.2f} CPU s/GiB, "
            f"the floor for a client that hashes what it sends; imagepushd / floor = "
            f"{med['ipd']['cpu'] / verified:.2f}"
        )
    ok = True
    print("targets (imagepushd, default chunk size):")
    ipd = med["ipd"]
    checks = [
        (f"wall ratio to ctr <= {WALL_TARGET}", ipd["wall"] / base["wall"], WALL_TARGET, ""),
        (f"CPU ratio to ctr <= {CPU_TARGET}", ipd["cpu"] / base["cpu"], CPU_TARGET, ""),
        (f"CPU s/GiB <= {CPU_PER_GIB_TARGET}", ipd["cpu"] / gib, CPU_PER_GIB_TARGET, ""),
        (f"peak RSS <= {RSS_TARGET_MIB:.0f} MiB", ipd["rss"], RSS_TARGET_MIB, " MiB"),
    ]
    if floor:
        checks.insert(
            3,
            (
                f"wall ratio to curl <= {CURL_WALL_TARGET}",
                ipd["wall"] / floor["wall"],
                CURL_WALL_TARGET,
                "",
            ),
        )
    for name, value, limit, unit in checks:
        ok &= value <= limit
        print(f"  {name:<28}{verdict(value <= limit)}  ({value:.2f}{unit})")
    data = tree_bytes(registry.data_dir)
    blobs = tree_bytes(registry.data_dir / "docker/registry/v2/blobs")
    print(
        f"registry data: {data / GiB:.3f} GiB in all, blob store {blobs / GiB:.3f} GiB for "
        f"{expected / GiB:.3f} GiB of distinct content pushed so far "
        f"({len(runs)} pushes of this image): "
        + ("no duplication" if blobs <= expected + 16 * MiB else "DUPLICATED")
    )
    return ok


#: py-spy frame markers, checked in order: the first that occurs in a stack names its category.
PROFILE_CATEGORIES = (
    ("importing modules", ("_find_and_load",)),
    ("waiting for the registry's answer", ("_receive_response_headers",)),
    ("socket send (blocked or copying)", ("SyncStream.write",)),
    ("pread of the blob file", ("_Transfer.read",)),
    ("thread pool / queue wait", ("Condition.wait", "Event.wait", "Lock.acquire")),
)


def categorise(frames: list[str]) -> str:
    for name, markers in PROFILE_CATEGORIES:
        if any(marker in frame for frame in frames for marker in markers):
            return name
    leaf = frames[-1]
    if leaf.startswith("_Body._stream"):
        return "sha256 update (_Body._stream)"
    if leaf.startswith("_worker (") or leaf.startswith("thread ("):
        return "thread pool / queue wait"
    if any(lib in frame for frame in frames[-3:] for lib in ("httpcore/", "h11/", "httpx/")):
        return "httpx / httpcore / h11"
    return "other Python"


def profile_push(
    image: SourceImage, containerd: Containerd, registry: Registry, workdir: Path, rate: int
) -> None:
    """One imagepushd push under ``py-spy record --idle``: where each thread's time goes."""
    pyspy = REPO / ".venv/bin/py-spy"
    if not pyspy.exists():
        print("\n--profile: py-spy not found; install it with .venv/bin/pip install py-spy")
        return
    raw = workdir / "py-spy.txt"
    repo = f"bench/push-{image.size_gib}g-profile"
    cmd = [str(pyspy), "record", "--idle", "--threads", "-r", str(rate), "--format", "raw"]
    cmd += ["-o", str(raw), "--", str(REPO / ".venv/bin/imagepushd"), "push", image.name]
    cmd += [
        f"{registry.host}/{repo}:latest",
        "--root",
        str(containerd.root),
        "--plain-http",
        "--json",
    ]
    os.sync()
    code, wall, *_ = run_child(cmd, workdir / "py-spy.out")
    if code != 0:
        print(f"\n--profile: py-spy exited {code}: {(workdir / 'py-spy.out').read_text()[-2000:]}")
        return
    groups: dict[str, dict[str, int]] = {}
    leaves: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        group = "blob worker threads" if "blob_" in frames[0] else "main thread"
        category = categorise(frames)
        per = groups.setdefault(group, {})
        per[category] = per.get(category, 0) + int(count)
        if category not in ("thread pool / queue wait", "waiting for the registry's answer"):
            leaves[frames[-1]] = leaves.get(frames[-1], 0) + int(count)
    print(
        f"\nprofile: one imagepushd push of the {image.size_gib} GiB image under py-spy "
        f"({rate} Hz, idle included), {wall:.2f}s wall (slowed by sampling)"
    )
    for group, per in groups.items():
        total = sum(per.values())
        print(f"  {group}: {total / rate:.1f} thread-seconds")
        for category, n in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"    {n / total:6.1%} {n / rate:6.2f}s  {category}")
    busy = sum(leaves.values())
    print("  busiest lines (samples outside waits):")
    for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {n / busy:6.1%}  {leaf}")


BUSY_LOOP = "import sys\nn = int(sys.argv[1])\nwhile n:\n    n -= 1\n"
#: Seconds the push runs alone (start-up, plan, HEADs) before the competing build starts.
COMPETE_LEAD = 1.0
COMPETE_PROBE = 20_000_000


def still_running(pid: int) -> bool:
    """Whether child ``pid`` has not exited, without reaping it (wait_measured does that)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def run_build(count: int, placed: Placement) -> float:
    """The competing "build": a CPU-bound busy loop of ``count`` steps; its wall time."""
    started = time.perf_counter()
    proc = subprocess.Popen(placed.command([sys.executable, "-c", BUSY_LOOP, str(count)]))
    placed.join(proc.pid)
    code, _, _ = wait_measured(proc.pid)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"the busy loop exited {code}")
    return time.perf_counter() - started


def compete(
    image: SourceImage,
    containerd: Containerd,
    registry: Registry,
    workdir: Path,
    rounds: int,
    seconds: float,
) -> bool:
    """How much a push slows a CPU-bound build on the same CPU, without and with the unit's
    scheduling (systemd/imagepushd.service, applied by bench/_sched.py); True if less with."""
    unit = Scheduling.from_unit(REPO / "systemd" / "imagepushd.service")
    modes = {"today": Scheduling(), "unit": unit}
    cpu = max(os.sched_getaffinity(0))
    builds: dict[str, list[float]] = {"alone": [], "today": [], "unit": []}
    pushes: dict[str, list[Run]] = {"today": [], "unit": []}
    overlapped: dict[str, list[bool]] = {"today": [], "unit": []}
    with cpu_groups(f"imagepushd-bench-{os.getpid()}") as groups:
        build_at = Placement(cpu, groups.group("build", Scheduling().cpu_weight))
        push_at = {
            mode: Placement(cpu, groups.group(f"push-{mode}", sched.cpu_weight), sched)
            for mode, sched in modes.items()
        }
        count = int(COMPETE_PROBE * seconds / run_build(COMPETE_PROBE, build_at))
        print(
            f"\ncompeting build: a busy loop of {count} steps (~{seconds:.0f}s alone) and an "
            f"imagepushd push of the {image.size_gib} GiB image, both pinned to CPU {cpu}, in "
            f"sibling CPU cgroups ({'v2' if groups.v2 else 'v1'}); the registry wherever the "
            f"kernel puts it; the push starts {COMPETE_LEAD:.0f}s ahead",
            flush=True,
        )
        for rnd in range(1, rounds + 1):
            order = ["alone", "today", "unit"]
            for mode in order if rnd % 2 else order[::-1]:
                if mode == "alone":
                    builds[mode].append(run_build(count, build_at))
                    print(f"  round {rnd} build alone {builds[mode][-1]:7.2f}s", flush=True)
                    continue

                def during(proc: subprocess.Popen[bytes], mode: str = mode) -> None:
                    time.sleep(COMPETE_LEAD)
                    builds[mode].append(run_build(count, build_at))
                    overlapped[mode].append(still_running(proc.pid))

                run = push_once(
                    "ipd",
                    rnd,
                    image,
                    containerd,
                    registry,
                    workdir,
                    repo=f"bench/compete-{mode}-r{rnd}",
                    placed=push_at[mode],
                    during=during,
                )
                pushes[mode].append(run)
                print(
                    f"  round {rnd} build with push ({mode}) {builds[mode][-1]:7.2f}s; push "
                    f"{run.wall:.2f}s wall {run.cpu:.2f}s CPU",
                    flush=True,
                )
    alone = statistics.median(builds["alone"])
    print(f"build slowdown by a concurrent push (medians of {rounds} rounds):")
    print(f"  {'push scheduling':<50}{'build s':>9}{'slowdown':>10}{'push s':>8}{'push CPU':>9}")
    print(f"  {'(no push)':<50}{alone:>9.2f}{1.0:>10.2f}")
    slowdown: dict[str, float] = {}
    for mode, sched in modes.items():
        build = statistics.median(builds[mode])
        slowdown[mode] = build / alone
        label = f"{mode}: {sched.describe()}"
        partial = "" if all(overlapped[mode]) else "  (push ended before the build)"
        print(
            f"  {label:<50}{build:>9.2f}{slowdown[mode]:>10.2f}"
            f"{statistics.median(r.wall for r in pushes[mode]):>8.2f}"
            f"{statistics.median(r.cpu for r in pushes[mode]):>9.2f}{partial}"
        )
    ok = slowdown["unit"] < slowdown["today"]
    print(
        f"  the unit's settings slow the build less than today's: {verdict(ok)} "
        f"({slowdown['unit']:.2f} vs {slowdown['today']:.2f})"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,8", help="image sizes in GiB (default 1,8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"clients to run, of {','.join(VARIANTS)} (ipd and ctr are required)",
    )
    parser.add_argument("--workdir", type=Path, help="parent of the temporary directory")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then push the first image once more under py-spy (.venv/bin/py-spy) and break "
        "imagepushd's time down by thread and activity",
    )
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument(
        "--compete",
        action="store_true",
        help="then measure how much a push of the first image slows a CPU-bound build on the "
        "same CPU, with default scheduling and with the unit's (CPUWeight=, Nice=, I/O class)",
    )
    parser.add_argument("--compete-rounds", type=int, default=3)
    parser.add_argument(
        "--compete-seconds", type=float, default=4.0, help="the build's length alone"
    )
    parser.add_argument(
        "--skip-comparison",
        action="store_true",
        help="only --profile / --compete: no side-by-side runs of the clients",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    variants = [v for v in args.variants.split(",") if v]
    if not {"ipd", "ctr"} <= set(variants) or not set(variants) <= set(VARIANTS):
        parser.error(f"--variants must include ipd and ctr, from {','.join(VARIANTS)}")
    tools = ["containerd", "ctr", "docker-registry", "curl", "openssl"]
    tools += ["taskset", "nice", "ionice"] if args.compete else []
    if not require_root("bench/push.py") or not require_tools("bench/push.py", tools):
        return 2

    parent = args.workdir or Path(tempfile.gettempdir())
    total = sum(sizes) * GiB
    free = shutil.disk_usage(parent).free
    if free < DISK_FACTOR * total:
        print(
            f"bench/push.py: {free / GiB:.1f} GiB free under {parent}, need about "
            f"{DISK_FACTOR * total / GiB:.0f} GiB ({DISK_FACTOR} x {total / GiB:.0f} GiB of "
            "images: layer files, archive, containerd content, registry storage); "
            "free some space, pass fewer --sizes, or choose --workdir",
            file=sys.stderr,
        )
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-push-", dir=parent))
    containerd = Containerd(workdir / "containerd", ctr_timeout=3600)
    registry = Registry(workdir / "registry", log_level="warn")
    all_ok = True
    started = time.perf_counter()
    try:
        containerd.start()
        images = [build_and_import(containerd, workdir, size) for size in sizes]
        registry.start()
        print(f"registry at {registry.host}; containerd root {containerd.root}", flush=True)
        expected = 0
        for image in images:
            expected += image.content_bytes
            runs: list[Run] = []
            for rnd in range(1, 0 if args.skip_comparison else args.rounds + 1):
                order = variants if rnd % 2 else variants[::-1]
                for variant in order:
                    run = push_once(variant, rnd, image, containerd, registry, workdir)
                    runs.append(run)
                    print(
                        f"  {image.size_gib} GiB round {rnd} {LABELS[variant]:<17} "
                        f"{run.wall:7.2f}s wall {run.cpu:6.2f}s CPU {run.rss_mib:6.1f} MiB",
                        flush=True,
                    )
            if runs:
                hashing = hash_cpu(image, containerd, workdir)
                all_ok &= report(image, runs, registry, expected, hashing)
        if args.profile:
            profile_push(images[0], containerd, registry, workdir, args.profile_rate)
        if args.compete:
            all_ok &= compete(
                images[0], containerd, registry, workdir, args.compete_rounds, args.compete_seconds
            )
        print(f"\ntotal time {time.perf_counter() - started:.0f}s; all targets: {verdict(all_ok)}")
    finally:
        registry.close()
        containerd.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
