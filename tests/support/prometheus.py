"""Debian's real ``prometheus`` on a private port and data directory; the shipped rules and
dashboard, with the dashboard's queries as plain PromQL.

:class:`Prometheus` writes a configuration (JSON, which is YAML) that scrapes the given
targets as job ``imagepushd`` every second and loads the given rule files, runs
``prometheus`` with its TSDB under the base directory and its log in ``prometheus.log``, and
answers queries through the HTTP API (``/api/v1/...``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from tests.support.process import log_size, read_log, tail_log, terminate, wait_until
from tests.support.registry import free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "packaging" / "prometheus" / "imagepushd.rules.yml"
RULES_TEST = REPO / "tests" / "prometheus" / "imagepushd.rules.test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "imagepushd-dashboard.json"
HINT = "install the Debian package prometheus (apt-get install -y prometheus)"
T = TypeVar("T")
#: The scrape job the rules expect (ImagepushdDown selects ``up{job="imagepushd"}``).
JOB = "imagepushd"


def dashboard_queries(
    instance: str = ".*", rate_interval: str = "1m", range_: str = "1h"
) -> list[tuple[str, str]]:
    """Every panel query of the dashboard as ``(panel title, PromQL)``, Grafana's variables
    replaced as Grafana would: ``$instance`` by a regex, ``$__rate_interval`` and ``$__range``
    by durations."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"$instance": instance, "$__rate_interval": rate_interval, "$__range": range_}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = re.sub(r"\$\w+", lambda m: values[m[0]], target["expr"])
            queries.append((panel["title"], expr))
    return queries


class PrometheusError(AssertionError):
    """Prometheus did not start, or its API did not answer as expected."""


class _AddressInUse(Exception):
    pass


class Prometheus:
    """One private ``prometheus``; :meth:`start` says what it scrapes (as job ``imagepushd``)."""

    def __init__(
        self, base_dir: Path, *, interval: str = "1s", start_timeout: float = 60.0
    ) -> None:
        self.base_dir = base_dir
        self.targets: list[str] = []
        self.rule_files: list[Path] = []
        self.interval = interval
        self.start_timeout = start_timeout
        self.config_path = base_dir / "prometheus.yml"
        self.log_path = base_dir / "prometheus.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        # scrape_timeout may not exceed scrape_interval, whose default timeout (10s) it would.
        timing = {"scrape_interval": self.interval, "scrape_timeout": self.interval}
        return {
            "global": {**timing, "evaluation_interval": self.interval},
            "rule_files": [os.fspath(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": self.targets}]}],
        }

    def start(self, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> Self:
        """Scrape ``targets`` (``HOST:PORT``) and evaluate ``rule_files``: start on a free
        loopback port (another one if it was taken meanwhile) and wait for ``/-/ready``."""
        self.targets = list(targets)
        self.rule_files = list(rule_files)
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError(f"prometheus not found: {HINT}")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        for _ in range(5):
            self.port = free_port()
            try:
                self._start_once(binary)
                return self
            except _AddressInUse:
                continue
        raise PrometheusError(f"no free port after 5 attempts:\n{self.log_tail()}")

    def _start_once(self, binary: str) -> None:
        mark = log_size(self.log_path)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.base_dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.base_dir,
            )
        try:
            self._wait_ready()
        except PrometheusError:
            exited = self._proc is not None and self._proc.poll() is not None
            self.stop()
            if exited and "address already in use" in read_log(self.log_path, mark):
                raise _AddressInUse() from None
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise PrometheusError(f"prometheus exited on start:\n{self.log_tail()}")
                try:
                    response = client.get("/-/ready")
                    if response.status_code == 200:
                        return
                    last = f"/-/ready answered {response.status_code}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {self.start_timeout}s ({last})")

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: its ``data``, after checking ``status`` is ``success``."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"/api/v1/{path} {params}: {response.status_code} {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr}: a {data['resultType']}, not a vector")
        return list(data["result"])

    def wait_for(
        self, what: str, probe: Callable[[], T], timeout: float = 60.0, interval: float = 0.5
    ) -> T:
        """Call ``probe`` until it returns something truthy (that value); a hang guard only."""
        value = wait_until(probe, timeout, interval)
        if value is None:
            raise PrometheusError(f"{what}: not within {timeout}s:\n{self.log_tail()}")
        return value

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self._proc is not None:
            terminate(self._proc, timeout)
        self._proc = None

    def log_tail(self, lines: int = 40) -> str:
        return tail_log(self.log_path, lines, "(no prometheus log)")
