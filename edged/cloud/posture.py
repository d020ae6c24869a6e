"""A person's posture from a pose signature, without an image: standing, sitting, lying.

A pose signature (the `pose` stage's, docs/mqtt.md) is 17 COCO keypoints (nose, eyes, ears,
shoulders, elbows, wrists, hips, knees, ankles; left before right) × (x, y, visibility) as int8,
x and y across the person's crop (−127 = left/top edge, 127 = right/bottom). The rules are
geometry, not a trained model:

- the **torso** runs from the middle of the hips to the middle of the shoulders; its angle from
  the image's vertical says upright (small) or lying (near 90°);
- with the torso upright, the **thighs** (hip → knee) say standing (they hang down, in line with
  the torso) or sitting (they point forward, near horizontal); the knee angle (hip-knee-ankle)
  is reported beside;
- with the torso upright and no knee in view (a portrait cut at the waist), the posture is
  `upright`: standing or sitting cannot be told from the shoulders up.

Angles need the crop's shape, since x and y are in crop widths and heights: `crop_aspect`
(height / width, in pixels). A pose object's box (the extent of its visible keypoints, in frame
coordinates) and the same extent in the signature give it, given the frame's own aspect
(`aspect_from_box`). A lying person in bed and one who has fallen look alike in one signature;
telling them apart takes time (a lying posture that follows standing within seconds), which
this module does not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POSTURES = ("standing", "sitting", "lying", "upright", "unknown")
N_KEYPOINTS = 17
SIGNATURE_LEN = 3 * N_KEYPOINTS
NOSE, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 0, 5, 6, 11, 12, 13, 14, 15, 16

# Thresholds, in degrees from the image's vertical. A standing torso leans a few degrees, a
# person bending or walking up to ~30; from 55° on the shoulders are nearer the hips' height than
# above them: lying. A hanging thigh is within ~30° of vertical when standing or walking; a
# seated person's points forward, 60-90°.
LYING_TORSO_DEG = 55.0
SITTING_THIGH_DEG = 50.0
MIN_VISIBILITY = 64  # of 127: the stage's own cut for a keypoint in view is 0.5
EDGE = 126           # |x| or |y| at or beyond this: on the crop's edge, i.e. clipped to it


class PostureError(ValueError):
    pass


@dataclass(frozen=True)
class Posture:
    label: str                      # one of POSTURES
    torso_deg: float | None = None  # torso from the image's vertical, 0..180 (0: shoulders above hips)
    thigh_deg: float | None = None  # the more horizontal visible thigh, from the vertical, 0..180
    knee_deg: float | None = None   # the smaller visible knee angle, hip-knee-ankle (180 = straight)


def keypoints(signature: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(xy in crop units -1..1, shape 17×2; visible mask) from a 51-value signature."""
    sig = np.asarray(signature, np.float64)
    if sig.shape != (SIGNATURE_LEN,) or not np.all(np.isfinite(sig)):
        raise PostureError(f"expected a pose signature of {SIGNATURE_LEN} numbers, got {sig.size}")
    if np.any(sig < -128) or np.any(sig > 127):
        raise PostureError("a pose signature holds int8 values (-128..127)")
    k = sig.reshape(N_KEYPOINTS, 3)
    # The stage clips keypoints to the crop: one on its edge was placed outside it, where the
    # model guesses (a knee below a portrait cut at the waist), so it does not count as seen.
    inside = np.all(np.abs(k[:, :2]) < EDGE, axis=1)
    return k[:, :2] / 127.0, (k[:, 2] >= MIN_VISIBILITY) & inside


def aspect_from_box(signature: Sequence[int], box: Sequence[float], frame_aspect: float) -> float | None:
    """The crop's height / width in pixels, from a pose object's `box` (frame-normalised extent
    of its visible keypoints) and the frame's height / width; None if it cannot be told."""
    xy, seen = keypoints(signature)
    if seen.sum() < 2:
        return None
    ext = xy[seen].max(axis=0) - xy[seen].min(axis=0)     # in crop half-widths/heights
    bw, bh = float(box[2]) - float(box[0]), float(box[3]) - float(box[1])
    if ext[0] <= 0.05 or ext[1] <= 0.05 or bw <= 0 or bh <= 0:
        return None
    crop_w, crop_h = bw / (ext[0] / 2), bh / (ext[1] / 2)  # in frame widths / heights
    return crop_h / crop_w * frame_aspect


def _deg_from_vertical(dx: float, dy: float) -> float:
    """Angle of the vector (dx, dy) (image axes, y down) from straight up, 0..180."""
    return math.degrees(math.atan2(abs(dx), -dy))


def classify(signature: Sequence[int], crop_aspect: float = 1.0) -> Posture:
    """The posture of one pose signature; `crop_aspect` = the crop's height / width in pixels."""
    if not (crop_aspect > 0 and math.isfinite(crop_aspect)):
        raise PostureError(f"crop aspect must be a positive number, got {crop_aspect!r}")
    xy, seen = keypoints(signature)
    p = xy * np.array([1.0, crop_aspect])  # the same unit (crop widths) on both axes

    def mid(a: int, b: int):
        pts = [p[i] for i in (a, b) if seen[i]]
        return np.mean(pts, axis=0) if pts else None

    shoulders, hips = mid(L_SHOULDER, R_SHOULDER), mid(L_HIP, R_HIP)
    if shoulders is None or hips is None:
        return Posture("unknown")
    torso = shoulders - hips
    if np.hypot(*torso) < 1e-6:
        return Posture("unknown")
    torso_deg = _deg_from_vertical(*torso)
    thighs, knees = [], []
    for hip, knee, ankle in ((L_HIP, L_KNEE, L_ANKLE), (R_HIP, R_KNEE, R_ANKLE)):
        if not (seen[hip] and seen[knee]):
            continue
        t = p[knee] - p[hip]
        if np.hypot(*t) < 1e-6:
            continue
        # The thigh's angle from "down", the way it hangs when standing: 0 hanging, 90 forward.
        thighs.append(180.0 - _deg_from_vertical(*t))
        if seen[ankle]:
            a, b = p[hip] - p[knee], p[ankle] - p[knee]
            na, nb = np.hypot(*a), np.hypot(*b)
            if na > 1e-6 and nb > 1e-6:
                knees.append(math.degrees(math.acos(float(np.clip(a @ b / (na * nb), -1, 1)))))
    thigh_deg = max(thighs) if thighs else None
    knee_deg = min(knees) if knees else None
    if torso_deg >= LYING_TORSO_DEG:
        label = "lying"
    elif thigh_deg is None:
        label = "upright"
    elif thigh_deg >= SITTING_THIGH_DEG:
        label = "sitting"
    else:
        label = "standing"
    r = lambda v: None if v is None else round(v, 1)  # noqa: E731
    return Posture(label, r(torso_deg), r(thigh_deg), r(knee_deg))


def confusion(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, int]]:
    """{true posture: {predicted posture: count}} over the postures that occur."""
    out: dict[str, dict[str, int]] = {}
    for t, p in zip(truth, predicted):
        row = out.setdefault(t, {})
        row[p] = row.get(p, 0) + 1
    return out


def postures_of(record: dict, frame_aspect: float) -> list[dict]:
    """The postures of the pose objects in one JSON record: a pose object itself ({"signature",
    "box"}), or anything with "objects" (a detections payload, an `edged detect` line)."""
    objs = record.get("objects") if isinstance(record.get("objects"), list) else [record]
    out = []
    for o in objs:
        if not isinstance(o, dict) or "signature" not in o or o.get("label", "pose") != "pose":
            continue
        sig = o["signature"]
        aspect = None
        box = o.get("box")
        if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
            aspect = aspect_from_box(sig, box, frame_aspect)
        p = classify(sig, aspect or 1.0)
        out.append({"posture": p.label, "torso_deg": p.torso_deg, "thigh_deg": p.thigh_deg,
                    "knee_deg": p.knee_deg})
    return out


def classify_file(path, frame_aspect: float = 0.75):
    """(line number, the record, its postures) for each JSON line of `path` holding a pose."""
    import json
    from pathlib import Path

    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise PostureError(f"{path}:{n}: not JSON") from None
            if not isinstance(record, dict):
                raise PostureError(f"{path}:{n}: expected a JSON object")
            try:
                found = postures_of(record, frame_aspect)
            except PostureError as exc:
                raise PostureError(f"{path}:{n}: {exc}") from None
            if found:
                yield n, record, found
