"""Turn file-system activity on containerd's ``meta.db`` into one debounced "changed".

A bbolt commit is several writes (one ``IN_MODIFY`` per ``pwrite``, another for a growing
``ftruncate``, ``IN_CLOSE_WRITE`` when containerd closes the file), and a busy containerd
commits many times a second. :class:`MetaWatcher` watches meta.db's *directory* with watchdog
(non-recursive, so a replaced meta.db — a new inode — is seen like any other change), folds a
burst of events into one "changed" once the file has been quiet for ``debounce`` seconds, and
never holds a change back longer than ``max_delay`` in a continuous stream so a busy host still
gets scans.

Events can be lost (inotify queue overflow, network file systems, a watch that could not be
placed), so a slow poll compares meta.db's identity and bbolt txid every ``poll_interval``
seconds and reports a change when either moved. Until containerd has created its root, the
watcher observes the nearest existing ancestor directory and moves its watch down as the
directories appear; the poll also re-checks that placement, which heals a directory replaced
behind its back.

Open and close-without-write events are ignored on purpose: the daemon's own reads of meta.db
would otherwise wake it up forever.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

log = logging.getLogger(__name__)

#: Events on meta.db itself that mean its content may have changed. Deliberately absent:
#: ``opened``, ``closed_no_write`` (our own reads) and ``attrib`` (chmod, not content).
_CHANGE_EVENTS = frozenset({"modified", "created", "moved", "deleted", "closed"})
#: Events on a directory on the way to meta.db that make the watch move.
_PATH_EVENTS = frozenset({"created", "moved", "deleted"})
#: Bound on re-arming rounds in one go (each round goes at least one directory deeper).
_MAX_REARM_ROUNDS = 64

#: What the poll compares: meta.db's (st_dev, st_ino), or None, and its txid, or None.
_Observation = tuple[tuple[int, int] | None, int | None]


class ObserverLike(Protocol):
    """The part of watchdog's ``BaseObserver`` the watcher uses (2.2.1 and later)."""

    def schedule(
        self, event_handler: FileSystemEventHandler, path: str, *, recursive: bool = ...
    ) -> ObservedWatch:
        """Start delivering events under ``path`` to ``event_handler``."""

    def unschedule(self, watch: ObservedWatch) -> None:
        """Stop a watch made by :meth:`schedule`."""

    def start(self) -> None:
        """Start the observer thread."""

    def stop(self) -> None:
        """Ask the observer thread to stop."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the observer thread to end."""


class _Handler(FileSystemEventHandler):
    """Forwards every watchdog event to the watcher (runs on watchdog's dispatch thread)."""

    def __init__(self, sink: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Hand the event over; classification happens in the watcher."""
        self._sink(event)


def _is_on_the_way(path: str, target_dir: str) -> bool:
    """Whether ``path`` is ``target_dir`` or one of its ancestors."""
    if not path:
        return False
    return target_dir == path or target_dir.startswith(path.rstrip(os.sep) + os.sep)


def _nearest_dir(directory: str) -> tuple[str, tuple[int, int]] | None:
    """The deepest existing directory among ``directory`` and its ancestors, with its identity."""
    current = directory
    while True:
        try:
            st = os.stat(current)
        except OSError:
            st = None
        if st is not None and os.path.isdir(current):
            return current, (st.st_dev, st.st_ino)
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


class MetaWatcher:
    """A debounced "meta.db changed" signal from watchdog events plus a slow txid poll.

    ``txid`` returns meta.db's current bbolt txid, or None when the file is missing or
    unreadable (None is a value like any other: None → 7 is a change). It is called from the
    watcher's thread every ``poll_interval`` seconds and from :meth:`wait` when a change is
    handed out (never two calls at once), so it should be cheap (``BoltFile.meta().txid``)
    and use a ``BoltFile`` of its own, not the scanner's (one instance is not safe to share
    between threads); exceptions it raises count as None. ``observer_factory`` makes the
    watchdog observer (``PollingObserver`` for file systems without inotify); ``clock`` is a
    monotonic clock in seconds.

    Start the watcher *before* the first scan so no commit can fall between the two. Every
    public method is thread-safe; :meth:`wait` is for one waiting thread at a time (the loop).

    The waiter sleeps in ``poll`` on a socket pair that every hand-over writes a byte to, not
    on a condition variable, and :meth:`notify_external` takes no lock: a signal handler runs
    on the main thread between two bytecodes, possibly while that thread holds the watcher's
    lock, so waking the loop from it must never wait for one.
    """

    def __init__(
        self,
        meta_db: Path,
        *,
        txid: Callable[[], int | None],
        debounce: float = 0.1,
        max_delay: float = 1.0,
        poll_interval: float = 30.0,
        observer_factory: Callable[[], ObserverLike] = Observer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if debounce < 0 or max_delay < debounce or poll_interval <= 0:
            raise ValueError("need 0 <= debounce <= max_delay and poll_interval > 0")
        self.meta_db = Path(os.path.abspath(meta_db))
        self._txid = txid
        self._debounce = debounce
        self._max_delay = max_delay
        self._poll_interval = poll_interval
        self._observer_factory = observer_factory
        self._clock = clock
        self._handler = _Handler(self._on_event)

        # Serialises txid calls and orders poll against hand-over; taken before _lock.
        self._txid_lock = threading.Lock()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the watcher's own thread
        # The waiter's self-pipe: readable when there may be something to hand over.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # poll, not select: a busy daemon's descriptors may number past select's 1024.
        self._wake_poll = select.poll()
        self._wake_poll.register(self._wake_r, select.POLLIN)
        # Set without the lock (see notify_external); read and cleared by the waiter.
        self._external = False
        # Guarded by _lock.
        self._burst_first: float | None = None
        self._burst_last: float | None = None
        self._changed = False
        self._rearm_requested = False
        self._started = False
        self._stopping = False
        self._seen: _Observation = (None, None)
        self._target_file = os.path.realpath(self.meta_db)
        self._target_dir = os.path.dirname(self._target_file)
        # Touched by start(), then only by the watcher's thread, then by stop() after joining it.
        self._observer: ObserverLike | None = None
        self._watch: ObservedWatch | None = None
        self._armed: tuple[str, tuple[int, int]] | None = None
        self._schedule_failed_logged = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> MetaWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Take the poll baseline, place the watch and start the poll thread (once only)."""
        with self._lock:
            if self._started:
                raise RuntimeError("MetaWatcher.start() called twice")
            self._started = True
        with self._txid_lock:
            seen = self._observe()
            with self._lock:
                self._seen = seen
        self._observer = self._observer_factory()
        self._observer.start()
        self._arm()
        self._thread = threading.Thread(target=self._run, name="imagepushd-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and polling; a blocked :meth:`wait` returns. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._work.notify_all()
        self._kick()
        if self._thread is not None:
            self._thread.join()
        if self._observer is not None:
            self._unschedule()
            self._observer.stop()
            self._observer.join(timeout=5.0)
        # A late notify_external (a push ending after the stop) finds a closed socket object
        # and does nothing; a bare file descriptor could by then be someone else's.
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ the waiter's side

    def wait(self, timeout: float) -> bool:
        """Block until a debounced change, an external wake-up or ``timeout`` seconds.

        Returns True, and clears the change, when meta.db changed. Returns False on timeout,
        after :meth:`notify_external` (the caller checks why it was woken) and once stopped.
        """
        deadline = self._clock() + timeout
        while self._wait_ready(deadline):
            # The caller scans after this returns, so it sees at least the state observed here:
            # that becomes the poll's baseline, or the poll would ask for the same scan again.
            # Holding the txid lock keeps a poll from interleaving with the hand-over.
            with self._txid_lock:
                seen = self._observe()
                with self._lock:
                    if self._changed or self._burst_first is not None:
                        self._seen = seen
                        self._changed = False
                        self._burst_first = self._burst_last = None
                        return True
            # Another waiter took this change; wait for the next one.
        return False

    def _wait_ready(self, deadline: float) -> bool:
        """Block until a change is due (True) or a wake-up, stop or the deadline (False)."""
        while True:
            # Drain before looking: a byte written after this makes the poll return.
            self._drain()
            if self._external:
                self._external = False
                if not self._change_due():
                    return False
            with self._lock:
                now = self._clock()
                if self._changed or self._burst_settled(now):
                    return True
                if self._stopping or now >= deadline:
                    return False
                wake = deadline
                if self._burst_first is not None and self._burst_last is not None:
                    wake = min(
                        wake,
                        self._burst_last + self._debounce,
                        self._burst_first + self._max_delay,
                    )
            self._wake_poll.poll(max(0, math.ceil((wake - now) * 1000)))

    def _change_due(self) -> bool:
        with self._lock:
            return self._changed or self._burst_settled(self._clock())

    def notify_external(self) -> None:
        """Wake :meth:`wait` now (or make the next call return at once), e.g. for a signal.

        Safe in a signal handler and from any thread: it takes no lock.
        """
        self._external = True
        self._kick()

    def _kick(self) -> None:
        """Make the waiter's poll return (a full buffer is as good as one more byte)."""
        # BlockingIOError: already readable; closed: stopped.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:  # BlockingIOError: empty; closed: stopped
            pass

    def _burst_settled(self, now: float) -> bool:
        if self._burst_first is None or self._burst_last is None:
            return False
        return (
            now - self._burst_last >= self._debounce or now - self._burst_first >= self._max_delay
        )

    # ------------------------------------------------------------------ events (watchdog's thread)

    def _on_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        paths = [os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")]
        now = self._clock()
        kick = False
        with self._lock:
            if kind in _CHANGE_EVENTS and self._target_file in paths:
                if self._burst_first is None:
                    self._burst_first = now
                    kick = True
                self._burst_last = now
            if kind in _PATH_EVENTS and any(_is_on_the_way(p, self._target_dir) for p in paths):
                self._rearm_requested = True
                self._work.notify_all()
        if kick:
            self._kick()

    # ------------------------------------------------------------------ the watcher's thread

    def _run(self) -> None:
        next_poll = self._clock() + self._poll_interval
        while True:
            with self._lock:
                while not (self._stopping or self._rearm_requested):
                    now = self._clock()
                    if now >= next_poll:
                        break
                    self._work.wait(next_poll - now)
                if self._stopping:
                    return
                rearm, self._rearm_requested = self._rearm_requested, False
            try:
                if rearm and self._arm():
                    self._poll()
                if self._clock() >= next_poll:
                    self._arm()
                    self._poll()
                    next_poll = self._clock() + self._poll_interval
            except Exception:
                # The fallback must outlive any surprise; the next round tries again.
                log.warning("meta.db watcher: unexpected error", exc_info=True)
                next_poll = self._clock() + self._poll_interval

    def _observe(self) -> _Observation:
        """meta.db's identity and txid now (the caller holds ``_txid_lock``)."""
        try:
            st = os.stat(self.meta_db)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            identity = None
        try:
            txid = self._txid()
        except Exception as exc:
            log.debug("meta.db txid unreadable: %s", exc)
            txid = None
        return identity, txid

    def _poll(self) -> None:
        with self._txid_lock:
            seen = self._observe()
            with self._lock:
                changed = seen != self._seen
                if changed:
                    self._seen = seen
                    self._changed = True
            if changed:
                self._kick()

    def _arm(self) -> bool:
        """Watch the deepest existing directory on the way to meta.db; True if the watch moved."""
        assert self._observer is not None
        moved = False
        for _ in range(_MAX_REARM_ROUNDS):
            target_file = os.path.realpath(self.meta_db)
            target_dir = os.path.dirname(target_file)
            with self._lock:
                self._target_file, self._target_dir = target_file, target_dir
            where = _nearest_dir(target_dir)
            if where is None or (where == self._armed and self._watch is not None):
                return moved
            self._unschedule()
            self._armed = where
            moved = True
            try:
                self._watch = self._observer.schedule(self._handler, where[0], recursive=False)
            except OSError as exc:
                if not os.path.isdir(where[0]):
                    continue  # removed while the watch was being placed: look again
                # Out of inotify watches, permission denied, ...: the poll still works.
                if not self._schedule_failed_logged:
                    log.warning(
                        "cannot watch %s (%s); checking meta.db every %gs instead",
                        where[0],
                        exc,
                        self._poll_interval,
                    )
                    self._schedule_failed_logged = True
                return moved
            if where[0] == target_dir:
                log.info("watching %s", target_file)
            else:
                log.info("watching %s until %s appears", where[0], target_dir)
        return moved

    def _unschedule(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and self._observer is not None:
            try:
                self._observer.unschedule(watch)
            except Exception as exc:  # the emitter may already be gone with its directory
                log.debug("unscheduling %s: %s", watch.path, exc)
