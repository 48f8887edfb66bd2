"""Benchmark: ``imagepushd push --archive`` against ``skopeo copy docker-archive:`` on one archive.

Run as root from the repository: ``.venv/bin/python bench/archive.py [--size-mib 1024]
[--rounds 2]``.

One ``docker save`` archive (a config and one layer of ``--size-mib`` incompressible bytes,
uncompressed, as ``docker save`` writes layers) is written once; one real docker-registry
(tests/support/registry.py, plain HTTP) receives, per round and alternating the order:

- ``imagepushd push --archive FILE HOST/ipd-N:latest --plain-http --json``;
- ``skopeo copy docker-archive:FILE docker://HOST/skopeo-N:latest --dest-tls-verify=false``.

Each push is a child process with a private, empty TMPDIR: wall time, CPU time (user+sys from
``os.wait4``), peak RSS (``VmHWM`` from ``/proc/PID/status``; see bench/_proc.py), and extra
disk: the peak size of its TMPDIR (polled every 10 ms, as the RSS is) and the peak drop in free
space of the file system under the registry and the archive (``statvfs``; this includes the
registry's own copy of the upload, the same for both tools, so the difference between the two is
what the tool itself wrote). The digest each tool pushed is read back with ``skopeo inspect
--raw``.

Note that skopeo gzip-compresses the uncompressed layer on its way to a registry (containers/
image does so by default), so it pushes a different, smaller-on-the-wire image; with random
bytes the layer does not shrink, so the bytes sent are comparable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._proc import wait_measured  # noqa: E402
from tests.support.images import write_large_docker_archive  # noqa: E402
from tests.support.registry import Registry  # noqa: E402

MiB = 1 << 20


@dataclass
class Run:
    tool: str
    wall: float
    cpu: float
    rss_mib: float
    tmp_peak_mib: float
    fs_peak_mib: float
    digest: str


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def run_child(tool: str, cmd: list[str], env: dict[str, str], tmpdir: Path, fs: Path) -> Run:
    before = free_bytes(fs)
    peaks = {"tmp": 0, "fs": 0}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )

    def poll() -> None:
        peaks["tmp"] = max(peaks["tmp"], tree_size(tmpdir))
        peaks["fs"] = max(peaks["fs"], before - free_bytes(fs))

    outputs: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        with stream:
            outputs[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=("out", proc.stdout)),
        threading.Thread(target=drain, args=("err", proc.stderr)),
    ]
    for reader in readers:
        reader.start()
    proc.returncode, usage, rss = wait_measured(proc.pid, poll)
    wall = time.monotonic() - started
    for reader in readers:
        reader.join()
    err = outputs["err"]
    if proc.returncode != 0:
        raise SystemExit(f"{tool} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return Run(
        tool,
        wall,
        usage.ru_utime + usage.ru_stime,
        rss / MiB,
        peaks["tmp"] / MiB,
        peaks["fs"] / MiB,
        "",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: /tmp)")
    args = parser.parse_args()
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise SystemExit("skopeo not found: apt-get install skopeo")
    work = Path(tempfile.mkdtemp(prefix="bench-archive-", dir=args.dir))
    try:
        archive = work / "saved.tar"
        started = time.monotonic()
        layer = write_large_docker_archive(archive, args.size_mib * MiB, "bench/archive:latest")
        print(
            f"archive: {archive.stat().st_size / MiB:.0f} MiB (layer {layer[:19]}…) written in "
            f"{time.monotonic() - started:.1f}s"
        )
        policy = work / "policy.json"
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        auth = work / "auth.json"
        auth.write_text('{"auths":{}}')
        tools = ["imagepushd", "skopeo"]
        runs: list[Run] = []
        for round_no in range(args.rounds):
            order = tools if round_no % 2 == 0 else tools[::-1]
            for tool in order:
                tmpdir = work / f"tmp-{tool}-{round_no}"
                tmpdir.mkdir()
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "HOME": str(work),
                    "DOCKER_CONFIG": str(work),
                    "TMPDIR": str(tmpdir),
                    "PYTHONPATH": str(REPO / "daemon"),
                }
                ref = f"{tool}:latest"
                # A fresh registry per run: nothing to skip, and nothing skopeo's blob-info
                # cache could mount from an earlier run's repository instead of uploading.
                with Registry(work / f"registry-{tool}-{round_no}") as registry:
                    if tool == "imagepushd":
                        cmd = [sys.executable, "-m", "imagepushd", "push", "--archive"]
                        cmd += [str(archive), f"{registry.host}/{ref}", "--plain-http", "--json"]
                    else:
                        cmd = [skopeo, f"--policy={policy}", "copy", f"--dest-authfile={auth}"]
                        cmd += ["--dest-tls-verify=false", f"docker-archive:{archive}"]
                        cmd += [f"docker://{registry.host}/{ref}"]
                    result = run_child(tool, cmd, env, tmpdir, work)
                    result.digest = registry.skopeo_inspect_digest(ref, creds=None)
                shutil.rmtree(work / f"registry-{tool}-{round_no}")
                runs.append(result)
                print(
                    f"round {round_no + 1} {tool:10} wall {result.wall:6.2f}s  "
                    f"CPU {result.cpu:6.2f}s  peak RSS {result.rss_mib:6.1f} MiB  "
                    f"TMPDIR peak {result.tmp_peak_mib:7.1f} MiB  "
                    f"fs peak {result.fs_peak_mib:7.1f} MiB  {result.digest[:19]}…"
                )
                shutil.rmtree(tmpdir)
        print("\nmedians over rounds:")
        for tool in tools:
            mine = [r for r in runs if r.tool == tool]
            print(
                f"  {tool:10} wall {statistics.median(r.wall for r in mine):6.2f}s  "
                f"CPU {statistics.median(r.cpu for r in mine):6.2f}s  "
                f"peak RSS {statistics.median(r.rss_mib for r in mine):6.1f} MiB  "
                f"TMPDIR peak {max(r.tmp_peak_mib for r in mine):7.1f} MiB  "
                f"fs peak {statistics.median(r.fs_peak_mib for r in mine):7.1f} MiB"
            )
        for tool in tools:
            print(f"{tool} pushed: {sorted({r.digest for r in runs if r.tool == tool})}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
