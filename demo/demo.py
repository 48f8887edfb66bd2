"""``make demo``: start a private containerd, import sample images, list them with imagepushd.

The daemon issue extends this to a private registry and the running daemon; for now it shows
the reader: a multi-platform image, a Docker-typed image and one with a missing platform.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.containerd import Containerd  # noqa: E402
from tests.support.images import ImageBuilder  # noqa: E402


def main() -> int:
    imagepushd = Path(sys.executable).parent / "imagepushd"
    with tempfile.TemporaryDirectory(prefix="imagepushd-demo-") as tmp:
        work = Path(tmp)
        b = ImageBuilder()
        amd = b.manifest([b.layer(4 << 20, "amd")])
        arm_layer = b.layer(4 << 20, "arm")
        arm = b.manifest([arm_layer], architecture="arm64", variant="v8")
        images = {
            "registry.example.com/team/app:1.0": b.index([amd, arm]),
            "registry.example.com/team/tool:2.3": b.manifest(
                [b.layer(1 << 20, "tool", docker=True)], docker=True
            ),
        }
        b.write_oci_archive(work / "sample.tar", images)
        with Containerd(work / "containerd") as containerd:
            containerd.start()
            print(f"# private containerd at {containerd.root}")
            containerd.import_archive(work / "sample.tar")
            containerd.tag(
                "registry.example.com/team/app:1.0", "registry.example.com/team/app:stable"
            )
            containerd.create_namespace("k8s.io")
            containerd.import_archive(work / "sample.tar", namespace="k8s.io")
            containerd.content_rm(arm_layer.digest, namespace="k8s.io")
            for args in (
                ["images", "-A"],
                ["export", "registry.example.com/team/app:1.0", "-o", str(work / "app.tar")],
            ):
                cmd = [str(imagepushd), *args, "--root", str(containerd.root)]
                print("$ imagepushd " + " ".join(args))
                subprocess.run(cmd, check=True)
            print(f"# exported {(work / 'app.tar').stat().st_size} bytes; ctr re-imports it:")
            containerd.create_namespace("reimported")
            containerd.import_archive(work / "app.tar", namespace="reimported")
            subprocess.run(
                ["ctr", "-a", str(containerd.socket), "-n", "reimported", "images", "ls"],
                check=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
