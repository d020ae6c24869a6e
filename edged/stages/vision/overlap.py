"""Frames through a vision graph with the model invokes on a thread of their own, so that the
vision thread's Python work (preparing the next unit's input, decoding the last one, merging,
tracking, publishing, the next frame's first input) runs while an interpreter is busy.

TFLite's (and LiteRT's) `invoke()` releases the GIL, so this gains wherever a core is free; on
one core it costs a thread switch per invoke and nothing else. The work of a frame is the graph's
sequence of units (one invoke each, `VisionGraph.units`). `FrameRunner` keeps one unit invoking
while it prepares the next into the stage's other input slot (two preallocated input buffers per
model, and a copy of the outputs each invoke fills), then finishes the invoked one: results come
out in order and are exactly those of `VisionGraph.detect`. A stage that crops an earlier stage's
objects waits for that stage to be finished (its input depends on it). Across frames the same
holds: the last unit of a frame is finished once the next frame's first unit is invoking, so a
frame's results come out of the `push` of the next frame, or of `flush` when no frame follows.

At most two units are in flight (one invoking, one queued behind it); the invoke thread exits on
`close`. A stop (the `stop` event, the daemon's) abandons the frames in progress between two units:
the invoke running then is the only one waited for, the one queued behind it is not started, and
no object of an abandoned frame is handed out. An invoke that never returns (an Edge TPU hang) blocks the vision thread as a plain
invoke would: the daemon's hang check sees it through the model's `invoking_since`.
"""

from __future__ import annotations

import _thread
import queue
import threading
from collections import deque

import numpy as np

from edged.stages.vision.graph import FrameWork, Unit, VisionGraph, Wait
from edged.stages.vision.preprocess import check_image


class _Signal:
    """Set once, waited for by any thread: a lock held until `set` (`threading.Event`'s interface
    for what a job needs, without its condition and waiter list: two of these per invoke)."""

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()  # the next waiter passes too
        return True


class _Job:
    __slots__ = ("unit", "done", "started", "skipped")

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.done = _Signal()
        self.started = _Signal()  # taken off the queue by the invoke thread
        self.skipped = False  # not invoked: the stop came first


class Invoker:
    """A thread that runs units' invokes (commit, invoke, copy the outputs) in the order given;
    once `stop` is set it starts none (a job it skips is done, with `skipped` set)."""

    def __init__(self, name: str = "vision-invoke", stop: threading.Event | None = None) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._idle = False  # waiting for a job
        self._stop = stop
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def submit(self, unit: Unit) -> _Job:
        """Queue `unit`'s invoke. When the invoke thread was idle, return only once it has taken
        the job: it needs the GIL to start the invoke, and a caller going straight on with
        Python work (decoding, preparing the next input) would keep it for up to the
        interpreter's switch interval (5 ms) while the interpreter has nothing to do."""
        if self._closed:
            raise RuntimeError("vision: the invoke thread is closed")
        job = _Job(unit)
        idle = self._idle
        self._jobs.put(job)
        if idle:
            job.started.wait()  # blocking lets the GIL go; the invoke releases it again
        return job

    def _loop(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                # Idle only while nothing is queued: a submit seeing this waits for its job to
                # start, which is right away (set back before the job is marked started).
                self._idle = True
                job = jobs.get()
                self._idle = False
            if job is None:  # close(): after every job queued before it
                return
            job.started.set()
            if self._stop is not None and self._stop.is_set():
                job.skipped = True
                job.done.set()
                continue
            try:
                job.unit.invoke()
            except BaseException as exc:  # handed to the vision thread, which raises it
                job.unit.error = exc
            job.done.set()

    def close(self, timeout: float | None = None) -> bool:
        """Let the queued invokes finish, then end the thread; False if it is still running after
        `timeout` (an invoke that does not return)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        self.thread.join(timeout)
        return not self.thread.is_alive()


class FrameRunner:
    """Runs frames through a graph, in order; with `overlap`, invokes on an `Invoker` thread.

    A finished frame is handed out as (tag, objects, ms) in the order pushed: to `on_done` the
    moment its last unit is finished (during the next frame's push, right after that frame's first
    invoke started), else in the list `push` and `flush` return. `flush()` finishes the rest. `ms`
    is a frame's time from the start of its push to its last result. Without overlap every frame
    is finished by its own push. A frame pushed and never handed out (the runner forgets the open
    frames after an error, and at `close`) is given to `on_drop(tag)`, so that its owner can free
    what the tag holds (the daemon: the camera buffer).

    Once `stop` is set, `push` and `flush` abandon the open frames at the next unit boundary:
    they wait only for the invoke already running, and give every open frame to `on_drop`.
    """

    def __init__(self, graph: VisionGraph, *, overlap: bool = True, on_done=None, on_drop=None,
                 stop: threading.Event | None = None) -> None:
        self.graph = graph
        self.overlap = overlap
        self.on_done = on_done
        self.on_drop = on_drop
        self.stop = stop
        self._invoker = Invoker(stop=stop) if overlap else None
        self._flight: deque[_Job] = deque()          # invoking or invoked, not finished
        self._frames: deque[FrameWork] = deque()     # pushed, not handed out
        self._out: list[tuple[object, tuple, float]] = []

    @property
    def pending(self) -> int:
        """Frames pushed whose results have not been handed out yet."""
        return len(self._frames)

    def push(self, image: np.ndarray, tag: object = None) -> list[tuple[object, tuple, float]]:
        check_image(image)  # a bad frame raises here, before any work of it is queued
        g = self.graph
        fw = g.start(image, tag)
        self._frames.append(fw)
        try:
            for item in g.units(fw, overlap=self.overlap):
                if self._stopping():
                    break  # the stop came while this unit was prepared: it is not run
                if isinstance(item, Wait):
                    self._finish_one()
                    continue
                if self._invoker is None:
                    item.invoke()
                    g.finish(item)
                    self._deliver()
                else:
                    self._flight.append(self._invoker.submit(item))
                    # Keep one invoking while the next is prepared: finish all but the newest.
                    while len(self._flight) > 1 and not self._stopping():
                        self._finish_one()
                if self._stopping():
                    break  # before the next unit is prepared
            # A frame whose last stages had nothing to crop completed without a unit to finish.
            self._deliver()
            if self._stopping():
                self._drop()
        except BaseException:
            self._drop()
            raise
        return self._done()

    def flush(self) -> list[tuple[object, tuple, float]]:
        try:
            while self._flight and not self._stopping():
                self._finish_one()
            if self._stopping():
                self._drop()
        except BaseException:
            self._drop()
            raise
        return self._done()

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def close(self, timeout: float | None = 2.0) -> bool:
        """Stop the invoke thread (after the invokes in flight; their results are dropped)."""
        self._flight.clear()
        self._forget()
        return self._invoker.close(timeout) if self._invoker is not None else True

    def _forget(self) -> None:
        dropped = [fw.tag for fw in self._frames] + [tag for tag, _, _ in self._out]
        self._frames.clear()
        self._out.clear()
        if self.on_drop is not None:
            for tag in dropped:
                self.on_drop(tag)

    def _finish_one(self) -> None:
        if not self._flight:
            raise RuntimeError("vision: a stage waits for units that were never queued")
        job = self._flight.popleft()
        job.done.wait()
        if job.skipped:  # a stop came first: its frame is abandoned, never finished
            return
        unit = job.unit
        if unit.error is not None:
            raise unit.error
        self.graph.finish(unit)
        self._deliver()

    def _drop(self) -> None:
        """After an error or at a stop: wait for what is in flight (its input slots must be free;
        after a stop the invoke thread starts none of it), forget the open frames. The next push
        starts clean."""
        for job in self._flight:
            job.done.wait()
        self._flight.clear()
        self._forget()

    def _deliver(self) -> None:
        while self._frames and self._frames[0].objects is not None:
            fw = self._frames.popleft()
            done = (fw.tag, fw.objects, (fw.finished - fw.started) * 1000.0)
            if self.on_done is not None:
                self.on_done(*done)
            else:
                self._out.append(done)

    def _done(self) -> list[tuple[object, tuple, float]]:
        out, self._out = self._out, []
        return out
