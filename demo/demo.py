"""``make demo``: the main job end to end on a private containerd and a private registry.

Starts containerd and a CNCF registry on loopback, runs ``imagepushd run`` with a config of
one rule, imports and tags an image the way a build would, and shows it pushed and verified
(manifest digest equal to the source, every blob pulled back by skopeo), then cleans up.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.containerd import Containerd  # noqa: E402
from tests.support.images import ImageBuilder  # noqa: E402
from tests.support.registry import Registry  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="imagepushd-demo-") as tmp:
        work = Path(tmp)
        with Containerd(work / "containerd") as containerd, Registry(work / "registry") as registry:
            say(f"containerd at {containerd.root}, registry at {registry.host}")
            config = work / "config.toml"
            config.write_text(
                f"""
[containerd]
root = "{containerd.root}"

[state]
path = "{work}/state/state.db"

[push]
settle = "200ms"

[[rule]]
match = ["{registry.host}/team/**"]
exclude = ["**:dev"]
targets = ["{{image}}", "{registry.host}/mirror/{{repository}}:{{tag}}"]
"""
            )
            print(config.read_text())
            cli = [sys.executable, "-m", "imagepushd", "--config", str(config)]
            subprocess.run([*cli, "check-config"], check=True)
            log = (work / "daemon.log").open("w")
            daemon = subprocess.Popen([*cli, "run"], stderr=log)
            try:
                return demo(containerd, registry, cli, daemon, work)
            finally:
                if daemon.poll() is None:
                    daemon.send_signal(signal.SIGTERM)
                    daemon.wait(30)
                log.close()
                say("daemon log")
                print((work / "daemon.log").read_text())


def demo(
    containerd: Containerd,
    registry: Registry,
    cli: list[str],
    daemon: subprocess.Popen[bytes],
    work: Path,
) -> int:
    b = ImageBuilder()
    amd = b.manifest([b.layer(8 << 20, "amd"), b.layer(1 << 20, "common")])
    arm = b.manifest([b.layer(8 << 20, "arm"), b.layer(1 << 20, "common")], architecture="arm64")
    index = b.index([amd, arm])
    built = f"{registry.host}/team/app:1.0"
    b.write_oci_archive(work / "build.tar", {"build-output:latest": index})
    containerd.import_archive(work / "build.tar")
    time.sleep(1)
    say(f"a build tags {built} (and a :dev tag the rule excludes)")
    started = time.monotonic()
    containerd.tag("build-output:latest", built, f"{registry.host}/team/app:dev")
    deadline = started + 30
    while time.monotonic() < deadline:
        try:
            if registry.skopeo_inspect_digest("mirror/team/app:1.0") == index.digest:
                break
        except AssertionError:
            pass
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    for ref in ("team/app:1.0", "mirror/team/app:1.0"):
        digest = registry.skopeo_inspect_digest(ref)
        verdict = "OK" if digest == index.digest else f"MISMATCH (source {index.digest})"
        print(f"{registry.host}/{ref}: {digest} {verdict}")
        registry.skopeo_copy_to_oci(ref, work / ("pulled-" + ref.replace("/", "_")))
    print(f"pushed and verified {elapsed:.1f}s after the tag; every blob pulled back by skopeo")
    say("imagepushd status")
    subprocess.run([*cli, "status"], check=True)
    say("imagepushd plan (what the rules select now, and why the rest is skipped)")
    subprocess.run([*cli, "plan"], check=True)
    say("stopping the daemon (SIGTERM)")
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(30)
    print(f"daemon exited with {code}")
    status = json.loads(
        subprocess.run(
            [*cli, "status", "--json"], check=True, capture_output=True, text=True
        ).stdout
    )
    ok = code == 0 and status["pushed_count"] == 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
