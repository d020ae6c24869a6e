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
"""

from __future__ import annotations

import time

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.records import DetectedObject
from edged.runtime import Model
from edged.stages.vision.entry import where
from edged.stages.vision.preprocess import Letterbox, Preprocessor

# MediaPipe's 33 landmarks in the COCO-17 order: nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles (left before right).
COCO17 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)


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
        self.last_inference_ms = 0.0

    @property
    def labels(self) -> tuple[str, ...]:
        return ("pose",)

    @property
    def reads(self) -> tuple[int, ...]:
        """The outputs `finish` reads."""
        return (self._lm, self._presence)

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        box = self.preprocess(image)
        t0 = time.perf_counter()
        self.model.invoke()
        self.last_inference_ms = (time.perf_counter() - t0) * 1000.0
        return self.finish(self.model, box)

    def finish(self, outputs, box: Letterbox) -> tuple[DetectedObject, ...]:
        """The pose from the outputs of an invoke (the model, or an `OutputCopy` taken from it)."""
        presence = float(np.ravel(outputs.output(self._presence))[0])
        if presence < self.score_threshold:
            return ()
        lm = np.asarray(outputs.output(self._lm), np.float32).reshape(-1, 5)[list(self.keypoints)]
        # Model pixels → crop-normalised, undoing the letterbox.
        x = np.clip((lm[:, 0] - box.left) / box.width, 0.0, 1.0)
        y = np.clip((lm[:, 1] - box.top) / box.height, 0.0, 1.0)
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
