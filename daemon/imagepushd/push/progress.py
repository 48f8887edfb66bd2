"""Rendering push progress events: redrawn bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TextIO

from imagepushd.push.pusher import BlobProgress, Event, ManifestPushed
from imagepushd.units import human_size

BAR_WIDTH = 24
REDRAW_INTERVAL = 0.1


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]


class ProgressRenderer:
    """Turns :data:`Event` objects into output; thread-safe (events come from upload threads)."""

    def __init__(
        self, stream: TextIO, tty: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, tuple[int, int]] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def __call__(self, event: Event) -> None:
        """Render one event."""
        with self._lock:
            if isinstance(event, ManifestPushed):
                self._line(f"manifest {event.reference} {event.digest}")
            elif event.outcome is not None:
                self._active.pop(event.digest, None)
                self._line(self._done_text(event))
            elif self._tty:
                self._active[event.digest] = (event.position, event.size)
                if self._clock() - self._last_draw >= REDRAW_INTERVAL:
                    self._redraw()
            elif event.position == 0:
                self._line(f"blob {_short(event.digest)} {human_size(event.size)} started")

    @staticmethod
    def _done_text(event: BlobProgress) -> str:
        assert event.outcome is not None
        return f"blob {_short(event.digest)} {human_size(event.size)} {event.outcome.value}"

    def _clear(self) -> None:
        if self._tty and self._drawn:
            self._stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _line(self, text: str) -> None:
        self._clear()
        self._stream.write(text + "\n")
        if self._tty:
            self._redraw()
        self._stream.flush()

    def _redraw(self) -> None:
        self._clear()
        for digest, (position, size) in sorted(self._active.items()):
            filled = BAR_WIDTH if size == 0 else BAR_WIDTH * min(position, size) // size
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self._stream.write(
                f"{_short(digest)} [{bar}] {human_size(position)} / {human_size(size)}\n"
            )
        self._drawn = len(self._active)
        self._last_draw = self._clock()
        self._stream.flush()

    def close(self) -> None:
        """Erase the bars."""
        with self._lock:
            self._active.clear()
            self._clear()
