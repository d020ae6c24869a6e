"""Pose landmarks on a person crop, published as a compact int8 keypoint **signature**: the vision
twin of the motion signature, from which the cloud can tell standing, sitting or lying without an
image.

The model (MediaPipe's pose landmark model, `decoder = "pose_landmarks"` in the manifest) takes a
letterboxed crop of one person and returns 33 body landmarks (x, y in input pixels, z, a
visibility logit, a presence logit) and a pose-presence score. The stage reports one object,
label `pose`: its score is the pose presence, its box the extent of the visible keypoints, and its
`signature` the manifest's keypoints (17 by default, the COCO body set) as three int8 values each:
x and y across the crop given (−127 = left/top edge, 127 = right/bottom), and the visibility
(0…127). Relative to the crop, a signature describes the body's shape, not where it stood.

The model was trained on people standing up in its input (MediaPipe's own pipeline rotates its
region of interest so the body points up before this model runs): shown someone lying, it finds
no pose or bends a skeleton out of the wrong limbs. So a crop at least as wide as it is tall
(`turn_from` = 1.0, width / height) is also shown turned a quarter turn either way, and a crop at
least twice as wide (`upright_until` = 2.0) only turned: no one upright is that wide. The view
with the strongest evidence wins: the mean over the 33 body landmarks of the model's own heatmap peak
(output `Identity_3`, one 64×64 map per landmark). On the labelled people shown upright and upside
down, the upright view had the higher evidence for 40 of 42 (presence: 32 of 42); docs/models.md
has the figures. The keypoints of a turned view are turned back, so the signature describes the
person as they lie in the crop. Turning costs nothing (a view of the crop); each extra turn costs
an invoke, on wide crops only: 2 or 3 invokes for a lying person instead of 1.
"""

from __future__ import annotations

import time

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.records import DetectedObject
from edged.runtime import Model
from edged.stages.vision.boxes import turn_back
from edged.stages.vision.entry import where
from edged.stages.vision.preprocess import Letterbox, Preprocessor

# MediaPipe's 33 landmarks in the COCO-17 order: nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles (left before right).
COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
BODY = 33  # landmarks of the body; the model's others (alignment points) have heatmaps too


class PoseStage:
    """Keypoints of the one person in an RGB crop. Owns its model; call from one thread."""

    def __init__(self, model: Model, entry: ModelEntry, *, score_threshold: float | None = None) -> None:
        if entry.decoder != "pose_landmarks":
            raise ModelError(f"{where(entry, 'decoder')}: the pose stage needs decoder = \"pose_landmarks\"")
        p = entry.params
        self.model, self.entry = model, entry
        self.preprocess = Preprocessor(model, entry)
        names = [o.name for o in model.outputs]
        try:
            self._lm = names.index(p.get("landmarks_output", "Identity"))
            self._presence = names.index(p.get("presence_output", "Identity_1"))
        except ValueError:
            raise ModelError(f"{where(entry, 'params')}: landmarks_output/presence_output: "
                             f"no such output (have: {', '.join(names)})") from None
        self.keypoints = tuple(int(i) for i in p.get("keypoints", COCO17))
        self.score_threshold = float(p.get("score_threshold", 0.5) if score_threshold is None else score_threshold)
        self.min_visibility = float(p.get("min_visibility", 0.5))
        self.turn_from = float(p.get("turn_from", 1.0))
        self.upright_until = float(p.get("upright_until", 2.0))
        if not 0 < self.turn_from <= self.upright_until:
            raise ModelError(f"{where(entry, 'params')}: expected 0 < turn_from <= upright_until, "
                             f"got {self.turn_from!r} and {self.upright_until!r}")
        hm = p.get("heatmap_output", "Identity_3")
        self._heatmap = names.index(hm) if hm in names else -1
        self.last_inference_ms = 0.0
        self.last_turn = 0

    @property
    def labels(self) -> tuple[str, ...]:
        return ("pose",)

    @property
    def reads(self) -> tuple[int, ...]:
        """The outputs `finish` and `evidence` read."""
        return (self._lm, self._presence) + ((self._heatmap,) if self._heatmap >= 0 else ())

    def turns(self, height: int, width: int) -> tuple[int, ...]:
        """The quarter turns (for np.rot90) a crop of this size is shown in: as it is while it is
        narrower than `turn_from` × its height; turned a quarter either way too from there (a
        person lying, or sitting, or with arms spread); only turned from `upright_until` on."""
        if width < self.turn_from * height or self._heatmap < 0:
            return (0,)
        return (0, 1, 3) if width < self.upright_until * height else (1, 3)

    def evidence(self, outputs) -> float:
        """How clearly the model saw a body in the view it was given: the mean over the body's
        landmarks of each landmark heatmap's peak (higher is clearer)."""
        if self._heatmap < 0:
            return float(np.ravel(outputs.output(self._presence))[0])
        hm = outputs.output(self._heatmap)
        return float(hm.reshape(-1, hm.shape[-1])[:, :BODY].max(axis=0).mean())

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        """The pose in one RGB crop, shown in each of its `turns`; the view with the most
        `evidence` wins (`last_turn`)."""
        best, best_ev, best_turn, ms = (), -np.inf, 0, 0.0
        for turn in self.turns(image.shape[0], image.shape[1]):
            box = self.preprocess(np.rot90(image, turn) if turn else image)
            t0 = time.perf_counter()
            self.model.invoke()
            ms += (time.perf_counter() - t0) * 1000.0
            ev = self.evidence(self.model)
            if ev > best_ev:
                best, best_ev, best_turn = self.finish(self.model, box, turn), ev, turn
        self.last_inference_ms, self.last_turn = ms, best_turn
        return best

    def finish(self, outputs, box: Letterbox, turn: int = 0) -> tuple[DetectedObject, ...]:
        """The pose from the outputs of an invoke (the model, or an `OutputCopy` taken from it)
        on the crop turned `turn` quarter turns; keypoints in the crop's own axes."""
        presence = float(np.ravel(outputs.output(self._presence))[0])
        if presence < self.score_threshold:
            return ()
        lm = np.asarray(outputs.output(self._lm), np.float32).reshape(-1, 5)[list(self.keypoints)]
        # Model pixels → crop-normalised, undoing the letterbox, then the turn.
        x = np.clip((lm[:, 0] - box.left) / box.width, 0.0, 1.0)
        y = np.clip((lm[:, 1] - box.top) / box.height, 0.0, 1.0)
        x, y = turn_back(x, y, turn)
        vis = 1.0 / (1.0 + np.exp(-np.clip(lm[:, 3], -30, 30)))
        seen = vis >= self.min_visibility
        if not seen.any():
            return ()
        sig = np.empty((len(self.keypoints), 3), np.int8)
        sig[:, 0] = np.round(x * 254 - 127)
        sig[:, 1] = np.round(y * 254 - 127)
        sig[:, 2] = np.round(vis * 127)
        b = (float(x[seen].min()), float(y[seen].min()), float(x[seen].max()), float(y[seen].max()))
        if b[2] <= b[0] or b[3] <= b[1]:
            return ()
        return (DetectedObject("pose", presence, b, signature=tuple(int(v) for v in sig.ravel())),)
