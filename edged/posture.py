"""A person's posture from a pose signature, without an image: standing, sitting, lying; and
fallen, from a track's postures over time (`FallWatch`). Numpy only: the device's tracks use it
(edged/stages/vision/tracks.py), and so does the cloud (edged/cloud/posture.py).

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
(`aspect_from_box`).

A person lying in bed and one who has fallen look alike in one signature; what tells them apart is
how they came to lie, which only a track's history shows: see `FallWatch`.
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


# --- Fallen: how a track came to lie -------------------------------------------------------------
#
# One signature cannot tell a fall from lying down: both end lying. The difference is how fast the
# body got there, and from where. A fall takes a standing person to the floor in about a second;
# lying down on purpose goes through sitting or kneeling, or takes longer. So, per person track:
#
# - `upright`: the last time the track was seen standing (or upright, knees out of view) with the
#   torso within UPRIGHT_TORSO_DEG of vertical;
# - a **fall** is a lying posture (torso >= LYING_TORSO_DEG) first seen at most `fall_s` after that;
#   it becomes **fallen** once the track has stayed lying `down_s` since (a stumble the person
#   gets up from at once is not reported). Frames with no pose, or an unknown posture, change
#   nothing; a lying run ends (and a fallen track gets up) after `up_frames` frames in a row that
#   are standing, upright or sitting.
# - Sitting does not count as upright: someone sitting on a bed who lies back quickly is lying
#   down, not falling (and so a fall from a chair is not reported either).
#
# The frame rate must let the transition be seen: with frames further apart than `fall_s`, no
# lying frame can follow an upright one within it. At the default 2 fps a fall is one or two
# frames long.

FALLEN = "fallen"
UPRIGHT_TORSO_DEG = 30.0


@dataclass(frozen=True)
class FallRule:
    fall_s: float = 2.0   # from the last upright frame to the first lying one, at most
    down_s: float = 3.0   # and then lying at least this long
    up_frames: int = 2    # frames in a row standing, upright or sitting that end lying


class FallWatch:
    """One track's postures over time, and whether it has fallen (see the rule above)."""

    def __init__(self, rule: FallRule | None = None) -> None:
        self.rule = rule or FallRule()
        self.upright_ts: float | None = None
        self.lying_since: float | None = None
        self.fast = False          # the current lying run started within fall_s of upright
        self.fallen = False
        self.posture = ""          # the last posture seen ("" = none yet)
        self._up_run = 0

    @property
    def state(self) -> str:
        """What the track is: "fallen", or the last posture seen ("" before any)."""
        return FALLEN if self.fallen else self.posture

    def see(self, ts: float, p: Posture) -> bool:
        """Feed the posture of the track at `ts` (seconds, increasing); True if `fallen` changed."""
        r = self.rule
        if p.label == "unknown":
            return False
        self.posture = p.label
        if p.label == "lying":
            self._up_run = 0
            if self.lying_since is None:
                self.lying_since = ts
                self.fast = self.upright_ts is not None and ts - self.upright_ts <= r.fall_s
            if self.fast and not self.fallen and ts - self.lying_since >= r.down_s:
                self.fallen = True
                return True
            return False
        if p.label in ("standing", "upright") and p.torso_deg is not None and p.torso_deg <= UPRIGHT_TORSO_DEG:
            self.upright_ts = ts
        self._up_run += 1
        if self._up_run >= r.up_frames and self.lying_since is not None:
            self.lying_since, self.fast = None, False
            if self.fallen:
                self.fallen = False
                return True
        return False
