"""Benchmark: a full meta.db snapshot and ``imagepushd images -A --json`` over 10,000 images.

Run as root from the repository: ``.venv/bin/python bench/scan.py [--runs 20] [--profile]``.

Starts a private containerd (tests/support/containerd.py) under a temporary directory, imports
a few small images into 4 namespaces, tags them up to 10,000 images with ``ctr images tag SRC
DST...`` (500 targets per call), then times over ``--runs`` runs:

(a) ``MetadataStore.read()`` of all namespaces (one long-lived store, as the daemon would use);
(a') the same with ``blobs=True`` (what the ``images`` command reads);
(b) ``imagepushd images --root ROOT -A --json`` in-process (tests/support/cli.py ``run_cli``:
``imagepushd.cli.run`` writing to a StringIO);
(c) for reference, ``ctr -n NS images ls -q`` for each of the 4 namespaces, run one after another;
(i) ``read()`` again on a store made with ``reuse_records=True`` while nothing changed (the
daemon's repeated snapshot: pages are still read and compared, records are not decoded again);
(i') the same with ``blobs=True`` (what the daemon reads).

``--profile`` adds a cProfile of (b). containerd is always stopped at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from bench._proc import require_root  # noqa: E402
from imagepushd import cli  # noqa: E402
from imagepushd.watch.bbolt import BoltFile  # noqa: E402
from imagepushd.watch.metadata import ImageRecord, MetadataStore  # noqa: E402
from tests.support.cli import run_cli  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.images import Blob, ImageBuilder  # noqa: E402

NAMESPACES = ("default", "team-a", "team-b", "team-c")
TARGET_MS = 150.0


def build_sources(b: ImageBuilder) -> dict[str, Blob]:
    single = b.image([2000, 500], "bench/single")
    amd = b.manifest([b.layer(800, "bench/idx/amd")])
    arm = b.manifest([b.layer(800, "bench/idx/arm")], architecture="arm64", variant="v8")
    d_amd = b.manifest([b.layer(300, "bench/dl/amd", docker=True)], docker=True)
    d_arm = b.manifest(
        [b.layer(300, "bench/dl/arm", docker=True)], architecture="arm", variant="v7", docker=True
    )
    return {
        "registry.example.com/bench/single:1": single,
        "registry.example.com/bench/index:1": b.index([amd, arm]),
        "registry.example.com/bench/docker-list:1": b.index([d_amd, d_arm], docker=True),
    }


def populate(containerd: Containerd, workdir: Path, total: int, per_call: int) -> None:
    b = ImageBuilder()
    sources = build_sources(b)
    archive = workdir / "sources.tar"
    b.write_oci_archive(archive, sources)
    src_names = list(sources)
    per_ns = total // len(NAMESPACES)
    serial = 0
    for ns in NAMESPACES:
        containerd.create_namespace(ns)
        containerd.import_archive(archive, namespace=ns)
        remaining = per_ns - len(sources)
        while remaining > 0:
            k = min(per_call, remaining)
            names = [f"registry.example.com/team/app{serial + i:05d}:v{i % 10}" for i in range(k)]
            containerd.tag(src_names[serial // per_call % len(src_names)], *names, namespace=ns)
            serial += k
            remaining -= k


def wait_idle(db: Path, quiet: float = 0.5, limit: float = 10.0) -> None:
    """Let containerd's background GC settle so the timings see a still file."""
    deadline = time.monotonic() + limit
    with BoltFile(db) as bolt:
        txid = bolt.meta().txid
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = bolt.meta().txid
            if now == txid:
                return
            txid = now


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    fn()  # warm-up (page cache, imports, first open)
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def summary(samples: list[float]) -> tuple[float, float, float]:
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[18]
    return statistics.median(samples), p95, min(samples)


def breakdown(root: Path, runs: int) -> dict[str, list[float]]:
    """Time the stages of ``images -A --json`` separately: snapshot, rows, JSON encoding."""
    from imagepushd.watch.content import ContentStore

    store = MetadataStore.at_root(root)
    content = ContentStore(root)
    snap = store.read(blobs=True)

    def rows() -> list[tuple[ImageRecord, cli._TargetRow]]:
        shared: dict[tuple[str, str], cli._TargetRow] = {}
        out = []
        for record in snap.images:
            key = (record.namespace, record.target.digest)
            if key not in shared:
                known = snap.blobs.get(record.namespace, {})
                graph = content.walk(record.target, known)
                shared[key] = cli._TargetRow(record.namespace, record.target, graph, None)
            out.append((record, shared[key]))
        return out

    listing = rows()
    dicts = [cli._image_row(record, row) for record, row in listing]
    times = {
        "snapshot: read(blobs=True)": timed(lambda: store.read(blobs=True), runs),
        "rows: content.walk + _TargetRow per target": timed(rows, runs),
        "JSON: one _image_json line per image": timed(
            lambda: ",\n  ".join([cli._image_json(r, row) for r, row in listing]),
            runs,
        ),
        "(for comparison) json.dump(rows, indent=2)": timed(
            lambda: json.dump(dicts, io.StringIO(), indent=2), runs
        ),
    }
    store.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--per-call", type=int, default=500, help="tag targets per ctr call")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="cProfile the images command")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not require_root("bench/scan.py"):
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-"))
    containerd = Containerd(workdir / "containerd")
    try:
        containerd.start()
        started = time.perf_counter()
        populate(containerd, workdir, args.images, args.per_call)
        setup_s = time.perf_counter() - started
        db = containerd.meta_db
        wait_idle(db)
        root = str(containerd.root)

        store = MetadataStore.at_root(containerd.root)
        snap = store.read()
        if len(snap.images) != args.images:
            raise SystemExit(f"expected {args.images} images, snapshot has {len(snap.images)}")

        def images_json() -> str:
            outcome = run_cli(["images", "--root", root, "-A", "--json"], home=Path.home())
            if outcome.code != 0:
                raise SystemExit(f"images exited {outcome.code}: {outcome.stderr}")
            return outcome.stdout

        rows = json.loads(images_json())
        if len(rows) != args.images or not all(r["complete"] for r in rows):
            raise SystemExit(f"images --json gave {len(rows)} rows (or incomplete content)")

        ctr = shutil.which("ctr")
        assert ctr is not None

        def ctr_ls() -> int:
            n = 0
            for ns in NAMESPACES:
                out = subprocess.run(
                    [ctr, "-a", str(containerd.socket), "-n", ns, "images", "ls", "-q"],
                    capture_output=True,
                    check=True,
                    text=True,
                ).stdout
                n += len(out.split())
            return n

        if ctr_ls() != args.images:
            raise SystemExit("ctr images ls -q does not list every image")

        reusing = MetadataStore.at_root(containerd.root, reuse_records=True)
        reusing_blobs = MetadataStore.at_root(containerd.root, reuse_records=True)
        results = {
            "(a) read()": timed(store.read, args.runs),
            "(a') read(blobs=True)": timed(lambda: store.read(blobs=True), args.runs),
            "(b) images -A --json": timed(images_json, args.runs),
            "(c) ctr images ls -q x4": timed(ctr_ls, args.runs),
            "(i) read(), reuse, same": timed(reusing.read, args.runs),
            "(i') same, blobs=True": timed(lambda: reusing_blobs.read(blobs=True), args.runs),
        }
        if reusing.read().images != snap.images:
            raise SystemExit("reuse_records gave different images")
        store.close()
        reusing.close()
        reusing_blobs.close()

        with BoltFile(db) as bolt:
            meta = bolt.meta()
        size = db.stat().st_size
        ctr_median = statistics.median(results["(c) ctr images ls -q x4"])
        print(
            f"\n{args.images} images in {len(NAMESPACES)} namespaces "
            f"(setup {setup_s:.1f}s, {args.per_call} tag targets per ctr call)"
        )
        print(
            f"meta.db: {size:,} bytes ({size / 2**20:.2f} MiB), page size {meta.page_size}, "
            f"{meta.pgid:,} pages in use (high-water pgid), {size // meta.page_size:,} in file, "
            f"txid {meta.txid:,}"
        )
        print(f"{args.runs} runs each (after one warm-up), milliseconds\n")
        print(f"{'measurement':<26}{'median':>9}{'p95':>9}{'min':>9}{'vs ctr':>9}")
        for name, samples in results.items():
            med, p95, low = summary(samples)
            ratio = med / ctr_median
            print(f"{name:<26}{med:>9.1f}{p95:>9.1f}{low:>9.1f}{ratio:>8.2f}x")
        b_median = statistics.median(results["(b) images -A --json"])
        verdict = "met" if b_median < TARGET_MS else "MISSED"
        print(f"\ntarget (b) < {TARGET_MS:.0f} ms: {verdict} ({b_median:.1f} ms median)")
        print("\nbreakdown of (b) (replicates cmd_images; medians, ms):")
        for name, samples in breakdown(containerd.root, args.runs).items():
            print(f"  {name:<44}{statistics.median(samples):>8.1f}")

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(5):
                images_json()
            profiler.disable()
            print("\ncProfile of 5 runs of (b), by internal time:")
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(30)
    finally:
        containerd.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
