"""Image files as frames: decoding to RGB uint8 and listing a replay folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edged.sources.camera.common import CameraError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mjpeg", ".mjpg", ".h264"}


# The default bound on an image's decoded pixels (camera.max_pixels): 16.8 M, e.g. 4096×4096.
MAX_PIXELS = 1 << 24


class ImageRefused(CameraError):
    """An image file that is refused before it is decoded (too many pixels)."""


def decode_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3).

    The size in the file's header is checked before any pixel is decoded: an image with more
    than `max_pixels` is refused (`ImageRefused`), except a JPEG, which is decoded reduced by
    1/2, 1/4 or 1/8 (the decoder's draft mode, at no cost) when that brings it within bounds.
    Any other failure to decode is a `CameraError` naming the file."""
    import warnings

    from PIL import Image  # only replay and the CLI decode files

    try:
        with warnings.catch_warnings():
            # Our own bound comes first; PIL's decompression-bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels and im.format == "JPEG":
                    scale = next((s for s in (2, 4, 8) if (w // s) * (h // s) <= max_pixels), 8)
                    im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
                    w, h = im.size
                if w * h > max_pixels:
                    raise ImageRefused(f"{path}: image is {w}×{h} = {w * h} pixels, more than "
                                       f"camera.max_pixels ({max_pixels}); refused")
                im.load()
                return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except CameraError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"{path}: image refused: {exc}") from None
    except FileNotFoundError:
        raise CameraError(f"{path}: no such image file") from None
    except Exception as exc:  # PIL raises many kinds for a damaged file: all mean "cannot decode"
        raise CameraError(f"{path}: cannot decode image: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CameraError(f"{path}: no such image file or folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CameraError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files
