"""Peak resident memory of a whole process tree (Linux ``/proc``), sampled in a thread.

Frameworks start helper processes (Ray's raylet and workers, multiprocessing pools), so the
largest single process under-reports. A tree's memory here is the sum of the RSS of the
root, its descendants, and every process in the root's session (daemons that re-parent
to init but keep the session).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int):
    """(ppid, session id, rss bytes) or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[3]), int(fields[21]) * PAGE


def tree_rss(root: int) -> int:
    """Bytes resident in ``root``'s tree and session right now."""
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found:
                stats[int(entry.name)] = found
    if root not in stats:
        return 0
    session = stats[root][1]
    members, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in stats.items() if ppid == parent and pid not in members]
        members.update(children)
        frontier.extend(children)
    members.update(pid for pid, (_, sid, _) in stats.items() if sid == session and session != 0)
    return sum(stats[pid][2] for pid in members)


class PeakMemory:
    """``with PeakMemory(pid) as peak: ...``; then ``peak.bytes`` is the largest sample."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.bytes = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
