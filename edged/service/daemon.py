"""The daemon: wires sources → stages → outbox → MQTT link from the config, and supervises them.

Threads, one job each (data flows one way):
  camera, vision, imu   the pipeline's (`edged.service.pipeline`), replaced whole on reload
  writer   encodes queued results and commits them to the outbox in batches, wakes the link
  (paho)   the MQTT network thread, plus the link's drain thread
The main thread handles signals, publishes stats, and stops everything in order.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

from edged import __version__

from edged.delivery import codec
from edged.config import Config
from edged.service import log as logsetup
from edged.service.log import Once, fields
from edged.service.notify import Notifier, ProgressWatchdog
from edged.delivery.outbox import Outbox
from edged.service.pipeline import Counters, Pipeline
from edged.service.reload import ReloadReporter, runtime_dir

log = logging.getLogger("edged.daemon")

# The writer's outbox commits (one fsync each): this many at once, then this many per second.
COMMIT_BURST = 4
EXIT_TPU_HUNG = 75  # EX_TEMPFAIL: an Edge TPU inference hung; systemd restarts the daemon (on the CPU)
COMMIT_RATE = 50.0
# Commands waiting for the main loop; more than this at once are dropped (and counted).
COMMAND_QUEUE = 64
# How long a stop or a relink waits for the writer to commit what is queued: local work (one
# commit, one fsync), but a loaded machine or a slow SD card can take seconds over it. Half of
# the unit's TimeoutStopSec=20s, so the offline status still goes out after it.
WRITER_FLUSH_S = 10.0


# glibc's malloc, tuned for a long-running process with a few threads and large buffers made
# once (models, frames, the vision stages' work arrays). By default glibc raises its mmap
# threshold to the size of each large block freed (reading a model file to check it frees one of
# several MB), so later buffers land in heaps that never shrink, and every thread that allocates
# gets an arena of its own. A fixed threshold and two arenas keep 3-5 MB less resident with the
# default chain. The trim threshold keeps the heap's top from being given back and faulted in
# again every frame (which a fixed mmap threshold alone would do): at a camera's fixed frame size
# a frame then costs no more page faults than untuned (docs/benchmarks.md, "Memory and start-up").
# An environment that sets any MALLOC_ variable (glibc's own tunables) is left as it is.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Apply the settings above where the C library is glibc; True if they were applied."""
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt (macOS)
        return False
    # mallopt returns 1 on success; musl's stub returns 0.
    return all(mallopt(k, v) == 1 for k, v in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, ARENA_MAX)))


class Daemon:
    def __init__(self, cfg: Config, config_path: str | Path | None = None) -> None:
        tune_malloc()  # before the models load and the threads start
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
        self.samples = None   # the sample queue, with [sampling] enabled (edged.delivery.samples)
        self.sampler = None   # and what fills it (edged.service.sampler)
        self._writer: threading.Thread | None = None
        self.notifier = Notifier.from_env()
        self.watchdog = ProgressWatchdog(self.notifier)
        # Each reload's outcome, for `edged reload` (the unit's ExecReload=) to wait on.
        self.reloads = ReloadReporter(runtime_dir())
        self._stats_prev = (self.counters.started, 0, 0.0, 0)
        # Commands from the broker wait here for the main loop; a flood beyond this is dropped.
        self.commands: queue.Queue = queue.Queue(maxsize=COMMAND_QUEUE)
        self.command_counts = {"commands": 0, "commands_refused": 0, "commands_failed": 0,
                               "commands_dropped": 0, "snapshots_refused": 0, "resend_requests": 0,
                               "resend_refused": 0}
        self._budgets: dict = {}  # command -> its per-minute commands.Budget (see _budget)
        self._state_lock = threading.Lock()
        self._state: dict = {"labels": [], "motion": None, "motion_score": None}
        self._state_dirty = False
        self._presence = None  # homeassistant.Presence, made with the first state published
        self._present: list[str] = []
        self.last_reload_error = ""
        self.updater = None
        if cfg.updates.url:  # python-tuf is imported only then, by the updater's own thread
            from edged.service.updater import Updater

            self.updater = Updater(cfg)
        # Early, so a SIGTERM while models load still ends in an orderly stop.
        self._install_signals()

    # -- set-up -------------------------------------------------------------------------------

    def open(self) -> None:
        """Open models, sources and the outbox; errors here end `edged run` with one line (exit 2
        for a bad config or model file, 69 for a device or runtime that is not there)."""
        # The outbox first: an unwritable state_dir is found before seconds of model loading.
        self.outbox = self._open_outbox(self.cfg)
        # Optional: a sample queue that cannot be opened turns sampling off, never the results.
        self.samples = self._reopen_samples(self.cfg)
        self.pipeline = self._open_first_pipeline()
        logsetup.set_static(backend=self.pipeline.backend)

    def _overlay(self) -> dict | None:
        return self.updater.overlay() if self.updater else None

    def _open_first_pipeline(self) -> Pipeline:
        """The pipeline at start; an installed release that cannot open is rolled back (to the
        release before it, else the shipped model) rather than leaving the device down."""
        from edged.models import ModelError
        from edged.runtime import RuntimeUnavailable

        if self.updater:
            self.updater.on_start()
        while True:
            try:
                return Pipeline.open(self.cfg, overlay=self._overlay())
            except (ModelError, RuntimeUnavailable) as exc:
                if not self._overlay():
                    raise
                self.updater.rollback_running(f"failed to open at start: {exc}")

    @staticmethod
    def _open_outbox(cfg: Config) -> Outbox:
        o = cfg.outbox
        ob = Outbox(cfg.outbox_path, max_bytes=o.max_bytes, synchronous=o.synchronous,
                    max_file_bytes=o.max_file_bytes or None, keep_rows=o.keep_acked_rows,
                    keep_bytes=o.keep_acked_bytes, keep_s=o.keep_acked_s)
        log.info("outbox ready", extra=fields(path=str(ob.path), spooled=ob.depth, last_seq=ob.last_seq))
        return ob

    @staticmethod
    def _open_samples(cfg: Config):
        if not cfg.sampling.enabled:
            return None
        from edged.delivery.samples import Caps, SampleQueue

        q = SampleQueue(cfg.samples_path, Caps.from_config(cfg.sampling), max_bytes=cfg.sampling.queue_max_bytes)
        spent = q.spent()
        log.info("sample queue ready", extra=fields(path=str(q.path), queued=q.depth, last_hour=spent["hour"],
                                                    last_day=spent["day"]))
        return q

    def _start_sampler(self) -> None:
        self.sampler = None
        if self.samples is None:
            return
        from edged.service.sampler import Sampler

        self.sampler = Sampler(self.cfg, self.samples, codec.get(self.cfg.mqtt.codec),
                               on_stored=lambda: self.link.wake() if self.link else None)
        self.sampler.start(self.spawn)

    def _stop_sampler(self) -> None:
        if self.sampler is not None:
            self.counters.samples_busy_before += self.sampler.busy
            self.sampler.stop()
            self.sampler = None

    # -- running ------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        extra = {}
        if self.pipeline.vision is not None:
            # Which resampler the vision stages use (the numpy one when the install had no compiler).
            from edged.stages.vision import native

            extra["resampler"] = native.name()
        log.info("starting", extra=fields(version=__version__, device_id=cfg.device_id,
                                          config=cfg.source_path, **extra))
        if extra and native.fell_back():
            log.warning("vision: the numpy resampler runs (the same results, slower): "
                        f"{native.STATUS.removeprefix('numpy: ')}; {native.INSTALL_HINT}")
        wd = self.watchdog
        wd.register("writer")
        self._start_link()
        self._writer = self.spawn("writer", self._writer_loop)
        self._start_sampler()
        self.pipeline.start(self)
        if self.updater:
            self.updater.on_start_trials(self)
            self.updater.start()
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
            if not self.commands.empty():
                self._run_commands()
            self._publish_state()
            if self.updater:
                self.updater.service(self)
            now = time.monotonic()
            if tick and now >= next_tick:
                wd.tick()
                next_tick = now + tick
            if self._tpu_hung():
                break
            if now >= next_status:
                self.notifier.status(self.status_line())
                next_status = now + 10.0
            if now >= next_stats:
                self.publish_stats()
                next_stats = now + self.cfg.stats.interval_s
        self.notifier.stopping()
        self._shutdown()
        return self.exit_code

    def _tpu_hung(self) -> bool:
        """An Edge TPU inference that never returned (libedgetpu blocks on some USB faults): the
        stuck thread cannot be freed, so record the fault, flush the queued results and exit with
        EXIT_TPU_HUNG; systemd restarts the daemon, which then starts on the CPU."""
        p = self.pipeline
        hung = p.hung_tpu(self.cfg.accelerator.invoke_timeout_s) if p else None
        if hung is None:
            return False
        model, age = hung
        rec = next((m.faults for m in p.models() if getattr(m, "faults", None) is not None), None)
        if rec is not None:
            rec.hung(model)
        log.error("Edge TPU inference hung; exiting so the service restarts on the CPU",
                  extra=fields(model=model, stuck_s=round(age, 1), exit_code=EXIT_TPU_HUNG,
                               timeout_s=self.cfg.accelerator.invoke_timeout_s))
        self.exit_code = EXIT_TPU_HUNG
        self._tpu_hang = True
        return True

    _tpu_hang = False

    def status_line(self) -> str:
        """systemctl status's one-line summary."""
        c = self.counters
        up = max(time.time() - c.started, 1e-9)
        connected = self.link.connected.is_set() if self.link else False
        return " ".join([f"backend={self.pipeline.backend if self.pipeline else 'cpu'}",
                         f"fps={c.frames / up:.1f}", f"outbox={self.outbox.depth if self.outbox else 0}",
                         f"broker={'connected' if connected else 'down'}"])

    def _start_link(self) -> None:
        from edged.delivery.link import Link

        self.watchdog.register("mqtt")
        self.link = Link(self.cfg, self.outbox, content_type=codec.get(self.cfg.mqtt.codec).content_type,
                         on_turn=lambda: self.watchdog.beat("mqtt"),
                         on_connected=self._on_link_connected,
                         on_command=self._enqueue_command if self.cfg.commands.enabled or self.cfg.commands.resend
                         else None,
                         command_names=None if self.cfg.commands.enabled else ("resend",),
                         on_announce=self.updater.announced if self.updater and self.cfg.updates.announce else None,
                         samples=self.samples)
        self.link.start()

    # -- things published outside the outbox: Home Assistant, command replies ---------------------

    def _on_link_connected(self, link) -> None:
        """On paho's thread, after each connect: announce to Home Assistant, restate the state."""
        if self.updater:
            self.updater.report_dirty = True  # the main loop restates the models report
        self._announce(link)
        self._publish_state(force=True)

    def _announce(self, link) -> None:
        """Publish discovery for what this config offers, and an empty retained config (HA's
        "remove") for every entity announced before that it no longer offers."""
        from edged.delivery import homeassistant as ha

        cfg = self.cfg
        announced = ha.announced_path(cfg)
        current: list[tuple[str, bytes]] = []
        if cfg.homeassistant.enabled:
            p = self.pipeline
            vision, motion = (p.vision, p.motion) if p else (None, None)
            labels = ha.presence_labels(cfg, list(getattr(vision, "labels", [])) if vision else [])
            motion_labels = list(getattr(motion, "output_labels", getattr(motion, "labels", []))) if motion else None
            current = ha.discovery(cfg, labels, motion_labels, hw_version=ha.pi_model())
        gone = ha.stale(ha.load_announced(announced), [t for t, _ in current])
        for topic in gone:
            link.publish_now("", b"", topic=topic, qos=1, retain=True)
        for topic, payload in current:
            link.publish_now("", payload, topic=topic, qos=1, retain=True)
        ha.save_announced(announced, [t for t, _ in current])
        if gone or current:
            log.info("announced to Home Assistant", extra=fields(entities=len(current), removed=len(gone)))

    def update_state(self, *, labels: list[str] | None = None, motion: tuple[str, float] | None = None) -> None:
        """Called by the pipeline threads when what is in view or the motion label changes. Only
        records it: the main loop publishes (at most every 0.25 s), off the inference threads."""
        with self._state_lock:
            if labels is not None and labels != self._state["labels"]:
                self._state["labels"] = labels
                self._state_dirty = True
            if motion is not None:
                if motion[0] != self._state["motion"]:
                    self._state_dirty = True
                self._state["motion"], self._state["motion_score"] = motion

    def _publish_state(self, force: bool = False) -> None:
        if not self.cfg.homeassistant.enabled or not self.link:
            return
        from edged.delivery import homeassistant as ha

        with self._state_lock:
            if self._presence is None or self._presence.hold_s != self.cfg.homeassistant.hold_s:
                self._presence = ha.Presence(self.cfg.homeassistant.hold_s)
            present = self._presence.update(self._state["labels"], time.monotonic())
            if present != self._present:
                self._present = present
                self._state_dirty = True
            if not (force or self._state_dirty):
                return
            self._state_dirty = False
            payload = ha.state_payload(self._state["labels"], self._state["motion"], self._state["motion_score"],
                                       present)
        # QoS 0: the state is superseded by the next one, and unacknowledged QoS 1 side messages
        # would take room in the client's in-flight window from the results.
        self.link.publish_now("state", payload, qos=0, retain=True)

    def _enqueue_command(self, name: str, payload: bytes, properties) -> None:
        if not self.cfg.commands.enabled and name != "resend":
            return  # not subscribed to; a broker that delivers it anyway is not obeyed
        try:
            self.commands.put_nowait((name, payload, properties))
        except queue.Full:
            self.command_counts["commands_dropped"] += 1
            self.once("cmd-flood", "commands arriving faster than they are answered; dropping some",
                      level=logging.WARNING, queued=COMMAND_QUEUE)

    def _run_commands(self) -> None:
        while True:
            try:
                name, payload, properties = self.commands.get_nowait()
            except queue.Empty:
                return
            self._answer(name, payload, properties)

    def _answer(self, name, payload, properties) -> None:
        """One command, parsed, run and answered inside one boundary: whatever arrives, and
        whatever goes wrong, the daemon carries on and the failure is counted."""
        from edged.delivery import commands

        counts = self.command_counts
        counts["commands"] += 1
        cmd = None
        try:
            cmd, error = commands.parse(name, payload, properties, own_prefix=self.cfg.topic("response"),
                                        reply_prefix=self.cfg.commands.reply_prefix)
            if error:
                counts["commands_refused"] += 1
                self.once(f"cmd-error:{cmd.name}", "command refused", level=logging.WARNING,
                          cmd=cmd.name, error=error)
                answer = commands.reply(cmd, False, error=error)
            else:
                try:
                    answer = self._run_command(cmd)
                except Exception as exc:  # nothing remote may take the daemon down
                    counts["commands_failed"] += 1
                    self.once(f"cmd-failed:{cmd.name}", "command failed", level=logging.ERROR,
                              cmd=cmd.name, error=f"{type(exc).__name__}: {exc}")
                    answer = commands.reply(cmd, False, error=f"{type(exc).__name__}: {exc}")
                else:
                    log.info("command", extra=fields(cmd=cmd.name))
            self._reply(cmd, answer)
        except Exception as exc:
            counts["commands_failed"] += 1
            self.once("cmd-boundary", "command could not be answered", level=logging.ERROR,
                      cmd=getattr(cmd, "name", "?"), error=f"{type(exc).__name__}: {exc}")

    def _run_command(self, cmd) -> bytes:
        from edged.delivery import commands

        if cmd.name == "stats":
            self.publish_stats()
            return commands.reply(cmd, True)
        if cmd.name == "update":
            if not self.updater:
                return commands.reply(cmd, False, error="updates are not configured ([updates] url)")
            self.updater.poke()
            return commands.reply(cmd, True)
        if cmd.name == "resend":
            return self._resend(cmd)
        if cmd.name == "reload":
            ok = self.reload()
            return commands.reply(cmd, ok, **({} if ok else {"error": "reload failed; see the device log"}))
        # snapshot
        cc = self.cfg.commands
        if not cc.snapshot:
            return commands.reply(cmd, False, error="snapshots are disabled (commands.snapshot = false)")
        budget = self._budget("snapshot", cc.snapshots_per_minute, cc.snapshot_bytes_per_minute)
        over = budget.allows()
        if over:
            self.command_counts["snapshots_refused"] += 1
            self.once("snapshot-budget", "snapshot refused: over the budget", level=logging.WARNING,
                      limit=over)
            return commands.reply(cmd, False, error=f"snapshot refused: {over} (commands.snapshots_per_minute, "
                                                    "commands.snapshot_bytes_per_minute)")
        cam = self.pipeline.camera if self.pipeline else None
        full = cam.snapshot() if cam is not None and hasattr(cam, "snapshot") else None
        # Else the newest frame, held while it is encoded (the camera reuses its buffers).
        frame = self.pipeline.newest_frame() if self.pipeline and full is None else None
        if full is None and frame is None:
            return commands.reply(cmd, False, error="no camera frame yet")
        try:
            image, ts = (full, time.time()) if full is not None else (frame.image, frame.ts)
            jpeg = commands.jpeg_snapshot(image, self.cfg.commands.snapshot_max_bytes)
        finally:
            if frame is not None:
                frame.release()
        budget.spend(len(jpeg))
        self.link.publish_now("snapshot", jpeg, qos=1)
        return commands.reply(cmd, True, bytes=len(jpeg), ts=round(ts, 3), topic=self.cfg.topic("snapshot"))

    def _budget(self, command: str, count: int, amount: int, unit: str = "bytes"):
        """The per-minute budget of `command`: kept from request to request, made anew (spent
        nothing) when a reload changed its limits."""
        from edged.delivery import commands

        budget = self._budgets.get(command)
        if budget is None or (budget.count, budget.nbytes) != (count, amount):
            budget = self._budgets[command] = commands.Budget(count, amount, unit=unit)
        return budget

    def _resend(self, cmd) -> bytes:
        """Put results the cloud asks for again back into the outbox (docs/mqtt.md, "Resend"):
        within the per-request cap and the per-minute budgets, from what the outbox still holds;
        the reply says what was resent, what is gone and what to ask for later."""
        from edged.delivery import commands

        cc = self.cfg.commands
        self.command_counts["resend_requests"] += 1
        if not cc.resend:
            return commands.reply(cmd, False, error="resend is disabled (commands.resend = false)")
        budget = self._budget("resend", cc.resend_per_minute, cc.resend_rows_per_minute, unit="rows")
        over = budget.allows()
        if over:
            self.command_counts["resend_refused"] += 1
            self.once("resend-budget", "resend request refused: over the budget", level=logging.WARNING,
                      limit=over)
            return commands.reply(cmd, False, error=f"resend refused: {over} (commands.resend_per_minute, "
                                                    "commands.resend_rows_per_minute)",
                                  retry_after_s=round(budget.retry_after(), 1))
        cap = min(cc.resend_max_rows, budget.room())
        done = self.outbox.resend(cmd.ranges, cap, topic_prefix=self.cfg.topic(""))
        budget.spend(len(done.seqs))
        if done.seqs and self.link:
            self.link.rewind(done.seqs[0])
        if done.gone_count:
            self.once("resend-gone", "resend asked for results no longer kept (see outbox.keep_acked_*)",
                      level=logging.INFO, gone=done.gone_count)
        listed = 32  # ranges listed per kind in a reply; the counts are always whole
        return commands.reply(cmd, True, resent=len(done.seqs), resent_ranges=_as_ranges(done.seqs)[:listed],
                              gone=[list(r) for r in done.gone[:listed]], gone_count=done.gone_count,
                              later=[list(r) for r in done.later[:listed]],
                              **({"truncated": True} if max(len(done.gone), len(done.later)) > listed else {}))

    def _reply(self, cmd, answer: bytes) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if cmd.correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = cmd.correlation
        self.link.publish_now("response", answer, qos=1, topic=cmd.response_topic, properties=props)

    def reload(self) -> bool:
        """Re-read the config and swap in a new pipeline; keep the old one if anything fails."""
        from edged import config as config_mod
        from edged.sources.camera import CameraError
        from edged.config import ConfigError
        from edged.sources.imu import ImuError
        from edged.sources.imu.imucsv import ImuCsvError
        from edged.models import ModelError
        from edged.runtime import RuntimeUnavailable

        self.notifier.reloading()
        self.reloads.begin()
        log.info("reloading", extra=fields(config=str(self.config_path or "<defaults>")))
        try:
            new_cfg = config_mod.load(self.config_path)
            new = Pipeline.open(new_cfg, running=self.pipeline, overlay=self._overlay())
        except ConfigError as exc:
            self.last_reload_error = exc.problems[0]
            for line in exc.problems:
                log.error("reload refused; keeping the running configuration", extra=fields(problem=line))
            self.notifier.ready(self.status_line())
            self.reloads.finish(False, "; ".join(exc.problems))
            return False
        except (ModelError, RuntimeUnavailable, CameraError, ImuCsvError, ImuError, OSError) as exc:
            self.last_reload_error = str(exc)
            log.error("reload failed; keeping the running pipeline", extra=fields(error=str(exc)))
            self.notifier.ready(self.status_line())
            self.reloads.finish(False, str(exc))
            return False
        except Exception as exc:  # whatever a bad file does to the loaders, the device runs on
            log.error("reload failed; keeping the running pipeline",
                      extra=fields(error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"))
            self.notifier.ready(self.status_line())
            self.reloads.finish(False, f"{type(exc).__name__}: {exc}")
            return False
        old_cfg = self.cfg
        self.pipeline.keep_imu_open = new.imu_handed_over_from is self.pipeline
        self.pipeline.stop(self)
        relink = (new_cfg.mqtt != old_cfg.mqtt or new_cfg.device_id != old_cfg.device_id
                  or new_cfg.outbox != old_cfg.outbox or new_cfg.state_dir != old_cfg.state_dir
                  or new_cfg.sampling != old_cfg.sampling)
        self._stop_sampler()
        if relink:
            # Flush what the old pipeline queued under the old settings, then reconnect.
            self._stop_writer()
            self.link.stop(timeout=0.5, say_offline=new_cfg.device_id != old_cfg.device_id)
            self.counters.published_before += self.link.published
            self.counters.bytes_sent_before += self.link.bytes_sent
            self.counters.rejected_before += self.link.rejected
            self.counters.samples_sent_before += self.link.samples_sent
            self.counters.sample_bytes_sent_before += self.link.sample_bytes_sent
            if new_cfg.outbox_path != old_cfg.outbox_path or new_cfg.outbox != old_cfg.outbox:
                self.outbox.close()
                self.outbox = self._open_outbox(new_cfg)
            if self.samples is not None:
                self.samples.close()
            self.samples = self._reopen_samples(new_cfg)
        self.cfg = new_cfg
        if relink:
            self._start_link()
            self._writer = self.spawn("writer", self._writer_loop)
        self._start_sampler()
        self.pipeline = new
        if self.updater:
            self.updater.reconfigure(new_cfg)
        logsetup.set_static(backend=new.backend)
        new.start(self)
        if not relink and self.link:  # a new link announces on connect; this one must now
            self._announce(self.link)
        self.notifier.ready(self.status_line())
        log.info("reloaded", extra=fields(relinked=relink))
        self.reloads.finish(True)
        return True

    def _reopen_samples(self, cfg: Config):
        """The sample queue; one that cannot be opened (unreadable, corrupt) turns sampling off
        with an error line, the file left as it is for inspection: results never wait on it,
        and a start or a reload is not refused for it."""
        from edged.delivery.samples import SampleQueueError

        try:
            return self._open_samples(cfg)
        except SampleQueueError as exc:
            log.error("sampling off: the sample queue cannot be opened", extra=fields(error=str(exc)))
            return None

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
        # Every thread's stack on stderr (the journal): after a crash in native code (the
        # interpreter, the resampler, a delegate) or systemd's watchdog kill (SIGABRT), and on
        # SIGUSR2, after which the daemon goes on (`systemctl kill -s USR2 edged`).
        try:
            faulthandler.enable(all_threads=True)
            faulthandler.register(signal.SIGUSR2, all_threads=True)
        except (AttributeError, OSError, RuntimeError, ValueError):  # no stderr to write to
            pass

    def stop(self, reason: str = "") -> None:
        if not self.stop_event.is_set():
            log.info("stopping", extra=fields(reason=reason))
        self.stop_event.set()

    def _stop_writer(self) -> None:
        """Flush what is queued into the outbox and end the writer. Waited for, not given a
        second: an outbox closed (or replaced, on a relink) under a writer still committing
        would lose those results and fail the writer."""
        self.results.put(None)  # writer: flush what is queued, then exit
        if self._writer:
            self._writer.join(WRITER_FLUSH_S)
            if self._writer.is_alive():
                log.error("the writer has not finished committing to the outbox; results still queued "
                          "may be lost", extra=fields(waited_s=WRITER_FLUSH_S, queued=self.results.qsize()))

    def _shutdown(self) -> None:
        if self.updater:
            self.updater.stop(clean=self.exit_code == 0)
        if self.pipeline:
            self.pipeline.stop(self, clean=not self._tpu_hang)
        self._stop_sampler()
        self._stop_writer()
        if self.link:
            if self.cfg.homeassistant.enabled:
                # No stale "face present" or motion on the next start: the retained state says
                # nothing is in view and no motion is known (JSON still, so Home Assistant's
                # templates render; QoS 1, sent before the offline status the link waits for).
                from edged.delivery import homeassistant as ha

                self.link.publish_now("state", ha.state_payload([], None, None, []), qos=1, retain=True)
            self.link.stop(timeout=0.5)
        if self.outbox:
            self.outbox.close()
        if self.samples is not None:
            self.samples.close()
        log.info("stopped", extra=fields(exit_code=self.exit_code))

    def _writer_loop(self) -> None:
        device = self.cfg.device_id
        c = codec.get(self.cfg.mqtt.codec)
        encoders = {"detections": c.detections, "motion": c.motion, "events": c.events}
        topics = {leaf: self.cfg.topic(leaf) for leaf in encoders}
        done = False
        budget, refilled = float(COMMIT_BURST), time.monotonic()
        # Idle, it still beats several times within its watchdog deadline (WatchdogSec): once a
        # second only would look stalled under a short WatchdogSec on a busy machine.
        idle_s = min(1.0, self.watchdog.deadline_s / 4)
        while not done:
            self.watchdog.beat("writer")
            try:
                item = self.results.get(timeout=idle_s)
            except queue.Empty:
                continue
            # Group commit under a token bucket: while commits stay under COMMIT_RATE a result
            # is stored (and published) at once; a flood of results is gathered into one commit
            # (one fsync) per 1 / COMMIT_RATE seconds instead of one each.
            now = time.monotonic()
            budget, refilled = min(COMMIT_BURST, budget + (now - refilled) * COMMIT_RATE), now
            not_before = now + max(0.0, (1.0 - budget) / COMMIT_RATE)
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
                wait = not_before - time.monotonic()
                try:
                    item = self.results.get(timeout=wait) if wait > 0 else self.results.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self.outbox.append(batch)
                self.link.wake()
                now = time.monotonic()
                budget, refilled = min(COMMIT_BURST, budget + (now - refilled) * COMMIT_RATE) - 1.0, now

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
        values = {
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
            "failed_imu_batches": c.imu_failed_batches,
            "outbox_depth": ob.depth,
            "outbox_bytes": ob.size_bytes,
            "dropped": ob.dropped,
            "outbox_kept": ob.kept,
            "outbox_kept_bytes": ob.kept_bytes,
            "resent": ob.resent,
            "resend_gone": ob.resend_gone,
            "published": c.published_before + link_pub,
            "bytes_sent": c.bytes_sent_before + link_bytes,
            "rejected": c.rejected_before + (self.link.rejected if self.link else 0),
            "raw_bytes": c.raw_bytes,
            **self.command_counts,
            "backend": self.pipeline.backend if self.pipeline else "cpu",
            "pid": os.getpid(),
        }
        if self.updater:
            values.update(self.updater.stats())
        if self.samples is not None:
            link = self.link
            values.update(self.samples.stats())
            values["samples_busy"] = c.samples_busy_before + (self.sampler.busy if self.sampler else 0)
            values["samples_sent"] = c.samples_sent_before + (link.samples_sent if link else 0)
            values["samples_bytes_sent"] = c.sample_bytes_sent_before + (link.sample_bytes_sent if link else 0)
        for k, v in self._source_stats().items():
            values.setdefault(k, v)  # the daemon's own counters win over a source's same-named one
        return values

    def _source_stats(self) -> dict:
        """Counters the sources and backends keep, flattened (camera_errors, imu_lost_samples, …)."""
        out: dict = {}
        p = self.pipeline
        if p is None:
            return out
        for prefix, obj in (("camera", p.camera), ("imu", p.imu),
                            ("vision", getattr(p.vision, "model", None)),
                            ("vision", p.vision),  # a chain of stages: per-stage ms and invokes
                            ("motion", getattr(p.motion, "model", None))):
            stats = getattr(obj, "stats", None) if obj is not None else None
            if isinstance(stats, dict):
                out.update({f"{prefix}_{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
        return out

    def publish_stats(self) -> None:
        values = self.stats_values()
        # Retained: Home Assistant's diagnostic sensors have a value at once after it restarts.
        self.link.publish_now("stats", codec.stats(values, self.cfg.device_id), retain=True)
        log.debug("stats", extra={"fields": values})


def _as_ranges(seqs: list[int]) -> list[list[int]]:
    """Ascending seqs as [first, last] runs."""
    out: list[list[int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out
