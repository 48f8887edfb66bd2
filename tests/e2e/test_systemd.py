"""imagepushd under a real systemd and journald, in a systemd-nspawn container.

The container boots this machine's own /usr (tests/support/nspawn.py) with the repository and
its venv bound read-only. Inside it the test starts Debian's containerd unit (its root
``/var/lib/containerd`` is fresh there) and a docker-registry as a transient unit on
``127.0.0.1:5000`` (the container has its own network namespace), installs imagepushd the way a
package would (``/usr/bin/imagepushd``, its man page, the repository's unit file in
/etc/systemd/system, a config in /etc/imagepushd), and drives it only through systemctl,
journalctl and ctr:

- ``systemd-analyze verify`` is clean and ``systemd-analyze security`` exposure is at most 2.0;
- ``systemctl start`` waits in "activating" until READY=1 (Type=notify), then "active";
- the unit's scheduling (CPUWeight=, Nice=, IOWeight=, I/O class) is what systemd shows, and
  the nice level and I/O class are those of every thread of the running daemon;
- ``systemctl reload`` keeps the same main process, which re-reads its configuration;
- a tag matching the rule is pushed within 10 s with the source digest (skopeo inside);
- the journal has the push record with its structured fields, ``systemctl status`` the STATUS=;
- ``systemctl stop`` ends the main process with exit status 0;
- ``[metrics]`` is scraped on TCP loopback, then (after a restart) on a unix socket in
  ``/run/imagepushd``, which the stop removes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.images import ImageBuilder
from tests.support.nspawn import DEFAULT_MASKS, INSIDE_ENV, REPO_ROOT, Machine, require_nspawn
from tests.support.process import wait_until

pytestmark = pytest.mark.e2e

UNIT = "imagepushd.service"
REGISTRY = "127.0.0.1:5000"
TARGET = f"{REGISTRY}/team/app:1"
SOURCE = "example.com/src/app:1"
SHARE = "/mnt/imagepushd-e2e"
PUSH_FIELDS = ("IMAGE", "TARGET", "DIGEST", "NAMESPACE", "BYTES", "DURATION_MS", "RULE")
MAX_EXPOSURE = 2.0
METRICS = "127.0.0.1:9464"
METRICS_SOCKET = "/run/imagepushd/metrics.sock"
#: The unit's scheduling as ``systemctl show`` reports it.
SCHEDULING = {
    "CPUWeight": "20",
    "Nice": "10",
    "IOWeight": "20",
    "IOSchedulingClass": "2",
    "IOSchedulingPriority": "7",
}

VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
MANPAGE_SCRIPT = REPO_ROOT / "packaging" / "manpage.py"

WRAPPER = f"""#!/bin/sh
exec {shlex.quote(str(VENV_PYTHON))} -m imagepushd "$@"
"""

CONFIG = f"""[push]
settle = "100ms"

[[rule]]
match = ["{REGISTRY}/team/**"]
target = "{{image}}"

[metrics]
listen = "{METRICS}"

[registries."{REGISTRY}"]
plain_http = true
"""

#: The reloaded configuration: one more rule, so the reload is visible in the journal.
CONFIG_RELOADED = (
    CONFIG
    + f"""
[[rule]]
match = ["{REGISTRY}/other/**"]
target = "{{image}}"
"""
)

REGISTRY_CONFIG = f"""version: 0.1
storage:
  filesystem: {{rootdirectory: /tmp/registry/data}}
  delete: {{enabled: true}}
http: {{addr: {REGISTRY}}}
log: {{level: warn}}
"""


def _require_tools() -> None:
    require_nspawn()
    missing = [
        p
        for p in ("containerd", "ctr", "docker-registry", "skopeo")
        if not Path("/usr/bin", p).exists()
    ]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not in /usr/bin: install the Debian packages containerd "
            "docker-registry skopeo; real-system tests never skip",
            pytrace=False,
        )
    if not VENV_PYTHON.exists():
        pytest.fail(f"no venv at {REPO_ROOT / '.venv'}: run make venv", pytrace=False)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    """A booted systemd with tmp_path/share bound read-write at SHARE."""
    _require_tools()
    share = tmp_path / "share"
    share.mkdir()
    # Debian's docker-registry unit fails there (no user, unusable config) and would want :5000.
    masks = (*DEFAULT_MASKS, "docker-registry.service")
    with Machine(tmp_path / "machine", binds=[(share, SHARE)], masks=masks) as booted:
        yield booted


def show(machine: Machine, *props: str) -> dict[str, str]:
    """``systemctl show -p ...`` of the unit as a dict."""
    out = machine.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def thread_nice(machine: Machine, pid: str) -> set[int]:
    """The nice values of every thread of ``pid`` (field 19 of ``/proc/PID/task/*/stat``)."""
    out = machine.run("sh", "-c", f"cat /proc/{pid}/task/*/stat").stdout
    return {int(line.rpartition(")")[2].split()[16]) for line in out.splitlines()}


def journal(machine: Machine) -> list[dict[str, Any]]:
    """The unit's journal entries (``journalctl -u imagepushd -o json``)."""
    out = machine.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def messages(entries: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("MESSAGE", "")) for e in entries]


def diagnostics(machine: Machine) -> str:
    """What to print when an assertion fails: the unit's status and journal."""
    status = machine.run("systemctl", "status", "--no-pager", "-n", "0", UNIT, check=False)
    log = machine.run("journalctl", "-u", UNIT, "--no-pager", "-o", "short-monotonic", check=False)
    return f"\n--- systemctl status\n{status.stdout}\n--- journal\n{log.stdout}{log.stderr}"


def start_services(machine: Machine) -> None:
    """containerd (Debian's unit) and a registry (a transient unit) inside."""
    machine.run("systemctl", "start", "containerd.service")
    machine.wait_for(["ctr", "version"], timeout=15)
    machine.write_file("/tmp/registry/config.yml", REGISTRY_CONFIG)
    machine.run(
        "systemd-run",
        "--unit=e2e-registry",
        "--collect",
        "docker-registry",
        "serve",
        "/tmp/registry/config.yml",
    )
    host, port = REGISTRY.split(":")
    machine.wait_for(["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"], timeout=15)


def install_imagepushd(machine: Machine) -> None:
    """What the package does: the program, its man page, the unit (enabled), the configuration.

    The man page (``Documentation=man:imagepushd(8)``) comes from packaging/manpage.py, as in
    the .deb build.
    """
    machine.write_file("/usr/bin/imagepushd", WRAPPER, mode=0o755)
    if MANPAGE_SCRIPT.exists():
        machine.run("mkdir", "-p", "/usr/share/man/man8")
        machine.run(VENV_PYTHON, MANPAGE_SCRIPT, "/usr/share/man/man8/imagepushd.8")
    machine.run("cp", REPO_ROOT / "systemd" / UNIT, f"/etc/systemd/system/{UNIT}")
    machine.write_file("/etc/imagepushd/config.toml", CONFIG)
    if REPO_ROOT.is_relative_to("/tmp") or REPO_ROOT.is_relative_to("/var/tmp"):
        # A checkout under /tmp (as CI may use) stands in for /usr/lib/python3: the unit's
        # PrivateTmp=yes would hide it, so show the service that one read-only path.
        machine.write_file(
            f"/etc/systemd/system/{UNIT}.d/checkout.conf",
            f"[Service]\nBindReadOnlyPaths={REPO_ROOT}\n",
        )
    # Enabled, as a package would: the WantedBy= link also keeps the unit loaded after it
    # stops, so ExecMainStatus= can still be read (an unreferenced inactive unit is unloaded).
    machine.run("systemctl", "enable", UNIT)
    machine.run("systemctl", "daemon-reload")


def verify_unit(machine: Machine) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` as on a real system.

    The container's /etc is empty, so ``man`` would fail for every ``Documentation=man:``
    entry (even systemd's own units): give it the host's manpath.config, or skip man pages.
    """
    manpath = Path("/etc/manpath.config")
    args = ["systemd-analyze", "verify"]
    if manpath.exists() and Path("/usr/bin/man").exists():
        machine.write_file(str(manpath), manpath.read_text())
    else:
        args.append("--man=no")
    return machine.run(*args, UNIT, check=False)


def security_exposure(machine: Machine) -> tuple[float, str]:
    out = machine.run("systemd-analyze", "security", "--no-pager", UNIT, check=False).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)", out)
    assert found, f"no exposure level in systemd-analyze security output:\n{out}"
    return float(found.group(1)), found.group(0)


def scrape(machine: Machine, uds: str | None = None) -> dict[tuple[str, str], float]:
    """GET /metrics from inside the container (TCP, or the unix socket ``uds``) with httpx:
    ``(name, labels as text) -> value``."""
    url = f"http://{METRICS}/metrics" if uds is None else "http://imagepushd/metrics"
    code = (
        "import httpx, sys\n"
        f"t = httpx.HTTPTransport(uds={uds!r})\n"
        f"r = httpx.Client(transport=t).get({url!r})\n"
        "r.raise_for_status()\n"
        "sys.stdout.write(r.text)\n"
    )
    text = machine.run(VENV_PYTHON, "-c", code).stdout
    return {
        (s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def start_observed(machine: Machine) -> list[tuple[str, str, str]]:
    """``systemctl start`` (blocking) while polling the unit: the states seen, in order."""
    starter = subprocess.Popen(
        ["nsenter", "-t", str(machine.pid), "-a", "systemctl", "start", UNIT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=INSIDE_ENV,
    )
    seen: list[tuple[str, str, str]] = []
    try:
        deadline = time.monotonic() + 60
        while starter.poll() is None and time.monotonic() < deadline:
            props = show(machine, "ActiveState", "SubState", "MainPID")
            state = (props["ActiveState"], props["SubState"], props["MainPID"])
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.05)
        out, _ = starter.communicate(timeout=30)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait()
    assert starter.returncode == 0, f"systemctl start failed: {out.decode()}{diagnostics(machine)}"
    return seen


def test_imagepushd_under_systemd(machine: Machine, tmp_path: Path) -> None:
    start_services(machine)
    install_imagepushd(machine)
    verify = verify_unit(machine)
    exposure, exposure_line = security_exposure(machine)
    print(f"\nsystemd-analyze verify {UNIT}: exit {verify.returncode}")
    print(verify.stdout + verify.stderr, end="")
    print(exposure_line)

    # start: Type=notify, so "activating" with a running main process until READY=1.
    seen = start_observed(machine)
    props = show(machine, "ActiveState", "SubState", "MainPID", "Type", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), diagnostics(machine)
    assert props["Type"] == "notify"
    main_pid = props["MainPID"]
    assert ("activating", "start", main_pid) in seen, f"states seen: {seen}"
    assert props["StatusText"].startswith("idle"), props

    # scheduling: systemd parsed the unit's settings and they are in force on every thread of
    # the main process (CPUWeight= and IOWeight= act through cgroup controllers, which this
    # container does not get: on this hybrid host its v1 hierarchies are read-only).
    assert show(machine, *SCHEDULING) == SCHEDULING
    assert thread_nice(machine, main_pid) == {int(SCHEDULING["Nice"])}
    ionice = machine.run("ionice", "-p", main_pid).stdout.strip()
    assert ionice == f"best-effort: prio {SCHEDULING['IOSchedulingPriority']}", ionice

    # reload: same process, new configuration read (the journal says so).
    machine.write_file("/etc/imagepushd/config.toml", CONFIG_RELOADED)
    machine.run("systemctl", "reload", UNIT)
    reloaded = wait_until(
        lambda: any(
            m.startswith("reloaded /etc/imagepushd/config.toml: 2 rule(s)")
            for m in messages(journal(machine))
        ),
        timeout=10,
    )
    assert reloaded, f"no reload in the journal{diagnostics(machine)}"
    props = show(machine, "ActiveState", "SubState", "MainPID")
    assert props == {"ActiveState": "active", "SubState": "running", "MainPID": main_pid}
    assert any(m.startswith("Reloaded imagepushd.service") for m in messages(journal(machine)))

    # a tag: import an image under a name no rule matches, then tag it into the rule.
    builder = ImageBuilder()
    manifest = builder.image([4096, 64 * 1024], seed="systemd-e2e")
    builder.write_oci_archive(tmp_path / "share" / "app.tar", {SOURCE: manifest})
    machine.run("ctr", "images", "import", "--no-unpack", f"{SHARE}/app.tar")
    tagged = time.monotonic()
    machine.run("ctr", "images", "tag", SOURCE, TARGET)

    def served() -> str | None:
        result = machine.run_bytes(
            "skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{TARGET}", check=False
        )
        if result.returncode != 0:
            return None
        return "sha256:" + hashlib.sha256(result.stdout).hexdigest()

    digest = wait_until(served, timeout=10, interval=0.2)
    latency = time.monotonic() - tagged
    assert digest == manifest.digest, f"{TARGET} not pushed within 10 s{diagnostics(machine)}"
    print(f"tag → pushed: {latency:.2f}s")

    # the journal: one push record, with its structured fields.
    def push_records() -> list[dict[str, Any]]:
        return [e for e in journal(machine) if "DIGEST" in e]

    records = wait_until(push_records, timeout=5)
    assert records, f"no push record in the journal{diagnostics(machine)}"
    assert len(records) == 1, records
    record = records[0]
    assert set(PUSH_FIELDS) <= set(record), record
    assert record["IMAGE"] == TARGET
    assert record["TARGET"] == TARGET
    assert record["DIGEST"] == manifest.digest
    assert record["NAMESPACE"] == "default"
    assert int(record["BYTES"]) >= 4096 + 64 * 1024
    assert int(record["DURATION_MS"]) >= 0
    assert record["RULE"] != ""
    assert record["SYSLOG_IDENTIFIER"] == "imagepushd"
    assert record["_SYSTEMD_UNIT"] == UNIT
    assert record["PRIORITY"] == "6"

    # STATUS= in systemctl status.
    status = wait_until(
        lambda: show(machine, "StatusText")["StatusText"] == "idle · 1 pushed", timeout=5
    )
    text = machine.run("systemctl", "status", "--no-pager", UNIT).stdout
    assert status, f"StatusText: {show(machine, 'StatusText')}{diagnostics(machine)}"
    assert 'Status: "idle · 1 pushed"' in text, text

    # metrics on TCP loopback, through the unit's RestrictAddressFamilies= and IPAddress*=.
    got = scrape(machine)
    assert got[("imagepushd_pushes_total", "result=pushed,rule=0")] == 1, got
    assert got[("imagepushd_bytes_sent_total", "rule=0")] == int(record["BYTES"]), got
    assert got[("imagepushd_last_push_timestamp_seconds", "rule=0")] > time.time() - 60, got
    assert got[("imagepushd_scan_duration_seconds_count", "")] >= 2, got

    # stop: the main process itself exits 0 (code=exited, not killed by the signal).
    machine.run("systemctl", "stop", UNIT)
    props = show(machine, "ActiveState", "Result", "ExecMainPID", "ExecMainCode", "ExecMainStatus")
    assert props == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainPID": main_pid,
        "ExecMainCode": "1",  # CLD_EXITED
        "ExecMainStatus": "0",
    }, diagnostics(machine)
    assert any(
        m.startswith("imagepushd.service: Deactivated successfully")
        for m in messages(journal(machine))
    )

    # metrics on a unix socket in the RuntimeDirectory= (ProtectSystem=strict leaves /run
    # read-only); the next stop removes it with the directory.
    machine.write_file(
        "/etc/imagepushd/config.toml",
        CONFIG_RELOADED.replace(f'listen = "{METRICS}"', f'listen = "unix:{METRICS_SOCKET}"'),
    )
    machine.run("systemctl", "start", UNIT)
    got = scrape(machine, uds=METRICS_SOCKET)
    assert got[("imagepushd_pushes_total", "result=pushed,rule=1")] == 0, got
    assert got[("imagepushd_queue_depth", "")] == 0, got
    mode = machine.run("stat", "-c", "%a %U", METRICS_SOCKET).stdout.split()
    assert mode == ["700", "root"], mode  # UMask=0077: only root may connect
    machine.run("systemctl", "stop", UNIT)
    assert machine.run("test", "-e", "/run/imagepushd", check=False).returncode == 1

    # last, so everything above is checked even when the unit file needs fixing.
    assert exposure <= MAX_EXPOSURE, exposure_line
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), (
        f"systemd-analyze verify {UNIT} is not clean:\n{verify.stdout}{verify.stderr}"
    )
