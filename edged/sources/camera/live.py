"""The base of live cameras: pacing, a pool of reused frame buffers, capture timestamps, and
surviving failures (counted by kind, logged once per kind, reopened with backoff)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from edged.records import Frame
from edged.service.log import Once, fields
from edged.sources.camera.buffers import FramePool, Lease
from edged.sources.camera.common import ERROR_KINDS, CameraFault, Pacer, chain_text

log = logging.getLogger("edged.camera")

# A device timestamp further back than this is taken for another clock, not an old frame.
MAX_FRAME_AGE_S = 5.0


class _NoBuffer(Exception):
    """Every frame buffer is in use: the frame just grabbed is dropped (see FramePool)."""


class LiveCamera:
    """What the real cameras share: pacing, reused frame buffers, and surviving failures.

    Frames converted into edged's own buffers come from `buffers` (a `FramePool`): each frame
    holds its buffer until released (`Frame.release()`), and a buffer in use is never written.

    A failure (CameraFault) is counted by kind, logged once per kind until frames flow again, and
    followed by closing the device and reopening it after a backoff that doubles from
    `backoff_min_s` to `backoff_max_s`. `read()` never raises for it; it returns None only once
    `close()` was called. While it waits for a camera that is down it calls `on_idle` about every
    `idle_s` seconds, so a supervisor can tell "waiting on purpose" from "stuck".

    The device is opened by the first `read()`, not by the constructor: on a reload the new
    pipeline is built while the old one still holds the camera, and a camera opens only once.
    """

    name = "camera"

    def __init__(self, *, fps: float, backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 idle_s: float = 1.0) -> None:
        self.fps = fps
        self.frames = 0
        self.errors = 0
        self.error_counts = dict.fromkeys(ERROR_KINDS, 0)
        self.opens = 0  # successful opens: more than one means the camera was reopened
        self.on_idle = None
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s
        self._backoff = backoff_min_s
        self._idle_s = idle_s
        self._retry_at = 0.0
        self._open_now = False
        self._failing: set[str] = set()
        self._pacer = Pacer(fps)
        self._closed = self._pacer.closed
        self._lock = threading.Lock()  # the device: read() vs close() / snapshot()
        self._once = Once(log)
        self.buffers = FramePool(self.name)
        self._lease: Lease | None = None  # the buffer of the frame being grabbed

    # -- what each camera implements -------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _grab(self) -> tuple[np.ndarray, float | None]:
        """The next frame as RGB uint8 (H, W, 3) and when its exposure began on the monotonic
        clock (None when the device does not say); raise CameraFault when there is none."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def _frame_buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A free buffer for the frame being grabbed (raises _NoBuffer when there is none)."""
        lease = self.buffers.take(shape)
        if lease is None:
            raise _NoBuffer()
        self._lease = lease
        return lease.array

    def _drop_lease(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def read(self) -> Frame | None:
        """The next frame (blocking); None once the source is closed."""
        while not self._closed.is_set():
            if not self._open_now:
                if not self._sleep_until(self._retry_at):
                    break
                with self._lock:
                    if self._closed.is_set():
                        break
                    try:
                        self._open()
                        self._open_now = True
                        self.opens += 1
                    except CameraFault as fault:
                        self._fault(fault)
                        continue
            if not self._pacer.wait():
                break
            with self._lock:
                if self._closed.is_set():
                    break
                try:
                    image, exposed = self._grab()
                except _NoBuffer:  # counted by the pool; the device is fine
                    continue
                except CameraFault as fault:
                    self._drop_lease()
                    self._fault(fault)
                    self._release_quietly()
                    continue
            self._recovered()
            self.frames += 1
            lease, self._lease = self._lease, None
            return Frame(self._capture_time(exposed), image, lease)
        with self._lock:
            self._release_quietly()
        return None

    def _capture_time(self, exposed: float | None) -> float:
        """Wall-clock time of a frame: when its exposure began by the device's own timestamp,
        else now. A timestamp that is not on the monotonic clock (in the future, or older than
        MAX_FRAME_AGE_S) is not trusted: said once, and the frame stamped on arrival."""
        now = time.time()
        if exposed is None:
            return now
        age = time.monotonic() - exposed
        if -0.001 <= age <= MAX_FRAME_AGE_S:
            return now - max(age, 0.0)
        self._once(f"{self.name}:clock", "camera timestamps are not on the monotonic clock; "
                   "stamping frames on arrival", source=self.name, age_s=round(age, 3))
        return now

    def _sleep_until(self, t: float) -> bool:
        """Wait until monotonic time `t`, calling on_idle; False when closed meanwhile."""
        while True:
            left = t - time.monotonic()
            if left <= 0:
                return not self._closed.is_set()
            if self._closed.wait(min(left, self._idle_s)):
                return False
            if self.on_idle is not None:
                self.on_idle()

    def _fault(self, fault: CameraFault) -> None:
        self.errors += 1
        self.error_counts[fault.kind] = self.error_counts.get(fault.kind, 0) + 1
        self._failing.add(fault.kind)
        self._once(f"{self.name}:{fault.kind}", f"camera {fault.kind}: {fault}; retrying",
                   source=self.name, retry_s=round(self._backoff, 2))
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def _recovered(self) -> None:
        if self._failing:
            for kind in self._failing:
                self._once.clear(f"{self.name}:{kind}")
            self._failing.clear()
            log.info("camera delivering frames again", extra=fields(source=self.name, errors=self.errors))
        self._backoff = self._backoff_min

    def _release_quietly(self) -> None:
        if self._open_now:
            self._open_now = False
            try:
                self._release()
            except Exception as exc:  # a camera that is gone may fail to close; nothing to do
                log.debug("camera release failed", extra=fields(source=self.name, error=chain_text(exc)))

    @property
    def stats(self) -> dict:
        return {"frames": self.frames, "errors": self.errors, "reopens": max(0, self.opens - 1),
                **{f"errors_{k}": v for k, v in self.error_counts.items()}, **self.buffers.stats}

    def close(self) -> None:
        self._closed.set()
        # If read() holds the device it releases it on its way out; otherwise do it here.
        if self._lock.acquire(blocking=False):
            try:
                self._release_quietly()
            finally:
                self._lock.release()
