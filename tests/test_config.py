"""Configuration parsing: defaults, every problem at once with its key path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagepushd.config import config_path, load_config, parse_config
from imagepushd.decide.platforms import PlatformPolicy
from imagepushd.errors import ConfigError, UsageError

FULL = """
[containerd]
root = "/srv/containerd"
namespaces = ["default", "k8s.io"]

[state]
path = "/tmp/state.db"

[push]
concurrency = 4
parallel_images = 1
chunk_size = "4MiB"
platforms = "available"
on_start = "all"
settle = "250ms"
job_backoff_initial = "10s"

[[rule]]
match = ["registry.example.com/team/**"]
exclude = "**:latest"
namespaces = ["default"]
targets = ["mirror.example.com/{repository}:{tag}", "{image}"]

[[rule]]
match = "**"
target = "localhost:5000/{namespace}/{repository}:{tag}"
referrers = true

[registries."registry.example.com"]
ca_file = "/etc/imagepushd/ca.pem"
username = "robot"
password_credential = "robot-password"
chunk_size = 8388608
concurrency = 2
requests_per_second = 2.5
max_concurrent_requests = 4
"""


def test_full_config():
    config = parse_config(FULL, "full.toml", {})
    assert config.containerd.root == Path("/srv/containerd")
    assert config.containerd.namespaces == ("default", "k8s.io")
    assert config.state_path == Path("/tmp/state.db")
    assert config.push.concurrency == 4 and config.push.chunk_size == 4 << 20
    assert config.push.platforms == PlatformPolicy("available")
    assert (config.push.on_start, config.push.settle) == ("all", 0.25)
    assert config.push.job_backoff_initial == 10.0
    first, second = config.rules
    assert [g.pattern for g in first.exclude] == ["**:latest"]
    assert first.targets == ("mirror.example.com/{repository}:{tag}", "{image}")
    assert second.targets == ("localhost:5000/{namespace}/{repository}:{tag}",)
    assert (first.referrers, second.referrers) == (False, True)
    registry = config.registry("registry.example.com")
    assert registry.password_credential == "robot-password" and registry.chunk_size == 8 << 20
    assert (registry.requests_per_second, registry.max_concurrent_requests) == (2.5, 4)
    assert config.registry("other.io").requests_per_second is None
    assert config.registry("other.io").plain_http is False


def test_defaults_and_state_directory():
    config = parse_config("", "empty.toml", {"STATE_DIRECTORY": "/var/lib/imagepushd"})
    assert config.state_path == Path("/var/lib/imagepushd/state.db")
    assert config.rules == () and config.push.on_start == "new-only"
    assert config.push.settle == 1.0 and config.push.concurrency == 3
    assert config.push.chunk_size is None  # adaptive chunks unless configured


def test_every_problem_is_reported_with_path_and_line():
    text = """
[push]
chunk_size = "4XB"
concurrency = 0
setle = "1s"

[[rule]]
match = ["ok/**"]

[[rule]]
match = ["***"]
target = "{img}/x"

[registries."r.io"]
plain_http = "yes"
password_file = "/x"

[extra]
"""
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "/etc/imagepushd/config.toml", {})
    assert exc.value.exit_code == 2
    assert exc.value.problems == [
        "push.chunk_size (line 3): invalid size '4XB' (examples: 4MiB, 512KiB, 1GB)",
        "push.concurrency (line 4): must be at least 1",
        "push.setle (line 5): unknown key (expected one of: chunk_size, concurrency, "
        "job_backoff_initial, job_backoff_max, on_start, parallel_images, platforms, "
        "resync_interval, retry_attempts, retry_initial, retry_max, settle)",
        "rule[1].match (line 11): '***': '***' is not a pattern (use '**')",
        "rule[1].target (line 12): '{img}/x': unknown field {img} (use image, registry, "
        "repository, tag, namespace)",
        'registries."r.io".username (line 14): is required with a password',
        'registries."r.io".plain_http (line 15): must be a bool, not a string',
        "extra (line 18): unknown key "
        "(expected one of: containerd, metrics, push, registries, rule, state)",
    ]
    assert str(exc.value).startswith("/etc/imagepushd/config.toml: 8 problem(s): ")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "[push]\nsettle = true",
            "push.settle (line 2): must be a str or an int or a float, not a boolean",
        ),
        ('[push]\nplatforms = "linux"', "push.platforms (line 2): platforms: invalid platform"),
        ('[push]\non_start = "sometimes"', 'push.on_start (line 2): must be "new-only" or "all"'),
        ('[[rule]]\ntarget = "{image}"', "rule[0].match (line 1): is required"),
        (
            '[[rule]]\nmatch = "a/**"\ntarget = "x"\ntargets = ["y"]',
            "rule[0] (line 1): set target or targets, not both",
        ),
        ("rule = 3", "rule (line 1): must be an array of tables"),
        (
            '[[rule]]\nmatch = "a/**"\nreferrers = "yes"',
            "rule[0].referrers (line 3): must be a bool, not a string",
        ),
        (
            "[containerd]\nnamespaces = [1]",
            "containerd.namespaces (line 2): must be a string or a list of strings",
        ),
        ("push = 1", "push (line 1): must be a table, not an integer"),
        (
            '[registries."r.io"]\nrequests_per_second = 0',
            'registries."r.io".requests_per_second (line 2): must be a positive number',
        ),
        (
            '[registries."r.io"]\nrequests_per_second = "fast"',
            'registries."r.io".requests_per_second (line 2): must be an int or a float',
        ),
        (
            '[registries."r.io"]\nmax_concurrent_requests = 0',
            'registries."r.io".max_concurrent_requests (line 2): must be at least 1',
        ),
    ],
)
def test_single_problems(text: str, problem: str):
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "c.toml", {})
    assert any(p.startswith(problem) for p in exc.value.problems), exc.value.problems


def test_invalid_toml_is_one_problem():
    with pytest.raises(ConfigError) as exc:
        parse_config("[push\n", "c.toml", {})
    assert exc.value.problems[0].startswith("not valid TOML")


def test_load_config_paths(tmp_path: Path):
    assert config_path(None, {}) == Path("/etc/imagepushd/config.toml")
    assert config_path(None, {"IMAGEPUSHD_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert config_path(tmp_path / "a.toml", {"IMAGEPUSHD_CONFIG": "/x.toml"}) == tmp_path / "a.toml"
    with pytest.raises(UsageError):
        load_config(tmp_path / "missing.toml", {})
    assert load_config(tmp_path / "missing.toml", {}, missing_ok=True).rules == ()
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml", {})
