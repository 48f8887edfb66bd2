"""The planner fed: containerd's images (:mod:`imagepushd.decide.views`) and the state.

:mod:`imagepushd.decide.planner` is pure; this module gives it its inputs. The daemon decides with
:func:`decide_snapshot` after each scan; ``imagepushd plan`` shows :func:`preview`, the same
decision without writing anything.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Set
from pathlib import Path

from imagepushd.config import Config
from imagepushd.decide.planner import Decision, Job, OpenJob, SeenImage, decide
from imagepushd.decide.platforms import host_platform
from imagepushd.decide.views import image_view
from imagepushd.remember import OPEN_STATUSES, State
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import MetadataSnapshot, MetadataStore
from imagepushd.watch.roots import discover_root


def _remembered(
    state: State | None, scope: Set[tuple[str, str]] | None = None
) -> tuple[dict[tuple[str, str], SeenImage], set[tuple[str, str]], list[OpenJob], bool]:
    """What ``state`` remembers, as the planner takes it (None: nothing, a first run)."""
    if state is None:
        return {}, set(), [], True
    seen = {k: SeenImage(v.digest, v.since, v.baseline) for k, v in state.seen.load(scope).items()}
    open_jobs = [
        OpenJob(j.id, Job(j.namespace, j.name, j.digest, j.target, j.rule))
        for j in state.jobs.select(OPEN_STATUSES)
    ]
    first = state.flags.get("baseline_done") is None
    return seen, state.pushed.holdings(), open_jobs, first


def decide_snapshot(
    snap: MetadataSnapshot,
    content: ContentStore,
    config: Config,
    state: State | None,
    *,
    now: float,
    settle: float,
    scope: Set[tuple[str, str]] | None = None,
) -> Decision:
    """The planner's decision for ``snap`` given what ``state`` remembers (None: nothing).

    ``scope`` limits it to those (namespace, name) (see :func:`decide`).
    """
    records = snap.images
    if scope is not None:
        records = tuple(r for r in records if (r.namespace, r.name) in scope)
    host = host_platform()
    views = [image_view(r, snap, content, config.push.platforms, host) for r in records]
    seen, pushed, open_jobs, first = _remembered(state, scope)
    return decide(
        views,
        seen,
        pushed,
        open_jobs,
        config.rules,
        now=now,
        settle=settle,
        baseline=first and config.push.on_start == "new-only",
        scope=scope,
    )


def preview(config: Config, env: Mapping[str, str], home: Path) -> list[dict[str, str]]:
    """``imagepushd plan``: the decision for containerd's images now, without writing state."""
    root = discover_root(None, config.containerd.root, env, home).path
    metadata = MetadataStore.at_root(root)
    try:
        snap = metadata.read(config.containerd.namespaces, blobs=True)
    finally:
        metadata.close()
    state = State(config.state_path) if config.state_path.exists() else None
    try:
        decision = decide_snapshot(
            snap, ContentStore(root), config, state, now=time.time(), settle=0.0
        )
    finally:
        if state is not None:
            state.close()

    def row(action: str, ns: str, name: str, target: str | None, reason: str) -> dict[str, str]:
        return {
            "action": action,
            "namespace": ns,
            "name": name,
            "target": target or "",
            "reason": reason,
        }

    rows = [row("push", j.namespace, j.name, j.target, "") for j in decision.enqueue]
    rows += [
        row("queued", j.namespace, j.name, j.target, "already queued") for j in decision.queued
    ]
    rows += [row("wait", n.namespace, n.name, n.target, n.reason) for n in decision.waiting]
    rows += [row("skip", n.namespace, n.name, n.target, n.reason) for n in decision.skipped]
    return sorted(rows, key=lambda r: (r["namespace"], r["name"], r["target"]))
