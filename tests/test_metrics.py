"""Metrics: the exposition, ``[metrics]`` validation, and the endpoint on TCP and unix sockets."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagepushd.config import parse_config
from imagepushd.errors import ConfigError, ListenError
from imagepushd.listen import Listen, parse_listen
from imagepushd.metrics import Metrics, MetricsServer
from tests.support.cli import run_cli


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition()
    return samples(body.decode())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp whose paths fit in ``sun_path`` (pytest's tmp_path may not)."""
    with tempfile.TemporaryDirectory(prefix="ipd-m-", dir="/tmp") as name:
        yield Path(name)


# ---- exposition -------------------------------------------------------------------------


def test_exposition_counts_what_the_daemon_reports() -> None:
    m = Metrics()
    m.rules_known([0, 1])
    m.push_count(0, "pushed", bytes_sent=1000, at=1_700_000_000.0)
    m.push_count(0, "pushed", bytes_sent=24, at=1_700_000_060.0)
    m.push_count(1, "up_to_date", at=1_700_000_010.0)
    m.push_count(1, "failed")
    m.retry_count("r.example")
    m.retry_count("r.example")
    m.resume_count("r.example")
    m.queue_set(3)
    m.registry_up("r.example", True)
    m.registry_up("down.example:5000", True)
    m.registry_up("down.example:5000", False)
    m.scan_observe(0.003)
    m.scan_observe(0.2)

    got = scrape(m)

    def pushes(rule: str, result: str) -> float:
        return got[("imagepushd_pushes_total", (("result", result), ("rule", rule)))]

    assert pushes("0", "pushed") == 2
    assert pushes("1", "up_to_date") == 1
    assert pushes("1", "failed") == 1
    # Known rules start at zero for every result, so rate() sees the first push.
    assert pushes("0", "cancelled") == 0 and pushes("1", "interrupted") == 0
    assert got[("imagepushd_bytes_sent_total", (("rule", "0"),))] == 1024
    assert got[("imagepushd_bytes_sent_total", (("rule", "1"),))] == 0
    assert got[("imagepushd_retries_total", (("registry", "r.example"),))] == 2
    assert got[("imagepushd_resumes_total", (("registry", "r.example"),))] == 1
    assert got[("imagepushd_queue_depth", ())] == 3
    assert got[("imagepushd_registry_up", (("registry", "r.example"),))] == 1
    assert got[("imagepushd_registry_up", (("registry", "down.example:5000"),))] == 0
    assert got[("imagepushd_scan_duration_seconds_count", ())] == 2
    assert got[("imagepushd_scan_duration_seconds_sum", ())] == pytest.approx(0.203)
    assert got[("imagepushd_scan_duration_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("imagepushd_last_push_timestamp_seconds", (("rule", "0"),))] == 1_700_000_060.0
    assert got[("imagepushd_last_push_timestamp_seconds", (("rule", "1"),))] == 1_700_000_010.0


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.queue_set(5)
    assert scrape(second)[("imagepushd_queue_depth", ())] == 0
    assert not any(name.startswith("python_") for name, _ in scrape(first))


def test_openmetrics_when_asked_for() -> None:
    body, content_type = Metrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = Metrics().exposition("")
    assert content_type.startswith("text/plain")
    assert b"# EOF" not in body


# ---- listen addresses and [metrics] -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("localhost:9464", "host must be an IP address, not 'localhost'"),
        ("9464", 'must be "HOST:PORT"'),
        (":9464", 'must be "HOST:PORT"'),
        ("::1:9464", "an IPv6 address goes in brackets"),
        ("[::1]", 'must be "HOST:PORT"'),
        ("[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
        ("127.0.0.1:0", "port must be a number from 1 to 65535, not '0'"),
        ("127.0.0.1:65536", "port must be a number from 1 to 65535"),
        ("127.0.0.1:http", "port must be a number from 1 to 65535, not 'http'"),
        ("unix:run/metrics.sock", "unix socket path must be absolute"),
        ("unix:/" + "x" * 107, "unix socket path is 108 bytes; at most 107 fit"),
    ],
)
def test_bad_listen_is_a_config_problem_with_its_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f'[push]\nsettle = "1s"\n\n[metrics]\nlisten = "{text}"\n', "c.toml", {})
    [reported] = caught.value.problems
    assert reported.startswith("metrics.listen (line 5): ")
    assert problem in reported


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[metrics]\n",
            'metrics.listen (line 1): is required in [metrics] (e.g. "127.0.0.1:9464")',
        ),
        ("[metrics]\nlisten = 9464\n", "metrics.listen (line 2): must be a str, not an integer"),
        (
            '[metrics]\nlisten = "127.0.0.1:9464"\nport = 1\n',
            "metrics.port (line 3): unknown key (expected one of: listen)",
        ),
        ("metrics = 1\n", "metrics (line 1): must be a table, not an integer"),
    ],
)
def test_metrics_table_problems(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "c.toml", {})
    assert caught.value.problems == [problem]


def test_metrics_are_off_unless_configured() -> None:
    assert parse_config("", "c.toml", {}).metrics.listen is None
    config = parse_config('[metrics]\nlisten = "[::1]:9464"\n', "c.toml", {})
    assert config.metrics.listen == Listen(host="::1", port=9464)


# ---- the endpoint ---------------------------------------------------------------------------


def test_tcp_scrape_and_nothing_else_served() -> None:
    metrics = Metrics()
    metrics.queue_set(7)
    with MetricsServer(Listen(host="127.0.0.1", port=0), metrics) as server:
        response = httpx.get(server.url)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert samples(response.text)[("imagepushd_queue_depth", ())] == 7
        assert httpx.get(server.url.replace("/metrics", "/")).status_code == 404
        assert httpx.post(server.url).status_code == 501
        url = server.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def test_ipv6_loopback_scrape() -> None:
    with MetricsServer(Listen(host="::1", port=0), Metrics()) as server:
        assert server.url.startswith("http://[::1]:")
        assert httpx.get(server.url).status_code == 200


def test_unix_socket_scrape_and_cleanup(short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    metrics = Metrics()
    metrics.resume_count("r.example")
    with MetricsServer(parse_listen(f"unix:{path}"), metrics) as server:
        assert server.url == f"unix:{path}"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client:
            response = client.get("http://imagepushd/metrics")
        assert response.status_code == 200
        assert samples(response.text)[("imagepushd_resumes_total", (("registry", "r.example"),))]
    assert not path.exists()


def test_a_stale_unix_socket_is_replaced(short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves
    with (
        MetricsServer(Listen(path=path), Metrics()),
        httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as client,
    ):
        assert client.get("http://imagepushd/metrics").status_code == 200


def test_a_live_unix_socket_is_not_taken_over(short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    with MetricsServer(Listen(path=path), Metrics()):
        with pytest.raises(ListenError, match="another process serves it"):
            MetricsServer(Listen(path=path), Metrics())
        assert path.exists()


def test_a_path_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "metrics.sock"
    path.write_text("keep me")
    with pytest.raises(ListenError, match=f"unix:{path}: exists and is not a socket$"):
        MetricsServer(Listen(path=path), Metrics())
    assert path.read_text() == "keep me"


def test_bind_errors_are_one_line_listen_errors(short_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            MetricsServer(Listen(host="127.0.0.1", port=port), Metrics())
    assert str(caught.value) == (
        f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    missing = short_dir / "nowhere" / "metrics.sock"
    with pytest.raises(ListenError) as caught:
        MetricsServer(Listen(path=missing), Metrics())
    assert str(caught.value) == (
        f"metrics: cannot listen on unix:{missing}: No such file or directory"
    )


# ---- the daemon's start -------------------------------------------------------------------


def daemon_config(tmp_path: Path, listen: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[containerd]\nroot = "{tmp_path / "containerd"}"\n\n'
        f'[state]\npath = "{tmp_path / "state.db"}"\n\n'
        f'[metrics]\nlisten = "{listen}"\n'
    )
    return config


def test_run_with_the_port_taken_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = daemon_config(tmp_path, f"127.0.0.1:{port}")
        outcome = run_cli(["--config", str(config), "run"], home=tmp_path)
    assert outcome.code == 1
    assert outcome.error_lines[-1] == (
        f"imagepushd: error: metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert not [line for line in outcome.error_lines if "Traceback" in line]


def test_run_with_an_unbindable_socket_path_fails_with_one_line(tmp_path: Path) -> None:
    path = f"/proc/{os.getpid()}/metrics.sock"
    config = daemon_config(tmp_path, f"unix:{path}")
    outcome = run_cli(["--config", str(config), "run"], home=tmp_path)
    assert outcome.code == 1
    assert outcome.error_lines[-1].startswith(
        f"imagepushd: error: metrics: cannot listen on unix:{path}: "
    )


def test_run_with_a_bad_listen_address_is_a_configuration_error(tmp_path: Path) -> None:
    config = daemon_config(tmp_path, "localhost:9464")
    outcome = run_cli(["--config", str(config), "run"], home=tmp_path)
    assert outcome.code == 2
    assert outcome.error_lines == [
        f"imagepushd: error: {config}: metrics.listen (line 8): host must be an IP address, "
        "not 'localhost'"
    ]
