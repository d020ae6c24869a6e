"""A Raspberry Pi camera module through picamera2 (libcamera), imported only when used.

The picamera2 class is a constructor argument (`factory`), which is where the hardware factory
(`edged.hardware`) hands in a fake.
"""

from __future__ import annotations

import logging

import numpy as np

from edged.service.log import fields
from edged.sources.camera.common import PICAMERA2_HINT, CameraError, CameraFault, chain_text
from edged.sources.camera.live import LiveCamera

log = logging.getLogger("edged.camera")


def lores_size(model_size: tuple[int, int], main_size: tuple[int, int], letterbox: bool) -> tuple[int, int]:
    """The (width, height) to ask the ISP for, so the vision stage needs no resize.

    A letterboxing model gets the frame scaled to fit its input with the frame's aspect ratio
    kept (the stage only pads); a stretching model gets exactly its input size, as its own
    training resize did. Even sizes (YUV420 needs them), never larger than the main stream."""
    mw, mh = model_size
    fw, fh = main_size
    if letterbox:
        s = min(mw / fw, mh / fh)
        w, h = round(fw * s), round(fh * s)
    else:
        w, h = mw, mh
    w, h = min(w, fw), min(h, fh)
    return max(2, w - w % 2), max(2, h - h % 2)


class Yuv420ToRgb:
    """Planar YUV 4:2:0 (as picamera2 returns it: shape (h * 3 / 2, stride)) to RGB, in reused buffers.

    The matrix follows the stream's colour space: libcamera gives small video streams
    SMPTE 170M (BT.601, limited range) and HD ones Rec.709 (limited range); sYCC/JPEG is BT.601
    full range. Chroma is upsampled by repetition (each chroma sample covers 2x2 pixels)."""

    def __init__(self, width: int, height: int, colour_space: str = "smpte170m") -> None:
        if width % 2 or height % 2:
            raise ValueError(f"YUV420 needs even sizes, got {width}x{height}")
        self.width, self.height = width, height
        cs = colour_space.lower()
        kr, kb = (0.2126, 0.0722) if "709" in cs else (0.299, 0.114)
        full = "sycc" in cs or "jpeg" in cs or "srgb" in cs
        ys, cs_ = (1.0, 1.0) if full else (255 / 219, 255 / 224)
        self.y_offset = 0.0 if full else 16.0
        self.y_scale = ys
        kg = 1.0 - kr - kb
        # R = Y' + rv·Cr;  G = Y' + gu·Cb + gv·Cr;  B = Y' + bu·Cb  (Cb, Cr centred on 128)
        self.rv = cs_ * 2 * (1 - kr)
        self.bu = cs_ * 2 * (1 - kb)
        self.gu = -cs_ * 2 * (1 - kb) * kb / kg
        self.gv = -cs_ * 2 * (1 - kr) * kr / kg
        h2, w2 = height // 2, width // 2
        self._y = np.empty((height, width), np.float32)
        self._cb = np.empty((h2, w2), np.float32)
        self._cr = np.empty((h2, w2), np.float32)
        self._chroma = np.empty((h2, w2), np.float32)
        self._tmp = np.empty((h2, w2), np.float32)
        self._px = np.empty((h2, 2, w2, 2), np.float32)

    def planes(self, yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views of the Y, U and V planes of a (h * 3 / 2, stride) array, padding cut off."""
        w, h = self.width, self.height
        stride = yuv.shape[1]
        if yuv.shape[0] != h * 3 // 2 or stride < w:
            raise ValueError(f"YUV420 frame of shape {yuv.shape} does not hold {w}x{h}")
        flat = yuv.reshape(-1)
        c = (h // 2) * (stride // 2)  # bytes per chroma plane; its rows are stride/2 wide
        u = flat[h * stride:h * stride + c].reshape(h // 2, stride // 2)[:, :w // 2]
        v = flat[h * stride + c:h * stride + 2 * c].reshape(h // 2, stride // 2)[:, :w // 2]
        return yuv[:h, :w], u, v

    def __call__(self, yuv: np.ndarray, out: np.ndarray) -> np.ndarray:
        y, u, v = self.planes(yuv)
        np.subtract(y, self.y_offset, out=self._y, dtype=np.float32)
        self._y *= self.y_scale
        self._y += 0.5  # round when the float result is cast to uint8
        np.subtract(u, 128.0, out=self._cb, dtype=np.float32)
        np.subtract(v, 128.0, out=self._cr, dtype=np.float32)
        y4 = self._y.reshape(self.height // 2, 2, self.width // 2, 2)
        for channel, (cb_k, cr_k) in enumerate(((0.0, self.rv), (self.gu, self.gv), (self.bu, 0.0))):
            ch = self._chroma
            if cb_k and cr_k:
                np.multiply(self._cb, cb_k, out=ch)
                np.multiply(self._cr, cr_k, out=self._tmp)
                ch += self._tmp
            elif cb_k:
                np.multiply(self._cb, cb_k, out=ch)
            else:
                np.multiply(self._cr, cr_k, out=ch)
            np.add(y4, ch[:, None, :, None], out=self._px)
            np.clip(self._px, 0.0, 255.0, out=self._px)
            np.copyto(out[:, :, channel], self._px.reshape(self.height, self.width), casting="unsafe")
        return out


def _picamera2_fault(exc: BaseException, timeout_s: float) -> CameraFault:
    text = chain_text(exc)
    low = text.lower()
    if isinstance(exc, TimeoutError):
        return CameraFault("timeout", f"no frame within {timeout_s:g} s (camera frontend timeout: check "
                                      "the ribbon cable and the power supply)")
    if isinstance(exc, IndexError) or "not found" in low or "no camera" in low:
        return CameraFault("unplugged", f"no camera detected ({text}): power off, reseat the ribbon "
                                        "cable, then check 'rpicam-hello --list-cameras'")
    if "busy" in low:
        return CameraFault("busy", f"camera busy ({text}): another program holds it "
                                   "(rpicam-*, libcamera-*, a second edged?)")
    if isinstance(exc, PermissionError) or "permission denied" in low:
        return CameraFault("permission", f"{text}: add the user running edged to the video group")
    return CameraFault("error", text)


def exposure_start(meta: dict) -> float | None:
    """When a frame's exposure began (monotonic seconds), from its libcamera metadata.

    SensorTimestamp (ns) marks the start of the frame's readout, not of its exposure: the first
    row was exposed for ExposureTime (µs) before being read (picamera2 issues #821 and #787;
    libcamera's control documentation of SensorTimestamp). A frame is stamped with the start of
    its exposure, as docs/mqtt.md promises, so ExposureTime is subtracted; without it the
    readout start is the best there is."""
    sensor_ns = meta.get("SensorTimestamp")
    if not sensor_ns:
        return None
    exposure_us = meta.get("ExposureTime") or 0
    return sensor_ns / 1e9 - exposure_us / 1e6


def _import_picamera2():
    try:
        from picamera2 import Picamera2
    except ImportError:
        raise CameraError(f"camera.source = \"picamera2\": {PICAMERA2_HINT}") from None
    return Picamera2


class Picamera2Source(LiveCamera):
    """A Raspberry Pi camera module through picamera2 (libcamera).

    Frames come from the `lores` stream at `size` (the model's input size, see `lores_size`), so
    the ISP does the resize: YUV420 converted with numpy on Pi 4 and earlier (VC4 ISP: lores must
    be YUV), RGB straight from the ISP on Pi 5. The `main` stream at `main_size` is only ever
    captured by `snapshot()`, and is RGB only when `snapshots` is set.

    `factory(camera_num)` makes the Picamera2 object: picamera2's own class by default, or
    `edged.fakes.camera.FakePicamera2Factory`.
    """

    name = "picamera2"

    def __init__(self, *, size: tuple[int, int], main_size: tuple[int, int] = (640, 480), fps: float = 10.0,
                 camera_num: int = 0, snapshots: bool = False, factory=None,
                 capture_timeout_s: float = 2.0, **kw) -> None:
        super().__init__(fps=fps, **kw)
        self._factory = factory or _import_picamera2()
        self.size = (int(size[0]), int(size[1]))
        self.main_size = (int(main_size[0]), int(main_size[1]))
        self.camera_num = camera_num
        self.snapshots = snapshots
        self.capture_timeout_s = capture_timeout_s
        # The sensor runs at least at 10 fps even when fewer frames are wanted: long frame
        # durations would let exposure drag and blur; the pacer drops what is not needed.
        self._frame_us = int(1e6 / max(fps, 10.0))
        self._cam = None
        self._yuv: Yuv420ToRgb | None = None

    def _open(self) -> None:
        try:
            cam = self._factory(self.camera_num)
        except Exception as exc:  # picamera2 raises RuntimeError, IndexError, OSError...
            raise _picamera2_fault(exc, self.capture_timeout_s) from None
        try:
            platform = getattr(getattr(cam, "platform", None), "name", "VC4")
            # On the VC4 ISP (Pi 4 and earlier) lores can only be YUV. picamera2's "BGR888"
            # is R, G, B in memory order: the RGB the stages want.
            lores_fmt = "YUV420" if platform == "VC4" else "BGR888"
            config = cam.create_video_configuration(
                main={"size": self.main_size, "format": "BGR888" if self.snapshots else "YUV420"},
                lores={"size": self.size, "format": lores_fmt},
                buffer_count=4,
                controls={"FrameDurationLimits": (self._frame_us, self._frame_us)})
            cam.configure(config)
            lores = cam.camera_config["lores"]
            w, h = lores["size"]
            self._yuv = (Yuv420ToRgb(w, h, str(cam.camera_config.get("colour_space", "")))
                         if lores["format"] == "YUV420" else None)
            cam.start()
        except Exception as exc:
            try:
                cam.close()
            except Exception:
                pass
            raise _picamera2_fault(exc, self.capture_timeout_s) from None
        self._cam = cam
        log.info("camera ready", extra=fields(source=self.name, camera=self.camera_num, lores=f"{w}x{h}",
                                              lores_format=lores["format"], main=f"{self.main_size[0]}x{self.main_size[1]}",
                                              platform=platform, snapshots=self.snapshots))

    def _grab(self) -> tuple[np.ndarray, float | None]:
        try:
            request = self._cam.capture_request(wait=self.capture_timeout_s)
        except Exception as exc:
            raise _picamera2_fault(exc, self.capture_timeout_s) from None
        try:  # the request holds one of the camera's few buffers until it is released
            arr = request.make_array("lores")
            meta = request.get_metadata()
        except Exception as exc:
            raise CameraFault("error", chain_text(exc)) from None
        finally:
            request.release()
        exposed = exposure_start(meta)
        if self._yuv is None:
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise CameraFault("error", f"lores frame of shape {arr.shape}, expected (h, w, 3)")
            return arr, exposed  # a fresh array from picamera2 already; no copy needed
        out = self._frame_buffer((self._yuv.height, self._yuv.width, 3))
        try:
            return self._yuv(arr, out), exposed
        except ValueError as exc:
            raise CameraFault("error", str(exc)) from None

    def snapshot(self) -> np.ndarray | None:
        """The current main-stream frame as RGB uint8 (JPEG-encodable), or None when snapshots are
        not configured or the camera is down."""
        if not self.snapshots:
            return None
        with self._lock:
            if not self._open_now or self._cam is None:
                return None
            try:
                arr = self._cam.capture_array("main", wait=self.capture_timeout_s)
            except Exception as exc:
                self._once(f"{self.name}:snapshot", f"snapshot failed: {chain_text(exc)}")
                return None
        return arr

    def _release(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()
