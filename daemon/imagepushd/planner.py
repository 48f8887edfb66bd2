"""From what containerd holds now, what the state remembers and the rules: the jobs.

Pure: no I/O, the clock comes in as ``now``. "New" means a (namespace, name) whose target digest
differs from the one last seen — digests are compared, never timestamps — and a tag must stay
put for ``settle`` seconds before it is pushed, so a burst of re-tags pushes only the last one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime

from imagepushd.errors import InvalidReferenceError
from imagepushd.rules import Rule, match_image


def _complete() -> str | None:
    return None


@dataclass(frozen=True)
class ImageView:
    """One image as the service sees it now.

    ``missing()`` says what content is missing (None: nothing). It costs a walk of the content
    store, so the planner asks only for images it would otherwise enqueue: not for those
    already pushed with this digest or already queued.
    """

    namespace: str
    name: str
    digest: str
    missing: Callable[[], str | None] = _complete
    #: When containerd may garbage-collect the image (its ``containerd.io/gc.expire``), if ever.
    expires: datetime | None = None


@dataclass(frozen=True)
class SeenImage:
    """What the state remembers of a (namespace, name): its digest, since when, baseline."""

    digest: str
    since: float
    baseline: bool = False


@dataclass(frozen=True)
class Job:
    """Push ``namespace``/``name`` at ``digest`` to ``target`` (rule ``rule`` asked for it)."""

    namespace: str
    name: str
    digest: str
    target: str
    rule: int


@dataclass(frozen=True)
class OpenJob:
    """A queued, running or failing job already in the state."""

    id: int
    job: Job


@dataclass(frozen=True)
class Note:
    """Why an image (or one of its targets) is not being pushed now."""

    namespace: str
    name: str
    target: str | None
    reason: str


@dataclass
class Decision:
    """The planner's answer for one snapshot."""

    seen_changed: dict[tuple[str, str], SeenImage] = field(default_factory=dict)
    seen_removed: list[tuple[str, str]] = field(default_factory=list)
    enqueue: list[Job] = field(default_factory=list)
    cancel: list[tuple[int, str]] = field(default_factory=list)
    waiting: list[Note] = field(default_factory=list)
    skipped: list[Note] = field(default_factory=list)
    queued: list[Job] = field(default_factory=list)
    wake_at: float | None = None


def decide(
    images: Iterable[ImageView],
    seen: Mapping[tuple[str, str], SeenImage],
    pushed: Set[tuple[str, str]],
    open_jobs: Sequence[OpenJob],
    rules: Sequence[Rule],
    *,
    now: float,
    settle: float,
    baseline: bool,
    scope: Set[tuple[str, str]] | None = None,
) -> Decision:
    """Decide jobs for ``images``.

    ``baseline`` is true on the very first scan with ``on_start = "new-only"``: everything
    present then is remembered as already handled.

    ``scope``, when given, limits the decision to those (namespace, name): images, seen names
    and open jobs outside it are left out, and their previous decision stands. Each image is
    decided on its own, so the decisions of the parts of a partition of the names make up the
    decision on the whole: a daemon re-plans only names that moved, or that wait on something
    that changed.
    """
    if scope is not None:
        images = [i for i in images if (i.namespace, i.name) in scope]
        seen = {k: v for k, v in seen.items() if k in scope}
        open_jobs = [o for o in open_jobs if (o.job.namespace, o.job.name) in scope]
    out = Decision()
    current: dict[tuple[str, str], str] = {}
    open_by_key = {(o.job.namespace, o.job.name, o.job.digest, o.job.target): o for o in open_jobs}
    wanted: set[tuple[str, str, str, str]] = set()

    for image in images:
        key = (image.namespace, image.name)
        current[key] = image.digest
        record = seen.get(key)
        if record is None or record.digest != image.digest:
            record = SeenImage(image.digest, now, baseline)
            out.seen_changed[key] = record
        try:
            matches = match_image(rules, image.namespace, image.name)
        except InvalidReferenceError as exc:
            out.skipped.append(Note(image.namespace, image.name, None, f"bad target: {exc}"))
            continue
        if not matches:
            out.skipped.append(Note(image.namespace, image.name, None, "no rule matches"))
            continue
        if image.expires is not None and image.expires.timestamp() <= now:
            when = image.expires.isoformat()
            reason = f"expired: containerd.io/gc.expire {when} has passed (containerd collects it)"
            out.skipped.append(Note(image.namespace, image.name, None, reason))
            continue
        if record.baseline:
            out.skipped.append(
                Note(
                    image.namespace,
                    image.name,
                    None,
                    'present at first start (on_start = "new-only")',
                )
            )
            continue
        targets = [(m.rule, str(t)) for m in matches for t in m.targets]
        for _rule, target in targets:
            wanted.add((image.namespace, image.name, image.digest, target))
        ready_at = record.since + settle
        if ready_at > now:
            out.waiting.append(
                Note(
                    image.namespace,
                    image.name,
                    None,
                    f"settling: tag must stay put {settle:g}s ({ready_at - now:.1f}s left)",
                )
            )
            out.wake_at = ready_at if out.wake_at is None else min(out.wake_at, ready_at)
            continue
        pending: list[Job] = []
        for rule, target in targets:
            job = Job(image.namespace, image.name, image.digest, target, rule)
            if (target, image.digest) in pushed:
                out.skipped.append(
                    Note(image.namespace, image.name, target, "already pushed with this digest")
                )
            elif (image.namespace, image.name, image.digest, target) in open_by_key:
                out.queued.append(job)
            else:
                pending.append(job)
        if not pending:
            continue
        missing = image.missing()
        if missing is not None:
            out.waiting.append(
                Note(image.namespace, image.name, None, f"content incomplete: {missing}")
            )
            continue
        out.enqueue.extend(pending)

    out.seen_removed = [key for key in seen if key not in current]
    for job_key, opened in open_by_key.items():
        namespace, name, digest, _target = job_key
        now_digest = current.get((namespace, name))
        if now_digest is None:
            out.cancel.append((opened.id, f"{namespace}/{name} was deleted"))
        elif now_digest != digest:
            out.cancel.append((opened.id, f"{namespace}/{name} moved to {now_digest}"))
        elif job_key not in wanted:
            out.cancel.append((opened.id, "no rule asks for this target any more"))
    return out
