"""Image files as frames: decoding to RGB uint8 and listing a replay folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edged.sources.camera.common import CameraError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mjpeg", ".mjpg", ".h264"}


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
