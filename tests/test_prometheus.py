"""The shipped alert rules and Grafana dashboard, checked with Debian's ``promtool``.

``promtool check rules`` parses the rules; ``promtool test rules`` runs
tests/prometheus/imagepushd.rules.test.yml (input series, expected alerts). The dashboard's
queries are parsed the same way (as recording rules) and compared with the metrics the daemon
exports. The live side (a real Prometheus scraping a pushing daemon) is in
tests/e2e/test_prometheus.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from imagepushd.metrics import Metrics
from tests.support.process import require_tools
from tests.support.prometheus import DASHBOARD, HINT, RULES, RULES_TEST, dashboard_queries

#: Prometheus' own series the dashboard may use besides the daemon's.
PROMETHEUS_SERIES = {"up"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    [binary] = require_tools("promtool", hint=HINT)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


#: The series a metric family of each type is exposed as (Prometheus' text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def exported_families() -> dict[str, str]:
    """The daemon's metric families (series with no child yet included): name -> type."""
    return {family.name: family.type for family in Metrics().registry.collect()}


def exported_series() -> set[str]:
    return {
        name + suffix for name, kind in exported_families().items() for suffix in SUFFIXES[kind]
    }


def referenced(expr: str) -> set[str]:
    """Metric names in a query: the daemon's by prefix, Prometheus' own by name."""
    names = set(re.findall(r"\bimagepushd_\w+", expr))
    return names | {n for n in PROMETHEUS_SERIES if re.search(rf"\b{n}\{{", expr)}


# ---- rules ------------------------------------------------------------------------------


def test_promtool_check_rules_accepts_every_alert() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    names = alert_names()
    assert sorted(names) == [
        "ImagepushdDown",
        "ImagepushdNoRecentPush",
        "ImagepushdPushesFailing",
        "ImagepushdQueueGrowing",
        "ImagepushdRegistryDown",
    ]
    assert f"SUCCESS: {len(names)} rules found" in result.stdout, result.stdout


def test_promtool_test_rules_passes() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet() -> None:
    """promtool passes a rules file that no test mentions: each alert must be exercised."""
    cases = re.findall(
        r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", RULES_TEST.read_text(), re.MULTILINE
    )
    for name in alert_names():
        outcomes = {quiet == "" for alert, quiet in cases if alert == name}
        assert outcomes == {True, False}, f"{name}: {outcomes or 'no test case'}"


# ---- dashboard --------------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "imagepushd"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, its Grafana variables filled in, as a recording rule for promtool."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, (_, e) in enumerate(queries)]
    path = tmp_path / "dashboard.rules.yml"  # JSON is YAML
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout, result.stdout


def test_dashboard_shows_every_exported_metric_and_nothing_else() -> None:
    exported = exported_series()
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for title, expr in dashboard_queries():
        names = referenced(expr)
        assert names, f"{title}: {expr} names no metric"
        assert names <= exported | PROMETHEUS_SERIES, f"{title}: {names - exported}"
        used |= names
    [instance] = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    match = re.fullmatch(r"label_values\((\w+), instance\)", instance["definition"])
    assert match and match[1] in exported, instance["definition"]
    families = exported_families()
    missing = {f for f in families if not any(name.startswith(f) for name in used)}
    assert not missing, f"metrics without a panel: {sorted(missing)}"
