"""From what containerd holds now, what the state remembers and the rules: the jobs.

Pure: no I/O, the clock comes in as ``now``. "New" means a (namespace, name) whose target digest
differs from the one last seen — digests are compared, never timestamps — and a tag must stay
put for ``settle`` seconds before it is pushed, so a burst of re-tags pushes only the last one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from imagepushd.decide.rules import Match, Rule, match_image
from imagepushd.errors import InvalidReferenceError
from imagepushd.reference import parse_reference
from imagepushd.watch.metadata import MetadataSnapshot
from imagepushd.watch.referrers import Referrer


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


class Why(enum.Enum):
    """Why an image waits or is skipped; the value is how the reason reads."""

    BAD_TARGET = "bad target"
    NO_RULE = "no rule matches"
    EXPIRED = "expired"
    BASELINE = "present at first start"
    SETTLING = "settling"
    PUSHED = "already pushed with this digest"
    INCOMPLETE = "content incomplete"


@dataclass(frozen=True)
class Reason:
    """A reason: its code, what it says, and an aside in brackets.

    ``key`` is what stays put while the reason does (a countdown in the aside does not count),
    so the daemon logs a waiting image again only when its reason changes.
    """

    code: Why
    detail: str = ""
    aside: str = ""

    @property
    def key(self) -> tuple[Why, str]:
        """What identifies the reason, without its aside."""
        return self.code, self.detail

    def __str__(self) -> str:
        text = f"{self.code.value}: {self.detail}" if self.detail else self.code.value
        return f"{text} ({self.aside})" if self.aside else text


@dataclass(frozen=True)
class Note:
    """Why an image (or one of its targets) is not being pushed now."""

    namespace: str
    name: str
    target: str | None
    why: Reason

    @property
    def reason(self) -> str:
        """The reason as it reads."""
        return str(self.why)


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


_JobKey = tuple[str, str, str, str]  # (namespace, name, digest, target)


def _job_key(job: Job) -> _JobKey:
    return job.namespace, job.name, job.digest, job.target


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
        images, seen, open_jobs = _within(scope, images, seen, open_jobs)
    out = Decision()
    current: dict[tuple[str, str], str] = {}
    open_by_key = {_job_key(o.job): o for o in open_jobs}
    wanted: set[_JobKey] = set()

    for image in images:
        key = (image.namespace, image.name)
        current[key] = image.digest
        record = seen.get(key)
        if record is None or record.digest != image.digest:
            record = SeenImage(image.digest, now, baseline)
            out.seen_changed[key] = record
        share = _decide_image(image, record, rules, pushed, open_by_key, now=now, settle=settle)
        out.skipped += share.skipped
        out.waiting += share.waiting
        out.queued += share.queued
        out.enqueue += share.enqueue
        wanted.update(share.wanted)
        out.wake_at = _earlier(out.wake_at, share.ready_at)

    out.seen_removed = [key for key in seen if key not in current]
    out.cancel = _cancels(open_by_key, current, wanted)
    return out


def _within(
    scope: Set[tuple[str, str]],
    images: Iterable[ImageView],
    seen: Mapping[tuple[str, str], SeenImage],
    open_jobs: Sequence[OpenJob],
) -> tuple[list[ImageView], dict[tuple[str, str], SeenImage], list[OpenJob]]:
    """The images, seen names and open jobs whose (namespace, name) is in ``scope``."""
    return (
        [i for i in images if (i.namespace, i.name) in scope],
        {k: v for k, v in seen.items() if k in scope},
        [o for o in open_jobs if (o.job.namespace, o.job.name) in scope],
    )


@dataclass(frozen=True)
class _Share:
    """One image's part of a :class:`Decision`.

    ``wanted`` are the jobs the rules ask for (settled or not): an open job not among them
    is cancelled. ``ready_at`` is when a settling image is due.
    """

    skipped: tuple[Note, ...] = ()
    waiting: tuple[Note, ...] = ()
    queued: tuple[Job, ...] = ()
    enqueue: tuple[Job, ...] = ()
    wanted: tuple[_JobKey, ...] = ()
    ready_at: float | None = None


def _decide_image(
    image: ImageView,
    record: SeenImage,
    rules: Sequence[Rule],
    pushed: Set[tuple[str, str]],
    open_by_key: Mapping[_JobKey, OpenJob],
    *,
    now: float,
    settle: float,
) -> _Share:
    """Skip ``image`` as a whole, let it settle, or sort its jobs (``record``: as seen now)."""
    targets = _targets(image, record, rules, now)
    if isinstance(targets, Reason):
        return _Share(skipped=(Note(image.namespace, image.name, None, targets),))
    jobs = [
        Job(image.namespace, image.name, image.digest, target, rule) for rule, target in targets
    ]
    wanted = tuple(_job_key(job) for job in jobs)
    ready_at = record.since + settle
    if ready_at > now:
        reason = Reason(
            Why.SETTLING, f"tag must stay put {settle:g}s", f"{ready_at - now:.1f}s left"
        )
        note = Note(image.namespace, image.name, None, reason)
        return _Share(waiting=(note,), wanted=wanted, ready_at=ready_at)
    skipped, queued, pending = _sort_jobs(jobs, pushed, open_by_key)
    # Only an image with something left to push is worth the walk of the content store.
    missing = image.missing() if pending else None
    if missing is not None:
        note = Note(image.namespace, image.name, None, Reason(Why.INCOMPLETE, missing))
        return _Share(skipped=skipped, waiting=(note,), queued=queued, wanted=wanted)
    return _Share(skipped=skipped, queued=queued, enqueue=pending, wanted=wanted)


def _targets(
    image: ImageView, record: SeenImage, rules: Sequence[Rule], now: float
) -> list[tuple[int, str]] | Reason:
    """The (rule, target) pairs the rules ask ``image`` to be pushed to, or why none."""
    try:
        matches = match_image(rules, image.namespace, image.name)
    except InvalidReferenceError as exc:
        return Reason(Why.BAD_TARGET, str(exc))
    if not matches:
        return Reason(Why.NO_RULE)
    if image.expires is not None and image.expires.timestamp() <= now:
        when = image.expires.isoformat()
        return Reason(
            Why.EXPIRED, f"containerd.io/gc.expire {when} has passed", "containerd collects it"
        )
    if record.baseline:
        return Reason(Why.BASELINE, aside='on_start = "new-only"')
    return [(m.rule, str(t)) for m in matches for t in m.targets]


def _sort_jobs(
    jobs: Iterable[Job], pushed: Set[tuple[str, str]], open_by_key: Mapping[_JobKey, OpenJob]
) -> tuple[tuple[Note, ...], tuple[Job, ...], tuple[Job, ...]]:
    """Notes for the jobs already pushed, the jobs already open, and the jobs still to run."""
    skipped: list[Note] = []
    queued: list[Job] = []
    pending: list[Job] = []
    for job in jobs:
        if (job.target, job.digest) in pushed:
            skipped.append(Note(job.namespace, job.name, job.target, Reason(Why.PUSHED)))
        elif _job_key(job) in open_by_key:
            queued.append(job)
        else:
            pending.append(job)
    return tuple(skipped), tuple(queued), tuple(pending)


def _earlier(wake_at: float | None, ready_at: float | None) -> float | None:
    """The earlier of two wake-up times, either of which may be none."""
    if wake_at is None:
        return ready_at
    if ready_at is None:
        return wake_at
    return min(wake_at, ready_at)


def _cancels(
    open_by_key: Mapping[_JobKey, OpenJob],
    current: Mapping[tuple[str, str], str],
    wanted: Set[_JobKey],
) -> list[tuple[int, str]]:
    """The open jobs to cancel, with why: given the digest of each image now and the jobs wanted."""
    cancel: list[tuple[int, str]] = []
    for job_key, opened in open_by_key.items():
        namespace, name, digest, _target = job_key
        now_digest = current.get((namespace, name))
        if now_digest is None:
            cancel.append((opened.id, f"{namespace}/{name} was deleted"))
        elif now_digest != digest:
            cancel.append((opened.id, f"{namespace}/{name} moved to {now_digest}"))
        elif job_key not in wanted:
            cancel.append((opened.id, "no rule asks for this target any more"))
    return cancel


class PushRecord(Protocol):
    """A push the state remembers (its ``Pushed``), as the planner reads it."""

    @property
    def target(self) -> str:
        """The reference pushed to."""

    @property
    def digest(self) -> str:
        """The digest it holds."""

    @property
    def namespace(self) -> str:
        """The source image's containerd namespace."""

    @property
    def name(self) -> str:
        """The source image's name."""


def repush_jobs(
    referrers: Iterable[Referrer],
    pushed: Iterable[PushRecord],
    holdings: Set[tuple[str, str]],
    rules: Sequence[Rule],
    snap: MetadataSnapshot,
) -> list[Job]:
    """Pushes to run again so that their referrer step takes referrers that came after them.

    A referrer is due when its subject was pushed (per the state) from an image that still
    holds that digest, by a rule with ``referrers = true`` rendering that target, and the
    referrer's own target does not hold it yet. Pure.
    """
    by_subject: dict[str, list[PushRecord]] = {}
    for record in pushed:
        by_subject.setdefault(record.digest, []).append(record)
    with_referrers = {r.index for r in rules if r.referrers}
    jobs: dict[_JobKey, Job] = {}
    for referrer in referrers:
        for record in by_subject.get(referrer.subject, ()):
            rule = _repush_rule(referrer, record, holdings, rules, with_referrers, snap)
            if rule is not None:
                key = (record.namespace, record.name, record.digest, record.target)
                jobs.setdefault(key, Job(*key, rule))
    return list(jobs.values())


def _repush_rule(  # noqa: PLR0917 (repush_jobs's own inputs)
    referrer: Referrer,
    record: PushRecord,
    holdings: Set[tuple[str, str]],
    rules: Sequence[Rule],
    with_referrers: Set[int],
    snap: MetadataSnapshot,
) -> int | None:
    """The rule by which ``referrer`` makes the push ``record`` due again, if it does."""
    if record.namespace != referrer.namespace:
        return None
    image = snap.image(record.namespace, record.name)
    if image is None or image.target.digest != record.digest:
        return None
    try:
        matches = match_image(rules, record.namespace, record.name)
        where = referrer.target(parse_reference(record.target))
    except InvalidReferenceError:
        return None  # the planner reports bad targets
    rule = _rendering_rule(matches, record.target, with_referrers)
    if rule is None or (str(where), referrer.descriptor.digest) in holdings:
        return None
    return rule


def _rendering_rule(matches: Iterable[Match], target: str, with_referrers: Set[int]) -> int | None:
    """The first of the ``matches`` by a rule in ``with_referrers`` that renders ``target``."""
    return next(
        (
            m.rule
            for m in matches
            if m.rule in with_referrers and any(str(t) == target for t in m.targets)
        ),
        None,
    )
