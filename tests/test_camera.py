"""Replay camera sources on the shipped sample photos: folders, single images, video files."""

import logging
import shutil
import sys
import time

import numpy as np
import pytest

from conftest import SAMPLES
from edged.sources.camera import CameraError, ReplayCamera, VideoReplay, decode_image, open_replay

IMAGES = sorted((SAMPLES / "images").glob("*.jpg"))


def test_folder_replays_in_name_order_and_loops():
    cam = ReplayCamera(SAMPLES / "images", fps=200)
    shapes = [cam.read().image.shape for _ in range(len(IMAGES) + 2)]
    expected = [decode_image(p).shape for p in IMAGES]
    assert shapes == expected + expected[:2]
    assert cam.frames == len(IMAGES) + 2


def test_paced_at_the_configured_rate():
    # Timed from before the camera exists: frame k is released no earlier than (k - 1) periods
    # after the first, however late the first read itself returned (a loaded machine may delay
    # the first decode by more than a period, after which the next frame is due at once).
    t0 = time.monotonic()
    cam = ReplayCamera(SAMPLES / "images" / "coffee.jpg", fps=20)
    for _ in range(7):
        frame = cam.read()
    elapsed = time.monotonic() - t0
    assert elapsed >= 6 / 20  # never faster than asked
    assert frame.image.dtype == np.uint8 and frame.image.shape == (400, 600, 3)
    assert abs(frame.ts - time.time()) < 1.0


def test_no_loop_ends_and_close_interrupts():
    cam = ReplayCamera(SAMPLES / "images" / "coffee.jpg", fps=100, loop=False)
    assert cam.read() is not None
    assert cam.read() is None
    slow = ReplayCamera(SAMPLES / "images", fps=0.1)
    slow.read()
    slow.close()
    t0 = time.monotonic()
    assert slow.read() is None
    assert time.monotonic() - t0 < 1.0


def test_undecodable_file_is_counted_logged_once_and_skipped(tmp_path, caplog):
    shutil.copy(IMAGES[0], tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    cam = ReplayCamera(tmp_path, fps=500)
    with caplog.at_level(logging.WARNING, logger="edged.camera"):
        frames = [cam.read() for _ in range(5)]
    assert all(f is not None and f.image.shape == (512, 512, 3) for f in frames)
    assert cam.errors == 1  # counted once: a file that cannot be decoded is not read again
    assert len([r for r in caplog.records if "cannot decode image" in r.getMessage()]) == 1


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CameraError, match="folder holds no images"):
        ReplayCamera(tmp_path)
    with pytest.raises(CameraError, match="no such image file or folder"):
        ReplayCamera(tmp_path / "missing")


@pytest.fixture
def video(tmp_path):
    import cv2  # opencv-python-headless: in the test extra
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (512, 512))
    frames = [decode_image(SAMPLES / "images" / n) for n in ("astronaut.jpg", "camera.jpg")]
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path, frames


def test_video_file_replays_rgb_frames_and_loops(video):
    path, originals = video
    cam = open_replay(path, fps=200)
    assert isinstance(cam, VideoReplay)
    got = [cam.read().image.copy() for _ in range(5)]
    for i, img in enumerate(got):
        want = originals[i % 2]
        assert img.shape == want.shape
        # MJPEG is lossy; a BGR/RGB mix-up or a wrong frame would be far off.
        assert np.abs(img.astype(int) - want).mean() < 6
    assert cam.frames == 5


def test_video_frames_reuse_released_buffers_and_never_one_in_use(video):
    cam = VideoReplay(video[0], fps=500)
    held = [cam.read() for _ in range(3)]  # not released: three buffers, none written twice
    pixels = [f.image.copy() for f in held]
    assert len({id(f.image) for f in held}) == 3
    for _ in range(20):  # released at once: one more buffer, reused for every frame
        f = cam.read()
        f.release()
    assert all(np.array_equal(f.image, p) for f, p in zip(held, pixels))
    assert cam.buffers.allocations == 4 and cam.stats["buffers"] == 4
    for f in held:
        f.release()
    ids = set()
    for _ in range(8):
        f = cam.read()
        ids.add(id(f.image))
        f.release()
    assert cam.buffers.allocations == 4 and len(ids) == 1


def test_video_without_opencv_says_what_to_install(video, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(CameraError, match="pip install opencv-python-headless"):
        VideoReplay(video[0])


def test_unreadable_video(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(CameraError, match="cannot open video|no decodable frame"):
        open_replay(bad)
