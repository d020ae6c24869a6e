"""Fake cameras: a picamera2 stand-in and a V4L2 (OpenCV VideoCapture) stand-in that "see" images.

Both show a set of still images (by default the shipped sample photos) as if a camera were
pointed at them, one image per `hold` frames, in real time at the configured frame rate, and can
be told to fail the way real cameras do. They are selected through the sources' factory
arguments (`Picamera2Source(factory=FakePicamera2Factory(...))`, `V4l2Source(backend=FakeV4l2(...))`)
or with `camera.fake = true` in the config; the sources cannot tell them from the hardware.

FakePicamera2Factory(images) is called like picamera2's `Picamera2(camera_num)` and returns a
`FakePicamera2` that follows picamera2's configuration rules: `create_video_configuration`
defaults (main XBGR8888 1280x720, lores YUV420, SMPTE170M colour space below 1280x720 and
Rec709 from there), sizes even, lores no larger than main, lores YUV-only on the VC4 platform,
configure only while stopped. Its "ISP" crops each image to the main stream's aspect ratio and
scales it to every stream's size; `capture_array` returns the stream in picamera2's layout
(YUV420 as (h * 3 / 2, stride) with a padded stride, "BGR888" as R, G, B, "RGB888" as B, G, R,
"XBGR8888" as R, G, B, 255); `capture_request` returns a request whose metadata carries the
frame's SensorTimestamp and ExposureTime as libcamera reports them: SensorTimestamp is when the
readout of the frame began (ns, monotonic clock; `delay_s` before delivery), which is later than
the start of its exposure by ExposureTime (µs; `exposure_s`) — picamera2 issues #821, #787 — and
which must be released: with every buffer held, no frame completes. Faults: `unplug()` (frames stop, so captures time out; opening
finds no camera, IndexError as in picamera2), `set_busy()` (opening fails like a camera acquired
elsewhere), `stall(seconds)` (frames stop for a while: a frontend timeout). Only one instance
per camera may be open at a time, as with libcamera.

FakeV4l2(images) is the `backend` of V4l2Source: `open(device)` returns a `FakeVideoCapture`
with OpenCV's VideoCapture interface (isOpened, set, get, grab, retrieve, read, release) that
snaps the requested size to the nearest mode the fake webcam supports and reports each frame's
buffer timestamp as `CAP_PROP_POS_MSEC`. Its capture queue works as V4L2's does: the webcam
streams at its own rate into the free buffers (`CAP_PROP_BUFFERSIZE`, OpenCV's default 4), a
frame arriving while every buffer is full is dropped, and `grab()` dequeues the oldest filled
buffer, so a reader slower than the camera gets frames that waited in the queue since its
previous read. The age of every frame handed out (retrieve time minus its exposure start) is
kept in `ages`, and `node(device)` reports the device node's state. Faults: `unplug()` (node gone, reads fail at once), `set_busy()` (open
fails), `stall(seconds)` (reads block `read_timeout_s`, then fail), `deny()` (node not
accessible).

Not emulated: exposure, white balance, noise, sensor modes and their fields of view, MJPEG decoding
cost, V4L2 controls other than size, rate, buffer count and FOURCC.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np

# picamera2's pixel formats: bytes per pixel and the memory order of R, G, B.
RGB_ORDERS = {"BGR888": (0, 1, 2), "RGB888": (2, 1, 0)}   # positions of R, G, B
YUV_FORMATS = ("YUV420",)
FORMATS = ("BGR888", "RGB888", "XBGR8888", "YUV420")


def _load(images) -> list[np.ndarray]:
    if isinstance(images, (str, Path)):
        from edged.sources.camera.images import decode_image, list_images

        return [decode_image(p) for p in list_images(Path(images))]
    out = [np.ascontiguousarray(i, dtype=np.uint8) for i in images]
    if not out:
        raise ValueError("a fake camera needs at least one image")
    return out


def _default_images() -> Path:
    from edged.config import _samples_dir

    return _samples_dir() / "images"


class _Scene:
    """The images in front of the fake camera, cropped to an aspect ratio and scaled, cached."""

    def __init__(self, images) -> None:
        self.images = _load(images if images is not None else _default_images())
        self._cache: dict[tuple, np.ndarray] = {}

    def view(self, index: int, fov: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Image `index` cropped (centred) to the aspect ratio of `fov` and scaled to `size`, RGB."""
        key = (index % len(self.images), fov, size)
        got = self._cache.get(key)
        if got is None:
            from PIL import Image

            img = self.images[key[0]]
            h, w = img.shape[:2]
            aspect = fov[0] / fov[1]
            if w / h > aspect:
                cw, ch = round(h * aspect), h
            else:
                cw, ch = w, round(w / aspect)
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            crop = Image.fromarray(img[y0:y0 + ch, x0:x0 + cw])
            got = np.asarray(crop.resize(size, Image.BILINEAR))
            self._cache[key] = got
        return got


def rgb_to_yuv420(rgb: np.ndarray, colour_space: str = "smpte170m", stride: int | None = None,
                  pad_value: int = 0x55) -> np.ndarray:
    """What an ISP writes for a YUV420 stream: planar Y, U, V, 2x2-averaged chroma, limited range
    (BT.601 for SMPTE170M, BT.709 for Rec709), rows `stride` bytes wide, as (h * 3 / 2, stride)."""
    h, w = rgb.shape[:2]
    stride = stride or w
    if "709" in colour_space.lower():
        m = np.array([[0.2126, 0.7152, 0.0722], [-0.1146, -0.3854, 0.5], [0.5, -0.4542, -0.0458]])
    else:
        m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    x = rgb.astype(np.float64) / 255.0
    yuv = x @ m.T
    y = 16 + 219 * yuv[..., 0]
    cb = 128 + 224 * yuv[..., 1]
    cr = 128 + 224 * yuv[..., 2]
    # chroma sited between the four luma samples it covers: their mean
    cb = cb.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    cr = cr.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    out = np.full(h * 3 // 2 * stride, pad_value, np.uint8)
    plane_y = out[:h * stride].reshape(h, stride)
    plane_y[:, :w] = np.clip(np.rint(y), 0, 255)
    c = (h // 2) * (stride // 2)
    u = out[h * stride:h * stride + c].reshape(h // 2, stride // 2)
    v = out[h * stride + c:h * stride + 2 * c].reshape(h // 2, stride // 2)
    u[:, :w // 2] = np.clip(np.rint(cb), 0, 255)
    v[:, :w // 2] = np.clip(np.rint(cr), 0, 255)
    return out.reshape(h * 3 // 2, stride)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


class _Faults:
    """Device state shared by a fake camera and everything opened from it."""

    def __init__(self) -> None:
        self.plugged = True
        self.busy = False
        self.denied = False
        self.stalled_until = 0.0
        self.lock = threading.Lock()

    def frames_flow(self) -> bool:
        return self.plugged and time.monotonic() >= self.stalled_until


class _FakeDevice:
    """What both fake cameras are: a scene shown `hold` frames per image, frames delivered
    `delay_s` after their exposure began, and the faults a test can switch on and off."""

    def __init__(self, images, hold: int, delay_s: float) -> None:
        self.scene = _Scene(images)
        self.hold = max(1, hold)
        self.delay_s = delay_s
        self.faults = _Faults()

    def unplug(self) -> None:
        self.faults.plugged = False

    def plug(self) -> None:
        self.faults.plugged = True

    def set_busy(self, busy: bool = True) -> None:
        self.faults.busy = busy

    def stall(self, seconds: float) -> None:
        self.faults.stalled_until = time.monotonic() + seconds


# --------------------------------------------------------------------------- picamera2

class FakePicamera2Factory(_FakeDevice):
    """Stands in for the `picamera2.Picamera2` class: `factory(camera_num)` opens a fake camera.
    A frame's exposure takes `exposure_s`, its readout starts then (SensorTimestamp) and it is
    delivered `delay_s` after that."""

    def __init__(self, images: str | Path | Sequence[np.ndarray] | None = None, *, platform: str = "VC4",
                 model: str = "imx708", hold: int = 1, delay_s: float = 0.0, exposure_s: float = 0.01) -> None:
        if platform not in ("VC4", "PISP"):
            raise ValueError(f"platform must be VC4 or PISP, got {platform!r}")
        super().__init__(images, hold, delay_s)
        self.exposure_s = exposure_s
        self.platform = SimpleNamespace(name=platform)  # like picamera2.platform.Platform.VC4
        self.model = model
        self.instances: list[FakePicamera2] = []
        self.open_instance: FakePicamera2 | None = None

    def global_camera_info(self) -> list[dict]:
        if not self.faults.plugged:
            return []
        return [{"Model": self.model, "Location": 2, "Rotation": 0, "Num": 0,
                 "Id": f"/base/soc/i2c0mux/i2c@1/{self.model}@1a"}]

    def __call__(self, camera_num: int = 0) -> "FakePicamera2":
        info = self.global_camera_info()
        info[camera_num]  # IndexError when there is no such camera, as in picamera2
        with self.faults.lock:
            if self.faults.busy or self.open_instance is not None:
                try:
                    raise RuntimeError("Failed to acquire camera: Device or resource busy")
                except RuntimeError as exc:
                    raise RuntimeError("Camera __init__ sequence did not complete.") from exc
            cam = FakePicamera2(self, camera_num)
            self.open_instance = cam
        self.instances.append(cam)
        return cam


class FakePicamera2:
    """One opened fake camera, with the picamera2 methods edged uses."""

    def __init__(self, factory: FakePicamera2Factory, camera_num: int) -> None:
        self._factory = factory
        self.camera_num = camera_num
        self.platform = factory.platform
        self.camera_config: dict = {}
        self.started = False
        self.is_open = True
        self.captures: dict[str, int] = {}
        self.outstanding = 0  # requests captured and not yet released
        self._t0 = 0.0
        self._period = 1 / 30
        self._last_frame = -1

    def create_video_configuration(self, main=None, lores=None, raw=None, transform=None, colour_space=None,
                                   buffer_count=6, controls=None, display="main", encode="main", queue=True,
                                   sensor=None, use_case="video") -> dict:
        self._require_open()
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        main["size"] = (main["size"][0] - main["size"][0] % 2, main["size"][1] - main["size"][1] % 2)
        if lores is not None:
            lores = {"format": "YUV420", "size": main["size"], **lores}
            lores["size"] = (lores["size"][0] - lores["size"][0] % 2, lores["size"][1] - lores["size"][1] % 2)
        if colour_space is None:
            w, h = main["size"]
            colour_space = "SMPTE170M" if w < 1280 or h < 720 else "Rec709"
        return {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": main, "lores": lores, "raw": raw,
                "controls": {"FrameDurationLimits": (33333, 33333), **(controls or {})},
                "display": display, "encode": encode, "sensor": sensor}

    def configure(self, config: dict) -> None:
        self._require_open()
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        streams = {}
        for name in ("main", "lores"):
            s = config.get(name)
            if s is None:
                if name == "main":
                    raise RuntimeError("'main' key expected in camera configuration")
                continue
            fmt, (w, h) = s["format"], s["size"]
            if fmt not in FORMATS:
                raise RuntimeError(f"Bad format {fmt} in stream {name}")
            if w % 2 or h % 2:
                raise RuntimeError("width and height should be even")
            streams[name] = dict(s)
        if "lores" in streams:
            (mw, mh), (lw, lh) = streams["main"]["size"], streams["lores"]["size"]
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if self.platform.name == "VC4" and streams["lores"]["format"] not in YUV_FORMATS:
                raise RuntimeError("lores stream must be YUV")
        for s in streams.values():
            w = s["size"][0]
            s["stride"] = (_align(w, 64) if s["format"] in YUV_FORMATS
                           else _align(w * (4 if s["format"] == "XBGR8888" else 3), 32))
        self.camera_config = {**config, **streams}
        if "lores" not in streams:
            self.camera_config["lores"] = None
        self._period = config.get("controls", {}).get("FrameDurationLimits", (33333, 33333))[0] / 1e6

    def start(self) -> None:
        self._require_open()
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        self.started = True
        self._t0 = time.monotonic()
        self._last_frame = -1

    def capture_request(self, wait=None) -> "FakeCompletedRequest":
        """The next frame's request; the caller must `release()` it. With every buffer held by
        unreleased requests no frame can complete, and the wait times out, as with libcamera."""
        self._require_open()
        if not self.started:
            raise RuntimeError("fake picamera2: capture_request before start() would wait forever")
        timeout = None if wait is True or wait is None else float(wait)
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        faults = self._factory.faults
        while True:
            now = time.monotonic()
            if faults.frames_flow() and self.outstanding < self.camera_config.get("buffer_count", 6):
                frame = int((now - self._t0) / self._period)
                if frame > self._last_frame:
                    break
                wake = self._t0 + (self._last_frame + 1) * self._period
            else:
                wake = now + 0.01
            if now >= deadline:
                raise TimeoutError()
            time.sleep(max(0.0005, min(wake, deadline) - now))
        self._last_frame = frame
        self.outstanding += 1
        return FakeCompletedRequest(self, frame)

    def capture_array(self, name: str = "main", wait=None) -> np.ndarray:
        request = self.capture_request(wait)
        try:
            return request.make_array(name)
        finally:
            request.release()

    def _render(self, stream: dict, index: int) -> np.ndarray:
        main = self.camera_config["main"]["size"]
        fmt, size = stream["format"], tuple(stream["size"])
        rgb = self._factory.scene.view(index, main, size)
        if fmt == "YUV420":
            return rgb_to_yuv420(rgb, str(self.camera_config.get("colour_space", "")), stride=stream["stride"])
        if fmt == "XBGR8888":
            out = np.full(rgb.shape[:2] + (4,), 255, np.uint8)
            out[..., :3] = rgb
            return out
        return np.ascontiguousarray(rgb[..., list(RGB_ORDERS[fmt])])

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            self.started = False
            with self._factory.faults.lock:
                if self._factory.open_instance is self:
                    self._factory.open_instance = None

    def _require_open(self) -> None:
        if not self.is_open:
            raise RuntimeError("Camera not opened")


class FakeCompletedRequest:
    """picamera2's CompletedRequest for one frame: its arrays and its metadata.

    SensorTimestamp is when the frame's readout started, in nanoseconds on the monotonic clock
    (what picamera2 compares with `time.monotonic_ns()`): the frame's slot in the sensor's
    timing, less the factory's `delay_s` (readout and ISP time before the frame is delivered).
    Its exposure began ExposureTime (µs) before that: `exposed_at` is that instant."""

    def __init__(self, cam: FakePicamera2, frame: int) -> None:
        self._cam = cam
        self._frame = frame
        self._released = False

    def make_array(self, name: str) -> np.ndarray:
        cam = self._cam
        if self._released:
            raise RuntimeError("request used after release()")
        stream = cam.camera_config.get(name)
        if stream is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        cam.captures[name] = cam.captures.get(name, 0) + 1
        return cam._render(stream, self._frame // cam._factory.hold)

    @property
    def exposed_at(self) -> float:
        cam = self._cam
        return cam._t0 + self._frame * cam._period - cam._factory.delay_s - cam._factory.exposure_s

    def get_metadata(self) -> dict:
        cam = self._cam
        readout = cam._t0 + self._frame * cam._period - cam._factory.delay_s
        return {"SensorTimestamp": int(readout * 1e9), "ExposureTime": int(round(cam._factory.exposure_s * 1e6)),
                "FrameDuration": int(cam._period * 1e6)}

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._cam.outstanding -= 1


# --------------------------------------------------------------------------- V4L2

class FakeV4l2(_FakeDevice):
    """Stands in for OpenCV's V4L2 capture and the /dev/video* nodes: the `backend` of V4l2Source.
    `delay_s` is seen in each frame's buffer timestamp."""

    def __init__(self, images: str | Path | Sequence[np.ndarray] | None = None, *,
                 devices: Sequence[str] = ("/dev/video0",),
                 modes: Sequence[tuple[int, int]] = ((640, 480), (320, 240), (1280, 720)),
                 max_fps: float = 30.0, read_timeout_s: float = 1.0, hold: int = 1,
                 delay_s: float = 0.0, frame_rates: Sequence[float] | None = None) -> None:
        import cv2

        super().__init__(images, hold, delay_s)
        self.cv2 = cv2
        self.devices = set(devices)
        self.modes = [tuple(m) for m in modes]
        self.max_fps = max_fps
        # A webcam that offers only these rates (many UVC cameras: 30 and 15 fps) snaps a
        # requested rate to the nearest, as V4L2's S_PARM does; None: any rate up to max_fps.
        self.frame_rates = tuple(frame_rates) if frame_rates else None
        self.read_timeout_s = read_timeout_s
        self.captures: list[FakeVideoCapture] = []

    def deny(self, denied: bool = True) -> None:
        self.faults.denied = denied

    # the boundary
    def node(self, device: str) -> str | None:
        if device not in self.devices or not self.faults.plugged:
            return "unplugged"
        return "permission" if self.faults.denied else None

    def open(self, device: str) -> "FakeVideoCapture":
        cap = FakeVideoCapture(self, device)
        self.captures.append(cap)
        return cap


class FakeVideoCapture:
    """cv2.VideoCapture's interface over a fake webcam."""

    def __init__(self, owner: FakeV4l2, device: str) -> None:
        self._o = owner
        self.device = device
        f = owner.faults
        self._opened = device in owner.devices and f.plugged and not f.busy and not f.denied
        self._size = owner.modes[0]
        self._fps = owner.max_fps
        self.props: dict[int, float] = {}
        self._t0 = time.monotonic()
        self._next = 0              # the next frame slot the webcam has not streamed yet
        self._queue: list[int] = []  # filled buffers, oldest first (frame slots)
        self._grabbed: int | None = None
        self._stamp_ms = 0.0
        self.ages: list[float] = []  # retrieve time - exposure start of every frame handed out
        self.dropped = 0            # frames the webcam made while every buffer was full

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return self._opened

    def set(self, prop: int, value: float) -> bool:
        cv2 = self._o.cv2
        if not self._opened:
            return False
        self.props[prop] = value
        if prop == cv2.CAP_PROP_FRAME_WIDTH:
            self._size = self._nearest(int(value), self._size[1])
        elif prop == cv2.CAP_PROP_FRAME_HEIGHT:
            self._size = self._nearest(self._size[0], int(value))
        elif prop == cv2.CAP_PROP_FPS:
            if self._o.frame_rates:
                self._fps = min(self._o.frame_rates, key=lambda r: abs(r - float(value)))
            else:
                self._fps = min(float(value), self._o.max_fps) if value > 0 else self._o.max_fps
        elif prop not in (cv2.CAP_PROP_BUFFERSIZE, cv2.CAP_PROP_FOURCC):
            return False
        return True

    def _nearest(self, w: int, h: int) -> tuple[int, int]:
        # what V4L2 drivers do with S_FMT: the supported size closest to the one asked for
        return min(self._o.modes, key=lambda m: (abs(m[0] - w) + abs(m[1] - h), -m[0]))

    def get(self, prop: int) -> float:
        cv2 = self._o.cv2
        if prop == cv2.CAP_PROP_FRAME_WIDTH:
            return float(self._size[0])
        if prop == cv2.CAP_PROP_FRAME_HEIGHT:
            return float(self._size[1])
        if prop == cv2.CAP_PROP_FPS:
            return float(self._fps)
        if prop == cv2.CAP_PROP_POS_MSEC:
            # OpenCV's V4L2 backend: the last dequeued buffer's timestamp in ms (the driver's
            # CLOCK_MONOTONIC), 0 before the first frame.
            return self._stamp_ms
        return float(self.props.get(prop, 0.0))

    def _buffers(self) -> int:
        return max(1, int(self.props.get(self._o.cv2.CAP_PROP_BUFFERSIZE, 4)))

    def _stream(self) -> None:
        """Queue every frame the webcam has made since the last look, into the free buffers."""
        period = 1.0 / self._fps
        made = int((time.monotonic() - self._t0) / period)  # slots 0..made-1 are complete
        if made - self._next > 64:                          # long unread: only the newest can fit
            self.dropped += made - 64 - self._next
            self._next = made - 64
        for n in range(self._next, made):
            if len(self._queue) < self._buffers():
                self._queue.append(n)
            else:
                self.dropped += 1
        self._next = max(self._next, made)

    def grab(self) -> bool:
        o = self._o
        if not self._opened:
            return False
        if not o.faults.plugged:
            return False  # ENODEV at once
        if not o.faults.frames_flow():
            time.sleep(o.read_timeout_s)  # select() timeout
            return False
        self._stream()
        while not self._queue:       # wait for the next frame (VIDIOC_DQBUF blocks)
            period = 1.0 / self._fps
            time.sleep(max(0.0, self._t0 + (self._next + 1) * period - time.monotonic()) + 1e-4)
            self._stream()
        self._grabbed = self._queue.pop(0)  # its buffer goes back to the driver's queue
        self._stamp_ms = (self._t0 + (self._grabbed + 1) / self._fps - o.delay_s) * 1000.0
        return True

    def retrieve(self, image: np.ndarray | None = None, flag: int = 0):
        o = self._o
        if self._grabbed is None:
            return False, None
        n = self._grabbed
        self.ages.append(time.monotonic() - self._stamp_ms / 1000.0)
        rgb = o.scene.view(n // o.hold, self._size, self._size)
        bgr = rgb[..., ::-1]
        if image is not None and image.shape == bgr.shape and image.dtype == np.uint8:
            image[...] = bgr
            return True, image
        return True, np.ascontiguousarray(bgr)

    def read(self, image: np.ndarray | None = None):
        if not self.grab():
            return False, None
        return self.retrieve(image)

    def release(self) -> None:
        self._opened = False
