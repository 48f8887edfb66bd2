"""The Debian package on a clean Debian 12, booted with systemd-nspawn (issue 5).

One module-wide machine, in this order (pytest runs a module's tests in file order):

1. ``make deb`` builds ``imagepushd_<version>_all.deb`` from a snapshot of the work tree.
2. ``mmdebstrap --variant=apt --include=systemd,systemd-sysv,dbus bookworm`` makes a clean
   Debian 12 root (cached as a tarball per day in /var/cache/imagepushd-test/, since it takes
   45 s or more), unpacked into a temporary directory and booted with ``systemd-nspawn -b``.
3. ``apt-get install ./imagepushd_<version>_all.deb`` there, dependencies from Debian's
   archive only; then containerd, docker-registry and the test suite's Debian packages.
4. The tests: the packaged service starts and does nothing; with one rule it pushes an image
   tagged with ``ctr`` (digest checked at the registry, ``STATUS=`` in ``systemctl status``,
   journal fields); the unit test suite passes against Debian's library versions; and
   ``apt-get purge`` removes everything.

The machine is stopped and its directory removed however the tests end.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import ImageBuilder
from tests.support.process import require_tools, terminate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/imagepushd-test")
#: What the test writes into the machine: the .deb, the test suite, the image archive.
INSIDE = "/root/imagepushd-test"
#: What the unit test suite (every tests/test_*.py) needs inside besides the package's own
#: dependencies: it runs there against Debian's python3-httpx, -tenacity, -watchdog, -systemd.
UNIT_TEST_PACKAGES = [
    "python3-pytest",
    "python3-hypothesis",
    "python3-cryptography",
    "python3-bcrypt",
]
#: Not run inside: tests/test_packaging.py builds wheels with pip from PyPI;
#: tests/test_prometheus.py checks packaging/'s rules and dashboard with promtool (the files
#: the package installs are compared with those below).
NOT_INSIDE = {"test_packaging.py", "test_prometheus.py"}
#: Files installed under /usr/share/imagepushd/ as they are in the source tree.
SHARED = {
    "prometheus/imagepushd.rules.yml": "packaging/prometheus/imagepushd.rules.yml",
    "grafana/imagepushd-dashboard.json": "packaging/grafana/imagepushd-dashboard.json",
}
IMAGE = "example.com/build/app:1"


def _log(message: str) -> None:
    print(f"[packaging e2e {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(
    cmd: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    _log(f"{' '.join(cmd[:3])} ...: exit {result.returncode} in {time.monotonic() - started:.0f}s")
    if result.returncode != 0:
        pytest.fail(
            f"{cmd} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}",
            pytrace=False,
        )
    return result


# ------------------------------------------------------------------------ the .deb


def _snapshot(dest: Path) -> Path:
    """The work tree as it is now, without venv, VCS and caches (build and tests use it)."""
    skip = {".venv", ".git", "dist", "build", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    skip |= {".hypothesis", "__pycache__"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in skip or n.endswith(".egg-info")}

    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the work tree: the .deb and the tests run inside come from the same one."""
    return _snapshot(tmp_path_factory.mktemp("pkg") / "src")


@pytest.fixture(scope="module")
def deb(source: Path) -> Path:
    """``make deb`` in the snapshot: dpkg-buildpackage with dh + pybuild, then lintian."""
    outdir = source / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
    result = _run(
        ["make", "-C", str(source), "deb"], timeout=900, env={**env, "OUTDIR": str(outdir)}
    )
    lintian = result.stdout[result.stdout.find("build-deb: lintian") :]
    _log("lintian:\n" + lintian)
    # build-deb.sh fails on lintian errors already; warnings are listed in the log above.
    assert not re.search(r"^E: ", lintian, re.MULTILINE), lintian
    version = re.search(
        r'__version__ = "([^"]+)"', (source / "daemon/imagepushd/__init__.py").read_text()
    )
    assert version is not None
    path = outdir / f"imagepushd_{version[1]}_all.deb"
    assert path.is_file(), sorted(p.name for p in outdir.iterdir())
    return path


# ------------------------------------------------------------------------ a clean Debian 12


def _bookworm_tarball() -> Path:
    """Today's ``mmdebstrap --variant=apt`` tarball of bookworm, built once a day."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"bookworm-{datetime.date.today():%Y%m%d}.tar"
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tarball.exists():
            for old in CACHE.glob("bookworm-*.tar"):
                old.unlink()
            partial = CACHE / f"{tarball.stem}.partial.tar"
            partial.unlink(missing_ok=True)
            _run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    "--include=systemd,systemd-sysv,dbus",
                    "bookworm",
                    str(partial),
                ],
                timeout=600,
            )
            partial.rename(tarball)
    return tarball


class Machine:
    """A Debian 12 root booted with ``systemd-nspawn -b``; commands run through nsenter."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self.console = root.parent / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self) -> None:
        started = time.monotonic()
        with self.console.open("wb") as console:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--keep-unit",
                    "--register=no",
                    "--quiet",
                    f"--machine={self.name}",
                    f"--directory={self.root}",
                    # A copied resolv.conf and an untouched /etc/localtime: bind mounts there
                    # make tzdata's postinst fail (it replaces /etc/localtime).
                    "--resolv-conf=copy-host",
                    "--timezone=off",
                    "--console=read-only",
                    "--boot",
                    "--",
                    "systemd.firstboot=off",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not self.pid1:
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"systemd-nspawn did not start:\n{self._console()}", pytrace=False)
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        self.pid1 = int(pid)
            time.sleep(0.1)
        # systemctl fails until PID 1 listens on its private socket: ask until it answers.
        deadline = time.monotonic() + 120
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"boot did not finish ({state!r}):\n{self._console()}", pytrace=False)
            time.sleep(0.2)
            answer = self.sh("timeout 60 systemctl is-system-running --wait", timeout=70)
            state = answer.stdout.strip()
        _log(f"booted in {time.monotonic() - started:.0f}s: {state}")
        if state == "degraded":
            _log(self.sh("systemctl --failed --no-pager").stdout)

    def _console(self) -> str:
        return self.console.read_text(errors="replace")[-4000:]

    def sh(
        self, script: str, *, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with ``sh -e`` inside, with a clean environment."""
        cmd = ["nsenter", "-t", str(self.pid1), "-a", "env", "-i", "HOME=/root", "LANG=C.UTF-8"]
        cmd += ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive"]
        result = subprocess.run(
            [*cmd, "sh", "-ec", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"inside: {script}\nexit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
                f"\n--- stderr\n{result.stderr[-6000:]}",
                pytrace=False,
            )
        return result

    def shutdown(self) -> None:
        """Stop the container (SIGTERM asks nspawn for a clean poweroff), then make sure."""
        if self.process is not None:
            terminate(self.process, 30)
        # Anything still running in that root (there should be nothing) is killed.
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if Path(os.readlink(proc / "root")).is_relative_to(self.root):
                        os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """A freshly booted clean Debian 12 (removed at the end, whatever happens)."""
    require_tools(
        "mmdebstrap",
        "systemd-nspawn",
        "nsenter",
        hint="apt-get install -y mmdebstrap systemd-container (make apt installs them)",
    )
    tarball = _bookworm_tarball()
    base = tmp_path_factory.mktemp("debian12")
    root = base / "root"
    root.mkdir()
    _run(["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(root)], timeout=300)
    box = Machine(root, f"ipd-pkg-{os.getpid()}")
    try:
        box.boot()
        yield box
    finally:
        box.shutdown()
        shutil.rmtree(base, ignore_errors=True)
        _log("machine stopped and removed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def installed(machine: Machine, deb: Path, source: Path) -> Machine:
    """The .deb installed with apt (dependencies from Debian), plus what the tests use."""
    inside = machine.root / INSIDE.lstrip("/")
    inside.mkdir(parents=True)
    shutil.copy(deb, inside)
    started = time.monotonic()
    machine.sh("apt-get update -q", timeout=300, check=True)
    result = machine.sh(f"apt-get install -y -q {INSIDE}/{deb.name}", timeout=600, check=True)
    fetched = [line for line in result.stdout.splitlines() if line.startswith("Get:")]
    took = time.monotonic() - started
    _log(f"apt-get install ./{deb.name}: {len(fetched)} packages downloaded in {took:.0f}s")
    # Everything came from Debian's archive: there is not even a pip to fetch from PyPI.
    assert machine.sh("python3 -m pip --version").returncode != 0
    started = time.monotonic()
    packages = " ".join(["containerd", "docker-registry", *UNIT_TEST_PACKAGES])
    # The machine shares the host's network (apt needs it): docker-registry must not start
    # on its packaged address (:5000) there. It is masked now and started on a free port by
    # the test that uses it.
    machine.sh("systemctl mask docker-registry.service", check=True)
    machine.sh(f"apt-get install -y -q --no-install-recommends {packages}", timeout=600, check=True)
    _log(f"containerd, docker-registry, test packages in {time.monotonic() - started:.0f}s")
    return machine


# ------------------------------------------------------------------------ the tests


def test_package_installs_files_and_starts_doing_nothing(installed: Machine) -> None:
    box = installed
    listing = box.sh("dpkg -L imagepushd", check=True).stdout.split()
    for path in (
        "/usr/bin/imagepushd",
        "/usr/lib/python3/dist-packages/imagepushd/cli.py",
        "/usr/lib/python3/dist-packages/imagepushd/data/imagepushd.service",
        "/lib/systemd/system/imagepushd.service",
        "/etc/imagepushd/config.toml",
        "/usr/share/doc/imagepushd/examples/config.example.toml",
        "/usr/share/doc/imagepushd/README.md",
        "/usr/share/man/man8/imagepushd.8.gz",
        "/usr/share/bash-completion/completions/imagepushd",
        *(f"/usr/share/imagepushd/{name}" for name in SHARED),
    ):
        assert path in listing, path
    for name, source in SHARED.items():
        installed_file = box.root / "usr/share/imagepushd" / name
        assert installed_file.read_bytes() == (REPO / source).read_bytes(), name
    conffiles = box.sh("cat /var/lib/dpkg/info/imagepushd.conffiles", check=True).stdout
    assert conffiles.split() == ["/etc/imagepushd/config.toml"]
    # The package's own copy, and nothing pip-installed anywhere.
    where = box.sh("python3 -c 'import imagepushd; print(imagepushd.__file__)'", check=True)
    assert where.stdout.strip() == "/usr/lib/python3/dist-packages/imagepushd/__init__.py"
    assert not box.sh("ls /usr/local/lib/python3*/dist-packages 2>/dev/null || true").stdout.strip()
    assert box.sh("systemctl is-enabled imagepushd").stdout.strip() == "enabled"
    # The packaged config has no active rule: the service runs and pushes nothing.
    check = box.sh("imagepushd check-config", check=True).stdout
    assert "0 rule(s)" in check, check
    active = box.sh("systemctl is-active imagepushd").stdout.strip()
    assert active == "active", box.sh("systemctl status imagepushd --no-pager; true").stdout
    assert (
        box.sh("imagepushd print-unit", check=True).stdout
        == box.sh("cat /lib/systemd/system/imagepushd.service").stdout
    )
    man = box.sh("zcat /usr/share/man/man8/imagepushd.8.gz", check=True).stdout
    assert man.startswith(".TH IMAGEPUSHD 8 "), man[:200]
    completion = box.sh(
        "bash -c '. /usr/share/bash-completion/completions/imagepushd; "
        'COMP_WORDS=(imagepushd pr); COMP_CWORD=1; _imagepushd; echo "${COMPREPLY[*]}"\'',
        check=True,
    )
    assert completion.stdout.split() == ["print-unit", "print-config"]


def test_service_pushes_a_tagged_image(installed: Machine, tmp_path: Path) -> None:
    box = installed
    port = _free_port()
    registry = f"127.0.0.1:{port}"
    builder = ImageBuilder()
    manifest = builder.image([4096, 200_000], seed=f"packaging-{time.time_ns()}")
    builder.write_oci_archive(box.root / INSIDE.lstrip("/") / "image.tar", {IMAGE: manifest})
    box.sh(
        f"""cat > /etc/docker/registry/config.yml <<'EOF'
version: 0.1
storage:
  filesystem: {{rootdirectory: /var/lib/docker-registry}}
  delete: {{enabled: true}}
http: {{addr: {registry}}}
log: {{level: warn}}
EOF
systemctl unmask docker-registry.service
systemctl restart docker-registry
ctr -n default images import --no-unpack {INSIDE}/image.tar""",
        check=True,
    )
    box.sh(
        f"""cat > /etc/imagepushd/config.toml <<'EOF'
[push]
settle = "0s"

[[rule]]
match = ["{registry}/team/**"]
target = "{{image}}"

[registries."{registry}"]
plain_http = true
EOF
imagepushd check-config
systemctl restart imagepushd""",
        check=True,
    )
    target = f"{registry}/team/app:v1"
    # After the restart (Type=notify: systemctl returns once it is ready) the new tag is new.
    box.sh(f"ctr -n default images tag {IMAGE} {target}", check=True)
    digest = _wait_for_manifest(registry, "team/app", "v1", manifest.media_type, timeout=60)
    assert digest == manifest.digest

    # The manifest is the last thing pushed; STATUS= follows once the job is recorded.
    deadline = time.monotonic() + 30
    while True:
        status = box.sh("systemctl status imagepushd --no-pager").stdout
        match = re.search(r'^\s*Status: "(.*)"$', status, re.MULTILINE)
        if match and "1 pushed" in match[1]:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no 'Status: \"... 1 pushed\"' line in:\n{status}", pytrace=False)
        time.sleep(0.5)
    _log(f"systemctl status: Status: {match[1]!r}")

    journal = box.sh(f"journalctl -u imagepushd -o json --no-pager IMAGE={target}", check=True)
    events = [json.loads(line) for line in journal.stdout.splitlines()]
    assert events, "no journal entry with IMAGE=" + target
    fields = events[-1]
    assert fields["TARGET"] == target
    assert fields["DIGEST"] == manifest.digest
    assert fields["NAMESPACE"] == "default"
    assert int(fields["BYTES"]) > 200_000
    for key in ("DURATION_MS", "RULE"):
        assert key in fields, sorted(fields)

    # Reload keeps the service running and re-reads the config.
    box.sh("systemctl reload imagepushd", check=True)
    assert box.sh("systemctl is-active imagepushd").stdout.strip() == "active"


def _wait_for_manifest(registry: str, repo: str, tag: str, media_type: str, timeout: float) -> str:
    """The sha256 of the manifest the registry serves for ``repo:tag``, once it is there."""
    url = f"http://{registry}/v2/{repo}/manifests/{tag}"
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, headers={"Accept": media_type})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                body = response.read()
                served = response.headers["Docker-Content-Digest"]
        except OSError as exc:
            problem = str(exc)
            time.sleep(0.5)
            continue
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        assert served == digest
        return digest
    pytest.fail(f"{registry}/{repo}:{tag} never appeared ({problem})", pytrace=False)


def test_unit_tests_pass_with_debian_library_versions(installed: Machine, source: Path) -> None:
    box = installed
    suite = box.root / INSIDE.lstrip("/") / "suite"
    suite.mkdir()
    shutil.copy(source / "pyproject.toml", suite)
    shutil.copytree(source / "tests", suite / "tests", ignore=shutil.ignore_patterns("e2e"))
    (suite / "packaging").mkdir()
    shutil.copy(source / "packaging" / "hypothesis_buildd.py", suite / "packaging")
    files = sorted(
        f"tests/{p.name}" for p in (source / "tests").glob("test_*.py") if p.name not in NOT_INSIDE
    )
    versions = box.sh(
        "dpkg-query -W -f='${Package} ${Version}\\n' python3 python3-httpx python3-tenacity "
        "python3-watchdog python3-systemd python3-pytest python3-hypothesis",
        check=True,
    ).stdout
    _log("Debian versions:\n" + versions)
    started = time.monotonic()
    # imagepushd comes from the package (no daemon/ in the suite); packaging/ only holds the
    # plugin that turns off Hypothesis's timing health checks on a busy machine. Each file
    # runs in its own interpreter (state one file leaves in logging cannot fail another), in
    # a mount namespace where /var/lib/containerd is empty: tests of root discovery need the
    # system root absent, and this machine has containerd installed.
    script = f"""
cd {INSIDE}/suite
export PYTHONPATH={INSIDE}/suite/packaging
unshare --mount --propagation private sh -c '
  mount -t tmpfs none /var/lib/containerd
  status=0
  for f in {" ".join(files)}; do
    python3 -m pytest -p no:cacheprovider -p hypothesis_buildd -q -rfE "$f" > "$f.log" 2>&1 ||
      status=1
    echo "$f: $(tail -n 1 "$f.log")"
  done
  exit $status'
"""
    result = box.sh(script, timeout=900)
    _log(f"unit tests inside in {time.monotonic() - started:.0f}s:\n{result.stdout}")
    if result.returncode != 0:
        logs = box.sh(f"cd {INSIDE}/suite && grep -l -E '(failed|error)' tests/*.log | xargs cat")
        pytest.fail(f"{result.stdout}{result.stderr}\n{logs.stdout[-15000:]}", pytrace=False)


def test_purge_removes_everything(installed: Machine) -> None:
    box = installed
    box.sh("apt-get purge -y -q imagepushd", timeout=300, check=True)
    leftovers = box.sh(
        "ls -d /usr/lib/python3/dist-packages/imagepushd* /etc/imagepushd /var/lib/imagepushd "
        "/lib/systemd/system/imagepushd.service /usr/lib/systemd/system/imagepushd.service "
        "/etc/systemd/system/multi-user.target.wants/imagepushd.service /usr/bin/imagepushd "
        "/usr/share/doc/imagepushd /usr/share/imagepushd /usr/share/man/man8/imagepushd.8.gz "
        "/usr/share/bash-completion/completions/imagepushd 2>/dev/null; true"
    ).stdout
    assert leftovers == "", leftovers
    load = box.sh("systemctl show -p LoadState --value imagepushd").stdout.strip()
    assert load == "not-found"
    assert box.sh("dpkg-query -W imagepushd").returncode != 0
    # The service was stopped on removal: no process is called imagepushd any more.
    assert box.sh("pgrep -x imagepushd || true").stdout.strip() == ""
