"""Camera sources: produce `Frame`s (RGB uint8) at a steady rate; they know nothing about models.

One module per kind: `replay` (image folders and video files: the demo's camera), `picamera2`
(Pi camera modules, the ISP scaling to the model's size) and `v4l2` (USB webcams through OpenCV),
the last two on the shared `live` base. A live camera that is unplugged, busy or stops
delivering is counted, logged once per kind and reopened with backoff; `read()` does not raise
for it. `open_camera` builds the source a `[camera]` config section describes, with the hardware
boundary (the picamera2 class, the V4L2 capture) from `edged.hardware`.
"""

from __future__ import annotations

from edged.sources.camera.common import (ERROR_KINDS, OPENCV_HINT, PICAMERA2_HINT, CameraError, CameraFault,
                                         Pacer, chain_text)
from edged.sources.camera.images import IMAGE_SUFFIXES, VIDEO_SUFFIXES, decode_image, list_images
from edged.sources.camera.live import MAX_FRAME_AGE_S, LiveCamera
from edged.sources.camera.picamera2 import Picamera2Source, Yuv420ToRgb, lores_size
from edged.sources.camera.replay import ReplayCamera, VideoReplay, open_replay
from edged.sources.camera.v4l2 import OpenCvV4l2, V4l2Source, v4l2_device


def open_camera(cam, *, model_size: tuple[int, int] | None = None, letterbox: bool = False,
                snapshots: bool = False, hardware=None):
    """The camera source a `[camera]` config section asks for.

    `model_size` (width, height) and `letterbox` come from the vision model; a picamera2 source
    asks the ISP for frames of that size. `hardware` (an `edged.hardware.Hardware`; default: the
    one the config section implies) supplies the picamera2 class or the V4L2 backend, real or
    emulated."""
    if cam.source == "replay":
        return open_replay(cam.path, fps=cam.fps, loop=cam.loop, max_pixels=getattr(cam, "max_pixels", 1 << 24))
    if hardware is None:
        from edged.hardware import load_factory

        hardware = load_factory("fake" if cam.fake else "real", None)
    if cam.source == "picamera2":
        device = str(cam.device or "0")
        if not device.isdigit():
            raise CameraError(f"camera.device: picamera2 takes a camera number (0, 1), got {device!r}")
        main = (cam.width, cam.height)
        size = lores_size(model_size, main, letterbox) if model_size else main
        return Picamera2Source(size=size, main_size=main, fps=cam.fps, camera_num=int(device),
                               snapshots=snapshots, factory=hardware.picamera2_factory(cam))
    if cam.source == "v4l2":
        return V4l2Source(cam.device or "/dev/video0", width=cam.width, height=cam.height, fps=cam.fps,
                          fourcc=cam.fourcc, backend=hardware.v4l2_backend(cam))
    raise CameraError(f"camera.source: unknown source {cam.source!r}")


__all__ = ["CameraError", "CameraFault", "ERROR_KINDS", "IMAGE_SUFFIXES", "LiveCamera", "MAX_FRAME_AGE_S",
           "OPENCV_HINT", "OpenCvV4l2", "PICAMERA2_HINT", "Pacer", "Picamera2Source", "ReplayCamera",
           "V4l2Source", "VIDEO_SUFFIXES", "VideoReplay", "Yuv420ToRgb", "chain_text", "decode_image",
           "list_images", "lores_size", "open_camera", "open_replay", "v4l2_device"]
