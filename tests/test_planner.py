"""The planner: digests, settle, baseline, already pushed, cancellation, incomplete content."""

from __future__ import annotations

from datetime import UTC, datetime

from imagepushd.decide.planner import Decision, ImageView, Job, Note, OpenJob, SeenImage, decide
from imagepushd.decide.rules import Glob, Rule

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
RULES = (
    Rule(0, (Glob.compile("example.com/**"),), targets=("{image}", "mirror.io/{repository}:{tag}")),
)


def run(
    images,
    seen=None,
    pushed=frozenset(),
    open_jobs=(),
    *,
    now=100.0,
    settle=1.0,
    baseline=False,
    rules=RULES,
) -> Decision:
    return decide(
        images,
        seen or {},
        pushed,
        list(open_jobs),
        rules,
        now=now,
        settle=settle,
        baseline=baseline,
    )


def img(name="example.com/app:1", digest=D1, ns="default", complete=True):
    return ImageView(ns, name, digest, lambda: None if complete else "2 blobs missing")


def test_new_image_waits_for_settle_then_gets_one_job_per_target():
    first = run([img()])
    assert first.enqueue == []
    assert first.seen_changed[("default", "example.com/app:1")] == SeenImage(D1, 100.0, False)
    assert first.wake_at == 101.0
    assert "settling" in first.waiting[0].reason
    later = run([img()], seen=first.seen_changed, now=101.0)
    assert later.seen_changed == {}
    assert later.enqueue == [
        Job("default", "example.com/app:1", D1, "example.com/app:1", 0),
        Job("default", "example.com/app:1", D1, "mirror.io/app:1", 0),
    ]


def test_zero_settle_pushes_immediately():
    assert len(run([img()], settle=0).enqueue) == 2


def test_baseline_images_are_never_pushed_but_later_moves_are():
    first = run([img()], baseline=True)
    seen = first.seen_changed
    assert first.enqueue == [] and seen[("default", "example.com/app:1")].baseline
    assert "first start" in first.skipped[0].reason
    assert run([img()], seen=seen, now=1000).enqueue == []
    moved = run([img(digest=D2)], seen=seen, now=1000, settle=0)
    assert {j.digest for j in moved.enqueue} == {D2}


def test_already_pushed_targets_are_skipped():
    pushed = {("example.com/app:1", D1)}
    out = run([img()], settle=0, pushed=pushed)
    assert [j.target for j in out.enqueue] == ["mirror.io/app:1"]
    assert out.skipped[0].reason == "already pushed with this digest"


def test_open_jobs_are_not_duplicated():
    job = Job("default", "example.com/app:1", D1, "example.com/app:1", 0)
    out = run([img()], settle=0, open_jobs=[OpenJob(7, job)])
    assert out.queued == [job]
    assert [j.target for j in out.enqueue] == ["mirror.io/app:1"]
    assert out.cancel == []


def test_moved_and_deleted_sources_cancel_open_jobs():
    job = Job("default", "example.com/app:1", D1, "example.com/app:1", 0)
    moved = run([img(digest=D2)], settle=0, open_jobs=[OpenJob(7, job)])
    assert moved.cancel == [(7, f"default/example.com/app:1 moved to {D2}")]
    gone = run(
        [], open_jobs=[OpenJob(7, job)], seen={("default", "example.com/app:1"): SeenImage(D1, 0)}
    )
    assert gone.cancel == [(7, "default/example.com/app:1 was deleted")]
    assert gone.seen_removed == [("default", "example.com/app:1")]


def test_rule_removed_cancels_its_jobs():
    job = Job("default", "example.com/app:1", D1, "elsewhere.io/app:1", 3)
    out = run([img()], settle=0, open_jobs=[OpenJob(9, job)])
    assert out.cancel == [(9, "no rule asks for this target any more")]


def test_incomplete_content_waits_with_reason():
    out = run([img(complete=False)], settle=0)
    assert out.enqueue == []
    assert out.waiting[0].reason == "content incomplete: 2 blobs missing"


def test_content_is_walked_only_for_images_that_would_be_pushed():
    """The completeness check costs a content walk: not for unmatched, baseline or settling."""
    asked: list[str] = []

    def view(name: str) -> ImageView:
        def missing() -> str | None:
            asked.append(name)
            return None

        return ImageView("default", name, D1, missing)

    images = [view("other.io/app:1"), view("example.com/app:1")]
    run(images, baseline=True)
    run(images)  # new: settling
    assert asked == []
    settled = {("default", "example.com/app:1"): SeenImage(D1, 0.0, False)}
    assert len(run(images, seen=settled).enqueue) == 2
    assert asked == ["example.com/app:1"]


def test_unmatched_and_untagged_images_are_skipped():
    out = run([img(name="other.io/app:1"), img(name="sha256:" + "a" * 64)], settle=0)
    assert out.enqueue == []
    assert [n.reason for n in out.skipped] == ["no rule matches", "no rule matches"]


def test_namespaces_are_distinct_sources():
    out = run([img(ns="default"), img(ns="k8s.io")], settle=0)
    assert sorted({j.namespace for j in out.enqueue}) == ["default", "k8s.io"]


def test_bad_rendered_target_is_a_skip_not_a_crash():
    rules = (Rule(0, (Glob.compile("**"),), targets=("mirror.io/{namespace}/{repository}",)),)
    out = run([img(ns="UPPER")], settle=0, rules=rules)
    assert out.enqueue == [] and out.skipped[0].reason.startswith("bad target")


def test_completeness_is_checked_only_for_targets_still_to_push():
    """Already pushed (or queued) everywhere: the content store is not walked at all."""
    calls: list[str] = []

    def missing() -> str | None:
        calls.append("walk")
        return "1 blob missing"

    seen = {("default", "example.com/app:1"): SeenImage(D1, 0.0)}
    view = ImageView("default", "example.com/app:1", D1, missing)
    both = {("example.com/app:1", D1), ("mirror.io/app:1", D1)}
    done = run([view], seen=seen, pushed=both)
    assert calls == []
    assert [n.reason for n in done.skipped] == ["already pushed with this digest"] * 2
    assert done.waiting == []
    one = run([view], seen=seen, pushed={("example.com/app:1", D1)})
    assert calls == ["walk"]
    assert one.enqueue == []
    assert [n.reason for n in one.waiting] == ["content incomplete: 1 blob missing"]


def test_a_scope_decides_only_its_names_and_the_parts_make_the_whole():
    """Each name is decided on its own: a daemon re-plans only what changed."""
    names = [f"example.com/app{i}:1" for i in range(6)] + ["other.io/app:1"]
    images = [img(name=n, digest=D2 if i % 2 else D1) for i, n in enumerate(names)]
    images.append(img(name="example.com/incomplete:1", complete=False))
    seen = {("default", n): SeenImage(D1, 0.0) for n in names[:4]}
    seen[("default", "example.com/deleted:1")] = SeenImage(D1, 0.0)
    jobs = [
        OpenJob(1, Job("default", names[1], D1, names[1], 0)),  # moved to D2: cancelled
        OpenJob(2, Job("default", names[2], D1, names[2], 0)),  # still wanted: queued
        OpenJob(3, Job("default", "example.com/deleted:1", D1, "example.com/deleted:1", 0)),
    ]
    pushed = {(f"mirror.io/app{0}:1", D1)}
    kwargs = {"pushed": pushed, "open_jobs": jobs, "now": 100.0, "settle": 10.0}
    whole = run(images, seen, **kwargs)
    keys = {("default", n) for n in [*names, "example.com/incomplete:1", "example.com/deleted:1"]}
    part = {("default", names[i]) for i in (0, 1, 4)} | {("default", "example.com/deleted:1")}
    parts = [
        decide(images, seen, pushed, jobs, RULES, now=100.0, settle=10.0, baseline=False, scope=s)
        for s in (part, keys - part)
    ]
    assert parts[0].seen_removed == [("default", "example.com/deleted:1")]
    assert [j.target for j in parts[0].enqueue] == [names[0]]  # its mirror was pushed
    assert [c[0] for c in parts[0].cancel] == [1, 3]

    def notes(decisions: list[Decision], attr: str) -> list[Note]:
        return sorted((n for d in decisions for n in getattr(d, attr)), key=repr)

    merged_seen = {**parts[0].seen_changed, **parts[1].seen_changed}
    assert merged_seen == whole.seen_changed
    assert sorted(parts[0].seen_removed + parts[1].seen_removed) == sorted(whole.seen_removed)
    for attr in ("enqueue", "queued", "cancel"):
        merged = sorted((x for d in parts for x in getattr(d, attr)), key=repr)
        assert merged == sorted(getattr(whole, attr), key=repr), attr
    assert notes(parts, "waiting") == notes([whole], "waiting")
    assert notes(parts, "skipped") == notes([whole], "skipped")
    wakes = [d.wake_at for d in parts if d.wake_at is not None]
    assert whole.wake_at == min(wakes)
    # An empty scope decides nothing, whatever the inputs.
    assert (
        decide(
            images, seen, pushed, jobs, RULES, now=100.0, settle=10.0, baseline=False, scope=set()
        )
        == Decision()
    )


def test_an_expired_image_is_skipped_with_its_expiry():
    """containerd 2.x collects an image once its gc.expire passed: pushing it races the GC."""
    expiry = datetime.fromtimestamp(100.0, UTC)
    view = ImageView("default", "example.com/app:1", D1, expires=expiry)
    out = run([view], settle=0, now=100.0)
    assert out.enqueue == []
    assert [n.reason for n in out.skipped] == [
        "expired: containerd.io/gc.expire 1970-01-01T00:01:40+00:00 has passed "
        "(containerd collects it)"
    ]
    assert len(run([view], settle=0, now=99.0).enqueue) == 2
