"""The `blazeface` decoder: MediaPipe-style SSD anchors, raw box regression, sigmoid scores,
weighted NMS."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import Model, TensorSpec
from edged.stages.vision import boxes as box_ops
from edged.stages.vision import native
from edged.stages.vision.boxes import logit, nms, nms_few, sigmoid, sigmoid_py, ssd_anchors
from edged.stages.vision.decoder import Candidates, Decoded, Decoder
from edged.stages.vision.entry import number, per4, where


class BlazeFaceDecoder(Decoder):
    """BlazeFace: 896 anchors, 16 regressors per anchor (box centre/size, then 6 keypoints)."""

    name = "blazeface"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        p = self.params
        self._boxes = self._output("boxes_output", "box regressors",
                                   lambda t: len(t.shape) == 3 and t.shape[-1] >= 4)
        self._scores = self._output("scores_output", "scores",
                                    lambda t: len(t.shape) == 3 and t.shape[-1] == 1)
        self.reads = (self._boxes, self._scores)
        a = p.get("anchors")
        if not isinstance(a, dict):
            raise ModelError(f"{where(entry, 'params')}.anchors: missing table of SSD anchor options")
        try:
            self.anchors = ssd_anchors(input_size=input_hw, **a)
        except TypeError as exc:
            raise ModelError(f"{where(entry, 'params')}.anchors: {exc}") from None
        n = self.outputs[self._boxes].shape[1]
        if len(self.anchors) != n:
            raise ModelError(f"{where(entry, 'params')}.anchors: generate {len(self.anchors)} anchors, "
                             f"the model has {n}")
        h, w = input_hw
        self.box_scale = per4(entry, "box_scale", p.get("box_scale", [w, h, w, h]))
        self._scale = tuple(self.box_scale.tolist())
        self.score_clip = number(entry, p, "params", "score_clip", 100.0, lo=0.0)
        self.nms_iou = number(entry, p, "params", "nms_iou", 0.3, lo=0.0, hi=1.0)
        nms_kind = p.get("nms", "weighted")
        if nms_kind not in ("weighted", "hard"):
            raise ModelError(f"{where(entry, 'params')}.nms: expected \"weighted\" or \"hard\", "
                             f"got {nms_kind!r}")
        self.weighted = nms_kind == "weighted"
        # Float outputs are their own values: read as stored, without Model.output's copy.
        self._as_stored = all(self.outputs[i].dtype == np.float32 and not self.outputs[i].quantized
                              for i in self.reads)
        boxes_spec, scores_spec = self.outputs[self._boxes], self.outputs[self._scores]
        self._rows, self._box_step = n, boxes_spec.shape[-1]
        # The library's candidate scan (float32 outputs of one score per anchor), or None: numpy's.
        self.compiled = native.LIB if (self._as_stored and math.prod(scores_spec.shape) == n
                                       and math.prod(boxes_spec.shape) == n * self._box_step) else None
        self._anchors = np.ascontiguousarray(self.anchors, np.float32)  # kept: the library reads it
        self._anchors_at = native.address(self._anchors)
        self._few = Candidates(box_ops.FEW)

    def decode_model(self, model: Model, threshold: float) -> Decoded:
        """For float outputs, `decode` on the outputs as stored (an `OutputCopy`'s own buffers,
        or one copy from the interpreter): `Model.output` would copy all 2304 x 17 values once
        more for the few rows a decode reads. Quantised outputs are dequantised as usual."""
        if not self._as_stored:
            return super().decode_model(model, threshold)
        at = getattr(model, "raw_at", None)  # an OutputCopy's buffers stay where they are
        if self.compiled is not None and at is not None:
            # The candidates found and gathered by one call of the library (the same values
            # `decode` picks with numpy); many candidates go the numpy way.
            few = self._few
            n = self.compiled.edged_float_candidates(
                at[self._scores], self._rows, logit(threshold), at[self._boxes], self._box_step,
                self._anchors_at, few.cap, few.anchor_at, few.logits_at, few.boxes_at, few.anchors_at)
            if n == 0:
                return Decoded.empty()
            if n <= few.cap:
                return self._decode_few(few.boxes[:n].tolist(), few.logits[:n].tolist(), few.anchors[:n].tolist())
        outputs: list = [None] * len(self.outputs)
        for i in self.reads:
            outputs[i] = model.raw_output(i)
        return self.decode(outputs, threshold)

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        raw = outputs[self._boxes].reshape(-1, outputs[self._boxes].shape[-1])
        logits = outputs[self._scores].reshape(-1)
        limit = logit(threshold)
        hit = np.flatnonzero(logits >= limit)
        if hit.size == 0:
            return Decoded.empty()
        if hit.size <= box_ops.FEW:
            return self._decode_few(raw[hit, :4].tolist(), logits[hit].tolist(), self.anchors[hit].tolist())
        a = self.anchors[hit]
        r = raw[hit, :4] / self.box_scale
        cx = r[:, 0] * a[:, 2] + a[:, 0]
        cy = r[:, 1] * a[:, 3] + a[:, 1]
        w = r[:, 2] * a[:, 2]
        h = r[:, 3] * a[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = sigmoid(np.clip(logits[hit], -self.score_clip, self.score_clip)).astype(np.float32)
        boxes, scores = nms(boxes, scores, self.nms_iou, self.max_detections, weighted=self.weighted)
        return Decoded.from_arrays(boxes, scores, np.zeros(len(scores), np.intp))

    def _decode_few(self, raw: list, logits: list, anchors: list) -> Decoded:
        """`decode` for a few candidates, on Python floats (see box_ops.FEW)."""
        sx, sy, sw, sh = self._scale
        clip = self.score_clip
        cands = []
        for (rx, ry, rw, rh), z, (ax, ay, aw, ah) in zip(raw, logits, anchors):
            cx, cy = rx / sx * aw + ax, ry / sy * ah + ay
            w, h = rw / sw * aw, rh / sh * ah
            cands.append((sigmoid_py(min(max(z, -clip), clip)), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        kept = nms_few(cands, self.nms_iou, self.max_detections, weighted=self.weighted)
        return Decoded([b for _, b in kept], [sc for sc, _ in kept], [0] * len(kept))
