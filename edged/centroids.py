"""Motion centroids: one point per known motion in signature space, and open-set nearest-centroid matching.

Shared by the device (a `motion.centroids` file lets the motion stage label windows itself,
including motions enrolled after the model shipped) and the cloud (`edged.cloud.signatures`
builds, enrolls and classifies). Numpy only.

A signature is the motion model's int8 embedding of one IMU window (`MotionSignature.signature`).
`build_centroids` averages labelled signatures per motion and calibrates, per motion, how far a
signature of that motion may lie from its centroid: the `quantile` of the distances seen in the
labelled signatures, times `margin`. `enroll_centroid` adds one motion from a handful of
signatures. `classify` names the nearest centroid, or `"unknown"` when the signature lies beyond
that motion's threshold — a motion none of the centroids describes. Distances are Euclidean in
int8 units (one quantisation scale covers the whole embedding, so this is the Euclidean distance
of the dequantised values up to a constant).

Centroid files are JSON (`save_centroids` / `load_centroids`) and name the model and signature
version they belong to, so a device never matches one embedding's signatures against another's
centroids.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

UNKNOWN = "unknown"
DEFAULT_QUANTILE = 0.99
DEFAULT_MARGIN = 1.25
FORMAT = "edged-centroids/1"
# What a motion payload's `label` may be (docs/schemas/motion.schema.json).
LABEL_PATTERN = re.compile(r"[a-z0-9 _-]{1,64}")


class SignatureError(ValueError):
    """A signature or centroid file that cannot be used, worded for the user (one line)."""


@dataclass(frozen=True)
class Centroids:
    labels: tuple[str, ...]
    centroids: np.ndarray  # (motions, dim) float64, in int8 signature units
    thresholds: np.ndarray  # (motions,) distance beyond which a signature is "unknown"
    counts: tuple[int, ...]  # signatures each centroid was built from
    quantile: float
    margin: float
    # Which model's signatures these are (manifest name and params.signature_version): a device
    # refuses centroids made for another embedding. "" / 1 for files from before the fields existed.
    model: str = ""
    signature_version: int = 1

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def threshold(self) -> float:
        """The largest per-motion threshold (a one-number summary)."""
        return float(self.thresholds.max())

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "signature_version": self.signature_version,
            "metric": "euclidean",
            "quantile": self.quantile,
            "margin": self.margin,
            "motions": [
                {"label": lab, "count": int(n), "threshold": round(float(th), 4),
                 "centroid": [round(float(v), 4) for v in c]}
                for lab, n, th, c in zip(self.labels, self.counts, self.thresholds, self.centroids)
            ],
        }

    @classmethod
    def from_json(cls, doc: dict, where: str = "centroids") -> "Centroids":
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SignatureError(f"{where}: not an edged centroid file (expected \"format\": \"{FORMAT}\")")
        motions = doc.get("motions")
        if not isinstance(motions, list) or not motions:
            raise SignatureError(f"{where}: motions: expected a non-empty list")
        labels, counts, ths, cents = [], [], [], []
        for i, m in enumerate(motions):
            try:
                labels.append(str(m["label"]))
                counts.append(int(m["count"]))
                ths.append(float(m["threshold"]))
                cents.append([float(v) for v in m["centroid"]])
            except (KeyError, TypeError, ValueError) as exc:
                raise SignatureError(f"{where}: motions[{i}]: missing or bad field ({exc})") from None
        if len({len(c) for c in cents}) != 1:
            raise SignatureError(f"{where}: centroids have different lengths {sorted({len(c) for c in cents})}")
        if len(set(labels)) != len(labels) or UNKNOWN in labels:
            raise SignatureError(f"{where}: motions: labels must be unique and not {UNKNOWN!r}")
        model, version = doc.get("model", ""), doc.get("signature_version", 1)
        if not isinstance(model, str) or not isinstance(version, int) or isinstance(version, bool):
            raise SignatureError(f"{where}: model / signature_version: expected a name and an integer")
        return cls(tuple(labels), np.array(cents), np.array(ths), tuple(counts),
                   float(doc.get("quantile", DEFAULT_QUANTILE)), float(doc.get("margin", DEFAULT_MARGIN)),
                   model, version)


@dataclass(frozen=True)
class Match:
    label: str  # the nearest motion, or "unknown" beyond its threshold
    nearest: str  # the nearest motion, whatever the distance
    distance: float
    threshold: float = math.inf  # the nearest motion's threshold

    @property
    def score(self) -> float:
        """How well the signature fits its nearest motion: 1 at the centroid, 0 at (and beyond) its threshold."""
        return max(0.0, 1.0 - self.distance / self.threshold) if self.threshold > 0 else 0.0


def _as_matrix(signatures, where: str) -> np.ndarray:
    try:
        arr = np.asarray(signatures, dtype=np.float64)
    except (TypeError, ValueError):
        raise SignatureError(f"{where}: signatures must be equal-length lists of numbers") from None
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise SignatureError(f"{where}: expected (signatures, dim) values, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise SignatureError(f"{where}: signatures contain non-finite values")
    return arr


def _distances(sig: np.ndarray, cents: np.ndarray) -> np.ndarray:
    """(n, motions) Euclidean distances, without an (n, motions, dim) intermediate."""
    d2 = (sig * sig).sum(axis=1)[:, None] - 2.0 * sig @ cents.T + (cents * cents).sum(axis=1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0))


def build_centroids(signatures: Sequence[Sequence[int]] | np.ndarray, labels: Sequence[str], *,
                    quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN,
                    order: Sequence[str] | None = None) -> Centroids:
    """Centroids (one per label; in `order`, else first-seen order) and per-motion "unknown" thresholds.

    `signatures` (n, dim) and `labels` (n,) are labelled examples, e.g. signatures the device
    produced on training recordings. Each threshold is the `quantile` of the distances of that
    motion's examples to its own centroid, times `margin` (headroom for recordings the centroids
    were not built from).
    """
    sig = _as_matrix(signatures, "build_centroids")
    labels = [str(v) for v in labels]
    if len(labels) != len(sig):
        raise SignatureError(f"build_centroids: {len(sig)} signatures but {len(labels)} labels")
    if not 0.0 < quantile <= 1.0:
        raise SignatureError(f"build_centroids: quantile must be in (0, 1], got {quantile}")
    if not margin >= 1.0:
        raise SignatureError(f"build_centroids: margin must be >= 1, got {margin}")
    names = list(dict.fromkeys(labels))
    if order is not None:
        missing = sorted(set(names) - set(order))
        if missing:
            raise SignatureError(f"build_centroids: labels {missing} are not in order={list(order)}")
        names = [n for n in order if n in names]
    if UNKNOWN in names:
        raise SignatureError(f"build_centroids: {UNKNOWN!r} is reserved for open-set rejections")
    lab = np.array(labels)
    cents, ths, counts = [], [], []
    for name in names:
        members = sig[lab == name]
        if len(members) < 2:
            raise SignatureError(f"build_centroids: {name!r} has {len(members)} signature; "
                                 "a threshold needs at least 2")
        c = members.mean(axis=0)
        d = np.sqrt(((members - c) ** 2).sum(axis=1))
        cents.append(c)
        ths.append(float(np.quantile(d, quantile)) * margin)
        counts.append(len(members))
    return Centroids(tuple(names), np.array(cents), np.array(ths), tuple(counts), quantile, margin)


def nearest(centroids: np.ndarray, signatures: np.ndarray) -> np.ndarray:
    """Index of the nearest of `centroids` (motions, dim) for each signature (n, dim)."""
    return _distances(np.asarray(signatures, np.float64), np.asarray(centroids, np.float64)).argmin(axis=1)


def enroll_centroid(centroids: Centroids, signatures: Sequence[Sequence[int]] | np.ndarray, label: str, *,
                    replace: bool = False) -> Centroids:
    """`centroids` with one more motion, `label`, the mean of a handful of its `signatures`.

    A few windows give a usable centroid but not a usable spread: the 99th percentile of five
    distances is noise. So the new motion's threshold is its own calibrated one (the file's
    quantile of its distances, times its margin) or the median threshold of the motions already
    in the file, whichever is larger. With `replace`, an existing motion of that name is rebuilt.
    """
    sig = _as_matrix(signatures, "enroll")
    label = str(label).strip()
    if not LABEL_PATTERN.fullmatch(label) or label == UNKNOWN:
        raise SignatureError(f"enroll: motion name {label!r}: expected 1-64 of a-z, 0-9, space, '_', '-' "
                             f"(and not {UNKNOWN!r})")
    if sig.shape[1] != centroids.dim:
        raise SignatureError(f"enroll: signatures have {sig.shape[1]} values, centroids {centroids.dim}")
    if len(sig) < 2:
        raise SignatureError(f"enroll: {label!r} has {len(sig)} signature; at least 2 are needed")
    keep = [i for i, name in enumerate(centroids.labels) if name != label]
    if len(keep) < len(centroids.labels) and not replace:
        raise SignatureError(f"enroll: {label!r} is already enrolled (use --replace to rebuild it)")
    c = sig.mean(axis=0)
    own = float(np.quantile(np.sqrt(((sig - c) ** 2).sum(axis=1)), centroids.quantile)) * centroids.margin
    others = centroids.thresholds[keep]
    threshold = max(own, float(np.median(others))) if len(others) else own
    return Centroids(
        tuple(centroids.labels[i] for i in keep) + (label,),
        np.vstack([centroids.centroids[keep], c[None]]),
        np.append(others, threshold),
        tuple(centroids.counts[i] for i in keep) + (len(sig),),
        centroids.quantile, centroids.margin, centroids.model, centroids.signature_version,
    )


def classify(centroids: Centroids, signatures: Sequence[Sequence[int]] | np.ndarray) -> list[Match]:
    """The nearest motion for each signature, "unknown" when beyond that motion's threshold."""
    sig = _as_matrix(signatures, "classify")
    if sig.shape[1] != centroids.dim:
        raise SignatureError(f"classify: signatures have {sig.shape[1]} values, centroids {centroids.dim}")
    d = _distances(sig, centroids.centroids)
    near = d.argmin(axis=1)
    dist = d[np.arange(len(sig)), near]
    out = []
    for k, dd in zip(near.tolist(), dist.tolist()):
        name = centroids.labels[k]
        th = float(centroids.thresholds[k])
        out.append(Match(name if dd <= th else UNKNOWN, name, float(dd), th))
    return out


def save_centroids(centroids: Centroids, path: str | Path) -> None:
    Path(path).write_text(json.dumps(centroids.to_json(), indent=1) + "\n")


def load_centroids(path: str | Path) -> Centroids:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SignatureError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise SignatureError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    return Centroids.from_json(doc, str(path))


