"""Camera sources: produce `Frame`s (RGB uint8) at a steady rate; they know nothing about models.

`ReplayCamera` plays a folder of images (or a single image) in a loop at the configured frame
rate. It is the demo's and the tests' camera, and the way to run edged on recorded footage.
A file that cannot be decoded is counted, logged once, and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from edged.log import Once
from edged.records import Frame

log = logging.getLogger("edged.camera")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp"}


class CameraError(Exception):
    pass


def decode_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError  # only replay and the CLI decode files

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise CameraError(f"{path}: cannot decode image: {exc}") from None


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CameraError(f"{path}: no such image file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CameraError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


class ReplayCamera:
    """Replays image files at `fps`, looping. Decoded frames are cached (they are small demo sets)."""

    name = "replay"

    def __init__(self, path: str | Path, *, fps: float = 2.0, loop: bool = True,
                 cache_bytes: int = 64 << 20) -> None:
        self.files = list_images(Path(path))
        self.period = 1.0 / fps
        self.loop = loop
        self.frames = 0
        self.errors = 0
        self._cache: dict[Path, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._i = 0
        self._next = time.monotonic()
        self._closed = threading.Event()
        self._once = Once(log)

    def read(self) -> Frame | None:
        """The next frame, waiting for its turn; None when the replay is over or closed."""
        while not self._closed.is_set():
            if self._i >= len(self.files):
                if not self.loop:
                    return None
                self._i = 0
            delay = self._next - time.monotonic()
            if delay > 0 and self._closed.wait(delay):
                return None
            self._next = max(self._next + self.period, time.monotonic() - self.period)
            path = self.files[self._i]
            self._i += 1
            image = self._cache.get(path)
            if image is None:
                try:
                    image = decode_image(path)
                except CameraError as exc:
                    self.errors += 1
                    self._once(f"decode:{path}", str(exc))
                    if self.errors >= len(self.files) and not self._cache:
                        raise CameraError(f"{path.parent}: no image in the replay folder can be decoded") from None
                    continue
                if image.nbytes <= self._cache_left:
                    self._cache[path] = image
                    self._cache_left -= image.nbytes
            self.frames += 1
            return Frame(time.time(), image)
        return None

    def close(self) -> None:
        self._closed.set()
