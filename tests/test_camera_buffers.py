"""Camera frame buffers (edged.sources.camera.buffers) through the real pipeline: a frame the
vision stage is detecting is never written by the camera, however slow the detection, and the
buffers stay few over many frames.

The camera is the fake V4L2 webcam (edged.fakes.camera) under the production V4l2Source, showing
a different picture in every frame; the vision stage is the shipped face model, slowed down by
waiting (on a condition, not a time) until the camera has read several more frames.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from conftest import SAMPLES, daemon_for, wait_until
from edged import config
from edged.models import load_manifest, open_model
from edged.fakes.camera import FakeV4l2
from edged.service.pipeline import Mailbox, Pipeline
from edged.sources.camera import V4l2Source
from edged.sources.camera.buffers import BUFFERS_MAX
from edged.stages.vision import VisionStage
from edged.sources.camera.images import decode_image, list_images

REPO = SAMPLES.parent
FAST = {"backoff_min_s": 0.02, "backoff_max_s": 0.1}
SIZE = (640, 480)


def webcam() -> tuple[FakeV4l2, list[np.ndarray]]:
    """A fake webcam showing ten different pictures in turn, and the frames it shows (RGB)."""
    photos = [decode_image(p) for p in list_images(SAMPLES / "images")]
    backend = FakeV4l2(photos + [p[:, ::-1] for p in photos], max_fps=30.0)
    views = [backend.scene.view(i, SIZE, SIZE) for i in range(2 * len(photos))]
    assert len({v.tobytes() for v in views}) == len(views)
    return backend, views


def seen_as(image: np.ndarray, views: list[np.ndarray]) -> int | None:
    return next((i for i, v in enumerate(views) if np.array_equal(image, v)), None)


class SlowDetection:
    """The face stage, taking as long as the camera needs to read `behind` more frames; records
    for every frame whether its pixels were a whole frame the webcam showed when detection began
    and were still exactly those when it ended."""

    def __init__(self, stage: VisionStage, camera, views, behind: int, stop: threading.Event) -> None:
        self.stage, self.camera, self.views, self.behind, self.stop = stage, camera, views, behind, stop
        self.checked: list[tuple[int | None, bool]] = []

    def detect(self, image: np.ndarray):
        at_start = image.copy()
        start = self.camera.frames
        wait_until(lambda: self.camera.frames >= start + self.behind or self.stop.is_set(), timeout=60)
        objects = self.stage.detect(image)
        self.checked.append((seen_as(at_start, self.views), np.array_equal(image, at_start)))
        return objects


def test_a_slow_detection_sees_every_frame_intact_and_buffers_stay_few(tmp_path):
    cfg = config.parse(f'state_dir = "{tmp_path}"\n[camera]\nsource = "v4l2"\nfake = true\nfps = 30\n'
                       '[imu]\nenabled = false\n')
    backend, views = webcam()
    entry = load_manifest(REPO / "models")["face"]
    d = daemon_for(cfg)
    p = Pipeline(cfg)
    p.camera = V4l2Source("0", width=SIZE[0], height=SIZE[1], fps=30, backend=backend, **FAST)
    # Four frames read during each detection: a ring of three buffers overwrote the frame detected.
    slow = p.vision = SlowDetection(VisionStage(open_model(entry, threads=1), entry), p.camera, views,
                                    behind=4, stop=p.stop_event)
    p.start(d)
    try:
        assert wait_until(lambda: len(slow.checked) >= 8, timeout=120), "the vision stage saw too few frames"
        # A snapshot's hold keeps the newest frame's pixels while the camera reads on.
        held = p.newest_frame()
        pixels = held.image.copy()
        frames = p.camera.frames
        assert wait_until(lambda: p.camera.frames >= frames + 8 and p.last_frame is not held, timeout=60)
        assert np.array_equal(held.image, pixels)
        held.release()
        assert wait_until(lambda: len(slow.checked) >= 12, timeout=120)
    finally:
        p.stop(d)
    assert d.exit_code == 0
    for index, intact in slow.checked:
        assert index is not None, "a frame was torn before its detection began"
        assert intact, "the camera wrote into a frame while it was being detected"
    assert len({index for index, _ in slow.checked}) > 1  # the frames did differ
    assert d.counters.frames >= 12 and d.counters.frames_skipped >= 3 * 12
    # Buffers: filling, mailbox, detected, newest (+ the snapshot's hold), allocated once for
    # the whole run of some sixty frames, never the bound.
    stats = p.camera.stats
    assert p.camera.frames >= 50
    assert p.camera.buffers.allocations == stats["buffers"] <= 6 < BUFFERS_MAX
    assert stats["frames_dropped"] == 0


def test_with_every_buffer_in_use_the_waiting_frame_gives_its_back_and_then_frames_drop(caplog):
    backend, views = webcam()
    cam = V4l2Source("0", width=SIZE[0], height=SIZE[1], fps=30, backend=backend, **FAST)
    mailbox = Mailbox()
    cam.buffers.reclaim = mailbox.discard
    try:
        held = [cam.read() for _ in range(BUFFERS_MAX - 1)]  # a consumer that never lets go
        pixels = [f.image.copy() for f in held]
        mailbox.put(cam.read())  # the last buffer, waiting for a stage
        with caplog.at_level(logging.WARNING, logger="edged.camera"):
            newest = cam.read()  # the mailbox's frame is dropped for it: nothing in use is written
            assert mailbox.replaced == 1 and mailbox.take(0) is None
            assert seen_as(newest.image, views) is not None
            # Nothing left to give back: frames are dropped (counted) until a buffer is released.
            got = []
            reader = threading.Thread(target=lambda: got.append(cam.read()))
            reader.start()
            assert wait_until(lambda: cam.buffers.dropped >= 3, timeout=60)
            assert not got
            held[0].release()
            reader.join(60)
        assert got and got[0].image is held[0].image  # the buffer given back, reused
        assert all(np.array_equal(f.image, px) for f, px in zip(held[1:], pixels[1:]))
        assert cam.buffers.allocations == BUFFERS_MAX
        assert cam.stats["frames_dropped"] == cam.buffers.dropped >= 3
        warnings = [r for r in caplog.records if "frame buffers are in use" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        cam.close()


@pytest.mark.parametrize("released", [True, False])
def test_a_frame_held_twice_is_free_only_after_both_release(released):
    backend, _ = webcam()
    cam = V4l2Source("0", width=SIZE[0], height=SIZE[1], fps=30, backend=backend, **FAST)
    try:
        first = cam.read().hold()
        first.release()
        if released:
            first.release()
        second = cam.read()
        assert (second.image is first.image) == released
        second.release()
    finally:
        cam.close()


def test_a_reader_that_keeps_every_frame_gets_its_own_buffers_beyond_the_bound():
    # Not the daemon (it gives frames back): frames beyond the bound are not reused, not dropped.
    backend, views = webcam()
    cam = V4l2Source("0", width=SIZE[0], height=SIZE[1], fps=30, backend=backend, **FAST)
    try:
        frames = [cam.read() for _ in range(BUFFERS_MAX + 2)]
        pixels = [f.image.copy() for f in frames]
        cam.read().release()
        assert len({id(f.image) for f in frames}) == len(frames)
        assert all(np.array_equal(f.image, px) for f, px in zip(frames, pixels))
        assert cam.buffers.allocations == BUFFERS_MAX and cam.buffers.unpooled == 3
        assert cam.stats["frames_dropped"] == 0
    finally:
        cam.close()
