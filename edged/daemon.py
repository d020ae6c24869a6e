"""The daemon: wires sources → stages → outbox → MQTT link from the config, and supervises them.

Threads, one job each (data flows one way):
  camera   reads frames into a one-slot mailbox (frames are perishable: newest wins, skips counted)
  vision   takes the newest frame, detects, applies the publish policy, queues Detections
  imu      reads IMU bursts, feeds the motion stage, queues every MotionSignature
  writer   encodes queued results and commits them to the outbox in batches, wakes the link
  (paho)   the MQTT network thread, plus the link's drain thread
The main thread handles signals, publishes stats, and stops everything in order.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edged import __version__, codec
from edged.config import Config
from edged.log import Once, fields
from edged.outbox import Outbox
from edged.records import Detections, Frame

log = logging.getLogger("edged.daemon")

IMU_RAW_BYTES_PER_SAMPLE = 6 * 4  # six float32 channels, what sending raw samples would cost


@dataclass
class Counters:
    frames: int = 0
    frames_skipped: int = 0
    frames_failed: int = 0
    vision_ms_total: float = 0.0
    vision_runs: int = 0
    detections_queued: int = 0
    imu_samples: int = 0
    motion_windows: int = 0
    motion_ms_total: float = 0.0
    raw_bytes: int = 0
    started: float = field(default_factory=time.time)


class Mailbox:
    """A one-slot, newest-wins handoff from the camera thread to the vision thread."""

    def __init__(self) -> None:
        self._item: Frame | None = None
        self._cond = threading.Condition()
        self.replaced = 0

    def put(self, item: Frame) -> None:
        with self._cond:
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def take(self, timeout: float) -> Frame | None:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item


class DetectionPolicy:
    """Publish when what is seen changes (the multiset of labels), and every `heartbeat_s` while
    something stays in view; one empty message when the view clears, then silence."""

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self._last_key: tuple[str, ...] | None = None
        self._last_pub = 0.0

    def should_publish(self, d: Detections) -> bool:
        key = tuple(sorted(o.label for o in d.objects))
        if key != self._last_key or (key and d.ts - self._last_pub >= self.heartbeat_s):
            self._last_key = key
            self._last_pub = d.ts
            return True
        return False


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.exit_code = 0
        self.counters = Counters()
        self.mailbox = Mailbox()
        self.results: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._once = Once(log)
        self.camera = self.imu = self.vision = self.motion = None
        self.outbox: Outbox | None = None
        self.link = None

    # -- set-up -------------------------------------------------------------------------------

    def open(self) -> None:
        """Open models, sources and the outbox; errors here are the user's to fix (exit 2)."""
        from edged.models import default_models_dir, load_manifest, open_model

        cfg = self.cfg
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        if cfg.camera.enabled:
            from edged.camera import ReplayCamera
            from edged.vision import VisionStage

            entry = _entry(manifest, cfg.vision.model, "vision", "vision.model")
            model = open_model(entry, threads=cfg.vision.threads or None)
            self.vision = VisionStage(model, entry, score_threshold=cfg.vision.score_threshold or None)
            self.camera = ReplayCamera(cfg.camera.path, fps=cfg.camera.fps, loop=cfg.camera.loop)
            log.info("vision ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                  backend=model.backend, camera=self.camera.name))
        if cfg.imu.enabled:
            from edged.imu.replay import ReplayImu
            from edged.motion import MotionStage

            entry = _entry(manifest, cfg.motion.model, "motion", "motion.model")
            model = open_model(entry, threads=cfg.motion.threads or None)
            self.motion = MotionStage(model, entry)
            self.imu = ReplayImu(cfg.imu.path, speed=cfg.imu.speed, loop=cfg.imu.loop)
            log.info("motion ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                  backend=model.backend, imu=self.imu.chip_name))
        self.outbox = Outbox(cfg.outbox_path, max_bytes=cfg.outbox.max_bytes,
                             synchronous=cfg.outbox.synchronous)
        log.info("outbox ready", extra=fields(path=str(self.outbox.path), spooled=self.outbox.depth,
                                              last_seq=self.outbox.last_seq))

    # -- running ------------------------------------------------------------------------------

    def run(self) -> int:
        from edged.link import Link

        cfg = self.cfg
        log.info("starting", extra=fields(version=__version__, device_id=cfg.device_id,
                                          config=cfg.source_path))
        self.link = Link(cfg, self.outbox)
        self.link.start()
        self._spawn("writer", self._writer_loop)
        if self.camera:
            self._spawn("camera", self._camera_loop)
            self._spawn("vision", self._vision_loop)
        if self.imu:
            self._spawn("imu", self._imu_loop)
        self._install_signals()
        next_stats = time.monotonic() + min(5.0, cfg.stats.interval_s)
        while not self.stop_event.wait(0.25):
            if time.monotonic() >= next_stats:
                self.publish_stats()
                next_stats = time.monotonic() + cfg.stats.interval_s
        self._shutdown()
        return self.exit_code

    def _spawn(self, name: str, target) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception:  # a dead pipeline thread must stop the daemon, loudly
                log.exception("thread failed; stopping", extra=fields(thread=name))
                self.exit_code = 1
                self.stop_event.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: self.stop(f"signal {signal.Signals(s).name}"))

    def stop(self, reason: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping", extra=fields(reason=reason))
        self.stop_event.set()

    def _shutdown(self) -> None:
        for src in (self.camera, self.imu):
            if src:
                src.close()
        for t in self._threads:
            if t.name != "writer":
                t.join(0.5)
        self.results.put(None)  # writer: flush what is queued, then exit
        for t in self._threads:
            if t.name == "writer":
                t.join(1.0)
        if self.link:
            self.link.stop(timeout=0.5)
        if self.outbox:
            self.outbox.close()
        log.info("stopped", extra=fields(exit_code=self.exit_code))

    # -- pipeline threads ---------------------------------------------------------------------

    def _camera_loop(self) -> None:
        c = self.counters
        while not self.stop_event.is_set():
            frame = self.camera.read()
            if frame is None:
                if not self.stop_event.is_set():
                    log.info("camera replay finished")
                return
            c.raw_bytes += frame.image.nbytes
            self.mailbox.put(frame)

    def _vision_loop(self) -> None:
        c = self.counters
        policy = DetectionPolicy(self.cfg.vision.heartbeat_s)
        while not self.stop_event.is_set():
            frame = self.mailbox.take(0.25)
            if frame is None:
                continue
            t0 = time.perf_counter()
            try:
                objects = self.vision.detect(frame.image)
            except ValueError as exc:  # a frame the stage cannot use: count, say once, skip
                c.frames_failed += 1
                self._once("bad-frame", f"frame skipped: {exc}")
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            c.frames += 1
            c.vision_runs += 1
            c.vision_ms_total += ms
            c.frames_skipped = self.mailbox.replaced
            det = Detections(frame.ts, objects, ms)
            if policy.should_publish(det):
                c.detections_queued += 1
                self.results.put(("detections", det))

    def _imu_loop(self) -> None:
        c = self.counters
        while not self.stop_event.is_set():
            batch = self.imu.read(0.5)
            if batch is None:
                if self.stop_event.is_set():
                    return
                continue
            if not len(batch):
                continue
            c.imu_samples += len(batch)
            c.raw_bytes += len(batch) * IMU_RAW_BYTES_PER_SAMPLE
            for sig in self.motion.push(batch):
                c.motion_windows += 1
                c.motion_ms_total += sig.inference_ms
                self.results.put(("motion", sig))

    def _writer_loop(self) -> None:
        device = self.cfg.device_id
        encoders = {"detections": codec.detections, "motion": codec.motion}
        topics = {leaf: self.cfg.topic(leaf) for leaf in encoders}
        done = False
        while not done:
            item = self.results.get()
            batch = []
            while True:
                if item is None:
                    done = True
                else:
                    leaf, rec = item
                    enc = encoders[leaf]
                    batch.append((topics[leaf], lambda seq, enc=enc, rec=rec: enc(rec, device, seq)))
                if done or len(batch) >= 256:
                    break
                try:
                    item = self.results.get(timeout=0.02)  # gather a batch: one fsync per batch
                except queue.Empty:
                    break
            if batch:
                self.outbox.append(batch)
                self.link.wake()

    # -- stats ---------------------------------------------------------------------------------

    def stats_values(self) -> dict:
        c = self.counters
        ob = self.outbox
        link = self.link
        up = time.time() - c.started
        return {
            "ts": round(time.time(), 3),
            "uptime_s": round(up, 1),
            "fps": round(c.frames / up, 2) if up > 0 else 0.0,
            "inference_ms": round(c.vision_ms_total / c.vision_runs, 2) if c.vision_runs else None,
            "frames": c.frames,
            "skipped_frames": c.frames_skipped,
            "failed_frames": c.frames_failed,
            "motion_windows": c.motion_windows,
            "motion_inference_ms": round(c.motion_ms_total / c.motion_windows, 2) if c.motion_windows else None,
            "imu_samples": c.imu_samples,
            "outbox_depth": ob.depth,
            "outbox_bytes": ob.size_bytes,
            "dropped": ob.dropped,
            "published": link.published if link else 0,
            "bytes_sent": link.bytes_sent if link else 0,
            "raw_bytes": c.raw_bytes,
            "pid": os.getpid(),
        }

    def publish_stats(self) -> None:
        values = self.stats_values()
        self.link.publish_now("stats", codec.stats(values, self.cfg.device_id))
        log.debug("stats", extra={"fields": values})


def _entry(manifest: dict, name: str, task: str, key: str):
    from edged.models import ModelError

    entry = manifest.get(name)
    if entry is None:
        raise ModelError(f"{key}: no model named {name!r} in the manifest (have: {', '.join(sorted(manifest))})")
    if entry.task != task:
        raise ModelError(f"{key}: model {name!r} is a {entry.task} model, not a {task} model")
    return entry
