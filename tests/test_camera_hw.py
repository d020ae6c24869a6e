"""Live camera sources (picamera2, V4L2) through the fakes in edged.fakes.camera.

The fakes follow picamera2's and V4L2's rules (stream formats and layouts, size limits, one
open per camera, nearest supported webcam mode) and fail like the devices do; the sources above
them are the production code.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from conftest import SAMPLES
from edged import config
from edged.sources.camera import (CameraError, Picamera2Source, ReplayCamera, V4l2Source, Yuv420ToRgb, lores_size,
                          open_camera)
from edged.fakes.camera import FakePicamera2Factory, FakeV4l2, rgb_to_yuv420

IMAGES = SAMPLES / "images"
FAST = {"backoff_min_s": 0.02, "backoff_max_s": 0.1}


def picam(factory, **kw) -> Picamera2Source:
    args = {"size": (128, 96), "main_size": (640, 480), "fps": 50.0, "factory": factory,
            "capture_timeout_s": 0.2, **FAST, **kw}
    return Picamera2Source(**args)


def records(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


# -- sizes and colour -------------------------------------------------------------------------------

@pytest.mark.parametrize("model, main, letterbox, want", [
    ((128, 128), (640, 480), True, (128, 96)),     # face model: aspect kept, the stage only pads
    ((128, 128), (1280, 720), True, (128, 72)),
    ((300, 300), (640, 480), False, (300, 300)),   # person model: stretched, as its graph does
    ((300, 300), (320, 240), False, (300, 240)),   # never larger than main
    ((129, 129), (640, 480), True, (128, 96)),     # even sizes for YUV420
])
def test_lores_size(model, main, letterbox, want):
    assert lores_size(model, main, letterbox) == want


# Studio-range YCbCr of the primaries, from the BT.601 and BT.709 matrices (8 bit, limited range).
PRIMARIES = {
    "smpte170m": {(235, 128, 128): (255, 255, 255), (16, 128, 128): (0, 0, 0), (81, 90, 240): (255, 0, 0),
                  (145, 54, 34): (0, 255, 0), (41, 240, 110): (0, 0, 255)},
    "rec709": {(235, 128, 128): (255, 255, 255), (63, 102, 240): (255, 0, 0), (173, 42, 26): (0, 255, 0),
               (32, 240, 118): (0, 0, 255)},
}


@pytest.mark.parametrize("space", sorted(PRIMARIES))
def test_yuv420_primaries_decode_to_rgb(space):
    conv = Yuv420ToRgb(4, 2, space)
    for (y, u, v), rgb in PRIMARIES[space].items():
        stride = 8  # padded rows, as the ISP writes them
        yuv = np.full((3, stride), 0x55, np.uint8)
        yuv[:2, :4] = y
        flat = yuv.reshape(-1)
        flat[16:18] = u  # U plane: 1 row of stride/2 bytes, 2 used
        flat[20:22] = v
        out = np.zeros((2, 4, 3), np.uint8)
        got = conv(yuv, out)
        assert got is out
        assert np.abs(out.astype(int) - rgb).max() <= 2, (space, (y, u, v), out[0, 0])


def test_yuv420_round_trip_on_a_photo_with_padded_stride():
    from edged.sources.camera import decode_image

    rgb = decode_image(IMAGES / "coffee.jpg")[:240, :320]
    for space in ("smpte170m", "rec709"):
        yuv = rgb_to_yuv420(rgb, space, stride=384)
        out = Yuv420ToRgb(320, 240, space)(yuv, np.empty_like(rgb))
        err = np.abs(out.astype(int) - rgb)
        # chroma is shared by 2x2 pixels, so edges blur in colour; flat areas come back exact
        assert err.mean() < 3.0 and np.median(err) <= 1, (space, err.mean())
    with pytest.raises(ValueError, match="does not hold"):
        Yuv420ToRgb(320, 240)(np.zeros((100, 320), np.uint8), np.empty_like(rgb))


# -- picamera2 ------------------------------------------------------------------------------------

def test_picamera2_asks_the_isp_for_lores_at_model_size_and_converts_yuv():
    f = FakePicamera2Factory(IMAGES)
    cam = picam(f)
    try:
        frames = [cam.read() for _ in range(3)]
        cfg = f.instances[0].camera_config
        assert cfg["lores"]["format"] == "YUV420" and tuple(cfg["lores"]["size"]) == (128, 96)
        assert cfg["lores"]["stride"] == 128 and cfg["main"]["format"] == "YUV420"
        assert cfg["controls"]["FrameDurationLimits"] == (20000, 20000)
        assert f.instances[0].captures == {"lores": 3}  # main is never captured
        for fr in frames:
            assert fr.image.shape == (96, 128, 3) and fr.image.dtype == np.uint8
        # what the camera "saw", scaled by the ISP: the colours must come back, not R and B swapped
        seen = [f.scene.view(i, (640, 480), (128, 96)) for i in range(len(f.scene.images))]
        for fr in frames:
            errs = [np.abs(fr.image.astype(int) - s).mean() for s in seen]
            assert min(errs) < 4.0, errs
            swapped = min(np.abs(fr.image[..., ::-1].astype(int) - s).mean() for s in seen)
            assert swapped > min(errs) + 5 or np.allclose(fr.image, fr.image[..., ::-1], atol=8)
        assert cam.snapshot() is None  # not asked for
    finally:
        cam.close()


def test_picamera2_on_pi5_gets_rgb_lores_and_snapshots_from_main():
    f = FakePicamera2Factory(IMAGES, platform="PISP")
    cam = picam(f, snapshots=True)
    try:
        fr = cam.read()
        cfg = f.instances[0].camera_config
        assert cfg["lores"]["format"] == "BGR888" and cfg["main"]["format"] == "BGR888"
        assert any(np.array_equal(fr.image, f.scene.view(i, (640, 480), (128, 96))) for i in range(5))
        snap = cam.snapshot()
        assert snap.shape == (480, 640, 3)
        assert any(np.array_equal(snap, f.scene.view(i, (640, 480), (640, 480))) for i in range(5))
    finally:
        cam.close()


def test_picamera2_on_vc4_refuses_rgb_lores_as_picamera2_does():
    f = FakePicamera2Factory(IMAGES)
    c = f(0)
    conf = c.create_video_configuration(main={"size": (640, 480)}, lores={"size": (128, 96), "format": "BGR888"})
    with pytest.raises(RuntimeError, match="lores stream must be YUV"):
        c.configure(conf)
    conf = c.create_video_configuration(main={"size": (320, 240)}, lores={"size": (640, 480)})
    with pytest.raises(RuntimeError, match="may not exceed main"):
        c.configure(conf)


def test_picamera2_paces_at_the_configured_rate():
    cam = picam(FakePicamera2Factory(IMAGES), fps=20.0)
    try:
        first = cam.read()
        for _ in range(5):
            last = cam.read()
        # Timed from the first frame's exposure, not from when its read returned (which a loaded
        # machine may delay by most of a period): five frames later comes no sooner than five
        # periods after it, by its own timestamp and by the clock.
        assert last.ts - first.ts >= 5 / 20 * 0.9
        assert time.time() - first.ts >= 5 / 20 * 0.9
        assert cam.frames == 6
    finally:
        cam.close()


def test_picamera2_frames_carry_the_sensor_timestamp_and_every_request_is_released():
    # The ISP delivers a frame 150 ms after its exposure began: the frame's ts says when it was
    # taken, not when it arrived.
    f = FakePicamera2Factory(IMAGES, delay_s=0.15)
    cam = picam(f, fps=20.0)
    try:
        for _ in range(10):  # more frames than the camera has buffers (6)
            asked = time.time()
            fr = cam.read()
            arrived = time.time()
            assert arrived - fr.ts >= 0.15, arrived - fr.ts
            # The newest frame when the read began: its exposure began at most a frame period
            # (0.05 s), the ISP delay and the 10 ms exposure before that, however late the read
            # returned on a loaded machine (ms for the clock conversion).
            assert fr.ts >= asked - (0.05 + 0.15 + 0.01) - 0.005, asked - fr.ts
        assert f.instances[0].outstanding == 0
        assert f.instances[0].captures == {"lores": 10}
    finally:
        cam.close()


def test_picamera2_ts_is_the_start_of_exposure_not_of_readout():
    # SensorTimestamp marks the start of readout, ExposureTime after the exposure began
    # (picamera2 #821, #787): a 300 ms exposure read out 50 ms before delivery was taken 350 ms
    # before it arrived.
    f = FakePicamera2Factory(IMAGES, delay_s=0.05, exposure_s=0.3)
    cam = picam(f, fps=20.0)
    try:
        for _ in range(4):
            asked = time.time()
            fr = cam.read()
            arrived = time.time()
            assert arrived - fr.ts >= 0.35, arrived - fr.ts
            assert fr.ts >= asked - (0.05 + 0.05 + 0.3) - 0.005, asked - fr.ts
    finally:
        cam.close()


def test_a_camera_clock_that_is_not_monotonic_is_said_once_and_frames_stamped_on_arrival(caplog):
    f = FakePicamera2Factory(IMAGES, delay_s=-3600.0)  # an hour "in the future": another clock
    cam = picam(f)
    try:
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            for _ in range(3):
                asked = time.time()
                fr = cam.read()
                assert asked - 0.005 <= fr.ts <= time.time() + 0.005, (asked, fr.ts)
        assert len(records(caplog, "camera timestamps are not on the monotonic clock")) == 1
    finally:
        cam.close()


def test_picamera2_timeouts_are_counted_logged_once_and_survived(caplog):
    f = FakePicamera2Factory(IMAGES)
    cam = picam(f)
    try:
        cam.read()
        f.stall(0.8)  # a frontend timeout: no frames for a while
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            fr = cam.read()
        assert fr is not None
        assert cam.error_counts["timeout"] >= 2 and cam.errors == sum(cam.error_counts.values())
        assert len(records(caplog, "camera timeout")) == 1
        assert "no frame within 0.2 s" in records(caplog, "camera timeout")[0].getMessage()
        assert len(records(caplog, "delivering frames again")) == 1
        assert cam.stats["reopens"] >= 1 and len(f.instances) == cam.opens
        assert all(not c.is_open for c in f.instances[:-1])  # each failed camera was closed
        assert cam.stats["errors_timeout"] == cam.error_counts["timeout"]
        # Recovered means re-armed: the next stall is logged again, and retried at the short delay.
        f.stall(0.3)
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            assert cam.read() is not None
        first, again = records(caplog, "camera timeout")
        assert first.fields["retry_s"] == again.fields["retry_s"] == FAST["backoff_min_s"]
    finally:
        cam.close()


def test_picamera2_unplugged_then_plugged_back(caplog):
    f = FakePicamera2Factory(IMAGES)
    cam = picam(f)
    try:
        cam.read()
        f.unplug()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("frame", cam.read()))
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            t.start()
            assert _wait(lambda: cam.error_counts["unplugged"] >= 3, 5)
            f.plug()
            t.join(5)
        assert result["frame"] is not None
        (line,) = records(caplog, "camera unplugged")
        assert "no camera detected" in line.getMessage() and "rpicam-hello --list-cameras" in line.getMessage()
        assert cam.error_counts["timeout"] >= 1  # how the unplug showed first: frames stopped
    finally:
        cam.close()


def read_in_thread(cam) -> tuple[threading.Thread, dict]:
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("frame", cam.read()))
    t.start()
    return t, result


def test_picamera2_busy_at_start_does_not_raise_and_recovers(caplog):
    f = FakePicamera2Factory(IMAGES)
    f.set_busy()
    with caplog.at_level(logging.INFO, logger="edged.camera"):
        cam = picam(f)  # the camera is opened by the first read, not here
        assert f.instances == [] and cam.errors == 0
        t, result = read_in_thread(cam)
        assert _wait(lambda: cam.error_counts["busy"] >= 2, 5)
        (line,) = records(caplog, "camera busy")
        assert "another program holds it" in line.getMessage()
        f.set_busy(False)
        t.join(5)
        assert result["frame"] is not None
    cam.close()


def test_a_new_source_waits_while_the_old_one_holds_the_camera():
    """What a reload does: the new pipeline's camera is built while the old one still runs."""
    f = FakePicamera2Factory(IMAGES)
    old = picam(f)
    assert old.read() is not None
    new = picam(f)
    assert new.errors == 0  # building it did not touch the camera
    t, result = read_in_thread(new)
    assert _wait(lambda: new.error_counts["busy"] >= 1, 5)  # libcamera: one process per camera
    old.close()
    t.join(5)
    assert result["frame"] is not None and new.stats["reopens"] == 0
    new.close()


def test_close_interrupts_a_read_waiting_for_a_missing_camera():
    f = FakePicamera2Factory(IMAGES)
    f.unplug()
    cam = picam(f, backoff_min_s=30.0, backoff_max_s=30.0, idle_s=0.05)
    idles = []
    cam.on_idle = lambda: idles.append(time.monotonic())
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("frame", cam.read()))
    t.start()
    # The supervisor hears from a source that waits on purpose (idle_s apart); waited for, not
    # assumed to have happened after a fixed time, which a loaded machine may not give.
    assert _wait(lambda: len(idles) >= 3, 10), idles
    assert t.is_alive() and "frame" not in result  # still waiting for the camera
    t0 = time.monotonic()
    cam.close()
    t.join(2)
    assert not t.is_alive() and result["frame"] is None and time.monotonic() - t0 < 1.0


def test_picamera2_not_installed_says_how_to_install():
    try:
        import picamera2  # noqa: F401
        pytest.skip("picamera2 is installed here")
    except ImportError:
        pass
    with pytest.raises(CameraError, match=r"sudo apt install python3-picamera2.*--system-site-packages"):
        Picamera2Source(size=(128, 96))


# -- V4L2 -----------------------------------------------------------------------------------------

def test_v4l2_negotiates_the_nearest_mode_and_delivers_rgb(caplog):
    backend = FakeV4l2(IMAGES)
    cv2 = backend.cv2
    cam = V4l2Source("0", width=1200, height=700, fps=25, fourcc="MJPG", backend=backend, **FAST)
    try:
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            frames = [cam.read() for _ in range(3)]
        (ready,) = records(caplog, "camera ready")
        assert ready.fields["size"] == "1280x720" and ready.fields["asked"] == "1200x700"
        cap = backend.captures[0]
        assert cap.device == "/dev/video0"
        assert cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1 and cap.props[cv2.CAP_PROP_FPS] == 25
        assert cap.props[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
        for fr in frames:
            assert fr.image.shape == (720, 1280, 3)
            assert any(np.array_equal(fr.image, backend.scene.view(i, (1280, 720), (1280, 720)))
                       for i in range(5))  # RGB, exactly what the webcam saw
        assert len({id(f.image) for f in frames}) == 3  # three frames held: three buffers, none overwritten
    finally:
        cam.close()


def test_v4l2_frames_carry_the_buffer_timestamp():
    backend = FakeV4l2(IMAGES, delay_s=0.2)
    cam = V4l2Source("0", width=320, height=240, fps=25, backend=backend, **FAST)
    try:
        for _ in range(3):
            fr = cam.read()
            assert 0.2 <= time.time() - fr.ts < 0.2 + 0.04 + 0.5
    finally:
        cam.close()


@pytest.mark.parametrize("buffers", [1, 4])
def test_v4l2_frames_are_fresh_at_a_rate_far_below_the_cameras(buffers):
    # The webcam offers 30 fps only and streams into its queue whatever edged reads; edged wants
    # 4 fps. The
    # buffer refilled right after a read waits a whole edged period (250 ms) for the next one;
    # what edged hands on must be a frame taken within about one camera period, measured in the
    # fake as retrieve time minus exposure start.
    backend = FakeV4l2(IMAGES, frame_rates=(30.0,), delay_s=0.02)
    cam = V4l2Source("0", width=320, height=240, fps=4, backend=backend, **FAST)
    try:
        cap = None
        for _ in range(7):
            fr = cam.read()
            assert fr is not None
            if cap is None:
                cap = backend.captures[-1]
                cap.props[backend.cv2.CAP_PROP_BUFFERSIZE] = buffers  # a driver that keeps this many
        ages = np.array(cap.ages[1:])                          # after the first frame
        assert cap.dropped > 0                                 # the webcam did outrun edged
        assert np.median(ages) < 0.02 + 2 / 30, ages           # about one camera period at most
    finally:
        cam.close()


@pytest.mark.parametrize("fault, kind, text", [
    ("unplug", "unplugged", "/dev/video0 does not exist: is the webcam plugged in?"),
    ("stall", "timeout", "no frame (read timed out)"),
    ("set_busy", "busy", "busy with another program"),
    ("deny", "permission", "to the video group"),
])
def test_v4l2_faults_are_counted_logged_once_and_recovered(caplog, fault, kind, text):
    backend = FakeV4l2(IMAGES, read_timeout_s=0.05)
    cam = V4l2Source("/dev/video0", fps=50, backend=backend, **FAST)
    try:
        assert cam.read() is not None
        with caplog.at_level(logging.INFO, logger="edged.camera"):
            # Every fault lasts until it is cleared below, once it was seen twice: a fixed-length
            # stall could be over before a loaded machine starts the read.
            if fault == "stall":
                backend.stall(3600)
            else:
                getattr(backend, fault)()
                # busy and permission show at the next open: make the current capture fail first
                if fault in ("set_busy", "deny"):
                    backend.stall(3600)
            done = {}
            t = threading.Thread(target=lambda: done.setdefault("frame", cam.read()))
            t.start()
            assert _wait(lambda: cam.error_counts[kind] >= 2, 5), cam.error_counts
            backend.plug()
            backend.set_busy(False)
            backend.deny(False)
            backend.stall(0)
            t.join(5)
        assert done["frame"] is not None
        (line,) = records(caplog, f"camera {kind}")
        assert text in line.getMessage()
    finally:
        cam.close()


def test_v4l2_bad_fourcc_is_a_config_error():
    with pytest.raises(CameraError, match="camera.fourcc"):
        V4l2Source(fourcc="MJPEG", backend=FakeV4l2(IMAGES))


# -- selection from the config ----------------------------------------------------------------------

def test_open_camera_follows_the_config():
    cfg = config.parse('[camera]\nsource = "picamera2"\nfake = true\nwidth = 1280\nheight = 720\n')
    cam = open_camera(cfg.camera, model_size=(128, 128), letterbox=True)
    try:
        assert isinstance(cam, Picamera2Source) and cam.size == (128, 72) and cam.main_size == (1280, 720)
        assert cam.read().image.shape == (72, 128, 3)
    finally:
        cam.close()
    cfg = config.parse('[camera]\nsource = "v4l2"\nfake = true\ndevice = "2"\nwidth = 320\nheight = 240\n')
    cam = open_camera(cfg.camera)
    try:
        assert isinstance(cam, V4l2Source) and cam.device == "/dev/video2"
        assert cam.read().image.shape == (240, 320, 3)
    finally:
        cam.close()
    assert isinstance(open_camera(config.parse("").camera), ReplayCamera)
    bad = config.parse('[camera]\nsource = "picamera2"\nfake = true\ndevice = "/dev/video0"\n')
    with pytest.raises(CameraError, match="camera.device: picamera2 takes a camera number"):
        open_camera(bad.camera)


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()
