"""The pipeline: one config's sources and stages, and the threads that move data through them.

  camera   reads frames into a one-slot mailbox (frames are perishable: newest wins, skips counted)
  vision   takes the newest frame, detects, applies the publish policy, queues Detections
  imu      reads IMU bursts, feeds the motion stage, queues every MotionSignature

A `Pipeline` is built whole from a config (models loaded and verified, sources opened) and is
replaced whole on reload; the daemon (`edged.service.daemon`) owns what outlives it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edged.config import Config
from edged.records import Detections, Frame
from edged.service.log import fields

if TYPE_CHECKING:
    from edged.service.daemon import Daemon

log = logging.getLogger("edged.daemon")

IMU_RAW_BYTES_PER_SAMPLE = 6 * 4  # six float32 channels, what sending raw samples would cost


@dataclass
class Counters:
    frames: int = 0
    frames_skipped: int = 0
    frames_failed: int = 0
    vision_ms_total: float = 0.0
    vision_runs: int = 0
    imu_samples: int = 0
    imu_failed_batches: int = 0
    motion_windows: int = 0
    motion_ms_total: float = 0.0
    raw_bytes: int = 0
    published_before: int = 0   # acknowledged by links replaced on reload
    bytes_sent_before: int = 0
    rejected_before: int = 0
    samples_sent_before: int = 0
    sample_bytes_sent_before: int = 0
    samples_busy_before: int = 0
    started: float = field(default_factory=time.time)


class Mailbox:
    """A one-slot, newest-wins handoff from the camera thread to the vision thread. The frame in
    the slot is the mailbox's to release: when a newer one replaces it, or `discard` drops it."""

    def __init__(self) -> None:
        self._item: Frame | None = None
        self._cond = threading.Condition()
        self.replaced = 0

    def put(self, item: Frame) -> None:
        with self._cond:
            old, self._item = self._item, item
            if old is not None:
                self.replaced += 1
                old.release()
            self._cond.notify()

    def discard(self) -> bool:
        """Drop the waiting frame (its buffer is wanted back); False when there is none."""
        with self._cond:
            old, self._item = self._item, None
            if old is None:
                return False
            self.replaced += 1
            old.release()
            return True

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


class Pipeline:
    """The sources and stages built from one config, with their threads.

    On reload a new Pipeline is opened beside the running one (models loaded, sources opened);
    only when that succeeded is the old one stopped and the new one started, so a bad new model
    or a missing camera leaves the device running as it was.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.camera = self.imu = self.vision = self.motion = None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.mailbox = Mailbox()
        self.last_frame: Frame | None = None  # the newest published frame, for snapshots (held)
        self._last_lock = threading.Lock()
        self.imu_handed_over_from: Pipeline | None = None
        self.keep_imu_open = False  # set when a reload hands our IMU to the next pipeline

    @classmethod
    def open(cls, cfg: Config, *, running: "Pipeline | None" = None,
             overlay: dict | None = None) -> "Pipeline":
        """Open models and sources; errors here are the user's to fix.

        On reload, `running` is the pipeline in service: an IMU chip whose settings did not change
        is handed over rather than opened (and reconfigured) a second time while it is read.
        `overlay`: manifest entries that replace the shipped ones (installed releases)."""
        from edged.hardware import for_config
        from edged.models import default_models_dir, load_manifest, select
        from edged.tpu import open_for_backend

        from edged.tpu import TpuFaultRecord

        p = cls(cfg)
        hardware = for_config(cfg)
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        manifest.update(overlay or {})
        acc = cfg.accelerator
        loader = hardware.edgetpu_loader()
        faults = TpuFaultRecord.for_state_dir(cfg.state_dir) if acc.device != "cpu" else None
        try:
            if cfg.camera.enabled:
                from edged.sources.camera import open_camera
                from edged.stages.vision import VisionStage

                snapshots = bool(getattr(cfg, "commands", None) and cfg.commands.enabled and cfg.commands.snapshot)
                chain = cfg.vision.chain()
                if chain:
                    # Several stages: tiles and crops need the full frame, not the model's size.
                    from edged.stages.vision.graph import open_graph

                    p.vision = open_graph(chain, manifest, open_entry=lambda entry: open_for_backend(
                        entry, acc.device, acc.fallback, loader, retry_s=acc.retry_s,
                        threads=cfg.vision.threads or None, faults=faults))
                    p.camera = open_camera(cfg.camera, snapshots=snapshots, hardware=hardware)
                    model = p.vision.model
                    log.info("vision ready", extra=fields(model=",".join(s.model for s in chain),
                                                          runtime=model.runtime, backend=model.backend,
                                                          camera=p.camera.name))
                else:
                    entry = select(manifest, cfg.vision.model, "vision", "vision.model")
                    model = open_for_backend(entry, acc.device, acc.fallback, loader, retry_s=acc.retry_s,
                                             threads=cfg.vision.threads or None, faults=faults)
                    p.vision = VisionStage(model, entry, score_threshold=cfg.vision.score_threshold or None)
                    pre = p.vision.preprocess
                    # A live camera is asked for frames at the model's input size (the ISP scales).
                    p.camera = open_camera(cfg.camera, model_size=(pre.width, pre.height),
                                           letterbox=pre.letterbox, snapshots=snapshots, hardware=hardware)
                    log.info("vision ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                          backend=model.backend, camera=p.camera.name))
            if cfg.imu.enabled:
                from edged.stages.motion import MotionStage, load_stage_centroids

                entry = select(manifest, cfg.motion.model, "motion", "motion.model")
                model = open_for_backend(entry, acc.device, acc.fallback, loader, retry_s=acc.retry_s,
                                         threads=cfg.motion.threads or None, faults=faults)
                p.motion = MotionStage(model, entry, mounting=cfg.motion.mounting,
                                       centroids=load_stage_centroids(entry.centroids or cfg.motion.centroids,
                                                                      entry))
                imu = cfg.imu
                if running is not None and running.imu is not None and imu.source != "replay" \
                        and running.cfg.imu == imu:
                    p.imu, p.imu_handed_over_from = running.imu, running
                elif imu.source == "replay":
                    from edged.sources.imu.replay import ReplayImu

                    p.imu = ReplayImu(imu.path, speed=imu.speed, loop=imu.loop)
                else:
                    from edged.sources.imu.position import ImuPosition
                    from edged.sources.imu.source import ImuSource

                    # At start (not on reload): the last process's position, to count the
                    # samples that went by while the daemon was down.
                    position = ImuPosition.for_state_dir(cfg.state_dir, after_restart=running is None)
                    p.imu = ImuSource(chip=imu.source, bus=imu.bus, address=imu.address or None,
                                      rate_hz=imu.rate_hz, accel_range_g=imu.accel_range_g,
                                      gyro_range_dps=imu.gyro_range_dps, lpf_hz=imu.lpf_hz or None,
                                      smbus_factory=hardware.smbus_factory(imu), position=position)
                log.info("motion ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                      backend=model.backend, imu=p.imu.chip_name,
                                                      fake_bus=imu.fake and imu.source != "replay"))
        except BaseException:
            p.close_sources()
            raise
        return p

    @property
    def backend(self) -> str:
        """Where inference runs: "edgetpu:usb" (or another Edge TPU) when a model is on one, "cpu",
        or "cpu-fallback" while a model that should be on the Edge TPU runs on the CPU."""
        models = self.models()
        for m in models:
            if getattr(m, "backend", "cpu").startswith("edgetpu"):
                return m.backend
        if any(getattr(m, "wants_tpu", False) for m in models):
            return "cpu-fallback"
        return "cpu"

    def start(self, d: "Daemon") -> None:
        wd = d.watchdog
        if self.camera:
            if hasattr(self.camera, "on_idle"):
                # A live camera that is down retries inside read(); it is alive, not stuck.
                self.camera.on_idle = lambda: d.watchdog.beat("camera")
            # A slow replay or camera must not look like a stall: allow a few frame periods.
            frame_deadline = max(wd.deadline_s, 3.0 / self.cfg.camera.fps)
            wd.register("camera", frame_deadline)
            wd.register("vision", frame_deadline)
            buffers = getattr(self.camera, "buffers", None)
            if buffers is not None:
                # All frame buffers in use: the frame waiting in the mailbox gives its back.
                buffers.reclaim = self.mailbox.discard
            self.threads.append(d.spawn("camera", lambda: self._camera_loop(d)))
            self.threads.append(d.spawn("vision", lambda: self._vision_loop(d)))
        if self.imu:
            # Sampling: the stage copies a window's raw samples only when the sampler wants them.
            self.motion.keep_window = lambda label, ts: d.sampler is not None and d.sampler.wants_window(label, ts)
            wd.register("imu")
            self.threads.append(d.spawn("imu", lambda: self._imu_loop(d)))

    def close_sources(self, *, restart: bool = False) -> None:
        """`restart`: the daemon exits with a status the service restarts it on."""
        if self.camera:
            self.camera.close()
        if self.imu and not self.keep_imu_open:
            self.imu.close(restart=restart)

    def models(self) -> list:
        """Every model the pipeline runs: each stage's of a vision graph, the motion stage's."""
        vision = getattr(self.vision, "models", None) or [getattr(self.vision, "model", None)]
        return [m for m in (*vision, getattr(self.motion, "model", None)) if m]

    def hung_tpu(self, timeout_s: float) -> tuple[str, float] | None:
        """(model, seconds) of an Edge TPU inference running longer than `timeout_s`, or None."""
        import time

        now = time.monotonic()
        for m in self.models():
            since = getattr(m, "invoking_since", None)
            if since is not None and now - since > timeout_s:
                return m.entry.name, now - since
        return None

    def stop(self, d: "Daemon", *, clean: bool = True) -> None:
        self.stop_event.set()
        self.close_sources(restart=d.exit_code != 0)
        for t in self.threads:
            t.join(0.5)
        for part in ("camera", "vision", "imu"):
            d.watchdog.unregister(part)
        if clean:
            for m in self.models():
                if hasattr(m, "close"):
                    m.close()

    def newest_frame(self) -> Frame | None:
        """The newest published frame, held for the caller, who must `release()` it; or None."""
        with self._last_lock:
            frame = self.last_frame
            return frame.hold() if frame is not None else None

    def _keep_last(self, frame: Frame) -> None:
        """`frame` becomes the newest (the vision thread hands over its hold); the one before
        it is released."""
        with self._last_lock:
            old, self.last_frame = self.last_frame, frame
        if old is not None:
            old.release()

    def _camera_loop(self, d: "Daemon") -> None:
        c = d.counters
        from edged.sources.camera import CameraError

        while not self.stop_event.is_set():
            try:
                frame = self.camera.read()
            except CameraError as exc:  # e.g. a replay with no usable image: the rest runs on
                log.error("camera stopped", extra=fields(error=str(exc)))
                d.watchdog.unregister("camera")
                return
            d.watchdog.beat("camera")
            if frame is None:
                if not self.stop_event.is_set():
                    log.info("camera replay finished")
                    d.watchdog.unregister("camera")
                return
            c.raw_bytes += frame.image.nbytes
            self.mailbox.put(frame)

    def _vision_loop(self, d: "Daemon") -> None:
        c = d.counters
        v = self.cfg.vision
        policy = DetectionPolicy(v.heartbeat_s) if v.publish in ("labels", "both") else None
        tracker = None
        if v.publish in ("events", "both"):
            from edged.stages.vision.tracks import Tracker

            tracker = Tracker(hold_s=v.hold_s, min_hits=v.min_hits, heartbeat_s=v.heartbeat_s)
        skipped_before = c.frames_skipped

        def publish(frame: Frame, objects: tuple, ms: float) -> None:
            c.frames += 1
            c.vision_runs += 1
            c.vision_ms_total += ms
            c.frames_skipped = skipped_before + self.mailbox.replaced
            sampler = d.sampler
            if sampler is not None:
                # At most one crop a frame: the first detection whose score is in the band
                # (copied at once: the frame's buffer goes back to the camera).
                o = next((o for o in objects if sampler.wants_crop(o, frame.ts)), None)
                if o is not None:
                    sampler.take_crop(frame.image, o, frame.ts, o.stage or v.model)
            self._keep_last(frame)
            det = Detections(frame.ts, objects, ms)
            if policy is not None and policy.should_publish(det):
                d.results.put(("detections", det))
                if tracker is None:
                    d.update_state(labels=sorted(o.label for o in objects))
            if tracker is not None:
                h, w = frame.image.shape[:2]  # a pose's angles need the frame's shape
                for event in tracker.update(frame.ts, objects, h / w):
                    d.results.put(("events", event))
                # What is in view, held over missed frames: presence does not flap.
                d.update_state(labels=sorted(t.label for t in tracker.live()))

        runner = None
        if hasattr(self.vision, "units"):  # a graph of stages
            from edged.stages.vision.overlap import FrameRunner

            # A frame is published as soon as its last invoke is decoded: with overlap that is
            # during the next frame's push, so a frame is held barely longer than without overlap.
            # A frame the runner drops (after an error, at a stop, or at close) gives its buffer
            # back. A stop abandons the frame in progress after the invoke running then.
            runner = FrameRunner(self.vision, overlap=v.overlap, on_done=publish, on_drop=Frame.release,
                                 stop=self.stop_event)
        try:
            while not self.stop_event.is_set():
                # A frame still finishing (its last invoke overlaps the next frame's first) is
                # finished at once when no next frame is waiting.
                frame = self.mailbox.take(0.0 if runner is not None and runner.pending else 0.25)
                d.watchdog.beat("vision")
                if frame is None:
                    if runner is not None and runner.pending:
                        runner.flush()
                    continue
                t0 = time.perf_counter()
                try:
                    if runner is not None:
                        runner.push(frame.image, frame)
                        continue
                    objects = self.vision.detect(frame.image)
                except ValueError as exc:  # a frame the stage cannot use: count, say once, skip
                    if frame is not self.last_frame:  # (the runner may have released it: a no-op)
                        frame.release()
                    c.frames_failed += 1
                    d.once("bad-frame", f"frame skipped: {exc}")
                    continue
                publish(frame, objects, (time.perf_counter() - t0) * 1000.0)
            if runner is not None:
                runner.flush()
        finally:
            if runner is not None:
                runner.close()

    def _imu_loop(self, d: "Daemon") -> None:
        c = d.counters
        while not self.stop_event.is_set():
            batch = self.imu.read(0.5)
            d.watchdog.beat("imu")
            if batch is None:
                if not self.stop_event.is_set():
                    log.info("IMU replay finished")
                    d.watchdog.unregister("imu")
                return
            if not len(batch):
                continue
            c.imu_samples += len(batch)
            c.raw_bytes += len(batch) * IMU_RAW_BYTES_PER_SAMPLE
            try:
                sigs = self.motion.push(batch)
            except ValueError as exc:  # samples the stage cannot use (e.g. too slow): say once, skip
                c.imu_failed_batches += 1
                d.once("bad-imu", f"IMU samples skipped: {exc}")
                continue
            sampler = d.sampler
            for sig in sigs:
                c.motion_windows += 1
                c.motion_ms_total += sig.inference_ms
                d.results.put(("motion", sig))
                if sig.window is not None and sampler is not None:
                    sampler.take_motion(sig, sig.window, self.cfg.motion.model)
                d.update_state(motion=(sig.label, sig.score))
