"""Benchmark: the daemon's CPU on a busy build machine, against image count and commit rate.

Run as root from the repository:
``.venv/bin/python bench/busy.py [--images 100,1000,10000] [--rates 2,4.7,7,max] [--window 60]``.

A build machine's containerd commits all day for reasons unrelated to images (BuildKit and the
CRI create and delete leases, containers and snapshots for every build step). This starts a
private containerd (tests/support/containerd.py), a real docker-registry
(tests/support/registry.py) and ``imagepushd run`` as a subprocess (tests/support/daemon.py)
with one rule matching ``HOST/team/**`` and ``settle = "0s"``. For each image count (ascending),
with the daemon stopped, containerd is filled up to that many images (``ctr images tag SRC
DST...``, 500 names per call; none matches the rule), then the daemon is started and waited for
(``READY=1``), and:

- idle: nothing happens for ``--window`` seconds;
- churn at each rate of ``--rates``: a loop of ``ctr leases create --id ID`` / ``ctr leases
  delete ID`` (one commit each) paced to that many calls per second (``max``: back to back)
  runs for ``--window`` seconds;
- latency under churn: with churn at ``--latency-rate`` running, ``--tags`` matching tags are
  made one after another (``ctr images tag SRC HOST/team/app:TAG``) and the registry is polled
  (``HEAD /v2/team/app/manifests/TAG``, every 10 ms) until it serves the source's digest.

The daemon's CPU is utime+stime from ``/proc/PID/stat`` at the start and end of each window,
given as CPU seconds per minute; the commit rate is meta.db's txid advance over the window.
Targets (issue 13): with 10,000 images under churn of about 7 commits/s (the measured rate
nearest to it; a lease delete adds a GC commit, so 4.7 calls/s) < 1 CPU s per minute, idle
< 0.1, median tag-to-registry latency under churn at ``--latency-rate`` < 0.5 s. Exit status 1
if one is missed. Everything lives in one temporary directory, removed at the end (``--keep``
keeps it, e.g. for the daemon's log).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from bench._proc import proc_cpu, require_root, require_tools, verdict  # noqa: E402
from imagepushd.watch.bbolt import BoltFile  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.daemon import Daemon, render_config  # noqa: E402
from tests.support.images import ImageBuilder  # noqa: E402
from tests.support.registry import MANIFEST_ACCEPT, Registry  # noqa: E402

FILLER = "example.com/fill/base:1"
SOURCE = "example.com/bench/busy:source"
REPOSITORY = "team/app"
PER_CALL = 500
POLL = 0.010
PUSH_TIMEOUT = 60.0
CHURN_TARGET = 1.0
ISSUE_COMMITS = 7.0
IDLE_TARGET = 0.1
LATENCY_TARGET = 0.5


def txid(db: Path) -> int:
    with BoltFile(db) as bolt:
        return bolt.meta().txid


def wait_quiet(db: Path, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until meta.db's txid stays put for ``quiet`` seconds (containerd's GC settled)."""
    deadline = time.monotonic() + limit
    last = txid(db)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = txid(db)
        if now == last:
            return
        last = now


_LEASE_IDS = itertools.count()


class Churn:
    """A thread creating and deleting leases, ``rate`` ctr calls per second (None: flat out).

    Each call is one commit of containerd's; a lease delete may add a garbage collection's.
    """

    def __init__(self, ctr: list[str], rate: float | None) -> None:
        self._ctr = ctr
        self._rate = rate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._error: subprocess.CalledProcessError | None = None
        self.calls = 0

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise SystemExit(f"churn failed: {self._error.stderr.decode(errors='replace')}")

    def _run(self) -> None:
        started = time.monotonic()
        try:
            while True:
                lease = f"busy-{next(_LEASE_IDS)}"
                for args in (["create", "--id", lease], ["delete", lease]):
                    if self._stop.is_set():
                        return
                    subprocess.run([*self._ctr, "leases", *args], check=True, capture_output=True)
                    self.calls += 1
                    if self._rate is not None:
                        self._stop.wait(started + self.calls / self._rate - time.monotonic())
        except subprocess.CalledProcessError as exc:
            self._error = exc


@dataclass
class Row:
    images: int
    load: str
    commits_per_s: float
    cpu_per_min: float


def measure(pid: int, db: Path, window: float) -> tuple[float, float]:
    """The daemon's CPU seconds per minute and meta.db's commits per second over ``window``."""
    cpu0, tx0, t0 = proc_cpu(pid), txid(db), time.monotonic()
    time.sleep(window)
    cpu1, tx1, t1 = proc_cpu(pid), txid(db), time.monotonic()
    return (cpu1 - cpu0) / (t1 - t0) * 60, (tx1 - tx0) / (t1 - t0)


def fill(containerd: Containerd, start: int, stop: int) -> None:
    """Tag filler images ``start..stop-1`` (names no rule matches)."""
    for first in range(start, stop, PER_CALL):
        last = min(stop, first + PER_CALL)
        names = [f"example.com/fill/app{n:05d}:v{n % 10}" for n in range(first, last)]
        containerd.tag(FILLER, *names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", default="100,1000,10000", help="image counts, ascending")
    parser.add_argument(
        "--rates", default="2,4.7,7,max", help="ctr calls per second (max: flat out)"
    )
    parser.add_argument(
        "--latency-rate", type=float, default=7.0, help="ctr calls per second while tagging"
    )
    parser.add_argument("--window", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--tags", type=int, default=10, help="tags timed under churn per count")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    counts = [int(c) for c in args.images.split(",")]
    rates = [None if r == "max" else float(r) for r in args.rates.split(",")]
    if counts != sorted(counts) or counts[0] < 3:
        parser.error("--images must be ascending counts of at least 3")
    if not require_root("bench/busy.py") or not require_tools(
        "bench/busy.py", ("containerd", "ctr", "docker-registry")
    ):
        return 2
    ctr_path = shutil.which("ctr")
    assert ctr_path is not None

    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-busy-"))
    containerd = Containerd(workdir / "containerd")
    registry = Registry(workdir / "registry", log_level="warn")
    daemon = Daemon(workdir / "daemon")
    client: httpx.Client | None = None
    rows: list[Row] = []
    latencies: dict[int, list[float]] = {}
    try:
        containerd.start()
        registry.start()
        host = registry.host
        ctr = [ctr_path, "-a", str(containerd.socket), "-n", "default"]
        daemon.write_config(
            render_config(
                root=containerd.root,
                state=workdir / "daemon" / "state.db",
                push={"settle": "0s"},
                rules=[{"match": [f"{host}/team/**"]}],
                registries={host: {"plain_http": True}},
            )
        )
        b = ImageBuilder()
        filler = b.image([1000, 300], "bench/busy/filler")
        image = b.image([3000, 700], "bench/busy/source")
        archive = workdir / "sources.tar"
        b.write_oci_archive(archive, {FILLER: filler, SOURCE: image})
        containerd.import_archive(archive)
        client = httpx.Client(base_url=registry.url, timeout=5.0)
        db = containerd.meta_db
        have = 2  # the two imported images
        for count in counts:
            started = time.monotonic()
            fill(containerd, have - 2, count - 2)
            have = count
            wait_quiet(db)
            daemon.start(timeout=300.0)
            print(
                f"{count} images (filled in {time.monotonic() - started:.0f}s); "
                f"daemon pid {daemon.pid} ready",
                flush=True,
            )
            time.sleep(2.0)
            cpu, commits = measure(daemon.pid, db, args.window)
            rows.append(Row(count, "idle", commits, cpu))
            print(f"  idle: {cpu:.3f} CPU s/min ({commits:.1f} commits/s)", flush=True)
            for rate in rates:
                with Churn(ctr, rate):
                    time.sleep(1.0)
                    cpu, commits = measure(daemon.pid, db, args.window)
                label = "churn max" if rate is None else f"churn {rate:g}/s"
                rows.append(Row(count, label, commits, cpu))
                print(f"  {label}: {cpu:.3f} CPU s/min ({commits:.1f} commits/s)", flush=True)
            samples: list[float] = []
            with Churn(ctr, args.latency_rate):
                time.sleep(1.0)
                for i in range(args.tags):
                    tag = f"c{count}-t{i}"
                    t0 = time.monotonic()
                    subprocess.run(
                        [*ctr, "images", "tag", SOURCE, f"{host}/{REPOSITORY}:{tag}"],
                        check=True,
                        capture_output=True,
                    )
                    while True:
                        resp = client.head(
                            f"/v2/{REPOSITORY}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
                        )
                        if resp.status_code == 200:
                            break
                        if time.monotonic() - t0 > PUSH_TIMEOUT:
                            raise SystemExit(f"{tag} not pushed in time:\n{daemon.log_tail()}")
                        time.sleep(POLL)
                    samples.append(time.monotonic() - t0)
                    served = resp.headers.get("Docker-Content-Digest")
                    if served != image.digest:
                        raise SystemExit(f"{tag}: registry serves {served}, not {image.digest}")
                    time.sleep(0.5)
            latencies[count] = samples
            median = statistics.median(samples) * 1e3
            print(f"  tag → registry, churn {args.latency_rate:g}/s: median {median:.0f} ms")
            if not daemon.running:
                raise SystemExit(f"the daemon exited:\n{daemon.log_tail()}")
            daemon.stop()

        print(f"\ndaemon CPU seconds per minute ({args.window:g}s windows, utime+stime)")
        loads = list(dict.fromkeys(r.load for r in rows))
        header = "".join(f"{load:>22}" for load in loads)
        print(f"{'images':>8}{header}{'tag→registry':>16}")
        for count in counts:
            cells = []
            for load in loads:
                row = next(r for r in rows if r.images == count and r.load == load)
                cells.append(f"{row.cpu_per_min:>8.3f} ({row.commits_per_s:>4.1f} c/s)")
            med = statistics.median(latencies[count])
            print(f"{count:>8}" + "".join(f"{c:>22}" for c in cells) + f"{med * 1e3:>13.0f} ms")

        top = counts[-1]
        # The target's churn is issue 13's: about 7 commits/s (the nearest measured rate).
        churn = [r for r in rows if r.images == top and r.load != "idle"]
        target = min(churn, key=lambda r: abs(r.commits_per_s - ISSUE_COMMITS))
        idle = max(r.cpu_per_min for r in rows if r.load == "idle")
        med = statistics.median(latencies[top])
        print("\ntargets:")
        ok_churn = target.cpu_per_min < CHURN_TARGET
        ok_idle = idle < IDLE_TARGET
        ok_latency = med < LATENCY_TARGET
        print(
            f"  {top} images, {target.commits_per_s:.1f} commits/s < {CHURN_TARGET:g} CPU s/min"
            f"  {verdict(ok_churn)}"
        )
        print(f"  idle < {IDLE_TARGET:g} CPU s/min                  {verdict(ok_idle)}")
        print(f"  median tag → registry under churn < {LATENCY_TARGET:g} s  {verdict(ok_latency)}")
        return 0 if ok_churn and ok_idle and ok_latency else 1
    finally:
        if client is not None:
            client.close()
        daemon.close()
        registry.close()
        containerd.close()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
