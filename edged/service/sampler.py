"""The sampler: decides which windows and detections to keep as samples (`[sampling]`), and
stores them in the sample queue (`edged.delivery.samples`) on a thread of its own.

The pipeline threads only ask `wants_window` / `wants_crop` (a few comparisons, the budget's
in-memory ledger) and hand over a copy of the samples or of the crop's pixels; encoding (the
JPEG, the payload) and the SQLite commit happen on the `sampler` thread, so neither inference
nor the results' writer ever waits on a sample. A request the sampler cannot take at once (it
is still busy with earlier ones) is dropped and counted: samples are the first thing to give
way.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import queue
import threading

import numpy as np

from edged.centroids import UNKNOWN
from edged.records import DetectedObject, ImuBatch, MotionSignature, Sample
from edged.service.log import Once, fields

log = logging.getLogger("edged.sampler")

PENDING = 4  # requests waiting for the sampler thread; beyond, dropped (samples_busy)


class Sampler:
    def __init__(self, cfg, samples, codec, *, on_stored=lambda: None) -> None:
        self.cfg = cfg.sampling
        self.device_id = cfg.device_id
        self.topic = cfg.topic("sample")
        self.queue = samples
        self.codec = codec
        self.on_stored = on_stored
        self.busy = 0          # requests dropped because the sampler thread was behind
        self._requests: queue.Queue = queue.Queue(maxsize=PENDING)
        self._last: dict[str, float] = {}
        self._once = Once(log)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- triggers (called on the pipeline threads) ---------------------------------------------------

    def _due(self, trigger: str, ts: float) -> bool:
        last = self._last.get(trigger)
        if last is not None and 0 <= ts - last < self.cfg.min_interval_s:
            return False
        return self.queue.room()

    def wants_window(self, label: str, ts: float) -> bool:
        """For the motion stage, before it copies a window's samples."""
        return self.cfg.motion_unknown and label == UNKNOWN and self._due("unknown", ts)

    def wants_crop(self, o: DetectedObject, ts: float) -> bool:
        c = self.cfg
        if not c.vision_max_score or not c.vision_min_score <= o.score < c.vision_max_score:
            return False
        if c.vision_labels and o.label not in c.vision_labels:
            return False
        return self._due("uncertain", ts)

    def take_motion(self, sig: MotionSignature, window: ImuBatch, model: str) -> None:
        """Keep `window` (the raw samples the stage made `sig` from; copied here)."""
        self._last["unknown"] = sig.ts
        t0 = float(window.t[0])
        rows = np.empty((len(window), 7), "<f4")
        rows[:, 0] = window.t - t0
        rows[:, 1:] = window.data
        self._put(Sample(ts=sig.ts, kind="imu", trigger="unknown", model=model, label=sig.label, score=sig.score,
                         data=rows.tobytes(), t0=t0, n=len(window), signature=sig.signature,
                         signature_v=sig.signature_v))

    def take_crop(self, image: np.ndarray, o: DetectedObject, ts: float, model: str) -> None:
        """Keep the part of `image` around `o` (copied here: the camera reuses its buffers)."""
        self._last["uncertain"] = ts
        h, w = image.shape[:2]
        if self.cfg.full_frame:
            region = (0.0, 0.0, 1.0, 1.0)
        else:
            x0, y0, x1, y1 = o.box
            mx, my = (x1 - x0) * self.cfg.crop_margin, (y1 - y0) * self.cfg.crop_margin
            region = (max(0.0, x0 - mx), max(0.0, y0 - my), min(1.0, x1 + mx), min(1.0, y1 + my))
        c0, r0 = int(region[0] * w), int(region[1] * h)
        c1, r1 = max(c0 + 1, int(np.ceil(region[2] * w))), max(r0 + 1, int(np.ceil(region[3] * h)))
        pixels = image[r0:r1, c0:c1].copy()
        region = (c0 / w, r0 / h, c1 / w, r1 / h)
        self._put((pixels, Sample(ts=ts, kind="crop", trigger="uncertain", model=model, label=o.label,
                                  score=o.score, data=b"", box=tuple(o.box), region=region)))

    def _put(self, item) -> None:
        try:
            self._requests.put_nowait(item)
        except queue.Full:
            self.busy += 1

    # -- the sampler thread ---------------------------------------------------------------------------

    def start(self, spawn) -> None:
        self._thread = spawn("sampler", self._loop)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self._store(item)
            except Exception as exc:  # a sample is never worth the daemon
                self._once("failed", "sample not taken", level=logging.WARNING,
                           error=f"{type(exc).__name__}: {exc}")

    def _store(self, item) -> None:
        if isinstance(item, tuple):
            pixels, sample = item
            # Room for the payload's other fields; JSON carries the JPEG as base64 (4 bytes per 3).
            room = self.cfg.max_sample_bytes - 1024
            jpeg, width, height = _jpeg(pixels, room if self.codec.packed else room * 3 // 4)
            sample = dataclasses.replace(sample, data=jpeg, width=width, height=height)
        else:
            sample = item
        got = self.queue.offer(self.topic, lambda sid: self.codec.sample(sample, self.device_id, sid))
        if got is not None:
            log.info("sample taken", extra=fields(kind=sample.kind, trigger=sample.trigger, id=got,
                                                  label=sample.label, score=round(sample.score, 3)))
            self.on_stored()

    def stats(self) -> dict[str, int]:
        return {**self.queue.stats(), "samples_busy": self.busy}


def _jpeg(pixels: np.ndarray, max_bytes: int) -> tuple[bytes, int, int]:
    """A JPEG of an RGB crop within `max_bytes` (lower quality, then half the size, until it fits)."""
    from PIL import Image

    im = Image.fromarray(pixels)
    while True:
        for quality in (85, 70, 55):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            if buf.tell() <= max_bytes:
                return buf.getvalue(), im.width, im.height
        if min(im.size) <= 16:
            raise ValueError(f"a crop does not fit in {max_bytes} bytes as JPEG")
        im = im.resize((max(1, im.width // 2), max(1, im.height // 2)))
