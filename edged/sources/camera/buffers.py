"""Frame buffers a camera fills and its consumers give back: a small pool, reused, never
overwritten while a frame in it is still in use.

A camera takes a free buffer for each frame (`FramePool.take`) and allocates one only when none is
free, up to `limit`. The frame carries its `Lease`; whoever holds the frame releases it when done
(`Frame.release()`), and the buffer is free again when every holder has released it
(`Frame.hold()` adds a holder, e.g. a snapshot encoding the newest frame). In the daemon the
holders are the mailbox (until a newer frame replaces it), the vision stage (until the frame is
published or skipped, including frames a chain of stages finishes later) and the pipeline's
newest frame for snapshots (until the next one replaces it); so a steady stream needs about four
buffers, allocated once.

With all `limit` buffers in use (a consumer that holds frames it never releases) the pool says so
once and asks its `reclaim` hook to give one back: the pipeline drops the frame waiting in its
mailbox, the oldest one no stage has begun. When there is none, the new frame is dropped
(counted in `dropped`): a buffer that is in use is never written. A reader without a hook (one
that does not take part, e.g. `edged snapshot`, a test reading frames one by one) gets the
frames beyond the bound in buffers of their own, not reused (counted in `unpooled`).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from edged.service.log import fields

log = logging.getLogger("edged.camera")

BUFFERS_MAX = 8  # filling, mailbox, up to two in a chain of stages, the snapshot frame, and spare


class Lease:
    """One frame's hold on a pool buffer; the buffer goes back when the last holder releases it."""

    __slots__ = ("_pool", "array", "_refs", "_pooled")

    def __init__(self, pool: "FramePool", array: np.ndarray, pooled: bool = True) -> None:
        self._pool = pool
        self.array = array
        self._refs = 1
        self._pooled = pooled

    def hold(self) -> None:
        with self._pool._lock:
            if self._refs <= 0:
                raise RuntimeError("frame buffer held after it was given back")
            self._refs += 1

    def release(self) -> None:
        """Give up one hold; a release beyond the last is ignored (the buffer may be reused)."""
        pool = self._pool
        with pool._lock:
            if self._refs <= 0:
                return
            self._refs -= 1
            if self._refs or not self._pooled:
                return
            pool._give_back(self.array)


class FramePool:
    """Reused frame buffers of one shape (a new shape starts over), at most `limit` of them."""

    def __init__(self, name: str = "camera", limit: int = BUFFERS_MAX) -> None:
        self.name = name
        self.limit = limit
        self.allocated = 0    # buffers that exist now (in use or free)
        self.allocations = 0  # buffers ever allocated: stays put in a steady stream
        self.dropped = 0      # frames dropped because every buffer was in use
        self.unpooled = 0     # frames beyond the bound given buffers of their own (no reclaim hook)
        self.reclaim = None   # callable() -> bool: a consumer gives back a frame it can spare
        self._free: list[np.ndarray] = []
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        self._full_said = False

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.allocated - len(self._free)

    def take(self, shape: tuple[int, ...]) -> Lease | None:
        """A buffer of `shape` (uint8) leased to a new frame, or None when every buffer is in use
        and no consumer could give one back (the frame is to be dropped)."""
        shape = tuple(shape)
        for attempt in range(2):
            with self._lock:
                if shape != self._shape:
                    self.allocated -= len(self._free)  # buffers of the old size in use go when released
                    self._free.clear()
                    self._shape = shape
                if self._free:
                    return Lease(self, self._free.pop())
                if self.allocated < self.limit:
                    self.allocated += 1
                    self.allocations += 1
                    return Lease(self, np.empty(shape, np.uint8))
                say = not self._full_said
                self._full_said = True
            reclaim = self.reclaim
            if say:
                log.warning("all camera frame buffers are in use (frames not released); "
                            + ("dropping the oldest waiting frame" if reclaim is not None
                               else "further frames get buffers of their own"),
                            extra=fields(source=self.name, buffers=self.limit))
            if reclaim is None:
                with self._lock:
                    self.unpooled += 1
                return Lease(self, np.empty(shape, np.uint8), pooled=False)
            # Outside the lock: the hook releases a frame, which takes the lock.
            if attempt or not reclaim():
                break
        with self._lock:
            self.dropped += 1
        return None

    def _give_back(self, array: np.ndarray) -> None:  # with the lock held
        if array.shape == self._shape:
            self._free.append(array)
        else:
            self.allocated -= 1

    @property
    def stats(self) -> dict:
        return {"buffers": self.allocated, "frames_dropped": self.dropped}
