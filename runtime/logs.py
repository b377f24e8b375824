"""The operator's console for the coordinator and the site agent: one line per event, written through the
standard ``logging`` module and flushed at once (under a pipe or journald no line waits in a buffer, so a
SIGTERM loses none), as plain text for people or as JSON lines for a log collector."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Callable, Optional, TextIO

__all__ = ["FORMATS", "JsonLines", "console"]

FORMATS = ("text", "json")


class JsonLines(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ms), ``level``, ``component``, ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        return json.dumps({"time": time.isoformat(timespec="milliseconds"), "level": record.levelname.lower(),
                           "component": record.name.removeprefix("nordfl."), "message": record.getMessage()},
                          ensure_ascii=False)


def console(component: str, fmt: str = "text", stream: Optional[TextIO] = None) -> Callable[[str], None]:
    """``log(message)`` for ``component`` (the ``nordfl.<component>`` logger), one flushed line per message on
    ``stream`` (default stdout). Calling it again replaces the earlier handler rather than doubling lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    logger = logging.getLogger(f"nordfl.{component}")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stdout)  # StreamHandler flushes after every record
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger.info
