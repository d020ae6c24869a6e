"""The device's model updater: signed releases over TUF, staged rollout, self-test, health, rollback.

Off unless `[updates]` names a repository. Then a background thread, every `poll_interval_s` (or
at once when poked by `cmd/update`, or soon after a message on the fleet's announce topic
`<prefix>/fleet/release` — at most one such check per `announce_interval_s`, so a flood of
announcements cannot make the device hammer the repository; what the message says is never read,
it only prompts the verified check below):

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

Small artefacts — a motion model's centroids, a model's label map (`edged.artefacts`) — have
rollouts of their own. They are fetched and verified the same way, checked against the model the
device runs (centroids of another model or signature version are refused in one line), renamed
into `artefacts/NAME/KIND/VERSION/`, and applied through the same reload: the new pipeline's
model entry carries them. An installed artefact that no longer fits (its model was updated since)
is left unused, said once in the log.

Nothing here blocks the pipeline: network, disk and self-test work run on this thread; the
swap itself is the same reload a SIGHUP does. Power cuts: a release directory is renamed into
place only when complete and fsynced, `state.json` is replaced atomically, and every model file is
verified (size, sha256) again when a pipeline opens it, so a half-written model is never used.

State, under `<state_dir>/updates/`: `tuf/` (trusted metadata), `staging/`, `models/<name>/<version>/`
(installed releases: the running one, the previous one, one on trial), `artefacts/<name>/<kind>/<version>/`
(the running and previous artefact of each kind), `state.json`.
python-tuf is imported only when this module starts its thread, so a device without `[updates]`
never loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from edged import __version__
from edged import artefacts as art
from edged.service.log import Once, fields
from edged.rollout import ARTEFACT_KINDS, Channel, ChannelError

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


def _check_min_edged(desc: dict, base: str) -> None:
    if _version_tuple(desc.get("min_edged", "0")) > _version_tuple(__version__):
        raise UpdateRefused(f"{base}: needs edged {desc['min_edged']} or newer (this is {__version__})")


def _install(staging: Path, final: Path) -> None:
    """Make a verified staging directory the release at `final`, durably (files, then the rename)."""
    for p in staging.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_dir(final.parent)


# -- persisted state --------------------------------------------------------------------------------

def _version(v):
    return v if type(v) is int and v > 0 else None


@dataclass
class ArtefactState:
    running: int | None = None   # the artefact release in service; None: none (the shipped files)
    previous: int | None = None
    bad: list[int] = field(default_factory=list)  # refused: never tried again

    def to_dict(self) -> dict:
        return {"running": self.running, "previous": self.previous, "bad": self.bad}

    @classmethod
    def from_dict(cls, d) -> "ArtefactState":
        if not isinstance(d, dict):
            return cls()
        return cls(_version(d.get("running")), _version(d.get("previous")),
                   [v for v in d.get("bad", []) if type(v) is int])


@dataclass
class ModelState:
    running: int | None = None     # the release in service; None: the shipped model
    previous: int | None = None    # what to roll back to (None: the shipped model)
    trial: dict | None = None      # {"version", "since"}: in its health window
    testing: int | None = None     # a release being self-tested (a crash then is its fault)
    bad: list[int] = field(default_factory=list)  # refused after staging: never tried again
    artefacts: dict[str, ArtefactState] = field(default_factory=dict)  # kind -> its releases

    def artefact(self, kind: str) -> ArtefactState:
        return self.artefacts.setdefault(kind, ArtefactState())

    def to_dict(self) -> dict:
        d = {"running": self.running, "previous": self.previous, "trial": self.trial,
             "testing": self.testing, "bad": self.bad}
        if self.artefacts:
            d["artefacts"] = {k: a.to_dict() for k, a in sorted(self.artefacts.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelState":
        version = _version
        trial = d.get("trial")
        if not (isinstance(trial, dict) and version(trial.get("version"))):
            trial = None
        arts = d.get("artefacts") if isinstance(d.get("artefacts"), dict) else {}
        return cls(version(d.get("running")), version(d.get("previous")), trial, version(d.get("testing")),
                   [v for v in d.get("bad", []) if type(v) is int],
                   {k: ArtefactState.from_dict(a) for k, a in arts.items() if k in ARTEFACT_KINDS})


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
    kind: str = "model"  # or an artefact kind
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
        self._poked = False
        self._announce_pending = False
        self._announce_next = 0.0  # monotonic: no announced check before this
        self.announcements = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._staged: queue.Queue[Staged] = queue.Queue()
        self._lock = threading.Lock()
        self._health: dict[str, _Health] = {}
        self.pending: dict[str, int] = {}   # name -> version being fetched or staged
        self.pending_artefacts: dict[tuple[str, str], int] = {}  # (name, kind) -> version
        # Artefacts refused because they do not fit the model in service: (name, kind, version,
        # that model's sha256). Not fetched again while that model runs; tried again after a change.
        self._misfits: set[tuple[str, str, int, str]] = set()
        self.artefacts_dir = self.dir / "artefacts"
        self.report_dirty = True
        self.checks = 0
        self.bytes_fetched = 0
        self.last_check: dict | None = None

    # -- what the config runs ------------------------------------------------------------------

    def tracked(self) -> dict[str, str]:
        """Model name -> task, for the models the daemon opens with this config."""
        return {name: task for name, task, _ in self.cfg.model_uses()}

    def entry(self, name: str, version: int) -> "ModelEntry":
        """The installed release as a manifest entry (files verified when a pipeline opens it)."""
        from edged.models import ModelError, entry_from_table

        d = self.models_dir / name / str(version)
        try:
            desc = json.loads((d / DESCRIPTOR).read_bytes())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{d / DESCRIPTOR}: installed release unreadable: {exc}") from None
        return entry_from_table(name, desc["entry"], d, d / DESCRIPTOR)

    def shipped(self) -> dict[str, "ModelEntry"]:
        from edged.models import ModelError, default_models_dir, load_manifest

        try:
            return load_manifest(Path(self.cfg.models_dir) if self.cfg.models_dir else default_models_dir())
        except ModelError:
            return {}  # the pipeline opening it says what is wrong

    def base_entry(self, name: str) -> "ModelEntry | None":
        """The model `name` in service without its artefacts: the running release, else the shipped one."""
        m = self.state.model(name)
        return self.entry(name, m.running) if m.running is not None else self.shipped().get(name)

    def overlay(self) -> dict[str, "ModelEntry"]:
        """Manifest entries that replace the shipped ones: the releases in service, with the
        artefacts in service applied."""
        out = {}
        shipped = None
        for name, m in self.state.models.items():
            if name not in self.tracked():
                continue
            entry = self.entry(name, m.running) if m.running is not None else None
            arts = {k: a.running for k, a in sorted(m.artefacts.items()) if a.running is not None}
            if arts:
                if entry is None:
                    shipped = self.shipped() if shipped is None else shipped
                    entry = shipped.get(name)
                if entry is not None:
                    entry = self._with_artefacts(entry, arts)
            if entry is not None:
                out[name] = entry
        return out

    def artefact_dir(self, name: str, kind: str, version: int) -> Path:
        return self.artefacts_dir / name / kind / str(version)

    def _load_artefact(self, name: str, kind: str, version: int):
        """An installed artefact, checked against the sha256 recorded when it was installed."""
        d = self.artefact_dir(name, kind, version)
        try:
            desc = json.loads((d / DESCRIPTOR).read_bytes())
            path = d / art.FILES[kind]
            data = path.read_bytes()
        except (OSError, ValueError) as exc:
            raise art.ArtefactError(f"{d}: installed artefact unreadable: {exc}") from None
        if not isinstance(desc, dict) or hashlib.sha256(data).hexdigest() != desc.get("sha256"):
            raise art.ArtefactError(f"{path}: does not match the sha256 recorded at install: damaged")
        return path, art.parse(kind, data, str(path))

    def _with_artefacts(self, entry: "ModelEntry", arts: dict[str, int]) -> "ModelEntry":
        from dataclasses import replace

        for kind, version in arts.items():
            try:
                path, artefact = self._load_artefact(entry.name, kind, version)
            except art.ArtefactError as exc:
                self.once(f"artefact-bad:{entry.name}:{kind}:{version}", "installed artefact unusable; not used",
                          level=logging.ERROR, model=entry.name, artefact=kind, version=version, error=str(exc))
                continue
            reason = art.misfit(kind, artefact, entry)
            if reason:
                self.once(f"artefact-misfit:{entry.name}:{kind}:{version}:{entry.sha256}",
                          "installed artefact does not fit the model in service; not used", level=logging.WARNING,
                          model=entry.name, artefact=kind, version=version, reason=reason)
                continue
            entry = replace(entry, labels=list(artefact)) if kind == "labels" else replace(entry, centroids=path)
        return entry

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
            for kind, a in m.artefacts.items():
                while a.running is not None:
                    try:
                        self._load_artefact(name, kind, a.running)
                        break
                    except art.ArtefactError as exc:
                        log.error("installed artefact damaged; using the one before it",
                                  extra=fields(model=name, artefact=kind, version=a.running, error=str(exc)))
                        a.bad.append(a.running)
                        a.running, a.previous = a.previous, None
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
        """Check the repository now (a `cmd/update`)."""
        self._poked = True
        self._wake.set()

    def announced(self) -> None:
        """A message on the fleet's announce topic (on paho's thread): check soon — within
        `announce_interval_s` of the last check, and at most once per interval however many come."""
        self.announcements += 1
        if self.u.announce:
            self._announce_pending = True
            self._wake.set()

    def _save(self) -> None:
        with self._lock:
            _write_atomic(self.state_path, self.state.to_bytes())

    # -- the background thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._announce_next = time.monotonic() + self.u.announce_interval_s
            try:
                self.check()
            except Exception:  # a bug here must not take the daemon down; say it and go on
                log.exception("update check failed")
            self._wait_turn()

    def _wait_turn(self) -> None:
        """Until the next check is due: the poll interval, a poke, or an announcement whose turn came."""
        deadline = time.monotonic() + self.u.poll_interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            if self._poked:
                self._poked = False
                return
            if self._announce_pending and now >= self._announce_next:
                self._announce_pending = False
                return
            if now >= deadline:
                return
            timeout = deadline - now
            if self._announce_pending:
                timeout = min(timeout, self._announce_next - now)
            self._wake.wait(timeout)
            self._wake.clear()  # the flags above say why it was set

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
        self._consider_model(client, channel, name, task)
        for kind in ARTEFACT_KINDS:
            if self._stop.is_set():
                return
            self._consider_artefact(client, channel, name, kind)

    def _consider_model(self, client, channel: Channel, name: str, task: str) -> None:
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
            if running_revoked:  # a withdrawn release must go even when its successor cannot come
                self._hand_over(Staged(name, 0))
            return
        except tufx.DownloadError as exc:
            self._check_failed("net", f"cannot download {name} {want}: {_reason(exc)}")
            if running_revoked:
                self._hand_over(Staged(name, 0))
            return
        finally:
            with self._lock:
                self.pending.pop(name, None)
        self._hand_over(Staged(name, want))

    def _consider_artefact(self, client, channel: Channel, name: str, kind: str) -> None:
        from tuf.api import exceptions as tufx

        rollout = channel.artefact(name, kind)
        m = self.state.model(name)
        if rollout is None or (m.trial or {}).get("version") is not None:
            return  # nothing offered (keep what runs), or a model on trial: one change at a time
        a = m.artefact(kind)
        revoked = a.running in rollout.revoked
        want = rollout.choose(self.cfg.device_id, name)
        if revoked and (want is None or want == a.running):
            self._hand_over(Staged(name, 0, kind))  # back to none
            return
        if want is None or want == a.running or want in a.bad:
            return
        if a.running is not None and want < a.running and not revoked:
            return
        try:
            entry = self.base_entry(name)
        except Exception as exc:  # the running release unreadable: on_start's business, not this round's
            self.once(f"artefact-base:{name}", "cannot read the model in service", model=name, error=str(exc))
            return
        key = (name, kind, want, entry.sha256 if entry else "")
        if key in self._misfits:
            return
        with self._lock:
            self.pending_artefacts[(name, kind)] = want
        self.report_dirty = True
        try:
            self._stage_artefact(client, name, kind, want, entry, key)
        except UpdateRefused as exc:
            self._refused(name, want, str(exc), kind)
            return
        except tufx.DownloadError as exc:
            self._check_failed("net", f"cannot download {name} {kind} {want}: {_reason(exc)}")
            return
        finally:
            with self._lock:
                self.pending_artefacts.pop((name, kind), None)
        self._hand_over(Staged(name, want, kind))

    def _stage_artefact(self, client, name: str, kind: str, version: int, entry, key) -> None:
        """Download and verify artefact NAME/KIND/VERSION, check that it fits `entry` (the model in
        service), and rename it into artefacts/NAME/KIND/VERSION."""
        base = f"artefacts/{name}/{kind}/{version}"
        with self._staging(f"{name}-{kind}-{version}", base) as staging:
            try:
                desc = self._descriptor(client, base, staging)
                if (desc.get("name"), desc.get("kind"), desc.get("version")) != (name, kind, version):
                    raise UpdateRefused(f"{base}/{DESCRIPTOR}: describes {desc.get('name')} {desc.get('kind')} "
                                        f"{desc.get('version')}, not {name} {kind} {version}")
                _check_min_edged(desc, base)
                fname = art.FILES[kind]
                if desc.get("file") != fname:
                    raise UpdateRefused(f"{base}/{DESCRIPTOR}: file {desc.get('file')!r}, expected {fname!r}")
                data = self._fetch(client, base, fname, staging).read_bytes()
                artefact = art.parse(kind, data, f"{base}/{fname}")
                if entry is None:
                    raise UpdateRefused(f"{base}: model {name} is not in this device's manifest")
                reason = art.misfit(kind, artefact, entry)
                if reason:
                    self._misfits.add(key)
                    raise UpdateRefused(f"{base}: {reason}")
                desc["sha256"] = hashlib.sha256(data).hexdigest()  # checked again whenever it is applied
                (staging / DESCRIPTOR).write_text(json.dumps(desc, indent=1, sort_keys=True))
                _install(staging, self.artefact_dir(name, kind, version))
            except art.ArtefactError as exc:
                self.state.model(name).artefact(kind).bad.append(version)
                self._save()
                raise UpdateRefused(str(exc)) from None

    def _hand_over(self, staged: Staged) -> None:
        self._staged.put(staged)
        while not staged.done.wait(0.5):
            if self._stop.is_set():
                return

    @contextlib.contextmanager
    def _staging(self, label: str, base: str) -> Iterator[Path]:
        """An empty staging directory for release BASE while it is downloaded and checked, removed
        afterwards (an installed release was renamed away from it). What TUF refuses and a
        malformed descriptor come out as UpdateRefused, naming the release."""
        from tuf.api import exceptions as tufx

        staging = self.dir / "staging" / label
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
        except tufx.RepositoryError as exc:
            raise UpdateRefused(_reason(exc)) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRefused(f"{base}/{DESCRIPTOR}: malformed release descriptor ({exc})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch(self, client, base: str, fname: str, staging: Path) -> Path:
        """Target BASE/FNAME into `staging`, verified; refused when it is not in the signed targets."""
        info = client.get_targetinfo(f"{base}/{fname}")
        if info is None:
            raise UpdateRefused(f"{base}/{fname}: not in the signed targets")
        self._download(client, info, staging / fname)
        return staging / fname

    def _descriptor(self, client, base: str, staging: Path) -> dict:
        """A release's signed descriptor, BASE/release.json, downloaded into `staging` and parsed."""
        return json.loads(self._fetch(client, base, DESCRIPTOR, staging).read_bytes())

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
        from edged import selftest
        from edged.models import ModelError, entry_from_table

        base = f"models/{name}/{version}"
        with self._staging(f"{name}-{version}", base) as staging:
            try:
                desc = self._descriptor(client, base, staging)
                entry_table = desc["entry"]
                if desc.get("name") != name or desc.get("version") != version or entry_table.get("task") != task:
                    raise UpdateRefused(f"{base}/{DESCRIPTOR}: describes {desc.get('name')} {desc.get('version')} "
                                        f"({entry_table.get('task')}), not {name} {version} ({task})")
                _check_min_edged(desc, base)
                wanted = set(desc["files"])
                if self.cfg.accelerator.device == "cpu" and entry_table.get("edgetpu_file"):
                    wanted.discard(entry_table["edgetpu_file"])  # the CPU does not need the compiled variant
                for fname in sorted(wanted):
                    if "/" in fname or fname.startswith("."):
                        raise UpdateRefused(f"{base}: bad file name {fname!r}")
                    self._fetch(client, base, fname, staging)
                if self.cfg.accelerator.device == "cpu":
                    entry_table = {k: v for k, v in entry_table.items() if not k.startswith("edgetpu_")}
                    desc["entry"] = entry_table
                    (staging / DESCRIPTOR).write_text(json.dumps(desc, indent=1, sort_keys=True))
                entry = entry_from_table(name, entry_table, staging, staging / DESCRIPTOR)
                self.state.model(name).testing = version
                self._save()  # a model that kills the process in its self-test is not tried again
                self._self_test(entry, staging / desc.get("selftest", "selftest.npz"))
                self.state.model(name).testing = None
                _install(staging, self.models_dir / name / str(version))
            except (ModelError, selftest.SelfTestError) as exc:
                self.state.model(name).testing = None
                self.state.model(name).bad.append(version)
                self._save()
                raise UpdateRefused(str(exc)) from None

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

    def _refused(self, name: str | None, version: int | None, reason: str, artefact: str | None = None) -> None:
        import zlib

        kind = f"refused:{name}:{artefact}:{version}:{zlib.crc32(reason.encode()):08x}"
        extra = {"artefact": artefact} if artefact else {}
        self.once(kind, "update refused; keeping the running model", level=logging.ERROR,
                  model=name or "-", version=version or "-", reason=reason, **extra)
        self._outcome(name, version, "refused", reason, artefact)

    def _outcome(self, name, version, outcome: str, reason: str | None = None, artefact: str | None = None) -> None:
        self.state.last = {"model": name, "version": version, "outcome": outcome, "reason": reason,
                           "ts": round(self.clock(), 3)}
        if artefact:
            self.state.last["artefact"] = artefact
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
                if staged.kind == "model":
                    self._swap(daemon, staged)
                else:
                    self._swap_artefact(daemon, staged)
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

    def _swap_artefact(self, daemon, staged: Staged) -> None:
        a = self.state.model(staged.name).artefact(staged.kind)
        before = (a.running, a.previous)
        if staged.version == 0:  # the running artefact was revoked and nothing else admits us
            revoked = a.running
            a.running, a.previous = None, None
            self._save()
            if not daemon.reload():
                a.running, a.previous = before
                self._save()
                return
            log.warning("running artefact revoked; none in service now",
                        extra=fields(model=staged.name, artefact=staged.kind, version=revoked))
            self._outcome(staged.name, revoked, "rolled back", "revoked by the repository", staged.kind)
            self._prune_artefacts(staged.name, staged.kind)
            return
        a.previous, a.running = a.running, staged.version
        self._save()
        if not daemon.reload():
            a.running, a.previous = before
            a.bad.append(staged.version)
            self._save()
            self._refused(staged.name, staged.version,
                          f"failed to load: {getattr(daemon, 'last_reload_error', '') or 'see the log'}", staged.kind)
            return
        staged.ok = True
        self._prune_artefacts(staged.name, staged.kind)
        log.info("update installed", extra=fields(model=staged.name, artefact=staged.kind, version=staged.version,
                                                  previous=a.previous or "none"))
        self._outcome(staged.name, staged.version, "installed", None, staged.kind)

    def _prune_artefacts(self, name: str, kind: str) -> None:
        a = self.state.model(name).artefact(kind)
        keep = {str(v) for v in (a.running, a.previous) if v}
        d = self.artefacts_dir / name / kind
        for p in d.iterdir() if d.is_dir() else ():
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

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
            pending_artefacts = dict(self.pending_artefacts)
        models = {}
        for name in sorted(set(self.tracked()) | set(self.state.models)):
            m = self.state.model(name)
            models[name] = {"running": m.running, "previous": m.previous, "pending": pending.get(name),
                            "trial": bool(m.trial), "task": self.tracked().get(name)}
            arts = {k: {"running": a.running, "previous": a.previous, "pending": pending_artefacts.get((name, k))}
                    for k in ARTEFACT_KINDS if (a := m.artefacts.get(k, ArtefactState())) and
                    (a.running or a.previous or (name, k) in pending_artefacts)}
            if arts:
                models[name]["artefacts"] = arts
        return {"v": 1, "device_id": device_id, "ts": round(self.clock(), 3), "channel": self.u.channel,
                "models": models, "last": self.state.last, "last_check": self.last_check}

    def report_payload(self, device_id: str) -> bytes:
        return json.dumps(self.report(device_id), separators=(",", ":")).encode()

    def stats(self) -> dict:
        return {"update_checks": self.checks, "update_bytes": self.bytes_fetched,
                "update_announcements": self.announcements, "update_channel": self.u.channel,
                "models": self.running_summary()}

    def running_summary(self) -> dict:
        """What runs, in a few bytes for every stats message (`edged ingest` stores it as
        devices.models; `edged release status --db` reads it): per model the release in service
        (None: the shipped one), whether it is on trial, and the artefacts in service."""
        out = {}
        for name in sorted(self.tracked()):
            m = self.state.model(name)
            d = {"running": m.running, "trial": bool(m.trial)}
            arts = {k: a.running for k, a in sorted(m.artefacts.items()) if a.running is not None}
            if arts:
                d["artefacts"] = arts
            out[name] = d
        return out


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
