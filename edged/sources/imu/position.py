"""Where the IMU's sample stream stood, kept in the state dir so that a restarted daemon can count
the samples that went by while it was down.

`ImuSource` saves the stamp of the last sample it delivered (and the monotonic time it
corresponds to) about once a second while it reads, and once more when it closes: "running" while
it reads, "stopped" on a clean stop, "restarting" when the daemon exits with a status the service
restarts it on (an Edge TPU hang, EXIT_TPU_HUNG). The first run of the next process reads the
file: after "running" (the process died: an Edge TPU abort, SIGKILL, a crash) or "restarting",
the samples the chip produced between that last sample and the new process's first FIFO reset
are counted (`imu_lost_across_restart`) and logged in one line. A clean stop is a choice, not a
loss; a different boot (the device rebooted: the chip lost power too) or another chip / address
is not counted either. The gap is measured on CLOCK_MONOTONIC, which the kernel keeps for the
whole boot, so a wall-clock step while the daemon was down does not change it.

What the restarted process could still drain from the chip's FIFO is not taken: each driver sets
its chip up afresh (soft reset, as the Linux IIO drivers do at probe), which empties the FIFO.
docs/hardware.md ("Samples lost across a restart") gives the per-chip reasons: at the unit's
RestartSec=10s the FIFO has overflowed on every supported chip at the rates motion models use,
and what an overflowing FIFO keeps is only its newest samples.

Saving is atomic (a temporary file renamed over the old one). The periodic save is not fsynced
(a process that dies leaves what it wrote with the kernel; a power cut resets the chip and the
boot id anyway); the one on close is.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edged.service.log import fields

log = logging.getLogger("edged.imu")

FILE = "imu-position.json"
SAVE_EVERY_S = 1.0   # the periodic save: an abort can lose at most this much of the record
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot's id ("" when the kernel does not say): CLOCK_MONOTONIC values compare only within one."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


class ImuPosition:
    """The saved position of one IMU's sample stream at `path`.

    `previous` is what the last process saved (None when there is nothing usable, or when
    `after_restart` is False: a pipeline opened on reload, in the same process as the last one)."""

    def __init__(self, path: str | Path, *, after_restart: bool = True, every_s: float = SAVE_EVERY_S) -> None:
        self.path = Path(path)
        self.every_s = every_s
        self.boot = boot_id()
        self.previous = self._load() if after_restart else None
        self._next = float("-inf")
        self._warned = False  # a failing periodic save is logged once

    @classmethod
    def for_state_dir(cls, state_dir: str | Path, **kw) -> "ImuPosition":
        return cls(Path(state_dir) / FILE, **kw)

    def _load(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("IMU position record unreadable; samples lost while the daemon was down are not counted",
                        extra=fields(path=str(self.path), error=str(exc)))
            return None
        want = {"state": str, "boot_id": str, "chip": str, "address": int, "period_s": float,
                "last_mono": float, "last_stamp": float}
        if not isinstance(data, dict) or any(not isinstance(data.get(k), (int, float) if t is float else t)
                                             for k, t in want.items()):
            log.warning("IMU position record malformed; samples lost while the daemon was down are not counted",
                        extra=fields(path=str(self.path)))
            return None
        return data

    def lost_since(self, chip: str, address: int, now_mono: float) -> tuple[int, float] | None:
        """(samples, seconds) the chip produced after the last sample the previous process
        delivered, up to `now_mono`, when that process did not stop cleanly; else None. Taken once."""
        p, self.previous = self.previous, None
        if p is None or p["state"] not in ("running", "restarting"):
            return None
        if not self.boot or p["boot_id"] != self.boot or p["chip"] != chip or p["address"] != address:
            return None
        gap = now_mono - p["last_mono"]
        period = p["period_s"]
        if gap <= 0 or period <= 0:
            return None
        return int(gap / period), gap

    def save(self, *, chip: str, address: int, period_s: float, last_stamp: float, last_mono: float,
             now_mono: float, state: str = "running", force: bool = False) -> None:
        """Record the stream's position (at most every `every_s` unless `force`)."""
        if not force and now_mono < self._next:
            return
        self._next = now_mono + self.every_s
        data = {"state": state, "boot_id": self.boot, "chip": chip, "address": address,
                "period_s": period_s, "last_stamp": last_stamp, "last_mono": last_mono, "pid": os.getpid()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(data, fh)
                if force:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            if force or not self._warned:
                self._warned = True
                log.warning("cannot write the IMU position record", extra=fields(path=str(self.path), error=str(exc)))
