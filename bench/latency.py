"""Benchmark: time from ``ctr images tag`` to the manifest in the registry, and idle CPU.

Run as root from the repository: ``.venv/bin/python bench/latency.py [--tags 50] [--idle 60]``.

Starts a private containerd (tests/support/containerd.py) and a real docker-registry
(tests/support/registry.py), writes a configuration with one rule matching ``HOST/team/**``
(target ``{image}``: the name says where it goes), plain HTTP to the registry and
``settle = "0s"`` (its smallest), and starts ``imagepushd --config CFG run`` as a subprocess with
a notify socket (tests/support/daemon.py), waiting for ``READY=1``. One small image (two layers,
a few KiB) is then imported under a name no rule matches, and for i in 1..N:

- ``ctr images tag SRC HOST/team/app:tI`` is run; the clock starts just before the call;
- ``HEAD /v2/team/app/manifests/tI`` is polled with httpx every 10 ms; the latency is the time
  of the first 200 (its ``Docker-Content-Digest`` must be the source's digest);
- before the next tag the daemon is let go back to idle (``STATUS=idle · I pushed``), so every
  tag finds it waiting, as a tag on a quiet host would.

Each latency is split, from the notify socket's ``STATUS=`` datagrams, into ``ctr`` (the ctr
call itself), ``detect`` (ctr returned → the job dispatched, ``STATUS=pushing 1``: inotify,
debounce, scan, plan, state writes) and ``push`` (dispatched → the manifest answered 200).
Tag 1 uploads the blobs; later tags find them in the repository and only put the manifest.
The ``→idle`` column is when ``STATUS=idle · I pushed`` arrived (the job reaped) relative to
the poll's first 200, so it can be a few ms negative (the poll sees the 200 up to ~15 ms late).

Then the daemon is left alone for ``--idle`` seconds: its CPU time (utime+stime from
``/proc/PID/stat``) at the start and the end of the window gives CPU seconds per minute; the
threads' on-CPU time from ``/proc/PID/task/*/schedstat`` gives the same at ns resolution (a tick
is 10 ms), their voluntary context switches (``.../status``) count the wake-ups, and
meta.db's txid is compared to show whether containerd committed anything meanwhile. Peak RSS is
``VmHWM`` from ``/proc/PID/status``.

Targets: median latency < 1 s; idle CPU < 0.1 s per minute. Exit status 1 if one is missed.
Everything (containerd root, registry storage, daemon state and log) lives in one temporary
directory, removed at the end (``--keep`` keeps it, e.g. to read the daemon's log).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from bench._proc import CLK_TCK, proc_ticks, require_root, require_tools, verdict  # noqa: E402
from imagepushd.watch.bbolt import BoltFile  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.daemon import Daemon, render_config  # noqa: E402
from tests.support.images import ImageBuilder, sha256_digest  # noqa: E402
from tests.support.registry import MANIFEST_ACCEPT, Registry  # noqa: E402

SOURCE = "example.com/bench/latency:source"
REPOSITORY = "team/app"
POLL = 0.010
PUSH_TIMEOUT = 30.0
LATENCY_TARGET = 1.0
IDLE_TARGET = 0.1


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict (values as written, e.g. ``"41236 kB"``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> float:
    """``"41236 kB"`` → MiB."""
    return int(value.split(maxsplit=1)[0]) / 1024


def run_ns(pid: int) -> int:
    """Time on CPU of all of ``pid``'s threads in ns (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split(maxsplit=1)[0])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return total


def thread_switches(pid: int) -> dict[int, int]:
    """Voluntary context switches per thread id (each one is a thread going to sleep)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out[int(task.name)] = int(line.split()[1])
    return out


def txid(db: Path) -> int:
    with BoltFile(db) as bolt:
        return bolt.meta().txid


def summary(samples: list[float]) -> tuple[float, float, float, float]:
    """median, p95, min, max."""
    p95 = statistics.quantiles(samples, n=20, method="inclusive")[18]
    return statistics.median(samples), p95, min(samples), max(samples)


def wait_status(daemon: Daemon, accept: Callable[[str], bool], since: int, timeout: float) -> float:
    """Arrival time (monotonic) of the first ``STATUS=`` after ``since`` that ``accept`` likes."""
    return daemon.wait_notify("STATUS", accept, since=since, timeout=timeout).at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tags", type=int, default=50, help="tags to time (default 50)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, s (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.tags < 2:
        parser.error("--tags must be at least 2")
    if not require_root("bench/latency.py") or not require_tools(
        "bench/latency.py", ("containerd", "ctr", "docker-registry")
    ):
        return 2
    ctr = shutil.which("ctr")
    assert ctr is not None

    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-latency-"))
    containerd = Containerd(workdir / "containerd")
    registry = Registry(workdir / "registry", log_level="warn")
    daemon: Daemon | None = None
    client: httpx.Client | None = None
    try:
        containerd.start()
        registry.start()
        host = registry.host
        daemon = Daemon(workdir / "daemon")
        daemon.write_config(
            render_config(
                root=containerd.root,
                state=workdir / "daemon" / "state" / "state.db",
                push={"settle": "0s"},
                rules=[{"match": [f"{host}/team/**"]}],
                registries={host: {"plain_http": True}},
            )
        )
        started = time.monotonic()
        ready = daemon.start()
        assert ready is not None
        pid = daemon.pid
        print(
            f"registry {host}; containerd root {containerd.root}; daemon pid {pid} "
            f"READY=1 after {ready.at - started:.2f}s",
            flush=True,
        )

        b = ImageBuilder()
        image = b.image([3000, 700], "bench/latency")
        archive = workdir / "source.tar"
        b.write_oci_archive(archive, {SOURCE: image})
        containerd.import_archive(archive)
        archive.unlink()
        content = sum(blob.size for blob in b.blobs_of(image))
        print(f"imported {SOURCE} ({image.digest}, {content:,} bytes of content)", flush=True)

        client = httpx.Client(base_url=registry.url, timeout=5.0)
        ctr_cmd = [ctr, "-a", str(containerd.socket), "-n", "default", "images", "tag", SOURCE]
        # Let the daemon digest the import (not matched: nothing to push) and be idle.
        time.sleep(0.5)

        latencies: list[float] = []
        ctr_times: list[float] = []
        detects: list[float] = []
        pushes: list[float] = []
        idle_gaps: list[float] = []
        ticks_before = proc_ticks(pid)
        phase_started = time.monotonic()
        for i in range(1, args.tags + 1):
            tag = f"t{i}"
            mark = daemon.mark()
            t0 = time.monotonic()
            dst = f"{host}/{REPOSITORY}:{tag}"
            subprocess.run([*ctr_cmd, dst], check=True, capture_output=True)
            t_ctr = time.monotonic()
            url = f"/v2/{REPOSITORY}/manifests/{tag}"
            while True:
                resp = client.head(url, headers={"Accept": MANIFEST_ACCEPT})
                now = time.monotonic()
                if resp.status_code == 200:
                    break
                if now - t0 > PUSH_TIMEOUT:
                    raise SystemExit(
                        f"{tag} not in the registry within {PUSH_TIMEOUT}s:\n{daemon.log_tail()}"
                    )
                time.sleep(POLL)
            served = resp.headers.get("Docker-Content-Digest")
            if served != image.digest:
                raise SystemExit(f"{tag}: registry serves {served}, source is {image.digest}")
            dispatched = wait_status(daemon, lambda s: s.startswith("pushing"), mark, 10.0)
            idle = wait_status(
                daemon, lambda s, i=i: s.startswith(f"idle · {i} pushed"), mark, 10.0
            )
            latencies.append(now - t0)
            ctr_times.append(t_ctr - t0)
            detects.append(dispatched - t_ctr)
            pushes.append(now - dispatched)
            idle_gaps.append(idle - now)
        ticks_after = proc_ticks(pid)
        phase = time.monotonic() - phase_started

        print(f"\n{args.tags} tags of one image, one after another (ms):")
        print(f"  {'tag':>4}{'latency':>9}{'ctr':>8}{'detect':>8}{'push':>8}{'→idle':>8}")
        for i in sorted({0, 1, 2, len(latencies) - 1}):
            print(
                f"  {'t' + str(i + 1):>4}{latencies[i] * 1e3:>9.0f}{ctr_times[i] * 1e3:>8.0f}"
                f"{detects[i] * 1e3:>8.0f}{pushes[i] * 1e3:>8.0f}{idle_gaps[i] * 1e3:>8.0f}"
            )
        print(f"\n  {'':<32}{'median':>8}{'p95':>8}{'min':>8}{'max':>8}")
        rows = {
            "latency: tag → manifest 200": latencies,
            "  ctr images tag": ctr_times,
            "  detect: ctr done → dispatched": detects,
            "  push: dispatched → 200": pushes,
            "(push done → STATUS idle)": idle_gaps,
        }
        for name, samples in rows.items():
            med, p95, low, high = summary([s * 1e3 for s in samples])
            print(f"  {name:<32}{med:>8.0f}{p95:>8.0f}{low:>8.0f}{high:>8.0f}")
        later = latencies[1:]
        print(
            f"  tags 2..{args.tags} only (blobs already there): median "
            f"{statistics.median(later) * 1e3:.0f} ms, p95 {summary(later)[1] * 1e3:.0f} ms"
        )
        busy_cpu = (ticks_after - ticks_before) / CLK_TCK
        print(
            f"daemon CPU over the tag phase: {busy_cpu:.2f}s in {phase:.1f}s "
            f"({busy_cpu / args.tags * 1e3:.0f} ms per tag)"
        )

        # Idle: nothing tagged, nothing due. Let the last reap and status settle first.
        time.sleep(1.0)
        db = containerd.meta_db
        txid0 = txid(db)
        switches0 = thread_switches(pid)
        ticks0, ns0 = proc_ticks(pid), run_ns(pid)
        idle_started = time.monotonic()
        time.sleep(args.idle)
        ticks1, ns1 = proc_ticks(pid), run_ns(pid)
        idle_s = time.monotonic() - idle_started
        switches1 = thread_switches(pid)
        txid1 = txid(db)
        idle_cpu = (ticks1 - ticks0) / CLK_TCK
        per_min = idle_cpu / idle_s * 60
        wakes = {tid: switches1[tid] - switches0.get(tid, 0) for tid in switches1}
        total_wakes = sum(wakes.values())
        print(
            f"\nidle {idle_s:.1f}s: daemon CPU {ticks1 - ticks0} ticks ({idle_cpu:.2f}s, "
            f"tick {1e3 / CLK_TCK:.0f} ms) = {per_min:.3f} s per minute; "
            f"meta.db txid {txid0} → {txid1}"
        )
        print(
            f"  on-CPU time of its threads (schedstat, ns resolution): {(ns1 - ns0) / 1e6:.1f} ms "
            f"= {(ns1 - ns0) / 1e9 / idle_s * 60:.4f} s per minute"
        )
        per_thread = ", ".join(
            f"{n / idle_s * 60:.0f}" for n in sorted(wakes.values(), reverse=True)
        )
        print(
            f"  wake-ups (voluntary context switches): {total_wakes / idle_s * 60:.0f} per minute "
            f"over {len(wakes)} threads (per thread, per minute: {per_thread})"
        )
        status = proc_status(pid)
        print(
            f"daemon memory: VmHWM {kib(status['VmHWM']):.1f} MiB (peak RSS), "
            f"VmRSS {kib(status['VmRSS']):.1f} MiB, {status['Threads']} threads"
        )
        if not daemon.running:
            raise SystemExit(f"the daemon exited during the run:\n{daemon.log_tail()}")

        median = statistics.median(latencies)
        ok_latency = median < LATENCY_TARGET
        ok_idle = per_min < IDLE_TARGET
        print("\ntargets:")
        print(
            f"  median tag → registry < {LATENCY_TARGET:.0f} s     {verdict(ok_latency)}  "
            f"({median * 1e3:.0f} ms; p95 {summary(latencies)[1] * 1e3:.0f} ms)"
        )
        print(
            f"  idle CPU < {IDLE_TARGET} s per minute     {verdict(ok_idle)}  "
            f"({per_min:.3f} s per minute)"
        )
        digest = sha256_digest(registry.manifest(f"{REPOSITORY}:t1"))
        assert digest == image.digest, digest
        return 0 if ok_latency and ok_idle else 1
    finally:
        if client is not None:
            client.close()
        if daemon is not None:
            daemon.close()
        registry.close()
        containerd.close()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
