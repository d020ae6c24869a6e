"""Replay IMU source: plays a recorded CSV (`t,ax,ay,az,gx,gy,gz`) in real time, looping.

It hands out samples in bursts, as a chip's FIFO would, stamped with the wall-clock time at which
each sample "happens" in the replay (recording time / speed, offset by the loop count).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from edged.records import ImuBatch


def median(x: np.ndarray) -> float:
    """`np.median` of a 1-D float array, the same value: the middle one, or the mean of the two
    in the middle (NaN if any is NaN). Without np.median's check for masked arrays, which imports
    numpy.ma (1.1 MB resident) into a daemon that has no other use for it."""
    s = np.sort(x)
    k = len(s) // 2
    if np.isnan(s[-1]):
        return float("nan")
    return float(s[k]) if len(s) % 2 else float((s[k - 1] + s[k]) / 2)


class ReplayImu:
    chip_name = "replay"

    def __init__(self, path: str | Path, *, speed: float = 1.0, loop: bool = True,
                 burst_s: float = 0.1) -> None:
        from edged.sources.imu.imucsv import read_imu_csv

        rec = read_imu_csv(Path(path))
        self.t = rec.t - rec.t[0]
        self.data = rec.data
        step = median(np.diff(self.t)) if len(self.t) > 1 else 0.1
        self.duration = float(self.t[-1]) + step  # one loop, including the last sample's interval
        self.speed = speed
        self.loop = loop
        self.burst_s = burst_s
        self.samples = 0
        self._start = time.time()
        self._pos = 0       # index of the next sample in the recording
        self._lap = 0
        self._closed = threading.Event()

    @property
    def stats(self) -> dict:
        return {"samples": self.samples, "overflows": 0, "lost_samples": 0, "read_errors": 0}

    def read(self, timeout: float = 1.0) -> ImuBatch | None:
        """Samples that have come due since the last call (waits one burst interval)."""
        if self._closed.wait(min(timeout, self.burst_s)):
            return None
        now_rec = (time.time() - self._start) * self.speed  # position in recording time
        ts, rows = [], []
        while True:
            lap_t = now_rec - self._lap * self.duration
            end = int(np.searchsorted(self.t, lap_t, side="right"))
            if end > self._pos:
                ts.append(self.t[self._pos:end] + self._lap * self.duration)
                rows.append(self.data[self._pos:end])
                self._pos = end
            if self._pos < len(self.t) or lap_t < self.duration:
                break
            if not self.loop:
                if not ts:
                    return None
                break
            self._lap += 1
            self._pos = 0
        if not ts:
            return ImuBatch(np.empty(0), np.empty((0, 6), np.float32))
        t = np.concatenate(ts) / self.speed + self._start
        data = np.concatenate(rows) if len(rows) > 1 else rows[0]
        self.samples += len(t)
        return ImuBatch(t, data)

    def close(self, *, restart: bool = False) -> None:
        """`restart` as for ImuSource.close; a recording has no samples to lose while edged is down."""
        self._closed.set()
