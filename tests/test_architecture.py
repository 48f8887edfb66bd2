"""The package's shape: parts that import only downwards, and one image's path read top-down.

The parts are the folders of ``daemon/imagepushd`` in the order an image passes them:
``watch`` (containerd's metadata and content, the watcher), ``decide`` (rules, platforms, the
planner), ``push`` (the use case, the pusher, registry clients) and ``remember`` (the state
file). The top (``cli``, ``assembly``, ``service``, ``decisions``, ``layout``) uses them; the
shared modules beside it (errors, OCI and reference types, config, metrics...) are used by all.
"""

from __future__ import annotations

import ast
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import imagepushd
from tests.support.images import ImageBuilder
from tests.test_service import NAME, Rig, rule, until

PACKAGE = Path(imagepushd.__file__).parent
PARTS = ("watch", "decide", "push", "remember")
#: What each part may import besides the shared modules.
MAY_IMPORT = {
    "watch": set(),
    "decide": {"watch"},
    "push": {"watch", "decide", "remember"},
    "remember": set(),
}
TOP = {"cli", "assembly", "service", "decisions", "layout", "__main__"}


def part_of(module: str) -> str:
    """The part a module belongs to: its folder, or its own name for a top-level module."""
    return module.removeprefix("imagepushd.").split(".")[0]


def modules() -> Iterator[tuple[str, set[str]]]:
    """Every module of the package with the imagepushd modules it imports."""
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "imagepushd":
                    imported |= {f"imagepushd.{a.name}" for a in node.names}
                elif node.module.startswith("imagepushd."):
                    imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("imagepushd.")}
        yield name.removesuffix(".__init__"), imported


def test_the_parts_import_only_what_comes_before_them() -> None:
    wrong = []
    for module, imported in modules():
        mine = part_of(module)
        for other in {part_of(m) for m in imported} - {mine, "__version__"}:
            if mine in PARTS:
                allowed = other not in TOP and (other not in PARTS or other in MAY_IMPORT[mine])
            elif mine in TOP:
                allowed = True
            else:  # a shared module: config names the rules and platform policy it reads
                allowed = other not in TOP and (
                    other not in PARTS or (mine, other) == ("config", "decide")
                )
            if not allowed:
                wrong.append(f"{module} imports {other}")
    assert wrong == []
    assert sorted(
        p.name
        for p in PACKAGE.iterdir()
        if p.is_dir() and p.name != "data" and not p.name.startswith("__")
    ) == sorted(PARTS)


class Trail:
    """Per thread, the parts on the call stack; a part entered while it is already below another."""

    def __init__(self) -> None:
        self.reentered: list[str] = []
        self.entered: list[str] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("imagepushd."):
            return
        part = part_of(module)
        if part not in self.entered:
            self.entered.append(part)
        stack = []
        caller = frame.f_back
        while caller is not None:
            name = caller.f_globals.get("__name__", "")
            if name.startswith("imagepushd."):
                other = part_of(name)
                if not stack or stack[-1] != other:
                    stack.append(other)
            caller = caller.f_back
        if threading.current_thread().name.startswith("push") and stack[-1:] != ["service"]:
            stack.append("service")  # a worker runs what the loop dispatched: below it
        if stack and stack[0] != part and part in stack[1:]:
            self.reentered.append(f"{module}.{frame.f_code.co_qualname} from {' < '.join(stack)}")


def test_one_image_goes_down_through_the_parts_and_never_back_up(
    tmp_path: Path, image_builder: ImageBuilder
) -> None:
    rig = Rig(tmp_path, image_builder)
    rig.configure(rule(), on_start="all", settle="0s")
    app = rig.builder.image([100, 200], "architecture")
    rig.tag(NAME, app)
    trail = Trail()
    threading.setprofile(trail)
    sys.setprofile(trail)
    try:
        rig.start()
        until(lambda: rig.jobs() == [(NAME, app.digest, "done")], "the image is pushed")
        assert rig.stop() == 0
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    assert rig.holds(NAME, app)
    assert trail.reentered == []
    assert {"watch", "decide", "push", "remember"} <= set(trail.entered)
