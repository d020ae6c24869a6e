"""Signed model releases: the TUF repository edged devices update from (`edged release …`).

The repository is built with python-tuf's Metadata API and signed with securesystemslib keys; the
device side is `edged.service.updater`, which trusts only what the pinned root allows. Layout:

    REPO/public/            what a web server or object store serves (nothing secret)
      metadata/             N.root.json, N.targets.json, N.snapshot.json (consistent snapshots), timestamp.json
      targets/              models/<name>/<version>/<sha256>.<file>, channels/<sha256>.<channel>.json
    REPO/keys/              the online keys (targets, snapshot, timestamp): <role>.pem (0600), <role>.pub.json
    REPO/root.json          the root metadata to pin on devices (scripts/provision --root-json)
    root key                only where --root-key says (default REPO/offline/root.pem, to be moved
                            off this machine): it signs root metadata, i.e. key changes, nothing else

A release of model NAME at version N is the model file (and its `_edgetpu` variant), the files
its manifest entry names (labels, anchors, centroids), golden self-test vectors, and
`release.json` (the manifest entry, the minimum edged version, the file list), all as targets
under models/NAME/N/. Small artefacts are released on their own, without a new model
(`add_artefact`): a motion model's centroids (e.g. after `edged signatures enroll`) or a label map,
as `artefacts/NAME/KIND/N/` (the file and its `release.json`), with versions of their own. Who
should run what is the channel document (`edged.rollout`): a percent per version, and revoked
versions, for models and for artefacts. Every change re-signs targets, snapshot and timestamp; the
timestamp expires after a day, so a repository must be refreshed (`edged release refresh`, e.g.
hourly from cron) or devices stop trusting it: that is TUF's protection against a frozen mirror.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp)
from tuf.api.serialization.json import JSONSerializer

from edged import __version__
from edged import artefacts as art
from edged.rollout import ARTEFACT_KINDS, CHANNEL_RE, NAME_RE, Channel, ChannelError, ModelRollout
from edged.selftest import Golden

ONLINE_ROLES = ("targets", "snapshot", "timestamp")
EXPIRY = {"root": timedelta(days=365), "targets": timedelta(days=90),
          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
GOLDEN = "selftest.npz"
DESCRIPTOR = "release.json"


class ReleaseError(Exception):
    """A problem with the repository or a release, worded for the user (one line)."""


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `path` so that a reader (or a power cut) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- keys ------------------------------------------------------------------------------------------

def _pub_path(pem: Path) -> Path:
    """The public half beside a private key: keys/targets.pem -> keys/targets.pub.json."""
    return pem.with_suffix(".pub.json")


def _save_key(signer: CryptoSigner, pem: Path) -> None:
    key = signer.public_key
    _write_atomic(pem, signer.private_bytes, 0o600)
    _write_atomic(_pub_path(pem), json.dumps({"keyid": key.keyid, **key.to_dict()}, indent=1).encode())


def _load_signer(pem: Path, pub: Path) -> CryptoSigner:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        doc = json.loads(pub.read_text())
        key = SSlibKey.from_dict(doc.pop("keyid"), doc)
        return CryptoSigner(load_pem_private_key(pem.read_bytes(), None), key)
    except FileNotFoundError as exc:
        raise ReleaseError(f"{exc.filename}: key file missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError(f"{pem}: not a key edged wrote ({exc})") from None


# -- the repository ---------------------------------------------------------------------------------

@dataclass
class Release:
    name: str
    version: int
    task: str
    files: list[str]


class Repository:
    """An edged release repository on disk, opened with its online keys."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.public = self.path / "public"
        self.metadata_dir = self.public / "metadata"
        self.targets_dir = self.public / "targets"
        if not (self.metadata_dir / "timestamp.json").is_file():
            raise ReleaseError(f"{self.path}: not an edged release repository (run: edged release init {self.path})")
        keys = self.path / "keys"
        self.signers = {r: _load_signer(keys / f"{r}.pem", keys / f"{r}.pub.json") for r in ONLINE_ROLES}
        self.root = self._latest("root", Root)
        self.targets = self._latest("targets", Targets)
        self.snapshot = self._latest("snapshot", Snapshot)
        self.timestamp = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))

    def _latest(self, role: str, cls):
        versions = [int(m.group(1)) for p in self.metadata_dir.glob(f"*.{role}.json")
                    if (m := re.fullmatch(rf"(\d+)\.{role}\.json", p.name))]
        if not versions:
            raise ReleaseError(f"{self.metadata_dir}: no {role} metadata")
        return Metadata[cls].from_file(str(self.metadata_dir / f"{max(versions)}.{role}.json"))

    # -- creating ------------------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | Path, root_key: str | Path | None = None) -> "Repository":
        """New keys and root metadata, and empty targets: a repository devices can pin."""
        path = Path(path)
        if (path / "public" / "metadata").exists():
            raise ReleaseError(f"{path}: already a release repository (its root is {path / 'root.json'})")
        root_pem = Path(root_key) if root_key else path / "offline" / "root.pem"
        if root_pem.exists():
            raise ReleaseError(f"{root_pem}: exists; refusing to overwrite a root key")
        keys = path / "keys"
        if root_pem.resolve().parent == keys.resolve():
            raise ReleaseError(f"{root_pem}: the root key must not sit with the online keys in {keys}")
        signers = {r: CryptoSigner.generate_ed25519() for r in ("root",) + ONLINE_ROLES}
        _save_key(signers["root"], root_pem)
        for r in ONLINE_ROLES:
            _save_key(signers[r], keys / f"{r}.pem")
        root = Root(expires=_now() + EXPIRY["root"], consistent_snapshot=True)
        for role, s in signers.items():
            root.add_key(s.public_key, role)
        md = Metadata(root)
        md.sign(signers["root"])
        data = md.to_bytes(JSONSerializer(compact=False))
        _write_atomic(path / "public" / "metadata" / "1.root.json", data)
        _write_atomic(path / "root.json", data)
        targets = Metadata(Targets(expires=_now() + EXPIRY["targets"]))
        snapshot = Metadata(Snapshot(expires=_now() + EXPIRY["snapshot"]))
        timestamp = Metadata(Timestamp(expires=_now() + EXPIRY["timestamp"]))
        repo = cls.__new__(cls)
        repo.path = path
        repo.public = path / "public"
        repo.metadata_dir = repo.public / "metadata"
        repo.targets_dir = repo.public / "targets"
        repo.signers = {r: signers[r] for r in ONLINE_ROLES}
        repo.root, repo.targets, repo.snapshot, repo.timestamp = md, targets, snapshot, timestamp
        repo.publish(bump=False)
        return repo

    # -- keys ------------------------------------------------------------------------------------

    def rotate(self, root_key: str | Path, new_root_key: str | Path | None = None, *,
               keep_root: bool = False) -> Path | None:
        """New keys for the online roles (and, unless `keep_root`, for root): root metadata version
        N+1 naming them, signed by the current root key and by the new one, then every online
        role re-signed. Devices walk from the root they pinned to the new one; REPO/root.json is
        the new pin for devices provisioned from now on. Returns where the new root key went."""
        root_pem = Path(root_key)
        old = _load_signer(root_pem, _pub_path(root_pem))
        current = self.root.signed
        if old.public_key.keyid not in current.roles["root"].keyids:
            raise ReleaseError(f"{root_pem}: not a root key of {self.path} (root version {current.version} "
                               "trusts other keys)")
        new_pem = None
        if not keep_root:
            new_pem = Path(new_root_key) if new_root_key else (
                root_pem.with_name(f"root-{current.version + 1}.pem"))
            if new_pem.exists():
                raise ReleaseError(f"{new_pem}: exists; refusing to overwrite a root key")
            if new_pem.resolve().parent == (self.path / "keys").resolve():
                raise ReleaseError(f"{new_pem}: the root key must not sit with the online keys in {self.path / 'keys'}")
        root = Metadata[Root].from_bytes(self.root.to_bytes()).signed  # a copy to change
        signers = {r: CryptoSigner.generate_ed25519() for r in ONLINE_ROLES + (() if keep_root else ("root",))}
        for role, signer in signers.items():
            for keyid in list(root.roles[role].keyids):
                root.revoke_key(keyid, role)
            root.add_key(signer.public_key, role)
        root.version += 1
        root.expires = _now() + EXPIRY["root"]
        md = Metadata(root)
        md.sign(old)
        if not keep_root:
            md.sign(signers["root"], append=True)  # a new root must satisfy the old keys and its own
        # Keys first, under new names; then the root that trusts them; then the names swapped.
        # Interrupted, the repository still has the old root and old keys in force.
        keys = self.path / "keys"
        if new_pem is not None:
            _save_key(signers["root"], new_pem)
        for r in ONLINE_ROLES:
            _save_key(signers[r], keys / f"{r}.next.pem")
        data = md.to_bytes(JSONSerializer(compact=False))
        _write_atomic(self.metadata_dir / f"{root.version}.root.json", data)
        _write_atomic(self.path / "root.json", data)
        for r in ONLINE_ROLES:
            os.replace(keys / f"{r}.next.pem", keys / f"{r}.pem")
            os.replace(keys / f"{r}.next.pub.json", keys / f"{r}.pub.json")
        self.root = md
        self.signers = {r: signers[r] for r in ONLINE_ROLES}
        self.publish()
        return new_pem

    # -- targets ---------------------------------------------------------------------------------

    def _add_target(self, target_path: str, data: bytes) -> TargetFile:
        info = TargetFile.from_data(target_path, data)
        d, _, base = target_path.rpartition("/")
        _write_atomic(self.targets_dir / d / f"{info.hashes['sha256']}.{base}", data)
        self.targets.signed.targets[target_path] = info
        return info

    def read_target(self, target_path: str) -> bytes | None:
        info = self.targets.signed.targets.get(target_path)
        if info is None:
            return None
        d, _, base = target_path.rpartition("/")
        return (self.targets_dir / d / f"{info.hashes['sha256']}.{base}").read_bytes()

    def releases(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for p in self.targets.signed.targets:
            m = re.fullmatch(rf"models/([^/]+)/(\d+)/{DESCRIPTOR}", p)
            if m:
                out.setdefault(m.group(1), []).append(int(m.group(2)))
        return {k: sorted(v) for k, v in sorted(out.items())}

    def artefacts(self) -> dict[str, dict[str, list[int]]]:
        """Model name -> artefact kind -> released versions."""
        out: dict[str, dict[str, list[int]]] = {}
        for p in self.targets.signed.targets:
            m = re.fullmatch(rf"artefacts/([^/]+)/([^/]+)/(\d+)/{DESCRIPTOR}", p)
            if m:
                out.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(int(m.group(3)))
        return {n: {k: sorted(v) for k, v in sorted(kinds.items())} for n, kinds in sorted(out.items())}

    def _versions(self, name: str, kind: str) -> list[int]:
        return self.releases().get(name, []) if kind == "model" else self.artefacts().get(name, {}).get(kind, [])

    def channel(self, name: str) -> Channel:
        data = self.read_target(f"channels/{name}.json")
        return Channel.from_bytes(data, f"channels/{name}.json") if data else Channel(name)

    def channels(self) -> list[str]:
        return sorted(m.group(1) for p in self.targets.signed.targets
                      if (m := re.fullmatch(r"channels/([^/]+)\.json", p)))

    def add(self, model: str | Path, *, name: str | None = None, version: int,
            golden: "Golden", edgetpu: str | Path | None = None, min_edged: str | None = None) -> Release:
        """Add model file `model` (an entry of the manifest in its directory) as release NAME/VERSION,
        with golden self-test vectors measured for it (`edged.stages.golden.measure_release`: that
        runs the device's preprocessing, which this cloud module does not import)."""
        model = Path(model)
        if golden is None:
            raise ReleaseError(f"{model}: a release needs golden self-test vectors")
        table, models_dir = _manifest_table(model)
        name = name or table["name"]
        if not re.match(NAME_RE, name):
            raise ReleaseError(f"--name: expected letters, digits, '-' or '_', got {name!r}")
        if version < 1:
            raise ReleaseError(f"--version: expected a positive integer, got {version}")
        if version in self.releases().get(name, []):
            raise ReleaseError(f"{name} version {version} is already released; releases are immutable, "
                               "give a new --version")
        entry = {k: v for k, v in table.items() if k != "name"}
        files: dict[str, bytes] = {model.name: model.read_bytes()}
        entry["file"], entry["size"] = model.name, len(files[model.name])
        entry["sha256"] = hashlib.sha256(files[model.name]).hexdigest()
        tpu = Path(edgetpu) if edgetpu else (models_dir / table["edgetpu_file"] if table.get("edgetpu_file") else None)
        if tpu is not None:
            files[tpu.name] = tpu.read_bytes()
            entry.update(edgetpu_file=tpu.name, edgetpu_size=len(files[tpu.name]),
                         edgetpu_sha256=hashlib.sha256(files[tpu.name]).hexdigest())
        for fname in _aux_files(table, models_dir):
            files[fname] = (models_dir / fname).read_bytes()
        files[GOLDEN] = golden.to_bytes()
        descriptor = {"v": 1, "name": name, "version": version, "task": entry.get("task"),
                      "min_edged": min_edged or __version__, "created": _now().isoformat(),
                      "entry": entry, "files": sorted(files), "selftest": GOLDEN}
        base = f"models/{name}/{version}"
        for fname, data in files.items():
            self._add_target(f"{base}/{fname}", data)
        self._add_target(f"{base}/{DESCRIPTOR}", json.dumps(descriptor, indent=1, sort_keys=True).encode())
        return Release(name, version, str(entry.get("task")), sorted(files))

    def add_artefact(self, path: str | Path, kind: str, *, version: int, name: str | None = None,
                     min_edged: str | None = None) -> Release:
        """Release a small artefact for model NAME on its own: centroids (their file names the model,
        the default NAME) or a label map. Checked here as the device will check it."""
        path = Path(path)
        if kind not in ARTEFACT_KINDS:
            raise ReleaseError(f"--kind: expected one of {', '.join(ARTEFACT_KINDS)}, got {kind!r}")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ReleaseError(f"{path}: cannot read: {exc.strerror or exc}") from None
        try:
            artefact = art.parse(kind, data, str(path))
        except art.ArtefactError as exc:
            raise ReleaseError(str(exc)) from None
        if kind == "centroids":
            if name and artefact.model and name != artefact.model:
                raise ReleaseError(f"{path}: centroids for model {artefact.model!r}, not --name {name!r}")
            name = name or artefact.model
            if not name:
                raise ReleaseError(f"{path}: the file names no model; give --name")
        if not name or not re.match(NAME_RE, name):
            raise ReleaseError(f"--name: expected letters, digits, '-' or '_', got {name!r}")
        if version < 1:
            raise ReleaseError(f"--version: expected a positive integer, got {version}")
        if version in self._versions(name, kind):
            raise ReleaseError(f"{name} {kind} version {version} is already released; releases are immutable, "
                               "give a new --version")
        fname = art.FILES[kind]
        descriptor = {"v": 1, "name": name, "kind": kind, "version": version, "file": fname,
                      "min_edged": min_edged or __version__, "created": _now().isoformat(),
                      "for": art.describe(kind, artefact)}
        base = f"artefacts/{name}/{kind}/{version}"
        self._add_target(f"{base}/{fname}", data)
        self._add_target(f"{base}/{DESCRIPTOR}", json.dumps(descriptor, indent=1, sort_keys=True).encode())
        return Release(name, version, kind, [fname])

    def rollout(self, name: str, version: int, percent: float, channel: str = "stable",
                kind: str = "model") -> Channel:
        if not re.match(CHANNEL_RE, channel):
            raise ReleaseError(f"--channel: expected lower-case letters, digits, '-' or '_', got {channel!r}")
        if not 0 <= percent <= 100:
            raise ReleaseError(f"--percent: expected 0 to 100, got {percent:g}")
        what = name if kind == "model" else f"{name} {kind}"
        if version not in self._versions(name, kind):
            have = ", ".join(map(str, self._versions(name, kind))) or "none"
            raise ReleaseError(f"{what} version {version} is not released (released: {have}); add it first: "
                               f"edged release {'add' if kind == 'model' else 'artefact'}")
        ch = self.channel(channel)
        m = self._rollout_of(ch, name, kind)
        if version in m.revoked:
            raise ReleaseError(f"{what} version {version} is revoked; release a new version instead")
        m.rollouts[version] = float(percent)
        self._add_target(f"channels/{channel}.json", ch.to_bytes())
        return ch

    @staticmethod
    def _rollout_of(ch: Channel, name: str, kind: str) -> ModelRollout:
        if kind == "model":
            return ch.models.setdefault(name, ModelRollout())
        if kind not in ARTEFACT_KINDS:
            raise ReleaseError(f"--kind: expected model or one of {', '.join(ARTEFACT_KINDS)}, got {kind!r}")
        return ch.artefacts.setdefault(name, {}).setdefault(kind, ModelRollout())

    def revoke(self, name: str, version: int, channel: str | None = None, kind: str = "model") -> list[str]:
        """Withdraw a version from one channel (default: all): devices running it leave it."""
        names = [channel] if channel else self.channels()
        if not names:
            raise ReleaseError("no channel has any rollout yet")
        for c in names:
            ch = self.channel(c)
            m = self._rollout_of(ch, name, kind)
            m.rollouts.pop(version, None)
            m.revoked.add(version)
            self._add_target(f"channels/{c}.json", ch.to_bytes())
        return names

    # -- signing -----------------------------------------------------------------------------------

    def publish(self, *, timestamp_expires: datetime | None = None, bump: bool = True) -> None:
        """Sign new targets, snapshot and timestamp metadata and write them, timestamp last: a
        device reading mid-publish sees the previous consistent state."""
        ser = JSONSerializer(compact=False)
        t = self.targets.signed
        t.version += bump
        t.expires = _now() + EXPIRY["targets"]
        self.targets.signatures.clear()
        self.targets.sign(self.signers["targets"])
        _write_atomic(self.metadata_dir / f"{t.version}.targets.json", self.targets.to_bytes(ser))
        s = self.snapshot.signed
        s.version += bump
        s.expires = _now() + EXPIRY["snapshot"]
        s.meta["targets.json"] = MetaFile(version=t.version)
        self.snapshot.signatures.clear()
        self.snapshot.sign(self.signers["snapshot"])
        _write_atomic(self.metadata_dir / f"{s.version}.snapshot.json", self.snapshot.to_bytes(ser))
        self._sign_timestamp(timestamp_expires, bump)

    def refresh(self, *, timestamp_expires: datetime | None = None) -> None:
        """A new timestamp (and a new snapshot when it is more than half-way to expiry)."""
        s = self.snapshot.signed
        if s.expires - _now() < EXPIRY["snapshot"] / 2:
            s.version += 1
            s.expires = _now() + EXPIRY["snapshot"]
            self.snapshot.signatures.clear()
            self.snapshot.sign(self.signers["snapshot"])
            _write_atomic(self.metadata_dir / f"{s.version}.snapshot.json",
                          self.snapshot.to_bytes(JSONSerializer(compact=False)))
        self._sign_timestamp(timestamp_expires)

    def _sign_timestamp(self, expires: datetime | None, bump: bool = True) -> None:
        ts = self.timestamp.signed
        ts.version += bump
        ts.expires = expires or _now() + EXPIRY["timestamp"]
        ts.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.timestamp.signatures.clear()
        self.timestamp.sign(self.signers["timestamp"])
        _write_atomic(self.metadata_dir / "timestamp.json", self.timestamp.to_bytes(JSONSerializer(compact=False)))

    def status(self) -> dict:
        return {"repository": str(self.path),
                "expires": {r: m.signed.expires.isoformat() for r, m in
                            (("root", self.root), ("targets", self.targets), ("snapshot", self.snapshot),
                             ("timestamp", self.timestamp))},
                "releases": self.releases(),
                "artefacts": self.artefacts(),
                "channels": {c: json.loads(self.channel(c).to_bytes())["models"] for c in self.channels()},
                "artefact_channels": {c: doc["artefacts"] for c in self.channels()
                                      if "artefacts" in (doc := json.loads(self.channel(c).to_bytes()))}}


# -- what goes into a release -----------------------------------------------------------------------

def _manifest_table(model: Path) -> tuple[dict, Path]:
    """The manifest table (with its name) whose `file` is `model`, from the manifest beside it."""
    if not model.is_file():
        raise ReleaseError(f"{model}: model file not found")
    models_dir = model.parent
    paths = [models_dir / "manifest.toml"] + sorted((models_dir / "manifest.d").glob("*.toml"))
    for p in paths:
        if not p.is_file():
            continue
        try:
            doc = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ReleaseError(f"{p}: cannot read the manifest: {exc}") from None
        for name, t in (doc.get("models") or {}).items():
            if t.get("file") == model.name:
                return {"name": name, **t}, models_dir
    raise ReleaseError(f"{model}: no entry with file = {model.name!r} in {models_dir / 'manifest.toml'} "
                       "(a release carries the model's manifest entry: task, input, decoder, labels)")


def _aux_files(table: dict, models_dir: Path) -> list[str]:
    """Files beside the model that its entry names: labels, and params such as anchors or centroids."""
    out = [table["labels"]] if "labels" in table else []
    for v in (table.get("params") or {}).values():
        if isinstance(v, str) and "/" not in v and v not in out and (models_dir / v).is_file():
            out.append(v)
    return out


# -- what the devices report --------------------------------------------------------------------

def fleet_reports(host: str, port: int, prefix: str, seconds: float) -> dict[str, dict]:
    """Every device's retained `<prefix>/<device_id>/models` report, collected for `seconds`."""
    import threading
    import time

    import paho.mqtt.client as mqtt

    reports: dict[str, dict] = {}
    subscribed = threading.Event()

    def on_message(client, userdata, msg) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return  # not a report edged wrote; a status command does not fail on it
        if isinstance(doc, dict):
            reports[msg.topic.split("/")[-2]] = doc

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-release-status-{os.getpid()}")
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{prefix}/+/models", qos=1)
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_message = on_message
    try:
        c.connect(host, port, keepalive=10)
    except OSError as exc:
        raise ReleaseError(f"--broker {host}:{port}: cannot connect: {exc.strerror or exc}") from None
    c.loop_start()
    try:
        if not subscribed.wait(10):
            raise ReleaseError(f"--broker {host}:{port}: no answer to the subscription")
        time.sleep(seconds)  # retained reports arrive right after subscribing; give stragglers time
    finally:
        c.loop_stop()
        c.disconnect()
    return dict(sorted(reports.items()))


def fleet_from_db(url: str) -> dict[str, dict]:
    """What every device last reported running (its stats' `models`), from the PostgreSQL
    database `edged ingest` fills."""
    from edged.cloud.signatures import _safe_url

    if not url.startswith(("postgresql://", "postgres://")):
        raise ReleaseError(f"--db: expected a PostgreSQL URL (postgresql://…), got {_safe_url(url)!r}")
    try:
        import psycopg

        from edged.cloud import store
    except ImportError:
        raise ReleaseError("reading the ingest database needs psycopg: pip install 'edged[cloud]'") from None
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            rows = store.device_models(conn)
    except psycopg.Error as exc:
        raise ReleaseError(f"{_safe_url(url)}: {str(exc).strip().splitlines()[0]}") from None
    return {device: {"models": models if isinstance(models, dict) else {}, "stats_at": stats_at, "status": status}
            for device, models, stats_at, status in rows}


# -- the command line (edged release …) --------------------------------------------------------------

def run_cli(args, golden: Golden | None = None) -> int:
    """`edged release ACTION`; for `add`, `golden` holds the vectors the CLI measured or loaded."""
    import sys

    if args.action == "init":
        repo = Repository.init(args.repo, args.root_key)
        root_key = Path(args.root_key) if args.root_key else repo.path / "offline" / "root.pem"
        print(f"{repo.path}: repository created; serve {repo.public}; pin {repo.path / 'root.json'} on "
              f"devices (scripts/provision --root-json); root key: {root_key} — move it offline",
              file=sys.stderr)
        return 0
    repo = Repository(args.repo)
    if args.action == "add":
        rel = repo.add(args.model, name=args.name, version=args.version, golden=golden,
                       edgetpu=args.edgetpu, min_edged=args.min_edged)
        repo.publish()
        print(f"{rel.name} {rel.version}: released ({rel.task}: {', '.join(rel.files)}); roll it out with "
              f"edged release rollout {args.repo} --name {rel.name} --version {rel.version} --percent P",
              file=sys.stderr)
    elif args.action == "artefact":
        rel = repo.add_artefact(args.file, args.kind, version=args.version, name=args.name, min_edged=args.min_edged)
        repo.publish()
        print(f"{rel.name} {args.kind} {rel.version}: released; roll it out with edged release rollout "
              f"{args.repo} --name {rel.name} --kind {args.kind} --version {rel.version} --percent P", file=sys.stderr)
    elif args.action == "rollout":
        repo.rollout(args.name, args.version, args.percent, args.channel, args.kind)
        repo.publish()
        what = args.name if args.kind == "model" else f"{args.name} {args.kind}"
        print(f"{what} {args.version}: offered to {args.percent:g} % of channel {args.channel}", file=sys.stderr)
    elif args.action == "revoke":
        channels = repo.revoke(args.name, args.version, args.channel, args.kind)
        repo.publish()
        what = args.name if args.kind == "model" else f"{args.name} {args.kind}"
        print(f"{what} {args.version}: revoked on {', '.join(channels)}", file=sys.stderr)
    elif args.action == "rotate":
        root_key = Path(args.root_key) if args.root_key else repo.path / "offline" / "root.pem"
        new_pem = repo.rotate(root_key, args.new_root_key, keep_root=args.keep_root)
        print(f"root version {repo.root.signed.version}: new online keys"
              + (f" and a new root key in {new_pem} (move it offline; {root_key} no longer signs)" if new_pem else "")
              + f"; devices follow from the root they pinned; {repo.path / 'root.json'} is the pin for new devices",
              file=sys.stderr)
    elif args.action == "refresh":
        repo.refresh()
        print(f"timestamp {repo.timestamp.signed.version} signed, expires "
              f"{repo.timestamp.signed.expires.isoformat()}", file=sys.stderr)
    elif args.action == "status":
        status = repo.status()
        if args.db:
            status["devices"] = fleet_from_db(args.db)
        if args.broker:  # the retained reports are newer than the last stats the database holds
            status.setdefault("devices", {}).update(fleet_reports(args.broker, args.port, args.prefix, args.seconds))
        if args.json:
            print(json.dumps(status, indent=1))
        else:
            _print_status(status)
    return 0


def _print_status(status: dict) -> None:
    print(f"repository {status['repository']}")
    for role, when in status["expires"].items():
        print(f"  {role:9} expires {when}")
    for name, versions in status["releases"].items():
        print(f"release {name}: versions {', '.join(map(str, versions))}")
    for name, kinds in status.get("artefacts", {}).items():
        for kind, versions in kinds.items():
            print(f"release {name} {kind}: versions {', '.join(map(str, versions))}")

    def offers(m: dict) -> str:
        offered = ", ".join(f"v{r['version']} {r['percent']:g}%" for r in m["rollouts"]) or "nothing"
        return offered + (f"; revoked {', '.join(map(str, m['revoked']))}" if m["revoked"] else "")

    for channel, models in status["channels"].items():
        for name, m in models.items():
            print(f"channel {channel}: {name}: {offers(m)}")
        for name, kinds in status.get("artefact_channels", {}).get(channel, {}).items():
            for kind, m in kinds.items():
                print(f"channel {channel}: {name} {kind}: {offers(m)}")
    for device, rep in (status.get("devices") or {}).items():
        if not rep.get("models"):
            print(f"device {device}: no models reported ({rep.get('status') or 'status unknown'})")
        for name, m in (rep.get("models") or {}).items():
            if not isinstance(m, dict):
                continue
            last = rep.get("last") or {}
            outcome = f"; last: {last.get('outcome')} v{last.get('version')}" if last.get("model") == name else ""
            # The models topic says {"centroids": {"running": 1, …}}, stats {"centroids": 1}.
            running = {k: v.get("running") if isinstance(v, dict) else v for k, v in (m.get("artefacts") or {}).items()}
            arts = "".join(f"; {k} {v}" for k, v in sorted(running.items()) if v)
            print(f"device {device}: {name} running {m.get('running') or 'shipped'}"
                  f"{' (on trial)' if m.get('trial') else ''}{arts}{outcome}"
                  + (f" ({rep['status']})" if rep.get("status") else ""))


__all__ = ["Repository", "ReleaseError", "Release", "ChannelError", "fleet_reports", "run_cli"]
