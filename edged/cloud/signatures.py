"""Cloud-side use of motion signatures: centroids per motion, and open-set nearest-centroid matching.

A signature is the motion model's int8 embedding of one IMU window (`MotionSignature.signature`).
`build_centroids` averages labelled signatures per motion and calibrates, per motion, how far a
signature of that motion may lie from its centroid: the `quantile` of the distances seen in the
labelled (training) signatures, times `margin`. `classify` names the nearest centroid, or
`"unknown"` when the signature lies beyond that motion's threshold — a motion none of the
centroids describes. Distances are Euclidean in int8 units (one quantisation scale covers the
whole embedding, so this is the Euclidean distance of the dequantised values up to a constant).

Files: centroids are JSON (`save_centroids` / `load_centroids`); signatures come as JSON lines,
one object per line with a `signature` list and, for building, a `label` (the MQTT motion
payload has both fields, so captured payloads can be used as they are).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

UNKNOWN = "unknown"
DEFAULT_QUANTILE = 0.99
DEFAULT_MARGIN = 1.25
FORMAT = "edged-centroids/1"


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
        return cls(tuple(labels), np.array(cents), np.array(ths), tuple(counts),
                   float(doc.get("quantile", DEFAULT_QUANTILE)), float(doc.get("margin", DEFAULT_MARGIN)))


@dataclass(frozen=True)
class Match:
    label: str  # the nearest motion, or "unknown" beyond its threshold
    nearest: str  # the nearest motion, whatever the distance
    distance: float


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
        out.append(Match(name if dd <= centroids.thresholds[k] else UNKNOWN, name, float(dd)))
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


def read_signatures(path: str | Path, *, label_key: str | None = "label") -> tuple[np.ndarray, list[str | None]]:
    """Signatures (and labels, when `label_key` is given) from a JSON-lines file."""
    path = Path(path)
    sigs, labels = [], []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise SignatureError(f"{path}: no such file") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SignatureError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
        sig = rec.get("signature") if isinstance(rec, dict) else None
        if not isinstance(sig, list) or not sig or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in sig):
            raise SignatureError(f"{path}:{lineno}: signature: expected a non-empty list of numbers")
        if sigs and len(sig) != len(sigs[0]):
            raise SignatureError(f"{path}:{lineno}: signature: {len(sig)} values, earlier lines have {len(sigs[0])}")
        label = None
        if label_key is not None:
            label = rec.get(label_key)
            if not isinstance(label, str) or not label:
                raise SignatureError(f"{path}:{lineno}: {label_key}: expected a motion name")
        sigs.append(sig)
        labels.append(label)
    if not sigs:
        raise SignatureError(f"{path}: no signatures")
    return np.array(sigs, dtype=np.float64), labels


def build(signatures_path: str | Path, out_path: str | Path, *, label_key: str = "label",
          quantile: float = DEFAULT_QUANTILE, margin: float = DEFAULT_MARGIN) -> Centroids:
    """`edged signatures build`: labelled JSON-lines signatures → centroid file."""
    sig, labels = read_signatures(signatures_path, label_key=label_key)
    cents = build_centroids(sig, labels, quantile=quantile, margin=margin)
    save_centroids(cents, out_path)
    return cents


def classify_path(centroids_path: str | Path, signatures_path: str | Path) -> list[Match]:
    """`edged signatures classify`: one Match per line of a JSON-lines signature file."""
    cents = load_centroids(centroids_path)
    sig, _ = read_signatures(signatures_path, label_key=None)
    if sig.shape[1] != cents.dim:
        raise SignatureError(f"{signatures_path}: signatures have {sig.shape[1]} values, "
                             f"{centroids_path} has {cents.dim}")
    return classify(cents, sig)


def accuracy(matches: Iterable[Match], truth: Iterable[str]) -> float:
    pairs = list(zip(matches, truth))
    return sum(m.label == t for m, t in pairs) / max(1, len(pairs))
