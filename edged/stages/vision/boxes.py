"""Box arithmetic the decoders share: SSD anchor generation, IoU, hard and weighted NMS (numpy for
many candidates, Python floats for a few), the sigmoid/logit used on class scores, and points and
boxes of a turned view (np.rot90) turned back."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def ssd_anchors(*, input_size: Sequence[int], strides: Sequence[int], min_scale: float,
                max_scale: float, aspect_ratios: Sequence[float] = (1.0,), offset: float = 0.5,
                interpolated_scale_aspect_ratio: float = 1.0,
                reduce_boxes_in_lowest_layer: bool = False, fixed_anchor_size: bool = False,
                feature_map_sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """SSD anchor boxes as (N, 4) float32 [cx, cy, w, h], normalised to the input.

    Scales grow linearly from `min_scale` to `max_scale` over the layers; each layer adds one
    anchor per aspect ratio plus, if `interpolated_scale_aspect_ratio` > 0, one at the geometric
    mean of its scale and the next layer's. Consecutive layers with the same stride share one
    feature map (their anchors interleave per cell), the grouping MediaPipe uses for BlazeFace.
    Anchor order: layer, row, column, anchor-in-cell.
    """
    in_h, in_w = int(input_size[0]), int(input_size[1])
    n = len(strides)

    def scale_at(i: int) -> float:
        return (min_scale + max_scale) / 2 if n == 1 else min_scale + (max_scale - min_scale) * i / (n - 1)

    out = []
    layer = 0
    while layer < n:
        scales, ratios = [], []
        last = layer
        while last < n and strides[last] == strides[layer]:
            s = scale_at(last)
            if last == 0 and reduce_boxes_in_lowest_layer:
                scales += [0.1, s, s]
                ratios += [1.0, 2.0, 0.5]
            else:
                for ar in aspect_ratios:
                    scales.append(s)
                    ratios.append(float(ar))
                if interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == n - 1 else scale_at(last + 1)
                    scales.append(math.sqrt(s * nxt))
                    ratios.append(float(interpolated_scale_aspect_ratio))
            last += 1
        sq = np.sqrt(np.asarray(ratios))
        heights = np.asarray(scales) / sq
        widths = np.asarray(scales) * sq
        if feature_map_sizes is not None:
            fh, fw = (int(v) for v in feature_map_sizes[layer])
        else:
            fh, fw = math.ceil(in_h / strides[layer]), math.ceil(in_w / strides[layer])
        cy, cx = np.meshgrid((np.arange(fh) + offset) / fh, (np.arange(fw) + offset) / fw, indexing="ij")
        k = len(scales)
        a = np.empty((fh, fw, k, 4), np.float32)
        a[..., 0] = cx[..., None]
        a[..., 1] = cy[..., None]
        if fixed_anchor_size:
            a[..., 2:] = 1.0
        else:
            a[..., 2] = widths
            a[..., 3] = heights
        out.append(a.reshape(-1, 4))
        layer = last
    return np.concatenate(out)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_one(box: np.ndarray, boxes: np.ndarray, areas: np.ndarray | None = None) -> np.ndarray:
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    # np.maximum, not np.clip: the same result without clip's Python-level dispatch.
    inter = np.maximum(ix1 - ix0, 0) * np.maximum(iy1 - iy0, 0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (_areas(boxes) if areas is None else areas) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_out: int, *,
        weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Non-maximum suppression over [x0, y0, x1, y1] boxes; returns (boxes, scores) kept.

    Weighted NMS (BlazeFace's tie resolution) replaces each kept box by the score-weighted mean
    of the boxes it suppresses, which steadies boxes between frames; the score stays the best one.
    The loop runs once per kept detection, never per anchor.
    """
    if len(scores) == 0 or max_out < 1:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if len(scores) == 1:  # the common case of one object in view: nothing to suppress
        return np.asarray(boxes, np.float32).reshape(1, 4), np.asarray(scores, np.float32).reshape(1)
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    areas = _areas(boxes)
    kept_b, kept_s = [], []
    alive = np.ones(len(scores), bool)
    while len(kept_s) < max_out:
        live = np.flatnonzero(alive)
        if live.size == 0:
            break
        i = live[0]  # the best box still alive
        group = (_iou_one(boxes[i], boxes, areas) > iou) & alive
        group[i] = True
        if weighted:
            w = scores[group]
            kept_b.append((boxes[group] * w[:, None]).sum(axis=0) / w.sum())
        else:
            kept_b.append(boxes[i])
        kept_s.append(scores[i])
        alive &= ~group
    return np.asarray(kept_b, np.float32), np.asarray(kept_s, np.float32)


# Up to this many candidate boxes, decoding runs on Python floats instead of numpy: right after
# an invoke every numpy call starts from cold caches and costs 5-15 µs however small its arrays,
# while a Python float operation stays well under one. A person in view gives a handful of
# candidates; only crowded scenes take the numpy route.
FEW = 32


def iou_py(a: Sequence[float], b: Sequence[float]) -> float:
    """`_iou_one` for two boxes, on Python floats."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_few(cands: list[tuple[float, tuple[float, float, float, float]]], iou: float, max_out: int, *,
            weighted: bool = False) -> list[tuple[float, tuple[float, float, float, float]]]:
    """`nms` for a few (score, box) candidates on Python floats; kept (score, box), best first."""
    cands = sorted(cands, key=lambda c: -c[0])  # stable, as nms's argsort
    alive = [True] * len(cands)
    kept = []
    for i, (score, box) in enumerate(cands):
        if len(kept) >= max_out:
            break
        if not alive[i]:
            continue
        group = [j for j in range(i, len(cands)) if alive[j] and (j == i or iou_py(box, cands[j][1]) > iou)]
        for j in group:
            alive[j] = False
        if weighted and len(group) > 1:
            total = sum(cands[j][0] for j in group)
            box = tuple(sum(cands[j][0] * cands[j][1][k] for j in group) / total for k in range(4))
        kept.append((score, box))
    return kept


def sigmoid_py(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= -700.0 else 0.0


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: float) -> float:
    """Score threshold as a logit: comparing raw logits leaves exp() to the few candidates."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def turn_back(x: np.ndarray, y: np.ndarray, turn: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (x, y) in `np.rot90(image, turn)` → the same points in the image itself
    (numpy arrays or floats)."""
    turn %= 4
    if turn == 1:   # rot90 once turns anticlockwise: the image's right edge became the top
        return 1.0 - y, x
    if turn == 2:
        return 1.0 - x, 1.0 - y
    if turn == 3:
        return y, 1.0 - x
    return x, y


def turn_box_back(box: Sequence[float], turn: int) -> tuple[float, float, float, float]:
    """A normalised (x0, y0, x1, y1) in `np.rot90(image, turn)` → the same box in the image."""
    xa, ya = turn_back(box[0], box[1], turn)
    xb, yb = turn_back(box[2], box[3], turn)
    return (float(min(xa, xb)), float(min(ya, yb)), float(max(xa, xb)), float(max(ya, yb)))
