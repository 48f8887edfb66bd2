"""Packaging: package data, generated man page / completion / conffile, debian/ consistency.

The fast tests read files and render text. ``test_wheel_and_sdist_install_into_a_fresh_venv``
runs ``python -m build`` (sdist, then the wheel from the sdist) on a snapshot of the tree and
installs the wheel with pip into a new venv (dependencies from PyPI).
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

from imagepushd import __version__
from imagepushd.cli import Context, build_parser, run
from imagepushd.config import parse_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "daemon" / "imagepushd" / "data"
DEBIAN = REPO / "packaging" / "debian"
#: Prometheus rules and Grafana dashboard (installed under /usr/share/imagepushd/ by the .deb).
MONITORING = (
    "packaging/prometheus/imagepushd.rules.yml",
    "packaging/grafana/imagepushd-dashboard.json",
)


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "packaging" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env={}, home=Path("/nonexistent"), stdout=out, stderr=err)
    code = run(list(argv), ctx, err)
    return code, out.getvalue(), err.getvalue()


def _subcommands() -> list[str]:
    parser = build_parser()
    for action in parser._actions:
        if action.choices and action.dest == "command":
            return list(action.choices)
    raise AssertionError("no subcommands")


# ------------------------------------------------------------------ package data


@pytest.mark.parametrize("name", ["imagepushd.service", "config.example.toml"])
def test_systemd_dir_links_to_the_package_data(name: str) -> None:
    link = REPO / "systemd" / name
    assert link.is_symlink(), f"systemd/{name} must stay a symlink to daemon/imagepushd/data/"
    assert link.resolve() == (DATA / name).resolve()


def test_print_unit_and_print_config_print_the_packaged_files() -> None:
    code, out, _ = _cli("print-unit")
    assert code == 0
    assert out == (DATA / "imagepushd.service").read_text()
    code, out, _ = _cli("print-config")
    assert code == 0
    assert out == (DATA / "config.example.toml").read_text()
    parse_config(out, "config.example.toml", {})


def test_print_unit_exec_changes_only_exec_start() -> None:
    _, packaged, _ = _cli("print-unit")
    code, out, _ = _cli("print-unit", "--exec", "/opt/imagepushd/bin/imagepushd")
    assert code == 0
    changed = [
        (a, b) for a, b in zip(packaged.splitlines(), out.splitlines(), strict=True) if a != b
    ]
    assert changed == [
        (
            "ExecStart=/usr/bin/imagepushd --config /etc/imagepushd/config.toml run",
            "ExecStart=/opt/imagepushd/bin/imagepushd --config /etc/imagepushd/config.toml run",
        )
    ]


def test_pyproject_ships_the_data_files() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["imagepushd"]
    shipped = {p.name for pattern in patterns for p in DATA.glob(pattern.removeprefix("data/"))}
    assert shipped == {"imagepushd.service", "config.example.toml"}


# ------------------------------------------------------------------ generated files


def test_man_page_documents_every_command_and_option() -> None:
    page = _script("manpage").render()
    assert page.startswith(".TH IMAGEPUSHD 8 ")
    assert f'"imagepushd {__version__}"' in page.splitlines()[0]
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "FILES"):
        assert f"\n.SH {section}\n" in page
    for command in _subcommands():
        assert f"\n.SS {command.replace('-', chr(92) + '-')}\n" in page, command
    for option in ("--config", "--log-level", "--plain-http", "--all-namespaces", "--exec"):
        assert option.replace("-", "\\-") in page, option
    for field in ("IMAGE", "TARGET", "DIGEST", "NAMESPACE", "BYTES", "DURATION_MS", "RULE"):
        assert f"\\fB{field}\\fR" in page, field
    # roff: no text line may start with a control character, no unescaped hyphen in text.
    for line in page.splitlines():
        if not line.startswith("."):
            assert not line.startswith("'"), line
            assert not re.search(r"(?<!\\)-", line), line


def _complete(script: Path, *words: str) -> list[str]:
    quoted = " ".join(f"'{w}'" for w in words)
    result = subprocess.run(
        [
            "bash",
            "-c",
            f". {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _imagepushd; "
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path) -> None:
    script = tmp_path / "imagepushd"
    script.write_text(_script("bash_completion").render())
    assert _complete(script, "imagepushd", "") == [
        "-h",
        "--help",
        "--version",
        "--config",
        "--log-level",
        *_subcommands(),
    ]
    assert _complete(script, "imagepushd", "print-") == ["print-unit", "print-config"]
    assert _complete(script, "imagepushd", "--log-level", "") == [
        "debug",
        "info",
        "warning",
        "error",
    ]
    assert "--all-namespaces" in _complete(script, "imagepushd", "images", "--")
    # Global options are accepted after the subcommand too, so they complete there.
    assert _complete(script, "imagepushd", "--config", "x", "status", "--l") == [
        "--log-level",
        "--limit",
    ]
    assert _complete(script, "imagepushd", "status", "--log-level", "") == [
        "debug",
        "info",
        "warning",
        "error",
    ]
    (tmp_path / "conf.toml").touch()
    assert _complete(script, "imagepushd", "--config", f"{tmp_path}/con") == [
        f"{tmp_path}/conf.toml"
    ]


def test_conffile_has_no_active_setting_and_loads_with_no_rule() -> None:
    example = (DATA / "config.example.toml").read_text()
    conffile = _script("conffile").render(example)
    assert tomllib.loads(conffile) == {}
    config = parse_config(conffile, "/etc/imagepushd/config.toml", {})
    assert config.rules == ()
    # Every line of the example is still there, commented out, to be uncommented.
    for line in example.splitlines():
        assert line in conffile or f"# {line}" in conffile


# ------------------------------------------------------------------ debian/


def test_debian_changelog_version_is_the_package_version() -> None:
    top = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"imagepushd \(([^)]+)\) \w+; urgency=\w+", top)
    assert match, top
    assert match[1] == __version__, (
        f"packaging/debian/changelog is at {match[1]}, __version__ is {__version__}: add an entry"
    )


def _control_depends() -> dict[str, str]:
    control = (DEBIAN / "control").read_text()
    binary = control[control.index("\nPackage: imagepushd") :]
    depends = re.search(r"^Depends:(.*?)^\S", binary, re.MULTILINE | re.DOTALL)
    assert depends is not None
    out = {}
    for item in depends[1].split(","):
        m = re.fullmatch(r"\s*([a-z0-9.+-]+)(?: \(>= ([^)]+)\))?\s*", item)
        if m:
            out[m[1]] = m[2] or ""
    return out


def test_debian_depends_match_pyproject_lower_bounds() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    debian_names = {"systemd-python": "python3-systemd"}
    wanted = {}
    for requirement in pyproject["project"]["dependencies"]:
        name, bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement).groups()  # type: ignore[union-attr]
        wanted[debian_names.get(name, f"python3-{name.lower()}")] = bound
    depends = _control_depends()
    for package, bound in wanted.items():
        assert depends.get(package) == bound, (package, depends.get(package), bound)
    python = pyproject["project"]["requires-python"].removeprefix(">=")
    assert depends["python3"] == python


def test_unit_commands_come_from_dependencies() -> None:
    """Every program the unit runs is in the package or its Depends (a clean root lacks procps)."""
    providers = {"/usr/bin/imagepushd": "imagepushd", "/bin/kill": "procps"}
    unit = (DATA / "imagepushd.service").read_text()
    programs = re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", unit, re.MULTILINE)
    assert programs
    depends = {*_control_depends(), "imagepushd"}
    for program in programs:
        assert program in providers, f"{program}: which Debian package provides it?"
        assert providers[program] in depends, f"{program} needs Depends: {providers[program]}"


def test_unit_yields_to_the_builds() -> None:
    """The unit runs as a background service: below an ordinary unit's CPU and I/O share
    (systemd's defaults: CPUWeight=100, IOWeight=100, Nice=0, best-effort 4), never in the
    idle or realtime classes (idle could stall pushes for good on a machine always busy)."""
    settings: dict[str, str] = {}
    for line in (DATA / "imagepushd.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key, value)
    assert 1 <= int(settings["CPUWeight"]) < 100
    assert 1 <= int(settings["IOWeight"]) < 100
    assert 0 < int(settings["Nice"]) <= 19
    assert settings["IOSchedulingClass"] == "best-effort"
    assert 4 < int(settings["IOSchedulingPriority"]) <= 7


def test_debian_rules_is_executable_and_uses_pybuild() -> None:
    rules = DEBIAN / "rules"
    assert rules.stat().st_mode & 0o111
    assert "dh $@ --with python3 --buildsystem=pybuild" in rules.read_text()
    assert (REPO / "packaging" / "build-deb.sh").stat().st_mode & 0o111


def test_debian_installs_the_alert_rules_and_dashboard_under_usr_share() -> None:
    lines = (DEBIAN / "imagepushd.install").read_text().splitlines()
    installs = dict(line.split() for line in lines)
    for name in MONITORING:
        assert (REPO / name).is_file(), name
        kind = Path(name).parent.name  # prometheus/ or grafana/
        assert installs.get(name) == f"usr/share/imagepushd/{kind}/", name


# ------------------------------------------------------------------ wheel and sdist


def _snapshot(dest: Path) -> Path:
    skip = {".venv", ".git", "dist", "build", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    skip |= {".hypothesis", "__pycache__", "tests", "bench", "demo", "docs"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in skip or n.endswith(".egg-info")}

    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.mark.e2e
def test_wheel_and_sdist_install_into_a_fresh_venv(tmp_path: Path) -> None:
    source = _snapshot(tmp_path / "src")
    dist = tmp_path / "dist"
    # As `make dist`: the sdist, then the wheel built from the unpacked sdist.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # The licence metadata must not lean on anything the newest setuptools deprecates.
    assert "Deprecat" not in built.stdout + built.stderr, built.stdout + built.stderr
    wheel = dist / f"imagepushd-{__version__}-py3-none-any.whl"
    sdist = dist / f"imagepushd-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert (
            zf.read("imagepushd/data/imagepushd.service")
            == (DATA / "imagepushd.service").read_bytes()
        )
        assert (
            zf.read("imagepushd/data/config.example.toml")
            == (DATA / "config.example.toml").read_bytes()
        )
        info = f"imagepushd-{__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        assert "License: Apache-2.0" in metadata.splitlines(), metadata
        [licence] = [n for n in names if n.startswith(info) and n.endswith("/LICENSE")]
        assert zf.read(licence) == (REPO / "LICENSE").read_bytes()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"imagepushd", f"imagepushd-{__version__}.dist-info"}, tops
    with tarfile.open(sdist) as tf:
        base = f"imagepushd-{__version__}/daemon/imagepushd/data/"
        for name in ("imagepushd.service", "config.example.toml"):
            member = tf.getmember(base + name)
            assert member.isfile(), f"{name} is not a regular file in the sdist"
        assert tf.getmember(f"imagepushd-{__version__}/LICENSE").isfile()
        for name in MONITORING:
            assert tf.getmember(f"imagepushd-{__version__}/{name}").isfile(), name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    exe = venv / "bin" / "imagepushd"

    def cli(*args: str) -> str:
        # From another directory, so nothing from the source tree can be imported by accident.
        return subprocess.run(
            [str(exe), *args], check=True, capture_output=True, text=True, cwd=tmp_path
        ).stdout

    assert cli("--version").strip() == f"imagepushd {__version__}"
    assert cli("print-unit") == (DATA / "imagepushd.service").read_text()
    assert cli("print-config") == (DATA / "config.example.toml").read_text()
    assert f"ExecStart={exe} " in cli("print-unit", "--exec", str(exe))
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import imagepushd; print(imagepushd.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(venv)), where
    top = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.util as u; print(u.find_spec('daemon'))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert top.strip() == "None", "the wheel must not install a top-level module named daemon"
