"""Staged rollout: which release of a model a device should run, from its channel document.

Shared by the release tooling (which writes a channel) and the device's updater (which reads it).
A channel is a signed target `channels/<channel>.json` in the release repository:

    {"v": 1, "channel": "stable",
     "models": {"face": {"rollouts": [{"version": 3, "percent": 10.0}, {"version": 2, "percent": 100.0}],
                         "revoked": [1]}}}

A device is in a rollout when its cohort (a stable hash of the model name and its device id, in
0 ≤ c < 100) is below the rollout's percent: the same device is always in or out, and raising the
percent only adds devices. Each device runs the highest version whose rollout admits it; a revoked
version is never chosen, and a device running one leaves it.

Small artefacts released on their own — a model's motion centroids, its label map — have rollouts
of their own, per model and kind, under "artefacts" (absent when there are none):

    "artefacts": {"motion": {"centroids": {"rollouts": [{"version": 4, "percent": 100.0}], "revoked": []}}}

Their cohort is the model's: the devices that try a model first also try its artefacts first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

BUCKETS = 10_000  # cohort resolution: 0.01 %
CHANNEL_RE = r"^[a-z0-9][a-z0-9_-]{0,31}$"
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# What may be released without a model: centroids (edged.centroids' file, for a motion model) and
# a label map (one label per line, as many as the model has classes).
ARTEFACT_KINDS = ("centroids", "labels")


class ChannelError(ValueError):
    """A channel document that is not what edged writes (one line)."""


def cohort(device_id: str, name: str) -> float:
    """The device's place in rollouts of model `name`, in [0, 100)."""
    digest = hashlib.sha256(f"edged-rollout\0{name}\0{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % BUCKETS) * (100.0 / BUCKETS)


def admitted(device_id: str, name: str, percent: float) -> bool:
    return cohort(device_id, name) < percent


@dataclass
class ModelRollout:
    rollouts: dict[int, float] = field(default_factory=dict)  # version -> percent
    revoked: set[int] = field(default_factory=set)

    def choose(self, device_id: str, name: str) -> int | None:
        """The version this device should run, or None (no release admits it: keep what it has)."""
        ok = [v for v, p in self.rollouts.items() if v not in self.revoked and admitted(device_id, name, p)]
        return max(ok) if ok else None


def _rollout_doc(m: ModelRollout) -> dict:
    return {"rollouts": [{"version": v, "percent": p} for v, p in sorted(m.rollouts.items(), reverse=True)],
            "revoked": sorted(m.revoked)}


def _rollout_from(m, where: str) -> ModelRollout:
    rollouts = {}
    for r in m["rollouts"]:
        v, p = r["version"], r["percent"]
        if type(v) is not int or v < 1 or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ChannelError(f"{where}: bad rollout {r!r}")
        rollouts[v] = float(p)
    revoked = set(m.get("revoked", []))
    if not all(type(v) is int for v in revoked):
        raise ChannelError(f"{where}.revoked: expected version numbers")
    return ModelRollout(rollouts, revoked)


@dataclass
class Channel:
    name: str
    models: dict[str, ModelRollout] = field(default_factory=dict)
    artefacts: dict[str, dict[str, ModelRollout]] = field(default_factory=dict)  # model -> kind -> rollout

    def artefact(self, name: str, kind: str) -> ModelRollout | None:
        return self.artefacts.get(name, {}).get(kind)

    def to_bytes(self) -> bytes:
        doc = {"v": 1, "channel": self.name,
               "models": {n: _rollout_doc(m) for n, m in sorted(self.models.items())}}
        if any(self.artefacts.values()):
            doc["artefacts"] = {n: {k: _rollout_doc(m) for k, m in sorted(kinds.items())}
                                for n, kinds in sorted(self.artefacts.items()) if kinds}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "channel") -> "Channel":
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ChannelError(f"{where}: not a version 1 channel document")
            models = {str(name): _rollout_from(m, f"{where}: models.{name}") for name, m in doc["models"].items()}
            artefacts = {}
            for name, kinds in (doc.get("artefacts") or {}).items():
                # A kind this edged does not know (from a newer release tool) is not an error.
                artefacts[str(name)] = {k: _rollout_from(m, f"{where}: artefacts.{name}.{k}")
                                        for k, m in kinds.items() if k in ARTEFACT_KINDS}
            return cls(str(doc["channel"]), models, artefacts)
        except ChannelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ChannelError(f"{where}: malformed channel document ({type(exc).__name__}: {exc})") from None
