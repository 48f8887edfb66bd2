"""The daemon: watch meta.db, plan, push on a bounded worker pool, remember, report to systemd.

Control flow is explicit and single-threaded in the main loop; only pushes run on worker
threads. Signal handlers just set flags and wake the loop. READY=1 is sent after the first
full scan, WATCHDOG=1 from the loop itself (so a stuck loop gets the service restarted), and
STATUS= is kept current.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping, Set
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import httpx

from imagepushd.clients import Connection, RegistryClients, daemon_connection
from imagepushd.config import Config, load_config
from imagepushd.containerd.content import ContentStore, ImageGraph
from imagepushd.containerd.metadata import (
    META_DB,
    ImageRecord,
    MetadataSnapshot,
    MetadataStore,
    TxidProbe,
)
from imagepushd.containerd.referrers import ReferrerFinder
from imagepushd.containerd.roots import Found, discover_root, expected_root
from imagepushd.errors import (
    ContainerdError,
    ImagepushdError,
    MissingContentError,
    RootNotFoundError,
    SnapshotBusyError,
)
from imagepushd.metrics import Metrics, MetricsServer
from imagepushd.notify import Notifier, watchdog_interval
from imagepushd.pacing import BusyPatience, VerifyBudget
from imagepushd.planner import (
    Decision,
    ImageView,
    Job,
    OpenJob,
    SeenImage,
    Why,
    decide,
    repush_jobs,
)
from imagepushd.platforms import host_platform, select_manifests
from imagepushd.publish import Cancelled, Interrupted, JobRunner, Outcome, Publisher, Pushed
from imagepushd.registry.health import RegistryHealth
from imagepushd.state import OPEN_STATUSES, RUNNING, State
from imagepushd.watcher import MetaWatcher

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


def image_view(
    record: ImageRecord, snap: MetadataSnapshot, content: ContentStore, config: Config
) -> ImageView:
    """The planner's view of one image; its content is walked only if the planner asks."""

    def missing() -> str | None:
        try:
            graph = content.walk(record.target, snap.blobs.get(record.namespace, {}))
            if graph.complete or _partial_ok(graph, config):
                return None
        except ImagepushdError as exc:
            return str(exc)
        return f"{len(graph.missing)} blob(s) missing, e.g. {graph.missing[0].digest}"

    expires = record.expires_at(snap.db_version)
    return ImageView(record.namespace, record.name, record.target.digest, missing, expires)


def _partial_ok(graph: ImageGraph, config: Config) -> bool:
    """Whether the platforms policy can push something from an incomplete index.

    The push's own selection decides, so attestations and the host platform count as they will.
    """
    try:
        select_manifests(graph, config.push.platforms, host_platform())
    except MissingContentError:
        return False
    return True


def _plan_inputs(
    state: State | None, scope: Set[tuple[str, str]] | None = None
) -> tuple[dict[tuple[str, str], SeenImage], set[tuple[str, str]], list[OpenJob], bool]:
    if state is None:
        return {}, set(), [], True
    seen = {k: SeenImage(v.digest, v.since, v.baseline) for k, v in state.seen.load(scope).items()}
    open_jobs = [
        OpenJob(j.id, Job(j.namespace, j.name, j.digest, j.target, j.rule))
        for j in state.jobs.select(OPEN_STATUSES)
    ]
    first = state.flags.get("baseline_done") is None
    return seen, state.pushed.holdings(), open_jobs, first


def _decide(
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
    views = [image_view(r, snap, content, config) for r in records]
    seen, pushed, open_jobs, first = _plan_inputs(state, scope)
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


def plan_preview(config: Config, env: Mapping[str, str], home: Path) -> list[dict[str, str]]:
    """``imagepushd plan``: the decision for containerd's images now, without writing state."""
    root = discover_root(None, config.containerd.root, env, home).path
    metadata = MetadataStore.at_root(root)
    try:
        snap = metadata.read(config.containerd.namespaces, blobs=True)
    finally:
        metadata.close()
    state = State(config.state_path) if config.state_path.exists() else None
    try:
        decision = _decide(snap, ContentStore(root), config, state, now=time.time(), settle=0.0)
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


class Service:
    """``imagepushd run``: everything the daemon does, built from the configuration.

    ``transport`` (httpx) and ``clock`` are injected for tests; ``once`` makes one pass.
    ``metrics`` collects what it does; ``[metrics] listen`` serves them while it runs.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        env: Mapping[str, str],
        home: Path,
        notifier: Notifier,
        once: bool = False,
        clock: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
        install_signals: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        self._config_path = config_path
        self._env = env
        self._home = home
        self._notifier = notifier
        self._once = once
        self._clock = clock
        self._transport = transport
        self._install_signals = install_signals
        self._config = load_config(config_path, env)
        self._metrics = metrics or Metrics()
        self._metrics.rules_known(rule.index for rule in self._config.rules)
        self._stop = threading.Event()
        # Set by signal handlers, which only record and wake (see _signals); the loop acts.
        self._stop_requested = False
        self._reload = False
        self._running: dict[int, Future[Outcome]] = {}
        self._snapshot: MetadataSnapshot | None = None
        self._reasons: dict[tuple[str, str], tuple[Why, str]] = {}
        self._wake_at: float | None = None
        self._failures = 0
        self._watcher: MetaWatcher | None = None
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

    # ---- lifecycle ---------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (or one pass with ``once``); the process exit code."""
        config = self._config
        try:
            found = discover_root(None, config.containerd.root, self._env, self._home)
        except RootNotFoundError as exc:
            # containerd may simply not have started yet: watch where its root will be.
            found = Found(expected_root(config.containerd.root, self._env, self._home))
            log.warning("%s; waiting for containerd at %s", exc, found.place)
        root = found.path
        self._metadata = MetadataStore.at_root(root, reuse_buckets=True)
        self._content = ContentStore(root)
        self._finder = ReferrerFinder(self._content)
        with State(config.state_path, clock=self._clock) as state, self._metrics_server():
            self._state = state
            state.registries.forget()  # health is what this run sees
            self._health = RegistryHealth(
                probe=lambda host: self._clients.get(host).client.probe(),
                store=state.registries,
                waiting=state.jobs.open_on,
                clock=self._clock,
                wait=self._stop.wait,
                on_change=self._registry_changed,
            )
            self._clients = RegistryClients(self._connect, transport=self._transport)
            self._runner = JobRunner(
                Publisher(self._clients, host=host_platform()),
                content=self._content,
                finder=self._finder,
                state=state,
                health=self._health,
                metrics=self._metrics,
                config=lambda: self._config,
                snapshot=lambda: self._snapshot,
                clock=self._clock,
            )
            requeued = state.jobs.requeue_running()
            if requeued:
                log.info("%d job(s) interrupted by the last stop are queued again", requeued)
            # Registries expire abandoned upload sessions (distribution: after 7 days).
            state.uploads.drop_stale(STALE_UPLOAD_AGE)
            state.jobs.prune(FINISHED_JOB_AGE)
            # The watcher polls from its own thread: give it its own file descriptor.
            txid = TxidProbe(root)
            watcher = MetaWatcher(root / META_DB, txid=txid)
            self._watcher = watcher
            previous = self._signals()
            watcher.start()
            pool = ThreadPoolExecutor(config.push.parallel_images, thread_name_prefix="push")
            try:
                self._scan()
                self._notifier.ready()
                log.info(
                    "watching %s; %d rule(s); state %s",
                    found.describe(),
                    len(config.rules),
                    state.path,
                )
                self._loop(pool, watcher)
            finally:
                self._notifier.stopping()
                self._stop.set()
                self._drain(pool)
                state.jobs.requeue_running()
                self._restore(previous)
                watcher.stop()
                self._clients.close()
                self._metadata.close()
                txid.close()
        return 1 if self._once and self._failures else 0

    def _metrics_server(self) -> contextlib.AbstractContextManager[object]:
        listen = self._config.metrics.listen
        return contextlib.nullcontext() if listen is None else MetricsServer(listen, self._metrics)

    def _signals(self) -> dict[int, object]:
        if not self._install_signals:
            return {}
        previous: dict[int, object] = {}

        # A handler runs on the main thread between two bytecodes, possibly while that thread
        # holds a lock (the watcher's, or the stop Event's own), so it takes none: it records
        # the signal and wakes the loop through the watcher's lock-free self-pipe.
        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop()

        def reload(signum: int, frame: FrameType | None) -> None:
            self.reload()

        for signum, handler in (
            (signal.SIGTERM, stop),
            (signal.SIGINT, stop),
            (signal.SIGHUP, reload),
        ):
            previous[signum] = signal.signal(signum, handler)
        return previous

    def stop(self) -> None:
        """Ask the loop to stop, as SIGTERM does (safe from a signal handler: no lock taken)."""
        self._stop_requested = True
        self._wake()

    def reload(self) -> None:
        """Ask the loop to read the configuration again, as SIGHUP does (takes no lock)."""
        self._reload = True
        self._wake()

    def _restore(self, previous: dict[int, object]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _loop(self, pool: ThreadPoolExecutor, watcher: MetaWatcher) -> None:
        interval = watchdog_interval(self._env)
        last_ping = 0.0
        while not self._stopping():
            if self._reload:
                self._reload = False
                self._do_reload()
            self._reap()
            now = self._clock()
            self._dispatch(pool, now)
            self._report()
            if interval is not None and now - last_ping >= interval:
                self._notifier.watchdog()
                last_ping = now
            if self._once and not self._running and not self._due_now():
                return
            timeout = self._sleep_budget(now, interval)
            changed = watcher.wait(timeout)
            if self._stopping():
                return
            now = self._clock()
            resync = now - self._last_scan >= self._config.push.resync_interval
            if changed or resync or (self._wake_at is not None and now >= self._wake_at):
                self._scan()

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
        try:
            config = load_config(self._config_path, self._env)
        except ImagepushdError as exc:
            log.error("reload: keeping the previous configuration: %s", exc)
        else:
            if config.metrics != self._config.metrics:
                log.warning("reload: [metrics] changes take effect when the daemon restarts")
            self._config = config
            self._metrics.rules_known(rule.index for rule in config.rules)
            self._clients.forget()
            log.info("reloaded %s: %d rule(s)", self._config_path, len(config.rules))
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
        config = self._config
        now = self._clock()
        self._last_scan = now
        previous = self._snapshot
        replan = (
            previous is None
            or self._planned_config is not config
            or now - self._last_full >= config.push.resync_interval
        )
        full = replan or (self._verify_at is not None and now >= self._verify_at)
        started = time.monotonic()
        try:
            snap = self._metadata.read(config.containerd.namespaces, blobs=True, full=full)
        except SnapshotBusyError as exc:
            self._retry_busy(exc, now)
            return
        except ContainerdError as exc:
            if str(exc) != self._scan_error:
                log.error("cannot read containerd's metadata: %s", exc)
                self._scan_error = str(exc)
            return
        if self._scan_error:
            log.info("containerd's metadata is readable again")
            self._scan_error = ""
        if full:
            self._verify.spent(now, time.monotonic() - started)
        self._busy.succeeded()
        self._snapshot = snap
        scope: set[tuple[str, str]] | None = None
        if not replan and previous is not None:
            scope = snap.moved(previous)
            blobs = snap.blobs_changed
            if self._wake_at is not None and now >= self._wake_at:
                self._wake_at = None
                scope.update(self._reasons)
            else:
                scope.update(k for k in self._reasons if blobs is None or k[0] in blobs)
        if scope is None or scope:
            self._plan(snap, scope, replan=replan)
        if not snap.unverified:
            self._verify_at = None
        elif self._verify_at is None:
            self._verify_at = self._verify.due(now)
        self._wake_at = _earliest(self._wake_at, self._verify_at)
        decoded = self._metadata.images_decoded
        planned = len(snap.images) if scope is None else len(scope)
        self._metrics.scan_work(decoded - self._decoded, planned)
        self._decoded = decoded
        self._metrics.scan_observe(time.monotonic() - started)

    def _plan(
        self, snap: MetadataSnapshot, scope: set[tuple[str, str]] | None, *, replan: bool
    ) -> None:
        """Plan ``scope`` (None: every image) of ``snap`` and apply the decision."""
        config = self._config
        state = self._state
        settle = 0.0 if self._once else config.push.settle
        decision = _decide(
            snap, self._content, config, state, now=self._clock(), settle=settle, scope=scope
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
            future = pool.submit(self._runner.run, started)
            future.add_done_callback(self._wake)
            self._running[record.id] = future
            free -= 1
            if free == 0:
                break

    def _wake(self, _future: Future[Outcome] | None = None) -> None:
        if self._watcher is not None:
            self._watcher.notify_external()

    def _registry_changed(self, host: str, up: bool) -> None:
        self._metrics.registry_up(host, up)
        if up:
            self._wake()  # its waiting jobs are due now

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
        if not changed or not any(r.referrers for r in self._config.rules):
            return
        new = self._finder.among((r for r in snap.images if (r.namespace, r.name) in changed), snap)
        if not new:
            return
        state = self._state
        jobs = repush_jobs(
            new, state.pushed.newest(), state.pushed.holdings(), self._config.rules, snap
        )
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

    def _connect(self, host: str) -> Connection:
        return daemon_connection(
            lambda: self._config,
            host,
            env=self._env,
            home=self._home,
            state=self._state,
            metrics=self._metrics,
            health=self._health,
            stop=self._stop,
        )

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
