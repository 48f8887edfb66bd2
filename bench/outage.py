"""Benchmark: a registry outage while matching images are tagged: log noise and recovery time.

Run as root from the repository: ``.venv/bin/python bench/outage.py [--down 75] [--images 3]``.
``--code DIR`` runs the daemon from another checkout's package directory (for example
``--code /work/main/daemon`` for a before/after comparison on the same machine); it is put on
the daemon's ``PYTHONPATH``, ahead of this checkout's editable install.

Starts a private containerd and a real docker-registry (tests/support/), and
``imagepushd run`` with one rule matching ``HOST/team/**``, plain HTTP, ``settle = "100ms"``
and otherwise the default ``[push]`` settings (retry and job backoff included). One image is
pushed first, so the daemon has talked to the registry. Then:

- the registry is stopped, and ``--images`` small images are tagged to matching names;
- after ``--down`` seconds the registry is started again on the same port and storage;
- the manifests are polled (every 50 ms) until every image is served with its digest.

Printed: the WARNING and ERROR lines the daemon logged while the registry was down and from its
return until the last image was served, every line during that time, the seconds from the
return to each image being served, and the daemon's CPU seconds (utime+stime) over the run.
Every image is then checked with skopeo (digest equal, every blob pulled).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "daemon"))

from bench._proc import proc_cpu, require_root, require_tools  # noqa: E402
from tests.support.containerd import Containerd, load  # noqa: E402
from tests.support.daemon import Daemon, render_config  # noqa: E402
from tests.support.images import ImageBuilder  # noqa: E402
from tests.support.registry import MANIFEST_ACCEPT, Registry  # noqa: E402

SERVE_TIMEOUT = 600.0


def served(client: httpx.Client, tag: str) -> str | None:
    """The digest of the manifest served at ``team/app:TAG``, or None."""
    try:
        resp = client.get(f"/v2/team/app/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT})
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return "sha256:" + hashlib.sha256(resp.content).hexdigest()


def noisy(lines: list[str]) -> list[str]:
    """The WARNING and ERROR lines (the daemon's stderr format: ``imagepushd: LEVEL: ...``)."""
    return [line for line in lines if ": WARNING: " in line or ": ERROR: " in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--down", type=float, default=75.0, help="outage, s (default 75)")
    parser.add_argument("--images", type=int, default=3, help="images tagged (default 3)")
    parser.add_argument("--code", type=Path, help="run the daemon's package from this directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not require_root("bench/outage.py") or not require_tools(
        "bench/outage.py", ("containerd", "ctr", "docker-registry", "skopeo")
    ):
        return 2
    env = {}
    if args.code is not None:
        if not (args.code / "imagepushd" / "__init__.py").exists():
            parser.error(f"--code {args.code}: no imagepushd package there")
        env["PYTHONPATH"] = os.fspath(args.code.resolve())

    workdir = Path(tempfile.mkdtemp(prefix="imagepushd-bench-outage-"))
    containerd = Containerd(workdir / "containerd")
    registry = Registry(workdir / "registry", log_level="warn")
    daemon = Daemon(workdir / "daemon", env=env)
    try:
        containerd.start()
        registry.start()
        host = registry.host
        b = ImageBuilder()
        images = {
            f"build/app:{i}": b.image([3000, 700], f"bench/outage/{i}")
            for i in range(1 + args.images)
        }
        load(containerd, b, workdir, images)
        daemon.write_config(
            render_config(
                root=containerd.root,
                state=workdir / "daemon" / "state" / "state.db",
                push={"settle": "100ms"},
                rules=[{"match": [f"{host}/team/**"]}],
                registries={host: {"plain_http": True}},
            )
        )
        where = subprocess.run(
            [daemon.python, "-c", "import imagepushd; print(imagepushd.__file__)"],
            env=daemon.environment(),
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"daemon code: {where.stdout.strip()}")
        daemon.start()
        pid = daemon.pid
        cpu0 = proc_cpu(pid)
        client = httpx.Client(base_url=registry.url, timeout=5.0)
        containerd.tag("build/app:0", f"{host}/team/app:0")
        deadline = time.monotonic() + 60
        while served(client, "0") != images["build/app:0"].digest:
            if time.monotonic() > deadline:
                raise SystemExit(f"warm-up push not served:\n{daemon.log_tail()}")
            time.sleep(0.05)
        daemon.wait_notify("STATUS", "idle · 1 pushed")

        registry.stop()
        down_mark = daemon.log_mark()
        down_at = time.monotonic()
        for i in range(1, 1 + args.images):
            containerd.tag(f"build/app:{i}", f"{host}/team/app:{i}")
        time.sleep(max(0.0, args.down - (time.monotonic() - down_at)))
        registry.start()
        back = time.monotonic()
        back_mark = daemon.log_mark()
        during = daemon.log_text(down_mark)[: back_mark - down_mark].splitlines()

        landed: dict[int, float] = {}
        while len(landed) < args.images:
            for i in range(1, 1 + args.images):
                if i not in landed and served(client, str(i)) == images[f"build/app:{i}"].digest:
                    landed[i] = time.monotonic() - back
            if time.monotonic() - back > SERVE_TIMEOUT:
                raise SystemExit(f"not all served in {SERVE_TIMEOUT}s:\n{daemon.log_tail()}")
            time.sleep(0.05)
        after = daemon.log_text(back_mark).splitlines()
        cpu = proc_cpu(pid) - cpu0
        client.close()
        for i in range(1, 1 + args.images):
            registry.verify_image(
                f"team/app:{i}", images[f"build/app:{i}"].digest, workdir / "pull"
            )

        print(
            f"\nregistry down {back - down_at:.0f}s with {args.images} image(s) tagged; "
            "daemon log while down:"
        )
        for line in during:
            print(f"  | {line}")
        print("after the return, until the last push:")
        for line in after:
            print(f"  | {line}")
        print(
            f"\nwarning/error lines while down: {len(noisy(during))} (all lines {len(during)}); "
            f"after the return: {len(noisy(after))} (all lines {len(after)})"
        )
        print(
            "served after the return: "
            + ", ".join(f"app:{i} {landed[i]:.1f}s" for i in sorted(landed))
            + f"; last {max(landed.values()):.1f}s"
        )
        print(f"daemon CPU over the run: {cpu:.2f}s; skopeo: every image's digest and blobs OK")
        return 0
    finally:
        daemon.close()
        registry.close()
        containerd.close()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
