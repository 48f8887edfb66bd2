"""Bad input to the CLI: one clear line on stderr, exit 1 (2 for usage), no traceback."""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imagepushd.cli import Context, build_parser, run
from imagepushd.units import human_size
from tests.support.containerd import Containerd
from tests.support.images import ImageBuilder


def cli(
    *argv: str, env: dict[str, str] | None = None, fs: Path = Path("/")
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    ctx = Context(env=env or {}, home=Path("/nonexistent-home"), stdout=out, stderr=err, fs=fs)
    code = run(list(argv), ctx, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line(err: str, *needles: str) -> None:
    assert err.startswith("imagepushd: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def copied_root(containerd: Containerd, image_builder: ImageBuilder, tmp_path: Path) -> Path:
    """A containerd root whose meta.db holds one image, copied after containerd stopped."""
    root = image_builder.image([10], seed="cli")
    image_builder.write_oci_archive(tmp_path / "a.tar", {"example.com/cli:1": root})
    containerd.import_archive(tmp_path / "a.tar")
    containerd.stop()
    copy = tmp_path / "root"
    shutil.copytree(containerd.root, copy)
    return copy


def meta_db(root: Path) -> Path:
    return root / "io.containerd.metadata.v1.bolt" / "meta.db"


def test_human_size():
    assert [human_size(n) for n in (0, 1023, 1024, 5 << 20, 3 << 40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 TiB",
    ]


def test_missing_root_names_the_paths_tried(tmp_path: Path):
    code, _, err = cli("images", "--root", str(tmp_path / "nope"))
    assert code == 1
    assert_one_line(err, str(tmp_path / "nope"), "no containerd root found")
    code, _, err = cli("images", env={"XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert code == 1
    assert_one_line(err, "/var/lib/containerd", str(tmp_path / "xdg" / "containerd"))


def test_rootless_root_is_discovered(copied_root: Path, tmp_path: Path):
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "containerd").symlink_to(copied_root)
    fs = tmp_path / "fs"
    code, out, err = cli("images", env={"XDG_DATA_HOME": str(xdg)}, fs=fs)
    assert code == 0, err
    assert "example.com/cli:1" in out
    # Which root, and why, goes to stderr (stdout stays the listing).
    assert err == (
        f"imagepushd: containerd root {xdg / 'containerd'} (rootless containerd's default root)\n"
    )


def test_check_config_says_which_root(copied_root: Path, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\npath = "{tmp_path}/state.db"\n')
    fs = tmp_path / "fs"
    code, out, _ = cli("--config", str(config), "check-config", fs=fs)
    assert code == 0
    assert out.splitlines()[1].startswith("no containerd root found (")
    k3s = fs / "var/lib/rancher/k3s/agent/containerd"
    k3s.parent.mkdir(parents=True)
    k3s.symlink_to(copied_root)
    code, out, _ = cli("--config", str(config), "check-config", fs=fs)
    assert code == 0
    assert out.splitlines()[1] == (
        f"containerd root {k3s} (k3s, data-dir {fs}/var/lib/rancher/k3s)"
    )


@pytest.mark.e2e
def test_not_a_bbolt_file(copied_root: Path):
    meta_db(copied_root).write_bytes(os.urandom(8192))
    code, _, err = cli("images", "--root", str(copied_root))
    assert code == 1
    assert_one_line(err, "not a bbolt file")


def patch_db_version(path: Path, value: int) -> None:
    data = bytearray(path.read_bytes())
    count = 0
    needle = b"version"
    start = data.find(needle)
    while start != -1:
        data[start + len(needle)] = value
        count += 1
        start = data.find(needle, start + 1)
    assert count
    path.write_bytes(bytes(data))


@pytest.mark.e2e
def test_unsupported_and_newer_db_versions(copied_root: Path):
    patch_db_version(meta_db(copied_root), 0)  # zigzag varint 0: no schema version
    code, _, err = cli("images", "--root", str(copied_root))
    assert code == 1
    assert_one_line(err, "metadata version 0 is not supported")

    patch_db_version(meta_db(copied_root), 12)  # zigzag 12 = version 6: newer than we know
    code, out, err = cli("images", "--root", str(copied_root))
    assert code == 0
    assert "version 6 is newer than 4" in err
    assert "example.com/cli:1" in out


@pytest.mark.e2e
def test_unknown_namespace_and_image(copied_root: Path, tmp_path: Path):
    code, _, err = cli("images", "--root", str(copied_root), "-n", "nope")
    assert code == 1
    assert_one_line(err, "namespace 'nope' does not exist", "have: default")
    code, _, err = cli("export", "--root", str(copied_root), "nope:1", "-o", str(tmp_path / "o"))
    assert code == 1
    assert_one_line(err, "image 'nope:1' not found in namespace 'default'")
    code, _, err = cli("images", "--root", str(copied_root), env={"CONTAINERD_NAMESPACE": "x"})
    assert code == 1
    assert_one_line(err, "namespace 'x' does not exist")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]):
    for argv in (["images", "-n", "x", "-A"], ["export", "img"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as exc:
            cli(*argv)
        assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.e2e
def test_traceback_only_at_debug(copied_root: Path):
    meta_db(copied_root).write_bytes(b"\0" * 100)
    code, _, err = cli("--log-level", "debug", "images", "--root", str(copied_root))
    assert code == 1
    assert "Traceback" in err and err.rstrip().endswith("no valid meta page)")


@pytest.mark.e2e
def test_permission_denied_is_one_line(copied_root: Path):
    """An unprivileged user meets containerd's 0700 root and 0600 meta.db."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv not found (Debian package util-linux)")
    # pytest's tmp_path sits under a 0700 directory: give nobody a path it can traverse.
    public = Path(tempfile.mkdtemp(prefix="imagepushd-perm-", dir="/tmp"))
    public.chmod(0o755)
    try:
        copied_root = Path(shutil.copytree(copied_root, public / "root"))
        check_permissions(copied_root)
    finally:
        shutil.rmtree(public)


def check_permissions(copied_root: Path) -> None:
    def as_nobody(root: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"),
                *(sys.executable, "-m", "imagepushd", "images", "--root", str(root)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    copied_root.chmod(0o700)
    proc = as_nobody(copied_root)
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "permission denied", str(copied_root))

    copied_root.chmod(0o755)
    meta_db(copied_root).parent.chmod(0o755)
    meta_db(copied_root).chmod(0o600)
    proc = as_nobody(copied_root)
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "permission denied", "meta.db")


def test_images_json_rows_are_json_dumps_of_the_rows():
    """``images --json`` writes one ``json.dumps(row)`` per line, built without the dict."""
    from datetime import UTC, datetime

    from imagepushd.cli import _image_json, _image_row, _TargetRow
    from imagepushd.oci import Descriptor, Platform
    from imagepushd.watch.content import ImageGraph, ManifestNode
    from imagepushd.watch.metadata import ImageRecord

    layer = Descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:" + "b" * 64, 5)
    target = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "a" * 64, 9)
    graph = ImageGraph(ManifestNode(target, Platform("linux", "arm64", "v8"), None), (layer,))
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    records = [
        ImageRecord("default", "example.com/a:1", target, when, when),
        ImageRecord('n\u00e9 "x"', "example.com/\u2603:\u00e9", target, None, when),
        ImageRecord("default", "b", target, when.replace(microsecond=0), None),
    ]
    for record in records:
        rows = [
            _TargetRow(record.namespace, target, graph, None),
            _TargetRow(record.namespace, target, None, 'blob "x" is corrupt: \u00e9\n'),
        ]
        for row in rows:
            assert _image_json(record, row) == json.dumps(_image_row(record, row))


def test_referrers_with_an_archive_is_a_usage_error(tmp_path: Path):
    code, _, err = cli("push", "--archive", str(tmp_path / "x.tar"), "r.test/app:1", "--referrers")
    assert code == 2
    assert_one_line(err, "--referrers reads them from containerd; not with --archive")


def test_global_options_are_accepted_after_the_subcommand(tmp_path: Path) -> None:
    """``check-config --config F`` as well as ``--config F check-config``; the later wins."""
    good = tmp_path / "good.toml"
    good.write_text('[push]\nsettle = "2s"\n')
    for argv in (
        ["check-config", "--config", str(good)],
        ["--config", str(good), "check-config"],
        ["--config", str(tmp_path / "missing.toml"), "check-config", "--config", str(good)],
        ["check-config", "--log-level", "debug", "--config", str(good)],
    ):
        code, _, err = cli(*argv)
        assert code == 0, (argv, err)
    code, _, err = cli("check-config", "--config", str(tmp_path / "none.toml"))
    assert code == 2
    assert_one_line(err, "none.toml")


def test_every_subcommand_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    subcommands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert len(subcommands) >= 11
    for name, sub in subcommands.items():
        assert sub.description, name
    with pytest.raises(SystemExit):
        cli("images", "--help")
    assert "$CONTAINERD_NAMESPACE" in capsys.readouterr().out
