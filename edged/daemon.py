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
from edged.notify import Notifier, ProgressWatchdog
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
    published_before: int = 0   # acknowledged by links replaced on reload
    bytes_sent_before: int = 0
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

    @classmethod
    def open(cls, cfg: Config) -> "Pipeline":
        """Open models and sources; errors here are the user's to fix."""
        from edged.models import default_models_dir, load_manifest, open_model

        p = cls(cfg)
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        try:
            if cfg.camera.enabled:
                from edged.camera import open_replay
                from edged.vision import VisionStage

                entry = _entry(manifest, cfg.vision.model, "vision", "vision.model")
                model = open_model(entry, threads=cfg.vision.threads or None)
                p.vision = VisionStage(model, entry, score_threshold=cfg.vision.score_threshold or None)
                p.camera = open_replay(cfg.camera.path, fps=cfg.camera.fps, loop=cfg.camera.loop)
                log.info("vision ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                      backend=model.backend, camera=p.camera.name))
            if cfg.imu.enabled:
                from edged.imu.replay import ReplayImu
                from edged.motion import MotionStage

                entry = _entry(manifest, cfg.motion.model, "motion", "motion.model")
                model = open_model(entry, threads=cfg.motion.threads or None)
                p.motion = MotionStage(model, entry)
                p.imu = ReplayImu(cfg.imu.path, speed=cfg.imu.speed, loop=cfg.imu.loop)
                log.info("motion ready", extra=fields(model=entry.name, runtime=model.runtime,
                                                      backend=model.backend, imu=p.imu.chip_name))
        except BaseException:
            p.close_sources()
            raise
        return p

    @property
    def backend(self) -> str:
        model = getattr(self.vision, "model", None) or getattr(self.motion, "model", None)
        return getattr(model, "backend", "cpu")

    def start(self, d: "Daemon") -> None:
        wd = d.watchdog
        if self.camera:
            # A slow replay or camera must not look like a stall: allow a few frame periods.
            frame_deadline = max(wd.deadline_s, 3.0 / self.cfg.camera.fps)
            wd.register("camera", frame_deadline)
            wd.register("vision", frame_deadline)
            self.threads.append(d.spawn("camera", lambda: self._camera_loop(d)))
            self.threads.append(d.spawn("vision", lambda: self._vision_loop(d)))
        if self.imu:
            wd.register("imu")
            self.threads.append(d.spawn("imu", lambda: self._imu_loop(d)))

    def close_sources(self) -> None:
        for src in (self.camera, self.imu):
            if src:
                src.close()

    def stop(self, d: "Daemon") -> None:
        self.stop_event.set()
        self.close_sources()
        for t in self.threads:
            t.join(0.5)
        for part in ("camera", "vision", "imu"):
            d.watchdog.unregister(part)

    def _camera_loop(self, d: "Daemon") -> None:
        c = d.counters
        while not self.stop_event.is_set():
            frame = self.camera.read()
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
        policy = DetectionPolicy(self.cfg.vision.heartbeat_s)
        skipped_before = c.frames_skipped
        while not self.stop_event.is_set():
            frame = self.mailbox.take(0.25)
            d.watchdog.beat("vision")
            if frame is None:
                continue
            t0 = time.perf_counter()
            try:
                objects = self.vision.detect(frame.image)
            except ValueError as exc:  # a frame the stage cannot use: count, say once, skip
                c.frames_failed += 1
                d.once("bad-frame", f"frame skipped: {exc}")
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            c.frames += 1
            c.vision_runs += 1
            c.vision_ms_total += ms
            c.frames_skipped = skipped_before + self.mailbox.replaced
            det = Detections(frame.ts, objects, ms)
            if policy.should_publish(det):
                c.detections_queued += 1
                d.results.put(("detections", det))

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
            for sig in self.motion.push(batch):
                c.motion_windows += 1
                c.motion_ms_total += sig.inference_ms
                d.results.put(("motion", sig))


class Daemon:
    def __init__(self, cfg: Config, config_path: str | Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path  # re-read on SIGHUP
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.exit_code = 0
        self.counters = Counters()
        self.results: queue.Queue = queue.Queue()
        self.once = Once(log)
        self.pipeline: Pipeline | None = None
        self.outbox: Outbox | None = None
        self.link = None
        self._writer: threading.Thread | None = None
        self.notifier = Notifier.from_env()
        self.watchdog = ProgressWatchdog(self.notifier)
        self._stats_prev = (self.counters.started, 0, 0.0, 0)

    # -- set-up -------------------------------------------------------------------------------

    def open(self) -> None:
        """Open models, sources and the outbox; errors here are the user's to fix (exit 2)."""
        self.pipeline = Pipeline.open(self.cfg)
        self.outbox = self._open_outbox(self.cfg)

    @staticmethod
    def _open_outbox(cfg: Config) -> Outbox:
        ob = Outbox(cfg.outbox_path, max_bytes=cfg.outbox.max_bytes, synchronous=cfg.outbox.synchronous)
        log.info("outbox ready", extra=fields(path=str(ob.path), spooled=ob.depth, last_seq=ob.last_seq))
        return ob

    # -- running ------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        log.info("starting", extra=fields(version=__version__, device_id=cfg.device_id,
                                          config=cfg.source_path))
        wd = self.watchdog
        wd.register("writer")
        self._start_link()
        self._writer = self.spawn("writer", self._writer_loop)
        self.pipeline.start(self)
        self._install_signals()
        # READY only now: models loaded, sources open, outbox open. The broker may still be down;
        # that is what the outbox is for, not a reason to fail start-up.
        self.notifier.ready(self.status_line())
        log.info("ready", extra=fields(notify=self.notifier.backend))
        now = time.monotonic()
        next_stats = now + min(5.0, cfg.stats.interval_s)
        tick = wd.tick_interval
        next_tick = now
        next_status = now + 10.0
        while not self.stop_event.wait(0.25):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
            now = time.monotonic()
            if tick and now >= next_tick:
                wd.tick()
                next_tick = now + tick
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + 10.0
            if now >= next_stats:
                self.publish_stats()
                next_stats = now + self.cfg.stats.interval_s
        self.notifier.stopping()
        self._shutdown()
        return self.exit_code

    def status_line(self) -> str:
        """systemctl status's one-line summary."""
        c = self.counters
        up = max(time.time() - c.started, 1e-9)
        connected = self.link.connected.is_set() if self.link else False
        return " ".join([f"backend={self.pipeline.backend if self.pipeline else 'cpu'}",
                         f"fps={c.frames / up:.1f}", f"outbox={self.outbox.depth if self.outbox else 0}",
                         f"broker={'connected' if connected else 'down'}"])

    def _start_link(self) -> None:
        from edged.link import Link

        self.watchdog.register("mqtt")
        self.link = Link(self.cfg, self.outbox, on_turn=lambda: self.watchdog.beat("mqtt"))
        self.link.start()

    def reload(self) -> bool:
        """Re-read the config and swap in a new pipeline; keep the old one if anything fails."""
        from edged import config as config_mod
        from edged.camera import CameraError
        from edged.config import ConfigError
        from edged.imucsv import ImuCsvError
        from edged.models import ModelError
        from edged.runtime import RuntimeUnavailable

        self.notifier.reloading()
        log.info("reloading", extra=fields(config=str(self.config_path or "<defaults>")))
        try:
            new_cfg = config_mod.load(self.config_path)
            new = Pipeline.open(new_cfg)
        except ConfigError as exc:
            for line in exc.problems:
                log.error("reload refused; keeping the running configuration", extra=fields(problem=line))
            self.notifier.ready(self.status_line())
            return False
        except (ModelError, RuntimeUnavailable, CameraError, ImuCsvError, OSError) as exc:
            log.error("reload failed; keeping the running pipeline", extra=fields(error=str(exc)))
            self.notifier.ready(self.status_line())
            return False
        old_cfg = self.cfg
        self.pipeline.stop(self)
        relink = (new_cfg.mqtt != old_cfg.mqtt or new_cfg.device_id != old_cfg.device_id
                  or new_cfg.outbox != old_cfg.outbox or new_cfg.state_dir != old_cfg.state_dir)
        if relink:
            # Flush what the old pipeline queued under the old settings, then reconnect.
            self._stop_writer()
            self.link.stop(timeout=0.5, say_offline=new_cfg.device_id != old_cfg.device_id)
            self.counters.published_before += self.link.published
            self.counters.bytes_sent_before += self.link.bytes_sent
            if new_cfg.outbox_path != old_cfg.outbox_path or new_cfg.outbox != old_cfg.outbox:
                self.outbox.close()
                self.outbox = self._open_outbox(new_cfg)
        self.cfg = new_cfg
        if relink:
            self._start_link()
            self._writer = self.spawn("writer", self._writer_loop)
        self.pipeline = new
        new.start(self)
        self.notifier.ready(self.status_line())
        log.info("reloaded", extra=fields(relinked=relink))
        return True

    def spawn(self, name: str, target) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except Exception:  # a dead pipeline thread must stop the daemon, loudly
                log.exception("thread failed; stopping", extra=fields(thread=name))
                self.exit_code = 1
                self.stop_event.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        return t

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: self.stop(f"signal {signal.Signals(s).name}"))
        signal.signal(signal.SIGHUP, lambda s, f: self.reload_event.set())

    def stop(self, reason: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping", extra=fields(reason=reason))
        self.stop_event.set()

    def _stop_writer(self) -> None:
        self.results.put(None)  # writer: flush what is queued, then exit
        if self._writer:
            self._writer.join(1.0)

    def _shutdown(self) -> None:
        if self.pipeline:
            self.pipeline.stop(self)
        self._stop_writer()
        if self.link:
            self.link.stop(timeout=0.5)
        if self.outbox:
            self.outbox.close()
        log.info("stopped", extra=fields(exit_code=self.exit_code))

    def _writer_loop(self) -> None:
        device = self.cfg.device_id
        encoders = {"detections": codec.detections, "motion": codec.motion}
        topics = {leaf: self.cfg.topic(leaf) for leaf in encoders}
        done = False
        while not done:
            self.watchdog.beat("writer")
            try:
                item = self.results.get(timeout=1.0)
            except queue.Empty:
                continue
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
        """Health figures; rates and means are over the interval since the previous call."""
        c = self.counters
        ob = self.outbox
        now = time.time()
        prev_t, prev_frames, prev_ms, prev_runs = self._stats_prev
        self._stats_prev = (now, c.frames, c.vision_ms_total, c.vision_runs)
        dt = now - prev_t
        runs = c.vision_runs - prev_runs
        link_pub, link_bytes = (self.link.published, self.link.bytes_sent) if self.link else (0, 0)
        return {
            "ts": round(now, 3),
            "uptime_s": round(now - c.started, 1),
            "fps": round((c.frames - prev_frames) / dt, 2) if dt > 0 else 0.0,
            "inference_ms": round((c.vision_ms_total - prev_ms) / runs, 2) if runs else None,
            "frames": c.frames,
            "skipped_frames": c.frames_skipped,
            "failed_frames": c.frames_failed,
            "motion_windows": c.motion_windows,
            "motion_inference_ms": round(c.motion_ms_total / c.motion_windows, 2) if c.motion_windows else None,
            "imu_samples": c.imu_samples,
            "outbox_depth": ob.depth,
            "outbox_bytes": ob.size_bytes,
            "dropped": ob.dropped,
            "published": c.published_before + link_pub,
            "bytes_sent": c.bytes_sent_before + link_bytes,
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
