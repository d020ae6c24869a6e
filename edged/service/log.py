"""Logging for edged: one structured line per event.

On a terminal (or any plain stdout) lines are logfmt (`level=info component=mqtt msg="connected"
host=…`), so they read well and parse with standard tools. Under systemd, when stdout is the
journal (`JOURNAL_STREAM` names it), each event goes to journald directly with its fields as
journal fields — `DEVICE`, `BACKEND`, `EDGED_COMPONENT`, and every field of the line as
`EDGED_<NAME>` (e.g. `EDGED_SEQ`) — so `journalctl -u edged DEVICE=pi-kitchen EDGED_KIND=full`
filters on them. It uses systemd-python's `journal.send` where installed, else speaks journald's
native protocol itself.

`Once` keeps a repeating fault (a broker that stays down, a camera that keeps timing out) to one
line per kind until it clears.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import threading
import traceback

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


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
            # A bug, not bad input: keep the traceback, folded into the same line.
            parts.append(f"traceback={_quote(''.join(traceback.format_exception(*record.exc_info)))}")
        return " ".join(parts)


class JournalHandler(logging.Handler):
    """Sends each record to journald with structured fields (native protocol)."""

    def __init__(self, static: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.static = static
        self.socket_path = socket_path
        self._formatter = LogfmtFormatter()
        self._sock: socket.socket | None = None
        self._send_py = None
        if socket_path == JOURNAL_SOCKET:
            try:
                from systemd import journal  # type: ignore[import-not-found]

                self._send_py = journal.send
            except ImportError:
                pass

    def journal_fields(self, record: logging.LogRecord) -> dict[str, str]:
        line = self._formatter.format(record)
        message = line.split(" ", 1)[1]  # journald stamps the time itself
        out = {
            "MESSAGE": message,
            "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": "edged",
            "EDGED_COMPONENT": record.name.removeprefix("edged.") or "edged",
            **self.static,
        }
        for k, v in (getattr(record, "fields", None) or {}).items():
            out["EDGED_" + "".join(c if c.isalnum() else "_" for c in k.upper())] = str(v)
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = self.journal_fields(record)
            if self._send_py is not None:
                self._send_py(**fields)
                return
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(encode_journal(fields), self.socket_path)
        except Exception:
            self.handleError(record)


def encode_journal(fields: dict[str, str]) -> bytes:
    """journald's native datagram: KEY=value lines; a value with a newline as KEY, length, bytes."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode()
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def stdout_is_journal() -> bool:
    """systemd sets JOURNAL_STREAM to stdout's device:inode when stdout goes to the journal."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stdout.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


_static: dict[str, str] = {}


def setup(level: str = "info", *, device_id: str | None = None, stream=None) -> None:
    """Log lines to the journal when stdout is connected to it, else logfmt on stdout (or on
    `stream`, for a command whose stdout carries its output)."""
    root = logging.getLogger("edged")
    for h in list(root.handlers):
        root.removeHandler(h)
    if device_id:
        _static["DEVICE"] = device_id
    if stream is None and stdout_is_journal():
        handler: logging.Handler = JournalHandler(_static, os.environ.get("EDGED_JOURNAL_SOCKET", JOURNAL_SOCKET))
    else:
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def set_static(**kw: str) -> None:
    """Fields every journal entry carries from now on (e.g. BACKEND once it is known)."""
    for k, v in kw.items():
        _static[k.upper()] = str(v)


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
