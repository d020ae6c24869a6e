"""The reload handshake: how `systemctl reload edged` learns whether the daemon took the change.

systemd 252 (Debian 12) counts a reload as done when ExecReload= exits; `Type=notify-reload`,
where systemd itself waits for the daemon's READY=1, only exists from systemd 253, and even
there a refused reload looks like a successful one. So the unit's ExecReload= runs
`edged reload --pid $MAINPID`: it sends SIGHUP and waits until the daemon has recorded the
outcome in `reload.json` in the service's runtime directory ($RUNTIME_DIRECTORY, from
RuntimeDirectory=), then exits 0 when the new config and models are in service and 1 when they
were refused (the old pipeline still runs) — and systemctl passes that on.

The record counts the reloads the daemon began and finished. The waiter notes how many had begun
before it signalled; the first reload to begin after that reads the config after the signal, so
the waiter's answer is the one that reload ends with.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from edged.service.log import fields

log = logging.getLogger("edged.reload")

RECORD_NAME = "reload.json"


def runtime_dir(env: Mapping[str, str] | None = None) -> Path | None:
    """systemd's RuntimeDirectory= (the first one when there are several), else None."""
    value = (os.environ if env is None else env).get("RUNTIME_DIRECTORY", "")
    first = value.split(":")[0]
    return Path(first) if first else None


@dataclass
class ReloadRecord:
    pid: int          # the daemon the record belongs to (a restarted one starts over)
    begun: int = 0    # reloads begun by this process
    finished: int = 0
    ok: bool = True   # outcome of the last finished reload
    error: str = ""   # why it was refused, one line


def read_record(directory: Path) -> ReloadRecord | None:
    try:
        doc = json.loads((directory / RECORD_NAME).read_text())
        return ReloadRecord(int(doc["pid"]), int(doc["begun"]), int(doc["finished"]),
                            bool(doc["ok"]), str(doc.get("error", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ReloadReporter:
    """The daemon's end: records each reload's start and outcome (a no-op without a directory)."""

    def __init__(self, directory: Path | None, pid: int | None = None) -> None:
        self.directory = directory
        self.record = ReloadRecord(os.getpid() if pid is None else pid)
        self._warned = False
        self._write()

    def begin(self) -> None:
        self.record.begun += 1
        self._write()

    def finish(self, ok: bool, error: str = "") -> None:
        self.record.finished = self.record.begun
        self.record.ok, self.record.error = ok, ("" if ok else error or "refused")
        self._write()

    def _write(self) -> None:
        if self.directory is None:
            return
        target = self.directory / RECORD_NAME
        tmp = target.with_name(f".{RECORD_NAME}.{self.record.pid}")
        try:
            tmp.write_text(json.dumps(asdict(self.record)) + "\n")
            os.replace(tmp, target)  # a reader sees the old record or the new one, never half
        except OSError as exc:
            if not self._warned:  # `systemctl reload` will then time out and say so
                self._warned = True
                log.warning("cannot record reload outcomes",
                            extra=fields(path=str(target), error=exc.strerror or str(exc)))


class ReloadError(Exception):
    """The reload did not happen or was refused; the message is one line for the operator."""


def request_reload(pid: int, directory: Path, timeout: float = 100.0, poll: float = 0.05) -> ReloadRecord:
    """Signal the daemon `pid` to reload and wait for the outcome; raises ReloadError unless the
    new config is in service. `poll` is how often the record is read while waiting."""
    before = read_record(directory)
    begun = before.begun if before is not None and before.pid == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no process {pid} to reload") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid} (run as the service user or root)") from None
    deadline = time.monotonic() + timeout
    while True:
        rec = read_record(directory)
        if rec is not None and rec.pid == pid and rec.finished > begun:
            if not rec.ok:
                raise ReloadError(f"reload refused, the running configuration is kept: {rec.error}")
            return rec
        if not _alive(pid):
            raise ReloadError(f"process {pid} exited during the reload")
        if time.monotonic() >= deadline:
            raise ReloadError(f"no reload outcome from process {pid} within {timeout:g} s "
                              f"(nothing recorded in {directory / RECORD_NAME})")
        time.sleep(poll)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (an exited process its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and is not ours to signal
    try:
        # /proc/PID/stat: "pid (comm) S ...", where comm may hold spaces and parentheses.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
