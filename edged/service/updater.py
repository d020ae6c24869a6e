"""The device's model updater: signed releases over TUF, staged rollout, self-test, health, rollback.

Off unless `[updates]` names a repository. Then a background thread, every `poll_interval_s` (or
at once when poked by `cmd/update`):

  1. refreshes the repository's metadata with python-tuf's ngclient, trusting only what the pinned
     root.json allows (signatures, thresholds, expiry, version rollback, mix-and-match, lengths);
  2. reads the signed channel document and picks, per model the config runs, the version whose
     rollout admits this device (`edged.rollout`: a stable hash of the device id);
  3. downloads the release's files, each checked against its signed length and hashes, into a
     staging directory in the state dir, and runs the release's golden self-test on the new model
     in this thread (the running model is not touched);
  4. hands the staged release to the daemon's main thread, which swaps it in through the reload
     path (a new pipeline beside the running one; the old one is kept if the new one fails);
  5. watches a health window: the stage must make progress and not fail more than it succeeds.
     A failing model is rolled back in place; one that kills the process is rolled back on the
     next start, because a start during a health window that did not follow a clean stop is
     counted as its crash.

Nothing here blocks the pipeline: network, disk and self-test work run on this thread; the
swap itself is the same reload a SIGHUP does. Power cuts: a release directory is renamed into
place only when complete and fsynced, `state.json` is replaced atomically, and every model file is
verified (size, sha256) again when a pipeline opens it, so a half-written model is never used.

State, under `<state_dir>/updates/`: `tuf/` (trusted metadata), `staging/`, `models/<name>/<version>/`
(installed releases: the running one, the previous one, one on trial), `state.json`.
python-tuf is imported only when this module starts its thread, so a device without `[updates]`
never loads it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edged import __version__
from edged.service.log import Once, fields
from edged.rollout import Channel, ChannelError

if TYPE_CHECKING:
    from edged.models import ModelEntry

log = logging.getLogger("edged.updater")

STATE_FILE = "state.json"
DESCRIPTOR = "release.json"
INSTALL_HINT = "pip install 'edged[updates]' (python-tuf); scripts/provision --updates installs it"


class UpdateRefused(Exception):
    """A release the device will not install; the message is the one-line reason."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _version_tuple(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(p) for p in re.findall(r"\d+", str(text))[:3])


# -- persisted state --------------------------------------------------------------------------------

@dataclass
class ModelState:
    running: int | None = None     # the release in service; None: the shipped model
    previous: int | None = None    # what to roll back to (None: the shipped model)
    trial: dict | None = None      # {"version", "since"}: in its health window
    testing: int | None = None     # a release being self-tested (a crash then is its fault)
    bad: list[int] = field(default_factory=list)  # refused after staging: never tried again

    def to_dict(self) -> dict:
        return {"running": self.running, "previous": self.previous, "trial": self.trial,
                "testing": self.testing, "bad": self.bad}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelState":
        def version(v):
            return v if type(v) is int and v > 0 else None

        trial = d.get("trial")
        if not (isinstance(trial, dict) and version(trial.get("version"))):
            trial = None
        return cls(version(d.get("running")), version(d.get("previous")), trial, version(d.get("testing")),
                   [v for v in d.get("bad", []) if type(v) is int])


@dataclass
class State:
    """What survives a restart. The updater thread and the main thread both change it (each its
    own fields of a model, see Updater); the lock keeps a save from seeing the dict grow."""
    models: dict[str, ModelState] = field(default_factory=dict)
    clean_stop: bool = True
    last: dict | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def model(self, name: str) -> ModelState:
        with self.lock:
            return self.models.setdefault(name, ModelState())

    def to_bytes(self) -> bytes:
        with self.lock:
            return json.dumps({"v": 1, "clean_stop": self.clean_stop, "last": self.last,
                               "models": {n: m.to_dict() for n, m in sorted(self.models.items())}},
                              indent=1).encode()

    @classmethod
    def load(cls, path: Path) -> "State":
        try:
            doc = json.loads(path.read_bytes())
            return cls({str(n): ModelState.from_dict(m) for n, m in doc["models"].items()},
                       bool(doc.get("clean_stop", True)), doc.get("last") if isinstance(doc.get("last"), dict) else None)
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("update state unreadable; running the shipped models",
                      extra=fields(path=str(path), error=str(exc)))
            return cls()


@dataclass
class Staged:
    """A release downloaded, verified and self-tested, waiting for the main thread to swap it in."""
    name: str
    version: int
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


@dataclass
class _Health:
    task: str
    version: int
    since: float          # monotonic
    progress0: int
    failed0: int
    last_progress: float  # monotonic
    last_count: int


# -- the updater ------------------------------------------------------------------------------------

class Updater:
    def __init__(self, cfg, *, clock=time.time) -> None:
        self.cfg = cfg
        self.u = cfg.updates
        self.dir = Path(cfg.state_dir) / "updates"
        self.models_dir = self.dir / "models"
        self.state_path = self.dir / STATE_FILE
        self.clock = clock
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = State.load(self.state_path)
        self.once = Once(log)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._staged: queue.Queue[Staged] = queue.Queue()
        self._lock = threading.Lock()
        self._health: dict[str, _Health] = {}
        self.pending: dict[str, int] = {}   # name -> version being fetched or staged
        self.report_dirty = True
        self.checks = 0
        self.bytes_fetched = 0
        self.last_check: dict | None = None

    # -- what the config runs ------------------------------------------------------------------

    def tracked(self) -> dict[str, str]:
        """Model name -> task, for the stages the config enables."""
        out = {}
        if self.cfg.camera.enabled:
            for st in self.cfg.vision.stages or [self.cfg.vision]:  # a graph of stages, or one model
                out[st.model] = "vision"
        if self.cfg.imu.enabled:
            out[self.cfg.motion.model] = "motion"
        return out

    def entry(self, name: str, version: int) -> "ModelEntry":
        """The installed release as a manifest entry (files verified when a pipeline opens it)."""
        from edged.models import ModelError, entry_from_table

        d = self.models_dir / name / str(version)
        try:
            desc = json.loads((d / DESCRIPTOR).read_bytes())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{d / DESCRIPTOR}: installed release unreadable: {exc}") from None
        return entry_from_table(name, desc["entry"], d, d / DESCRIPTOR)

    def overlay(self) -> dict[str, "ModelEntry"]:
        """Manifest entries that replace the shipped ones: the releases in service."""
        out = {}
        for name, m in self.state.models.items():
            if m.running is not None and name in self.tracked():
                out[name] = self.entry(name, m.running)
        return out

    # -- start and stop --------------------------------------------------------------------------

    def on_start(self) -> None:
        """Before the first pipeline opens: roll back a release that was on trial when the
        process last ended without a clean stop, and drop releases whose files are damaged."""
        from edged.models import ModelError, verify

        crashed = not self.state.clean_stop
        for name in self.tracked():
            self.state.model(name)
        for name, m in self.state.models.items():
            if m.testing and crashed:
                m.bad.append(m.testing)
                self._refused(name, m.testing, "edged stopped unexpectedly during its self-test")
            m.testing = None
            if m.trial and crashed:
                self._rollback_state(name, "edged stopped unexpectedly during its health window")
        for name, m in self.state.models.items():
            while m.running is not None:
                try:
                    e = self.entry(name, m.running)
                    verify(e)
                    if e.edgetpu_path and self.cfg.accelerator.device != "cpu":
                        verify(e, e.edgetpu_path)
                    break
                except (ModelError, KeyError, TypeError, ValueError) as exc:
                    log.error("installed release damaged; using the one before it",
                              extra=fields(model=name, version=m.running, error=str(exc)))
                    m.bad.append(m.running)
                    m.running, m.previous, m.trial = m.previous, None, None
        shutil.rmtree(self.dir / "staging", ignore_errors=True)
        self.state.clean_stop = False
        self._save()

    def rollback_running(self, reason: str) -> None:
        """Every release in service goes back one step (the daemon could not open them)."""
        for name, m in self.state.models.items():
            if m.running is not None:
                m.trial = m.trial or {"version": m.running}
                self._rollback_state(name, reason)

    def reconfigure(self, cfg) -> None:
        """After a reload: follow the config's models and settings (the repository stays)."""
        self.cfg = cfg
        if cfg.updates.url:
            self.u = cfg.updates

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="updater", daemon=True)
        self._thread.start()

    def stop(self, clean: bool) -> None:
        self._stop.set()
        self._wake.set()
        while True:  # release a thread waiting for a swap that will not come
            try:
                s = self._staged.get_nowait()
            except queue.Empty:
                break
            s.done.set()
        if self._thread:  # a download or self-test in progress is abandoned (staging is cleared at start)
            self._thread.join(0.5)
        self.state.clean_stop = clean
        self._save()

    def poke(self) -> None:
        """Check the repository now (a `cmd/update`, or an announced release)."""
        self._wake.set()

    def _save(self) -> None:
        with self._lock:
            _write_atomic(self.state_path, self.state.to_bytes())

    # -- the background thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # a bug here must not take the daemon down; say it and go on
                log.exception("update check failed")
            self._wake.wait(self.u.poll_interval_s)
            self._wake.clear()

    def check(self) -> None:
        """One round: refresh metadata, pick versions, fetch, verify, self-test, hand over."""
        try:
            from tuf.api import exceptions as tufx
            from tuf.ngclient import Updater as TufClient, UpdaterConfig
        except ImportError:
            self.once("no-tuf", f"updates configured but python-tuf is not installed: {INSTALL_HINT}",
                      level=logging.ERROR)
            return
        self.checks += 1
        url = self.u.url.rstrip("/")
        meta_dir = self.dir / "tuf"
        meta_dir.mkdir(exist_ok=True)
        fetcher = _fetcher(self)
        try:
            root = Path(self.u.root_json).read_bytes()
            client = TufClient(str(meta_dir), f"{url}/metadata/", str(self.dir / "staging"), f"{url}/targets/",
                               fetcher=fetcher, config=UpdaterConfig(app_user_agent=f"edged/{__version__}"),
                               bootstrap=root)
            client.refresh()
            info = client.get_targetinfo(f"channels/{self.u.channel}.json")
            if info is None:
                self._checked("no rollout on this channel")
                return
            path = self._download(client, info)
            channel = Channel.from_bytes(Path(path).read_bytes(), f"channels/{self.u.channel}.json")
        except OSError as exc:
            self._check_failed("io", f"cannot use the update state: {exc}")
            return
        except tufx.DownloadError as exc:
            if isinstance(exc, tufx.DownloadLengthMismatchError):
                self._refused(None, None, _reason(exc))
            else:
                self._check_failed("net", f"cannot reach the update repository {url}: {_reason(exc)}")
            return
        except (tufx.RepositoryError, ChannelError, ValueError) as exc:
            self._refused(None, None, _reason(exc))
            return
        except UpdateRefused as exc:
            self._refused(None, None, str(exc))
            return
        self._checked("ok")
        for name, task in self.tracked().items():
            if self._stop.is_set():
                return
            self._consider(client, channel, name, task)

    def _consider(self, client, channel: Channel, name: str, task: str) -> None:
        m = self.state.model(name)
        rollout = channel.models.get(name)
        running_revoked = rollout is not None and m.running in rollout.revoked
        want = rollout.choose(self.cfg.device_id, name) if rollout else None
        if running_revoked and (want is None or want == m.running):
            self._hand_over(Staged(name, 0))  # back to the shipped model
            return
        if want is None or want == m.running or want in m.bad:
            return
        if m.running is not None and want < m.running and not running_revoked:
            return  # never downgrade unless the running release was withdrawn
        if (m.trial or {}).get("version") is not None:
            return  # one change at a time: wait for the running trial's verdict
        with self._lock:
            self.pending[name] = want
        self.report_dirty = True
        from tuf.api import exceptions as tufx

        try:
            self._stage(client, name, task, want)
        except UpdateRefused as exc:
            self._refused(name, want, str(exc))
            return
        except tufx.DownloadError as exc:
            self._check_failed("net", f"cannot download {name} {want}: {_reason(exc)}")
            return
        finally:
            with self._lock:
                self.pending.pop(name, None)
        self._hand_over(Staged(name, want))

    def _hand_over(self, staged: Staged) -> None:
        self._staged.put(staged)
        while not staged.done.wait(0.5):
            if self._stop.is_set():
                return

    def _download(self, client, info, dest: Path | None = None) -> str:
        """One target into `dest`, checked against its signed length and hashes; a mismatch is
        refused naming the file, a network failure raised as the fetcher's DownloadError."""
        from tuf.api import exceptions as tufx

        if info.length > self.u.max_download_bytes:
            raise UpdateRefused(f"{info.path}: {info.length} bytes, more than updates.max_download_bytes "
                                f"({self.u.max_download_bytes})")
        try:
            return client.download_target(info, str(dest) if dest else None)
        except (tufx.RepositoryError, tufx.DownloadLengthMismatchError, tufx.DownloadHTTPError) as exc:
            raise UpdateRefused(f"{info.path}: {_reason(exc)}") from None

    def _stage(self, client, name: str, task: str, version: int) -> None:
        """Download, verify and self-test release NAME/VERSION into models/NAME/VERSION."""
        from tuf.api import exceptions as tufx

        from edged import selftest
        from edged.models import ModelError, entry_from_table

        base = f"models/{name}/{version}"
        staging = self.dir / "staging" / f"{name}-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            info = client.get_targetinfo(f"{base}/{DESCRIPTOR}")
            if info is None:
                raise UpdateRefused(f"{base}/{DESCRIPTOR}: not in the signed targets")
            self._download(client, info, staging / DESCRIPTOR)
            desc = json.loads((staging / DESCRIPTOR).read_bytes())
            entry_table = desc["entry"]
            if desc.get("name") != name or desc.get("version") != version or entry_table.get("task") != task:
                raise UpdateRefused(f"{base}/{DESCRIPTOR}: describes {desc.get('name')} {desc.get('version')} "
                                    f"({entry_table.get('task')}), not {name} {version} ({task})")
            if _version_tuple(desc.get("min_edged", "0")) > _version_tuple(__version__):
                raise UpdateRefused(f"needs edged {desc['min_edged']} or newer (this is {__version__})")
            wanted = set(desc["files"])
            if self.cfg.accelerator.device == "cpu" and entry_table.get("edgetpu_file"):
                wanted.discard(entry_table["edgetpu_file"])  # the CPU does not need the compiled variant
            for fname in sorted(wanted):
                if "/" in fname or fname.startswith("."):
                    raise UpdateRefused(f"{base}: bad file name {fname!r}")
                finfo = client.get_targetinfo(f"{base}/{fname}")
                if finfo is None:
                    raise UpdateRefused(f"{base}/{fname}: not in the signed targets")
                self._download(client, finfo, staging / fname)
            if self.cfg.accelerator.device == "cpu":
                entry_table = {k: v for k, v in entry_table.items() if not k.startswith("edgetpu_")}
                desc["entry"] = entry_table
                (staging / DESCRIPTOR).write_text(json.dumps(desc, indent=1, sort_keys=True))
            entry = entry_from_table(name, entry_table, staging, staging / DESCRIPTOR)
            self.state.model(name).testing = version
            self._save()  # a model that kills the process in its self-test is not tried again
            self._self_test(entry, staging / desc.get("selftest", "selftest.npz"))
            self.state.model(name).testing = None
            for p in staging.iterdir():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(staging)
            final = self.models_dir / name / str(version)
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            _fsync_dir(final.parent)
        except tufx.RepositoryError as exc:
            raise UpdateRefused(_reason(exc)) from None
        except (ModelError, selftest.SelfTestError) as exc:
            self.state.model(name).testing = None
            self.state.model(name).bad.append(version)
            self._save()
            raise UpdateRefused(str(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRefused(f"{base}/{DESCRIPTOR}: malformed release descriptor ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _self_test(self, entry, golden_path: Path) -> None:
        from edged import selftest
        from edged.models import verify
        from edged.runtime import Model, RuntimeUnavailable

        verify(entry)
        try:
            golden = selftest.Golden.load(golden_path)
            model = Model(entry.path, threads=1)
        except RuntimeUnavailable as exc:
            raise selftest.SelfTestError(str(exc)) from None
        try:
            selftest.check(model, golden)
        except selftest.SelfTestError as exc:
            raise selftest.SelfTestError(f"self-test failed: {exc}") from None

    # -- reporting results of a round ---------------------------------------------------------------

    def _checked(self, outcome: str) -> None:
        self.once.clear("check:net")
        self.once.clear("check:io")
        self._set_check({"outcome": outcome})

    def _check_failed(self, kind: str, message: str) -> None:
        if self._stop.is_set():
            return  # a download cut short by the daemon's own stop is not a failure to report
        self._set_check({"outcome": "failed", "reason": message})
        self.once(f"check:{kind}", "update check failed", reason=message)

    def _set_check(self, result: dict) -> None:
        # Reported when it changes, not after every quiet poll.
        changed = self.last_check is None or {k: v for k, v in self.last_check.items() if k != "ts"} != result
        self.last_check = {"ts": round(self.clock(), 3), **result}
        self.report_dirty |= changed

    def _refused(self, name: str | None, version: int | None, reason: str) -> None:
        import zlib

        kind = f"refused:{name}:{version}:{zlib.crc32(reason.encode()):08x}"
        self.once(kind, "update refused; keeping the running model",
                  level=logging.ERROR, model=name or "-", version=version or "-", reason=reason)
        self._outcome(name, version, "refused", reason)

    def _outcome(self, name, version, outcome: str, reason: str | None = None) -> None:
        self.state.last = {"model": name, "version": version, "outcome": outcome, "reason": reason,
                           "ts": round(self.clock(), 3)}
        self._save()
        self.report_dirty = True

    # -- on the daemon's main thread ------------------------------------------------------------------

    def service(self, daemon) -> None:
        """Swap in what the thread staged, judge health windows, publish the report."""
        while True:
            try:
                staged = self._staged.get_nowait()
            except queue.Empty:
                break
            try:
                self._swap(daemon, staged)
            finally:
                staged.done.set()
        self._judge(daemon)
        if self.report_dirty and daemon.link is not None:
            self.report_dirty = False
            daemon.link.publish_now("models", self.report_payload(daemon.cfg.device_id), qos=1, retain=True)

    def _swap(self, daemon, staged: Staged) -> None:
        m = self.state.model(staged.name)
        if staged.version == 0:  # the running release was revoked and nothing else admits us
            revoked = m.running
            m.running, m.previous, m.trial = None, None, None
            self._save()
            if daemon.reload():
                log.warning("running release revoked; back to the shipped model",
                            extra=fields(model=staged.name, version=revoked))
                self._outcome(staged.name, revoked, "rolled back", "revoked by the repository")
            return
        before = (m.running, m.previous, m.trial)
        m.previous, m.running = m.running, staged.version
        m.trial = {"version": staged.version, "since": round(self.clock(), 3)}
        self._save()  # from here a crash means: roll back on the next start
        if not daemon.reload():
            m.running, m.previous, m.trial = before
            m.bad.append(staged.version)
            self._save()
            self._refused(staged.name, staged.version,
                          f"failed to load: {getattr(daemon, 'last_reload_error', '') or 'see the log'}")
            return
        staged.ok = True
        self._prune(staged.name)
        task = self.tracked()[staged.name]
        progress, failed = _counters(daemon, task)
        now = time.monotonic()
        self._health[staged.name] = _Health(task, staged.version, now, progress, failed, now, progress)
        log.info("update installed; watching its health", extra=fields(
            model=staged.name, version=staged.version, previous=m.previous or "shipped",
            health_window_s=self.u.health_window_s))
        self._outcome(staged.name, staged.version, "installed")

    def _judge(self, daemon) -> None:
        now = time.monotonic()
        for name, h in list(self._health.items()):
            progress, failed = _counters(daemon, h.task)
            if progress != h.last_count:
                h.last_count, h.last_progress = progress, now
            done, bad = progress - h.progress0, failed - h.failed0
            reason = None
            if bad > max(done, 3):
                reason = f"{bad} {h.task} inputs failed against {done} that succeeded"
            elif now - h.last_progress > max(self.u.health_window_s / 4, 5.0):
                reason = f"no {h.task} progress for {now - h.last_progress:.0f} s"
            elif now - h.since >= self.u.health_window_s:
                if done == 0:
                    reason = f"no {h.task} result in {now - h.since:.0f} s"
                else:
                    del self._health[name]
                    self.state.model(name).trial = None
                    self._save()
                    log.info("update healthy", extra=fields(model=name, version=h.version, results=done))
                    self.report_dirty = True
                    continue
            if reason:
                del self._health[name]
                self._rollback_state(name, reason)
                daemon.reload()
                self._prune(name)

    def _prune(self, name: str) -> None:
        """Keep the installed releases that may still run: the running, previous and trial ones."""
        m = self.state.model(name)
        keep = {str(v) for v in (m.running, m.previous, (m.trial or {}).get("version")) if v}
        d = self.models_dir / name
        for p in d.iterdir() if d.is_dir() else ():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _rollback_state(self, name: str, reason: str) -> None:
        m = self.state.model(name)
        bad = (m.trial or {}).get("version", m.running)
        m.bad.append(bad)
        m.running, m.previous, m.trial = m.previous, None, None
        log.error("update rolled back", extra=fields(model=name, version=bad,
                                                     to=m.running or "shipped", reason=reason))
        self._outcome(name, bad, "rolled back", reason)

    def on_start_trials(self, daemon) -> None:
        """After the first pipeline started: resume watching releases still on trial."""
        now = time.monotonic()
        for name, m in self.state.models.items():
            if m.trial and name in self.tracked():
                task = self.tracked()[name]
                progress, failed = _counters(daemon, task)
                self._health[name] = _Health(task, m.trial["version"], now, progress, failed, now, progress)

    def report(self, device_id: str) -> dict:
        with self._lock:
            pending = dict(self.pending)
        models = {}
        for name in sorted(set(self.tracked()) | set(self.state.models)):
            m = self.state.model(name)
            models[name] = {"running": m.running, "previous": m.previous, "pending": pending.get(name),
                            "trial": bool(m.trial), "task": self.tracked().get(name)}
        return {"v": 1, "device_id": device_id, "ts": round(self.clock(), 3), "channel": self.u.channel,
                "models": models, "last": self.state.last, "last_check": self.last_check}

    def report_payload(self, device_id: str) -> bytes:
        return json.dumps(self.report(device_id), separators=(",", ":")).encode()

    def stats(self) -> dict:
        return {"update_checks": self.checks, "update_bytes": self.bytes_fetched}


def _counters(daemon, task: str) -> tuple[int, int]:
    c = daemon.counters
    if task == "vision":
        return c.frames, c.frames_failed
    return c.motion_windows, c.imu_failed_batches


def _reason(exc: BaseException) -> str:
    """One line for a TUF error, saying what it means for the device."""
    from tuf.api import exceptions as tufx

    msg = str(exc) or type(exc).__name__
    if isinstance(exc, tufx.UnsignedMetadataError):
        return f"metadata not signed by the keys the pinned root trusts ({msg}): tampered, or signed with a wrong key"
    if isinstance(exc, tufx.ExpiredMetadataError):
        return f"expired metadata ({msg}): the repository was not refreshed, or a mirror replays old metadata"
    if isinstance(exc, tufx.BadVersionNumberError):
        return f"rollback refused ({msg}): the repository offers older metadata than this device has seen"
    if isinstance(exc, tufx.LengthOrHashMismatchError):
        return f"does not match its signed length and hashes ({msg}): tampered or corrupted"
    if isinstance(exc, tufx.DownloadLengthMismatchError):
        return f"larger than its signed length ({msg})"
    if isinstance(exc, tufx.DownloadHTTPError):
        return f"HTTP {exc.status_code}: {msg}"
    cause = exc.__cause__ or exc.__context__
    return f"{msg}: {cause}" if cause else msg


def _fetcher(updater: Updater):
    """ngclient's urllib3 fetcher, counting bytes and held to `bandwidth_kbps`."""
    from tuf.api import exceptions as tufx
    from tuf.ngclient import Urllib3Fetcher

    class CappedFetcher(Urllib3Fetcher):
        def _fetch(self, url):
            chunks = super()._fetch(url)
            rate = updater.u.bandwidth_kbps * 1000 / 8  # bytes per second, 0 = no cap
            start, sent = time.monotonic(), 0
            for chunk in chunks:
                sent += len(chunk)
                updater.bytes_fetched += len(chunk)
                if rate:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0 and updater._stop.wait(ahead):
                        raise tufx.DownloadError("edged is stopping")  # not a short, "tampered" file
                yield chunk

    return CappedFetcher(socket_timeout=30, chunk_size=16384, app_user_agent=f"edged/{__version__}")
