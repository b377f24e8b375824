"""Bounds on what a peer can make the coordinator write or hold: text, repeated rejections, streams.

A peer controls strings (a claimed site name, a manifest hash, metric names) and how often it
calls. Everything a peer sent is capped before it reaches the audit log or the console
(``bounded_text``); repeated rejections of the same kind from the same caller are written a
few times per window and then summarised (``RejectionLimiter``); and ``StreamGate`` caps how
many uploads run at once, per site and overall, so idle streams cannot starve a legitimate one.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable, Optional

MAX_TEXT = 256
"""Characters kept of one peer-supplied string in the audit log or on the console."""


def bounded_text(value, limit: int = MAX_TEXT) -> Optional[str]:
    """``value`` as printable text of at most ``limit`` characters (None stays None).

    Control characters are escaped (a name cannot forge a console line), and a longer string
    keeps its head and says how much was cut, so the log still shows what was tried."""
    if value is None:
        return None
    text = str(value)
    cut = len(text) - limit
    if cut > 0:
        text = text[:limit]
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    if len(text) > limit:  # escaping lengthened it
        text = text[:limit]
    return text + (f"...[{cut} more characters]" if cut > 0 else "")


class RejectionLimiter:
    """Lets through at most ``burst`` rejections per (kind, caller) in each ``window`` seconds.

    ``allow`` says whether to write this one; when a window with suppressed rejections ends, the
    next ``allow`` call hands ``summary(kind, caller, count)`` the number dropped, so the log says
    how many there were without holding one line each."""

    def __init__(self, summary: Callable[[str, str, int], None], burst: int = 20, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.summary, self.burst, self.window, self.clock = summary, burst, window, clock
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str], list] = defaultdict(lambda: [0.0, 0, 0])  # start, written, suppressed

    def allow(self, kind: str, caller: Optional[str]) -> bool:
        key = (kind, bounded_text(caller) or "unknown")
        with self._lock:
            state = self._state[key]
            now = self.clock()
            suppressed = 0
            if now - state[0] >= self.window:
                suppressed = state[2]
                state[:] = [now, 0, 0]
            ok = state[1] < self.burst
            state[1 if ok else 2] += 1
        if suppressed:
            self.summary(key[0], key[1], suppressed)
        return ok

    def flush(self) -> None:
        """Summarises every window's suppressed rejections now (at the end of a run)."""
        with self._lock:
            pending = [(key, state[2]) for key, state in self._state.items() if state[2]]
            for key, _ in pending:
                self._state[key][2] = 0
        for (kind, caller), count in pending:
            self.summary(kind, caller, count)


class StreamGate:
    """At most ``per_site`` open uploads per caller and ``total`` overall; ``enter`` says whether one more may open."""

    def __init__(self, per_site: int, total: int):
        self.per_site, self.total = per_site, total
        self._lock = threading.Lock()
        self._open: dict[str, int] = defaultdict(int)

    def enter(self, caller: str) -> Optional[str]:
        """None if admitted (call ``leave`` when done), else why not."""
        with self._lock:
            if self._open[caller] >= self.per_site:
                return f"site {bounded_text(caller)} already has {self._open[caller]} upload(s) open (limit {self.per_site})"
            if sum(self._open.values()) >= self.total:
                return f"the coordinator has {self.total} uploads open (its limit); try again shortly"
            self._open[caller] += 1
            return None

    def leave(self, caller: str) -> None:
        with self._lock:
            self._open[caller] -= 1
