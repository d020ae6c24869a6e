"""Replay sources: the demo's and the tests' camera, and the way to run edged on recorded footage.

`ReplayCamera` plays a folder of images (or one image), `VideoReplay` a video file (through
OpenCV), both looped at the configured frame rate; `open_replay` picks one by path. A file or
frame that cannot be decoded is counted, logged once, and skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edged.records import Frame
from edged.service.log import Once
from edged.sources.camera.buffers import FramePool
from edged.sources.camera.common import OPENCV_HINT, CameraError, Pacer
from edged.sources.camera.images import MAX_PIXELS, VIDEO_SUFFIXES, decode_image, list_images

log = logging.getLogger("edged.camera")


def open_replay(path: str | Path, *, fps: float = 2.0, loop: bool = True, max_pixels: int = MAX_PIXELS):
    """A replay source for `path`: a video file, an image file, or a folder of images."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoReplay(path, fps=fps, loop=loop)
    return ReplayCamera(path, fps=fps, loop=loop, max_pixels=max_pixels)


class VideoReplay:
    """Plays a video file at `fps`, looping, into reused RGB buffers (`buffers`, a FramePool:
    a frame holds its buffer until released)."""

    name = "replay-video"

    def __init__(self, path: str | Path, *, fps: float = 2.0, loop: bool = True) -> None:
        try:
            import cv2
        except ImportError:
            raise CameraError(f"{path}: {OPENCV_HINT}") from None
        self._cv2 = cv2
        self.path = Path(path)
        self.loop = loop
        self.frames = 0
        self.errors = 0
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise CameraError(f"{self.path}: cannot open video (unknown format or codec)")
        ok, first = self._cap.read()
        if not ok:
            raise CameraError(f"{self.path}: video has no decodable frame")
        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self._bgr = np.empty_like(first)
        self.buffers = FramePool(self.name)
        self._pacer = Pacer(fps)

    def read(self) -> Frame | None:
        cv2 = self._cv2
        while self._pacer.wait():
            ok, bgr = self._cap.read(self._bgr)
            if not ok:
                if not self.loop or self.frames == 0:
                    return None
                self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, bgr = self._cap.read(self._bgr)
                if not ok:
                    self.errors += 1
                    return None
            if bgr.shape != self._bgr.shape:  # a stream whose size changes mid-file
                self.errors += 1
                continue
            lease = self.buffers.take(bgr.shape)
            if lease is None:  # every buffer in use: this frame is dropped (counted by the pool)
                continue
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=lease.array)
            self.frames += 1
            return Frame(time.time(), lease.array, lease)
        return None

    @property
    def stats(self) -> dict:
        return {"frames": self.frames, "errors": self.errors, **self.buffers.stats}

    def close(self) -> None:
        self._pacer.closed.set()


class ReplayCamera:
    """Replays image files at `fps`, looping. Decoded frames are cached (they are small demo sets).

    A file that cannot be decoded, or has more than `max_pixels` pixels, is counted (`errors`;
    `refused` for the too-large ones), logged once, and skipped; it is not read again."""

    name = "replay"

    def __init__(self, path: str | Path, *, fps: float = 2.0, loop: bool = True,
                 cache_bytes: int = 64 << 20, max_pixels: int = MAX_PIXELS) -> None:
        self.files = list_images(Path(path))
        self.loop = loop
        self.max_pixels = max_pixels
        self.frames = 0
        self.errors = 0
        self.refused = 0
        self._bad: set[Path] = set()
        self._cache: dict[Path, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._i = 0
        self._pacer = Pacer(fps)
        self._once = Once(log)

    def read(self) -> Frame | None:
        """The next frame, waiting for its turn; None when the replay is over or closed."""
        while True:
            if self._i >= len(self.files):
                if not self.loop:
                    return None
                self._i = 0
            if not self._pacer.wait():
                return None
            path = self.files[self._i]
            self._i += 1
            if path in self._bad:
                continue
            image = self._cache.get(path)
            if image is None:
                try:
                    image = decode_image(path, max_pixels=self.max_pixels)
                except CameraError as exc:
                    from edged.sources.camera.images import ImageRefused

                    self.errors += 1
                    self.refused += isinstance(exc, ImageRefused)
                    self._bad.add(path)
                    self._once(f"decode:{path}", f"image skipped: {exc}")
                    if len(self._bad) >= len(self.files):
                        raise CameraError(f"{path.parent}: no image in the replay folder can be decoded") from None
                    continue
                if image.nbytes <= self._cache_left:
                    self._cache[path] = image
                    self._cache_left -= image.nbytes
            self.frames += 1
            return Frame(time.time(), image)

    @property
    def stats(self) -> dict:
        return {"frames": self.frames, "errors": self.errors, "refused": self.refused}

    def close(self) -> None:
        self._pacer.closed.set()
