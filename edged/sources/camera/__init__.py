"""Camera sources: produce `Frame`s (RGB uint8) at a steady rate; they know nothing about models.

Replay sources are the demo's and the tests' camera, and the way to run edged on recorded
footage: `ReplayCamera` plays a folder of images (or one image), `VideoReplay` a video file
(through OpenCV), both looped at the configured frame rate. `open_replay` picks one by path.
A file or frame that cannot be decoded is counted, logged once, and skipped.

Live sources: `Picamera2Source` (Pi camera modules through picamera2, the ISP scaling to the
model's size) and `V4l2Source` (USB webcams through OpenCV). A live camera that is unplugged,
busy or stops delivering is counted, logged once per kind and reopened with backoff; `read()`
does not raise for it. Their hardware boundary (the picamera2 class, the V4L2 capture) is a
constructor argument, which is how `edged.fakes.camera` stands in for it. `open_camera` builds
the source a `[camera]` config section describes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from edged.service.log import Once, fields
from edged.records import Frame

log = logging.getLogger("edged.camera")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".mjpeg", ".mjpg", ".h264"}
OPENCV_HINT = ("video files are read with OpenCV: pip install opencv-python-headless "
               "(or on Raspberry Pi OS: sudo apt install python3-opencv)")


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


def open_replay(path: str | Path, *, fps: float = 2.0, loop: bool = True):
    """A replay source for `path`: a video file, an image file, or a folder of images."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoReplay(path, fps=fps, loop=loop)
    return ReplayCamera(path, fps=fps, loop=loop)


class _Pacer:
    """Releases one frame every `period` seconds without drifting; interruptible by close()."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.next = time.monotonic()
        self.closed = threading.Event()

    def wait(self) -> bool:
        """Wait for the next frame's turn; False when closed."""
        delay = self.next - time.monotonic()
        if delay > 0 and self.closed.wait(delay):
            return False
        # After a stall, do not burst to catch up: frames are perishable anyway.
        self.next = max(self.next + self.period, time.monotonic() - self.period)
        return not self.closed.is_set()


class VideoReplay:
    """Plays a video file at `fps`, looping, into a small ring of reused RGB buffers."""

    name = "replay-video"
    RING = 3  # the frame being filled, one in the mailbox, one being detected

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
        self._ring = [np.empty_like(first) for _ in range(self.RING)]
        self._slot = 0
        self._pacer = _Pacer(fps)

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
            out = self._ring[self._slot]
            self._slot = (self._slot + 1) % self.RING
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)
            self.frames += 1
            return Frame(time.time(), out)
        return None

    def close(self) -> None:
        self._pacer.closed.set()


class ReplayCamera:
    """Replays image files at `fps`, looping. Decoded frames are cached (they are small demo sets)."""

    name = "replay"

    def __init__(self, path: str | Path, *, fps: float = 2.0, loop: bool = True,
                 cache_bytes: int = 64 << 20) -> None:
        self.files = list_images(Path(path))
        self.loop = loop
        self.frames = 0
        self.errors = 0
        self._cache: dict[Path, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._i = 0
        self._pacer = _Pacer(fps)
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

    def close(self) -> None:
        self._pacer.closed.set()


# --------------------------------------------------------------------------- live cameras

PICAMERA2_HINT = ("picamera2 is not installed: on Raspberry Pi OS run 'sudo apt install python3-picamera2' "
                  "and give edged's venv --system-site-packages (scripts/provision does both)")
ERROR_KINDS = ("unplugged", "busy", "timeout", "permission", "error")
# A device timestamp further back than this is taken for another clock, not an old frame.
MAX_FRAME_AGE_S = 5.0


class CameraFault(Exception):
    """A camera failure the source survives by retrying; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _chain_text(exc: BaseException) -> str:
    """The messages of an exception and of the ones it was raised from, in one line."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).split())
        parts.append(text or type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return ": ".join(parts)


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


class _LiveCamera:
    """What the real cameras share: pacing, a ring of reused frames, and surviving failures.

    A failure (CameraFault) is counted by kind, logged once per kind until frames flow again, and
    followed by closing the device and reopening it after a backoff that doubles from
    `backoff_min_s` to `backoff_max_s`. `read()` never raises for it; it returns None only once
    `close()` was called. While it waits for a camera that is down it calls `on_idle` about every
    `idle_s` seconds, so a supervisor can tell "waiting on purpose" from "stuck".

    The device is opened by the first `read()`, not by the constructor: on a reload the new
    pipeline is built while the old one still holds the camera, and a camera opens only once.
    """

    name = "camera"
    RING = 3  # the frame being filled, one in the mailbox, one being detected

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
        self._pacer = _Pacer(fps)
        self._closed = self._pacer.closed
        self._lock = threading.Lock()  # the device: read() vs close() / snapshot()
        self._once = Once(log)
        self._ring: list[np.ndarray] = []
        self._slot = 0

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
    def _next_ring(self, shape: tuple[int, ...]) -> np.ndarray:
        if not self._ring or self._ring[0].shape != shape:
            self._ring = [np.empty(shape, np.uint8) for _ in range(self.RING)]
        out = self._ring[self._slot]
        self._slot = (self._slot + 1) % self.RING
        return out

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
                except CameraFault as fault:
                    self._fault(fault)
                    self._release_quietly()
                    continue
            self._recovered()
            self.frames += 1
            return Frame(self._capture_time(exposed), image)
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
                log.debug("camera release failed", extra=fields(source=self.name, error=_chain_text(exc)))

    @property
    def stats(self) -> dict:
        return {"frames": self.frames, "errors": self.errors, "reopens": max(0, self.opens - 1),
                **{f"errors_{k}": v for k, v in self.error_counts.items()}}

    def close(self) -> None:
        self._closed.set()
        # If read() holds the device it releases it on its way out; otherwise do it here.
        if self._lock.acquire(blocking=False):
            try:
                self._release_quietly()
            finally:
                self._lock.release()


def _picamera2_fault(exc: BaseException, timeout_s: float) -> CameraFault:
    text = _chain_text(exc)
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


def _import_picamera2():
    try:
        from picamera2 import Picamera2
    except ImportError:
        raise CameraError(f"camera.source = \"picamera2\": {PICAMERA2_HINT}") from None
    return Picamera2


class Picamera2Source(_LiveCamera):
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
            sensor_ns = request.get_metadata().get("SensorTimestamp")
        except Exception as exc:
            raise CameraFault("error", _chain_text(exc)) from None
        finally:
            request.release()
        exposed = sensor_ns / 1e9 if sensor_ns else None
        if self._yuv is None:
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise CameraFault("error", f"lores frame of shape {arr.shape}, expected (h, w, 3)")
            return arr, exposed  # a fresh array from picamera2 already; no copy needed
        out = self._next_ring((self._yuv.height, self._yuv.width, 3))
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
                self._once(f"{self.name}:snapshot", f"snapshot failed: {_chain_text(exc)}")
                return None
        return arr

    def _release(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.stop()
            finally:
                cam.close()


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


class V4l2Source(_LiveCamera):
    """A USB webcam (or any V4L2 capture device) through OpenCV, at the configured size and rate.

    The driver picks the nearest mode it supports; the size it picked is logged and used. The
    capture queue is one buffer deep, so a frame is at most one frame period old at low rates.
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
        # One buffer: at 2 fps a deeper queue would hand out frames several seconds old.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self._cap = cap
        self._bgr = None
        log.info("camera ready", extra=fields(source=self.name, device=self.device, size=f"{w}x{h}",
                                              asked=f"{self.width}x{self.height}",
                                              fps=cap.get(cv2.CAP_PROP_FPS)))

    def _grab(self) -> tuple[np.ndarray, float | None]:
        ok, bgr = self._cap.read(self._bgr) if self._bgr is not None else self._cap.read()
        if not ok or bgr is None:
            state = self._backend.node(self.device)
            if state:
                raise self._node_fault(state)
            raise CameraFault("timeout", f"{self.device}: no frame (read timed out)")
        if bgr.ndim != 3 or bgr.shape[2] != 3:
            raise CameraFault("error", f"{self.device}: frame of shape {bgr.shape}, expected (h, w, 3)")
        self._bgr = bgr
        out = self._next_ring(bgr.shape)
        self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB, dst=out)
        # The buffer's timestamp from the driver (CLOCK_MONOTONIC for UVC webcams), in ms.
        ms = self._cap.get(self._cv2.CAP_PROP_POS_MSEC)
        return out, (ms / 1000.0 if ms > 0 else None)

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()


def open_camera(cam, *, model_size: tuple[int, int] | None = None, letterbox: bool = False,
                snapshots: bool = False):
    """The camera source a `[camera]` config section asks for.

    `model_size` (width, height) and `letterbox` come from the vision model; a picamera2 source
    asks the ISP for frames of that size. `cam.fake` selects the fakes in `edged.fakes.camera`,
    which play the images at `cam.path` as if a camera saw them."""
    if cam.source == "replay":
        return open_replay(cam.path, fps=cam.fps, loop=cam.loop)
    if cam.source == "picamera2":
        device = str(cam.device or "0")
        if not device.isdigit():
            raise CameraError(f"camera.device: picamera2 takes a camera number (0, 1), got {device!r}")
        main = (cam.width, cam.height)
        size = lores_size(model_size, main, letterbox) if model_size else main
        factory = None
        if cam.fake:
            from edged.fakes.camera import FakePicamera2Factory

            factory = FakePicamera2Factory(cam.path)
        return Picamera2Source(size=size, main_size=main, fps=cam.fps, camera_num=int(device),
                               snapshots=snapshots, factory=factory)
    if cam.source == "v4l2":
        backend = None
        if cam.fake:
            from edged.fakes.camera import FakeV4l2

            backend = FakeV4l2(cam.path, devices=(v4l2_device(cam.device or "/dev/video0"),))
        return V4l2Source(cam.device or "/dev/video0", width=cam.width, height=cam.height, fps=cam.fps,
                          fourcc=cam.fourcc, backend=backend)
    raise CameraError(f"camera.source: unknown source {cam.source!r}")
