"""Logging for edged: one structured line per event on stdout (journald picks it up under systemd).

Lines are logfmt (`level=info component=mqtt msg="connected" host=…`), so they read well in
`journalctl -u edged` and parse with standard tools. `Once` keeps a repeating fault (a broker
that stays down, a camera that keeps timing out) to one line per kind until it clears.
"""

from __future__ import annotations

import logging
import sys
import threading


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}",
            f"level={record.levelname.lower()}",
            f"component={record.name.removeprefix('edged.') or 'edged'}",
            f"msg={_quote(record.getMessage())}",
        ]
        for k, v in (getattr(record, "fields", None) or {}).items():
            parts.append(f"{k}={_quote(v)}")
        if record.exc_info and record.levelno >= logging.ERROR:
            parts.append(f"error={_quote(repr(record.exc_info[1]))}")
        return " ".join(parts)


def setup(level: str = "info") -> None:
    root = logging.getLogger("edged")
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def fields(**kw: object) -> dict:
    """`log.info("msg", extra=fields(k=v))` attaches structured fields to a line."""
    return {"fields": kw}


class Once:
    """Log a fault once per kind; `clear(kind)` re-arms it when the fault has gone away."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, level: int = logging.WARNING, **kw: object) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if kind in self._seen:
                return
            self._seen.add(kind)
        self._log.log(level, msg, extra=fields(kind=kind, **kw))

    def clear(self, kind: str) -> bool:
        with self._lock:
            if kind in self._seen:
                self._seen.discard(kind)
                return True
            return False
