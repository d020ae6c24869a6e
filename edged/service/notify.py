"""edged's side of the systemd notify protocol, and the progress-gated service watchdog.

`Notifier` tells the service manager where the daemon is in its life (READY, STATUS, RELOADING,
STOPPING) and pets the watchdog. It sends through systemd-python's `sd_notify` binding when that
is importable (Raspberry Pi OS ships it as python3-systemd, which the venv sees through
--system-site-packages) and otherwise writes the datagrams itself to `$NOTIFY_SOCKET`. Outside
systemd it is a silent no-op, and it never raises into the daemon: a vanished socket is logged
once and the daemon carries on.

`ProgressWatchdog` decides when petting is honest: each pipeline part (camera/vision, IMU/motion,
outbox) reports progress with `beat(name)`, and WATCHDOG=1 goes out only while every registered
part has beaten within its deadline. A thread that wedges inside a camera read or an interpreter
call therefore stops the petting, and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from edged.service.log import Once, fields

log = logging.getLogger("edged.notify")

# A send must not stall the daemon if the manager's queue is full; sd_notify is not expected to
# block for anywhere near this long.
_SEND_TIMEOUT_S = 1.0


def _import_sd_notify() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[import-not-found]
    except ImportError:
        return None
    return getattr(daemon, "notify", None)


def _socket_address(value: str) -> str | bytes | None:
    """Turn $NOTIFY_SOCKET into a sockaddr for AF_UNIX; None when the fallback cannot use it."""
    if value.startswith("@"):
        # Abstract namespace: the leading "@" stands for a NUL byte and the name is not a path.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:… (systemd ≥ 254) and anything else only sd_notify itself understands


class Notifier:
    """Send sd_notify(3) messages; every method returns whether the message went out."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None,
                 sd_notify: Callable[[str], bool] | None = None) -> None:
        """`address` is $NOTIFY_SOCKET as systemd sets it (a path or "@abstract"); None disables.

        `sd_notify` is systemd-python's `daemon.notify`; it reads $NOTIFY_SOCKET itself, so it
        is only passed in by `from_env`, where the address came from that same variable.
        """
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sd_notify = sd_notify if self.address else None
        self._sockaddr = _socket_address(self.address) if self.address else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._once = Once(log)
        if self.address and self._sd_notify is None and self._sockaddr is None:
            self._once("notify-address", "NOTIFY_SOCKET is not a path or @abstract name; "
                       "systemd notifications are off", address=self.address)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 use_systemd_python: bool = True) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd passes them."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = _positive_int(env.get("WATCHDOG_USEC"))
        pid = _positive_int(env.get("WATCHDOG_PID"))
        # systemd-python reads os.environ, so it can only stand in when that is what we read.
        sd = _import_sd_notify() if (use_systemd_python and environ is None and address) else None
        return cls(address, watchdog_usec=usec, watchdog_pid=pid, sd_notify=sd)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._sd_notify is not None or self._sockaddr is not None

    @property
    def backend(self) -> str:
        if self._sd_notify is not None:
            return "systemd-python"
        return "socket" if self._sockaddr is not None else "off"

    def watchdog_interval(self) -> float | None:
        """WatchdogSec= in seconds when the watchdog is armed for this process, else None."""
        if not self._watchdog_usec:
            return None
        # WATCHDOG_PID names the process the manager expects pets from; a child that inherited
        # the environment must not believe the watchdog is its business.
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def reloading(self) -> bool:
        # systemd ≥ 253 (Type=notify-reload) matches RELOADING=1 to its own reload request by
        # this timestamp; 252 ignores the extra field. READY=1 ends the reload either way.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (e.g. a slow first model load on a Pi Zero)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def notify(self, *lines: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False when off or when the send failed."""
        if not self.enabled:
            return False
        message = "\n".join(lines)
        try:
            with self._lock:
                if self._sd_notify is not None:
                    sent = bool(self._sd_notify(message))
                else:
                    self._send(message.encode())
                    sent = True
        except OSError as exc:
            self._once("notify-send", "cannot reach the service manager; carrying on without it",
                       socket=self.address, error=exc.strerror or str(exc))
            self._drop_socket()
            return False
        if sent and self._once.clear("notify-send"):
            log.info("service manager reachable again", extra=fields(socket=self.address))
        return sent

    def _send(self, payload: bytes) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_SEND_TIMEOUT_S)
            self._sock = sock
        self._sock.sendto(payload, self._sockaddr)

    def _drop_socket(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def close(self) -> None:
        self._drop_socket()


class ProgressWatchdog:
    """Pet the systemd watchdog only while every registered pipeline part is making progress.

    The daemon registers its parts ("vision", "motion", "outbox"), each of them calls
    `beat(name)` from its own loop whenever it completes a step, and one control loop calls
    `tick()` every `tick_interval` seconds. A beat means "my loop turned", not "my work
    succeeded": the outbox beats while it waits for a broker that is down, so an outage does
    not turn into restarts, while a thread stuck in a blocking call stops beating.
    """

    def __init__(self, notifier: Notifier, *, deadline_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`deadline_s` defaults to the service's WatchdogSec (30 s outside systemd)."""
        self.notifier = notifier
        self.deadline_s = deadline_s or notifier.watchdog_interval() or 30.0
        self._clock = clock
        self._last: dict[str, float] = {}
        self._deadline: dict[str, float] = {}
        self._retired: set[str] = set()  # parts unregistered since: their threads may still beat
        self._lock = threading.Lock()
        self._once = Once(log)

    @property
    def tick_interval(self) -> float | None:
        """How often to call `tick()`: half of WatchdogSec, or None when no watchdog is armed."""
        interval = self.notifier.watchdog_interval()
        return interval / 2 if interval else None

    def register(self, name: str, deadline_s: float | None = None) -> None:
        """Watch a part; registering counts as its first beat, so start-up gets a full deadline."""
        with self._lock:
            self._deadline[name] = deadline_s or self.deadline_s
            self._last[name] = self._clock()

    def unregister(self, name: str) -> None:
        """Stop watching a part that was shut down on purpose (e.g. camera disabled on reload)."""
        with self._lock:
            self._deadline.pop(name, None)
            self._last.pop(name, None)
            self._retired.add(name)
        self._once.clear(f"stalled:{name}")

    def beat(self, name: str) -> None:
        """Record progress of `name`; cheap enough for every frame. A part unregistered while
        its thread was still in its loop (a stop that gave up joining it on a loaded machine)
        may beat once more on its way out: ignored. A name never registered is a bug."""
        with self._lock:
            if name in self._deadline:
                self._last[name] = self._clock()
                return
            if name in self._retired:
                return
        raise KeyError(f"watchdog part {name!r} is not registered")

    def stale(self, now: float | None = None) -> dict[str, float]:
        """Parts whose last beat is older than their deadline, with the age in seconds."""
        now = self._clock() if now is None else now
        with self._lock:
            items = [(n, t, self._deadline.get(n)) for n, t in self._last.items()]
        return {n: now - t for n, t, limit in items if limit is not None and now - t > limit}

    def tick(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 if every part is fresh; returns whether the pet went out."""
        stale = self.stale(now)
        for name in self._registered():
            if name in stale:
                self._once(f"stalled:{name}", "pipeline part made no progress; not petting the "
                           "watchdog", level=logging.ERROR, part=name, age_s=round(stale[name], 1))
            elif self._once.clear(f"stalled:{name}"):
                log.warning("pipeline part is making progress again", extra=fields(part=name))
        if stale:
            return False
        return self.notifier.watchdog()

    def _registered(self) -> list[str]:
        with self._lock:
            return list(self._deadline)


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else None
    except ValueError:
        return None
    return number if number and number > 0 else None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return " ".join(str(text).split("\n"))
