"""A USB webcam (or any V4L2 capture device) through OpenCV, imported only when used.

The capture backend is a constructor argument, which is where the hardware factory
(`edged.hardware`) hands in a fake.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from edged.service.log import fields
from edged.sources.camera.common import OPENCV_HINT, CameraError, CameraFault
from edged.sources.camera.live import MAX_FRAME_AGE_S, LiveCamera

log = logging.getLogger("edged.camera")


class OpenCvV4l2:
    """The V4L2 boundary as edged uses it: OpenCV's VideoCapture with the V4L2 backend, and the
    state of the device node (which tells an unplugged webcam from a slow one)."""

    def __init__(self) -> None:
        try:
            import cv2
        except ImportError:
            raise CameraError(f"camera.source = \"v4l2\": {OPENCV_HINT}") from None
        self.cv2 = cv2

    def open(self, device: str):
        return self.cv2.VideoCapture(device, self.cv2.CAP_V4L2)

    def node(self, device: str) -> str | None:
        """None when the node is usable, else "unplugged" or "permission"."""
        import os

        if not os.path.exists(device):
            return "unplugged"
        if not os.access(device, os.R_OK | os.W_OK):
            return "permission"
        return None


def v4l2_device(device: str | int) -> str:
    """"/dev/video0" from "/dev/video0", "0" or 0."""
    text = str(device).strip()
    return f"/dev/video{text}" if text.isdigit() else text


DRAIN_MAX = 8  # grabs per frame at most: more than any capture queue edged asks for holds
WAITED = 0.25  # a grab that took this fraction of a camera period waited for a frame being taken
FRESH_PERIODS = 1.5  # a queued frame this many camera periods older than the newest one can be is fresh


class V4l2Source(LiveCamera):
    """A USB webcam (or any V4L2 capture device) through OpenCV, at the configured size and rate.

    The driver picks the nearest mode it supports; the size it picked is logged and used.

    Freshness: the webcam streams at its own rate into the capture queue whether or not edged
    reads, and a buffer is filled again right after edged dequeues it. With a one-buffer queue
    the frame waiting at the next read was therefore taken just after the previous read: one
    whole edged period old (0.5 s at 2 fps), not one camera period. So each read drains the
    queue: it grabs (dequeues without decoding) until it gets a fresh frame (one a grab had to
    wait for, or one whose buffer timestamp is within FRESH_PERIODS camera periods of the
    webcam's own delay), and only that frame is decoded. The queue is asked to be one buffer deep
    (some drivers keep more), so draining usually costs one grab of a stale buffer and a wait
    of at most one camera period.
    `backend` is `OpenCvV4l2()` by default, or `edged.fakes.camera.FakeV4l2`.
    """

    name = "v4l2"

    def __init__(self, device: str | int = "/dev/video0", *, width: int = 640, height: int = 480,
                 fps: float = 10.0, fourcc: str = "", backend=None, **kw) -> None:
        super().__init__(fps=fps, **kw)
        self._backend = backend or OpenCvV4l2()
        self._cv2 = self._backend.cv2
        self.device = v4l2_device(device)
        self.width, self.height = int(width), int(height)
        if fourcc and len(fourcc) != 4:
            raise CameraError(f"camera.fourcc: expected 4 characters such as MJPG or YUYV, got {fourcc!r}")
        self.fourcc = fourcc
        self._cap = None
        self._bgr: np.ndarray | None = None

    def _node_fault(self, state: str) -> CameraFault:
        if state == "unplugged":
            return CameraFault("unplugged", f"{self.device} does not exist: is the webcam plugged in? "
                                            "('v4l2-ctl --list-devices' lists capture devices)")
        return CameraFault("permission", f"{self.device}: permission denied: add the user running edged "
                                         "to the video group")

    def _open(self) -> None:
        cv2 = self._cv2
        state = self._backend.node(self.device)
        if state:
            raise self._node_fault(state)
        cap = self._backend.open(self.device)
        if not cap.isOpened():
            cap.release()
            raise CameraFault("busy", f"{self.device}: cannot open for capture (busy with another "
                                      "program, or not a capture device)")
        if self.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        # One buffer: as little as possible to drain before each fresh frame (see the class doc).
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cam_fps = cap.get(cv2.CAP_PROP_FPS)
        self._cam_period = 1.0 / cam_fps if cam_fps and cam_fps > 0 else 1.0 / 30
        self._cap = cap
        self._bgr = None
        log.info("camera ready", extra=fields(source=self.name, device=self.device, size=f"{w}x{h}",
                                              asked=f"{self.width}x{self.height}",
                                              fps=cap.get(cv2.CAP_PROP_FPS)))

    def _drain(self) -> bool:
        """Grab until the grabbed buffer holds a fresh frame; False when a grab failed.

        A grab that had to wait for its frame got one just taken; one that returned at once got
        a queued frame, fresh only if its timestamp is within 1.5 camera periods of the newest
        the webcam can deliver (its own delay, learnt from the grabs that waited)."""
        cap, cv2, period = self._cap, self._cv2, self._cam_period
        for _ in range(DRAIN_MAX):
            started = time.monotonic()
            if not cap.grab():
                return False
            now = time.monotonic()
            ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            age = now - ms / 1000.0 if ms > 0 else None
            if age is not None and not -0.001 <= age <= MAX_FRAME_AGE_S:
                age = None  # not on the monotonic clock: no use here
            if now - started >= WAITED * period:
                if age is not None:
                    self._latency_s = age if self._latency_s is None else min(self._latency_s, age)
                return True
            if age is not None and self._latency_s is not None and age <= self._latency_s + FRESH_PERIODS * period:
                return True
        return True  # a queue deeper than DRAIN_MAX, or a camera slower than it says: take this one

    _latency_s: float | None = None  # the webcam's own delay from exposure to dequeue, at least

    def _grab(self) -> tuple[np.ndarray, float | None]:
        ok = self._drain()
        bgr = None
        if ok:
            ok, bgr = self._cap.retrieve(self._bgr) if self._bgr is not None else self._cap.retrieve()
        if not ok or bgr is None:
            state = self._backend.node(self.device)
            if state:
                raise self._node_fault(state)
            raise CameraFault("timeout", f"{self.device}: no frame (read timed out)")
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise CameraFault("error", f"{self.device}: frame of shape {bgr.shape}, expected (h, w, 3)")
        self._bgr = bgr
        out = self._frame_buffer(bgr.shape)
        self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB, dst=out)
        # The buffer's timestamp from the driver (CLOCK_MONOTONIC for UVC webcams), in ms.
        ms = self._cap.get(self._cv2.CAP_PROP_POS_MSEC)
        return out, (ms / 1000.0 if ms > 0 else None)

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
