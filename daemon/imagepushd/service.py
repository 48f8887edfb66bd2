"""The daemon's loop: watch meta.db, decide, apply the decision, dispatch jobs, reap them.

Control flow is explicit and single-threaded in the loop; only pushes run on worker threads
(:class:`~imagepushd.push.publish.JobRunner`). Everything it works with comes in built and opened
(:mod:`imagepushd.assembly` does that from the configuration); signal handlers only record
and wake it. READY=1 is sent after the first full scan, WATCHDOG=1 from the loop itself (so a
stuck loop gets the service restarted), and STATUS= is kept current.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from imagepushd.config import Config, LiveConfig
from imagepushd.decide.planner import Decision, Job, Why, repush_jobs
from imagepushd.decisions import decide_snapshot
from imagepushd.errors import ContainerdError, ImagepushdError, SnapshotBusyError
from imagepushd.metrics import Metrics
from imagepushd.notify import Notifier
from imagepushd.push.clients import RegistryClients
from imagepushd.push.publish import Cancelled, Interrupted, JobRunner, Outcome, Pushed
from imagepushd.push.registry.health import RegistryHealth
from imagepushd.remember import OPEN_STATUSES, RUNNING, State
from imagepushd.watch.content import ContentStore
from imagepushd.watch.metadata import MetadataSnapshot, MetadataStore
from imagepushd.watch.pacing import BusyPatience, VerifyBudget
from imagepushd.watch.referrers import ReferrerFinder
from imagepushd.watch.watcher import MetaWatcher

log = logging.getLogger(__name__)

STOP_GRACE = 20.0
MAX_LOOP_SLEEP = 5.0
STALE_UPLOAD_AGE = 6 * 86400.0
FINISHED_JOB_AGE = 30 * 86400.0


def _earliest(a: float | None, b: float | None) -> float | None:
    """The earlier of two optional times."""
    if a is None or b is None:
        return b if a is None else a
    return min(a, b)


@dataclass(frozen=True)
class Parts:
    """What the loop works with, built and opened by :mod:`imagepushd.assembly`."""

    config: LiveConfig
    metadata: MetadataStore
    content: ContentStore
    finder: ReferrerFinder
    state: State
    health: RegistryHealth
    clients: RegistryClients
    runner: JobRunner
    watcher: MetaWatcher
    notifier: Notifier
    metrics: Metrics
    #: Set when the daemon stops: workers' retries and uploads end at once.
    stop: threading.Event


class Service:
    """``imagepushd run``'s loop over :class:`Parts`.

    ``watching`` is what the start-up line says is watched; ``watchdog`` the seconds between
    WATCHDOG=1 pings (None: none); ``once`` makes one pass; ``clock`` is injected for tests.
    """

    def __init__(
        self,
        parts: Parts,
        *,
        watching: str,
        watchdog: float | None = None,
        once: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._parts = parts
        self._live = parts.config
        self._metadata = parts.metadata
        self._state = parts.state
        self._health = parts.health
        self._watcher = parts.watcher
        self._notifier = parts.notifier
        self._metrics = parts.metrics
        self._stop = parts.stop
        self._watching = watching
        self._watchdog = watchdog
        self._once = once
        self._clock = clock
        self._metrics.rules_known([rule.index for rule in self._config.rules])
        # Set by signal handlers, which only record and wake (see assembly); the loop acts.
        self._stop_requested = False
        self._reload = False
        self._running: dict[int, Future[Outcome]] = {}
        self._snapshot: MetadataSnapshot | None = None
        self._reasons: dict[tuple[str, str], tuple[Why, str]] = {}
        self._wake_at: float | None = None
        self._failures = 0
        self._status = ""
        self._scan_error = ""
        self.stuck = 0
        self._last_scan = 0.0
        self._last_full = 0.0
        self._planned_config: Config | None = None
        self._busy = BusyPatience()
        self._verify = VerifyBudget()
        self._verify_at: float | None = None
        self._decoded = 0
        # Running jobs to run again when they end: a referrer of theirs came during the push.
        self._rerun: set[int] = set()

    @property
    def _config(self) -> Config:
        """The configuration as last read successfully (a reload replaces it)."""
        return self._live.current

    # ---- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); the process exit code."""
        state = self._state
        state.registries.forget()  # health is what this run sees
        requeued = state.jobs.requeue_running()
        if requeued:
            log.info("%d job(s) interrupted by the last stop are queued again", requeued)
        # Registries expire abandoned upload sessions (distribution: after 7 days).
        state.uploads.drop_stale(STALE_UPLOAD_AGE)
        state.jobs.prune(FINISHED_JOB_AGE)
        pool = ThreadPoolExecutor(self._config.push.parallel_images, thread_name_prefix="push")
        try:
            self._scan()
            self._notifier.ready()
            log.info(
                "watching %s; %d rule(s); state %s",
                self._watching,
                len(self._config.rules),
                state.path,
            )
            self._loop(pool)
        finally:
            self._notifier.stopping()
            self._stop.set()
            self._drain(pool)
            state.jobs.requeue_running()
        return 1 if self._once and self._failures else 0

    def stop(self) -> None:
        """Ask the loop to stop, as SIGTERM does (safe from a signal handler: no lock taken)."""
        self._stop_requested = True
        self._wake()

    def reload(self) -> None:
        """Ask the loop to read the configuration again, as SIGHUP does (takes no lock)."""
        self._reload = True
        self._wake()

    def _loop(self, pool: ThreadPoolExecutor) -> None:
        last_ping = 0.0
        while not self._stopping():
            now = self._work(pool)
            last_ping = self._ping(now, last_ping)
            if self._once and not self._running and not self._due_now():
                return
            changed = self._watcher.wait(self._sleep_budget(now, self._watchdog))
            if self._stopping():
                return
            if changed or self._rescan_due():
                self._scan()

    def _work(self, pool: ThreadPoolExecutor) -> float:
        """Take a reload, reap finished jobs, dispatch due ones, report; the time then."""
        if self._reload:
            self._reload = False
            self._do_reload()
        self._reap()
        now = self._clock()
        self._dispatch(pool, now)
        self._report()
        return now

    def _ping(self, now: float, last: float) -> float:
        """WATCHDOG=1 when it is due; the time of the last ping."""
        if self._watchdog is not None and now - last >= self._watchdog:
            self._notifier.watchdog()
            return now
        return last

    def _rescan_due(self) -> bool:
        """Whether to scan without a change: the resync interval, or a wake-up time, is due."""
        now = self._clock()
        if now - self._last_scan >= self._config.push.resync_interval:
            return True
        return self._wake_at is not None and now >= self._wake_at

    def _stopping(self) -> bool:
        """Whether to leave the loop; turns a recorded stop signal into the workers' stop."""
        if self._stop_requested:
            self._stop.set()
        return self._stop.is_set()

    def _sleep_budget(self, now: float, interval: float | None) -> float:
        # Finished pushes wake the loop themselves (see _dispatch).
        budget = MAX_LOOP_SLEEP
        if interval is not None:
            budget = min(budget, interval)
        if self._wake_at is not None:
            budget = min(budget, max(0.0, self._wake_at - now))
        # Jobs due at ``now`` were dispatched or wait for a slot, whose freeing wakes the loop.
        upcoming = self._state.jobs.next_attempt_after(now)
        if upcoming is not None:
            budget = min(budget, upcoming - now)
        released = self._health.next_release()  # jobs held by a Retry-After go then
        if released is not None:
            budget = min(budget, released - now)
        return max(budget, 0.01)

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        """Let in-flight pushes checkpoint (they stop between chunks), within a bound."""
        deadline = time.monotonic() + STOP_GRACE
        for future in list(self._running.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                future.result(timeout=remaining)
            except Exception:  # reported by _reap below
                log.debug("job ended with an error during stop", exc_info=True)
        self._reap()
        self.stuck = sum(not f.done() for f in self._running.values())
        if self.stuck:
            log.warning(
                "%d push(es) did not stop within %.0fs; exiting anyway", self.stuck, STOP_GRACE
            )
        pool.shutdown(wait=False, cancel_futures=True)

    def _do_reload(self) -> None:
        self._notifier.reloading()
        previous = self._config
        try:
            config = self._live.reload()
        except ImagepushdError as exc:
            log.error("reload: keeping the previous configuration: %s", exc)
        else:
            if config.metrics != previous.metrics:
                log.warning("reload: [metrics] changes take effect when the daemon restarts")
            self._metrics.rules_known([rule.index for rule in config.rules])
            self._parts.clients.forget()
            log.info("reloaded %s: %d rule(s)", self._live.path, len(config.rules))
            self._scan()
        self._notifier.ready()

    # ---- scanning and planning -----------------------------------------------------------

    def _scan(self) -> None:
        """Read containerd's metadata and plan what changed since the last scan.

        Only names that moved, or that wait on something that may have changed (their
        namespace's blobs, or the clock), are planned again; every other keeps its decision.
        Every image is planned on the first scan, after a reload, and every
        ``resync_interval`` as a safety net. A snapshot that may hide a change (records carried
        over across several commits, see ``MetadataSnapshot.unverified``) is followed by a full
        read as soon as the time budget for them allows.
        """
        now = self._clock()
        self._last_scan = now
        previous = self._snapshot
        replan = self._replan_due(now)
        full = replan or (self._verify_at is not None and now >= self._verify_at)
        started = time.monotonic()
        snap = self._read(now, full=full)
        if snap is None:
            return
        if full:
            self._verify.spent(now, time.monotonic() - started)
        self._snapshot = snap
        scope = None if replan or previous is None else self._scope(snap, previous, now)
        if scope is None or scope:
            self._plan(snap, scope, replan=replan)
        self._schedule_verify(snap, now)
        self._count_scan(len(snap.images) if scope is None else len(scope), started)

    def _count_scan(self, planned: int, started: float) -> None:
        """The scan's work and time, in the metrics."""
        decoded = self._metadata.images_decoded
        self._metrics.scan_work(decoded - self._decoded, planned)
        self._decoded = decoded
        self._metrics.scan_observe(time.monotonic() - started)

    def _replan_due(self, now: float) -> bool:
        """Whether to plan every image: the first scan, a new configuration, or a resync."""
        return (
            self._snapshot is None
            or self._planned_config is not self._config
            or now - self._last_full >= self._config.push.resync_interval
        )

    def _schedule_verify(self, snap: MetadataSnapshot, now: float) -> None:
        """A full read for a snapshot that may hide a change, when the time budget allows."""
        if not snap.unverified:
            self._verify_at = None
        elif self._verify_at is None:
            self._verify_at = self._verify.due(now)
        self._wake_at = _earliest(self._wake_at, self._verify_at)

    def _read(self, now: float, *, full: bool) -> MetadataSnapshot | None:
        """A snapshot of containerd's metadata, or None (said once) when it cannot be read."""
        try:
            snap = self._metadata.read(self._config.containerd.namespaces, blobs=True, full=full)
        except SnapshotBusyError as exc:
            self._retry_busy(exc, now)
            return None
        except ContainerdError as exc:
            if str(exc) != self._scan_error:
                log.error("cannot read containerd's metadata: %s", exc)
                self._scan_error = str(exc)
            return None
        if self._scan_error:
            log.info("containerd's metadata is readable again")
            self._scan_error = ""
        self._busy.succeeded()
        return snap

    def _scope(
        self, snap: MetadataSnapshot, previous: MetadataSnapshot, now: float
    ) -> set[tuple[str, str]]:
        """The names to plan again: moved ones, and those waiting on what may have changed."""
        scope = snap.moved(previous)
        if self._wake_at is not None and now >= self._wake_at:
            self._wake_at = None
            scope.update(self._reasons)
        else:
            blobs = snap.blobs_changed
            scope.update(k for k in self._reasons if blobs is None or k[0] in blobs)
        return scope

    def _plan(
        self, snap: MetadataSnapshot, scope: set[tuple[str, str]] | None, *, replan: bool
    ) -> None:
        """Plan ``scope`` (None: every image) of ``snap`` and apply the decision."""
        config = self._config
        state = self._state
        settle = 0.0 if self._once else config.push.settle
        decision = decide_snapshot(
            snap, self._parts.content, config, state, now=self._clock(), settle=settle, scope=scope
        )
        self._apply(decision, scope)
        self._queue_referrers(snap, decision.seen_changed)
        if replan:
            self._planned_config = config
            self._last_full = self._clock()
            if state.flags.get("baseline_done") is None:
                state.flags.set("baseline_done", str(self._clock()))

    def _retry_busy(self, exc: SnapshotBusyError, now: float) -> None:
        """Scan again soon; say so only if containerd has been too busy to read for long."""
        delay, report = self._busy.failed(now)
        self._wake_at = _earliest(self._wake_at, now + delay)
        if report:
            log.warning("containerd's metadata changed during every read for a while: %s", exc)
            self._scan_error = str(exc)
        else:
            log.debug("containerd is busy; reading its metadata again in %.2fs: %s", delay, exc)

    def _apply(self, decision: Decision, scope: Set[tuple[str, str]] | None = None) -> None:
        """Write ``decision`` to the state and keep its waiting reasons and wake-up time."""
        state = self._state
        state.seen.update(decision.seen_changed, decision.seen_removed)
        if decision.cancel:
            for job_id, reason in decision.cancel:
                log.info("job %d cancelled: %s", job_id, reason)
            state.jobs.cancel(dict(decision.cancel))
        for job in decision.enqueue:
            state.jobs.enqueue(
                job.namespace, job.name, job.digest, job.target, job.rule, reopen=True
            )
            log.info("queued %s/%s → %s (%s)", job.namespace, job.name, job.target, job.digest)
        self._note_waiting(decision, scope)

    def _note_waiting(self, decision: Decision, scope: Set[tuple[str, str]] | None) -> None:
        """Log a waiting image when its reason changes; keep the reasons of names not planned."""
        reasons = {(n.namespace, n.name): n.why for n in decision.waiting}
        for key, why in reasons.items():
            if self._reasons.get(key) != why.key:
                log.info("%s/%s waits: %s", key[0], key[1], why)
        kept = {} if scope is None else {k: v for k, v in self._reasons.items() if k not in scope}
        self._reasons = kept | {k: v.key for k, v in reasons.items()}
        wake_at = decision.wake_at
        self._wake_at = wake_at if scope is None else _earliest(self._wake_at, wake_at)

    # ---- jobs ----------------------------------------------------------------------------

    def _due_now(self) -> bool:
        return bool(self._state.jobs.due(self._clock(), 1, self._health.blocked()))

    def _dispatch(self, pool: ThreadPoolExecutor, now: float) -> None:
        free = self._config.push.parallel_images - len(self._running)
        if free <= 0 or self._stop.is_set():
            return
        blocked = self._health.blocked()  # registries down or held: their jobs wait
        for record in self._state.jobs.due(now, free + len(self._running), blocked):
            if record.id in self._running:
                continue
            started = self._state.jobs.start(record.id)
            if started is None:
                continue
            future = pool.submit(self._parts.runner.run, started)
            future.add_done_callback(self._wake)
            self._running[record.id] = future
            free -= 1
            if free == 0:
                break

    def _wake(self, _future: Future[Outcome] | None = None) -> None:
        self._watcher.notify_external()

    def _reap(self) -> None:
        for job_id, future in list(self._running.items()):
            if not future.done():
                continue
            del self._running[job_id]
            try:
                outcome = future.result()
            except Exception as exc:  # a bug in a worker must not kill the loop
                log.exception("job %d crashed", job_id)
                self._fail(job_id, f"internal error: {exc!r}", attempts=1)
                continue
            self._record(outcome)

    def _record(self, outcome: Outcome) -> None:
        job = outcome.job
        if isinstance(outcome, Cancelled):
            self._state.jobs.cancel({job.id: outcome.reason})
            log.info("job %d cancelled: %s", job.id, outcome.reason)
            self._metrics.push_count(job.rule, "cancelled")
        elif isinstance(outcome, Pushed):
            self._state.jobs.finish(job.id)
            if job.id in self._rerun:
                self._state.jobs.enqueue(
                    job.namespace, job.name, job.digest, job.target, job.rule, reopen=True
                )
            result = outcome.result
            self._metrics.push_count(
                job.rule,
                "up_to_date" if result.up_to_date else "pushed",
                bytes_sent=result.bytes_sent,
                at=self._clock(),
            )
        elif isinstance(outcome, Interrupted):
            log.info("job %d paused for shutdown: %s", job.id, outcome.error)
            self._metrics.push_count(job.rule, "interrupted")
        else:
            if outcome.waits_for_registry:  # due as soon as the registry is; it logged why
                self._state.jobs.fail(job.id, str(outcome.error), self._clock())
                self._failures += 1
            else:
                self._fail(job.id, str(outcome.error), job.attempts)
            self._metrics.push_count(job.rule, "failed")
        self._rerun.discard(job.id)  # a failed job's retry, like a rerun, sees the new referrer

    def _fail(self, job_id: int, error: str, attempts: int) -> None:
        push = self._config.push
        delay = min(push.job_backoff_max, push.job_backoff_initial * 2 ** max(0, attempts - 1))
        delay *= 0.9 + random.random() * 0.2
        self._state.jobs.fail(job_id, error, self._clock() + delay)
        self._failures += 1
        log.error(
            "job %d failed (attempt %d), retrying in %.0fs: %s", job_id, attempts, delay, error
        )

    def _queue_referrers(
        self, snap: MetadataSnapshot, changed: Mapping[tuple[str, str], object]
    ) -> None:
        """Push again, for its referrer step, an image whose referrer was tagged after its push.

        Only new or moved names are looked at, so each arrival asks for one run at most.
        """
        jobs = self._referrer_jobs(snap, changed)
        if not jobs:
            return
        state = self._state
        open_jobs = {
            (j.namespace, j.name, j.digest, j.target): j for j in state.jobs.select(OPEN_STATUSES)
        }
        for job in jobs:
            current = open_jobs.get((job.namespace, job.name, job.digest, job.target))
            if current is None:
                state.jobs.enqueue(
                    job.namespace, job.name, job.digest, job.target, job.rule, reopen=True
                )
                log.info(
                    "queued %s/%s → %s again for a new referrer",
                    job.namespace,
                    job.name,
                    job.target,
                )
            elif current.status == RUNNING:
                self._rerun.add(current.id)
            # A queued or failing job takes the newest snapshot's referrers when it runs.

    def _referrer_jobs(
        self, snap: MetadataSnapshot, changed: Mapping[tuple[str, str], object]
    ) -> list[Job]:
        """The pushed images that a referrer among ``changed`` names, to run again."""
        if not changed or not any(r.referrers for r in self._config.rules):
            return []
        new = self._parts.finder.among(
            (r for r in snap.images if (r.namespace, r.name) in changed), snap
        )
        if not new:
            return []
        pushed = self._state.pushed
        return repush_jobs(new, pushed.newest(), pushed.holdings(), self._config.rules, snap)

    # ---- reporting -----------------------------------------------------------------------

    def _report(self) -> None:
        counts = self._state.jobs.counts()
        self._metrics.queue_set(counts.get("queued", 0) + counts.get("failed", 0))
        activity = f"pushing {len(self._running)}" if self._running else "idle"
        if self._scan_error:
            activity = "waiting for containerd"
        parts = [activity, f"{self._state.pushed.count()} pushed"]
        if counts.get("failed"):
            parts.append(f"{counts['failed']} retrying")
        if counts.get("queued"):
            parts.append(f"{counts['queued']} queued")
        if self._reasons:
            parts.append(f"{len(self._reasons)} waiting")
        down = len(self._health.down())
        if down:
            parts.append(f"{down} registr{'y' if down == 1 else 'ies'} down")
        text = " · ".join(parts)
        if text != self._status:
            self._status = text
            self._notifier.status(text)
