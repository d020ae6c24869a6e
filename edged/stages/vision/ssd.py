"""The `ssd` decoder: TF Object Detection API box encoding (centre/size with scale factors), sigmoid
class logits with a background column, per-class NMS; anchors from a `.npy` table beside the model."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import Model, TensorSpec
from edged.stages.vision import boxes as box_ops
from edged.stages.vision import native
from edged.stages.vision.boxes import logit, nms, nms_few, sigmoid, sigmoid_py
from edged.stages.vision.decoder import Candidates, Decoded, Decoder
from edged.stages.vision.entry import number, per4, where


class SsdDecoder(Decoder):
    """TF Object Detection API SSD heads: box encodings [ty, tx, th, tw] and class logits.

    Anchors ([ycenter, xcenter, h, w] per row, as the API stores them) come from the `.npy`
    file named by `params.anchors_file`, relative to the model. Column 0..`background_classes`-1
    of the logits is background; the next column is label 0.
    """

    name = "ssd"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        p = self.params
        self._boxes = self._output("boxes_output", "box encodings", lambda t: t.shape[-1] == 4)
        self._scores = self._output("scores_output", "class logits", lambda t: t.shape[-1] != 4)
        self.reads = (self._boxes, self._scores)
        fname = p.get("anchors_file")
        if not isinstance(fname, str):
            raise ModelError(f"{where(entry, 'params')}.anchors_file: missing (a .npy beside the model)")
        path = entry.path.parent / fname
        try:
            anchors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read anchors: {exc}") from None
        n = self.outputs[self._boxes].shape[-2]
        if anchors.shape != (n, 4):
            raise ModelError(f"{path}: anchors have shape {anchors.shape}, the model needs ({n}, 4)")
        self.anchors = anchors.astype(np.float32)
        self.box_scale = per4(entry, "box_scale", p.get("box_scale", [10.0, 10.0, 5.0, 5.0]))
        self._scale = tuple(self.box_scale.tolist())
        self.background = int(number(entry, p, "params", "background_classes", 1, lo=0, hi=10))
        self.nms_iou = number(entry, p, "params", "nms_iou", 0.6, lo=0.0, hi=1.0)
        boxes_spec, scores_spec = self.outputs[self._boxes], self.outputs[self._scores]
        self._quant = ((float(scores_spec.zero_point), scores_spec.scale),
                       (float(boxes_spec.zero_point), boxes_spec.scale))
        self._anchors_at = native.address(self.anchors)
        self._rows, self._columns = len(self.anchors), scores_spec.shape[-1]
        # Outputs the library's scan reads: int8, one row of scores and of four box values per anchor.
        self._int8 = (all(t.dtype == np.int8 and t.quantized for t in (boxes_spec, scores_spec))
                      and math.prod(scores_spec.shape) == self._rows * self._columns
                      and math.prod(boxes_spec.shape) == self._rows * 4)
        self._bounds: dict[float, int | None] = {}  # score threshold → lowest stored code to look at
        self.compiled = native.LIB  # the library's candidate scan (int8 outputs), or None: numpy's
        self._few = Candidates(box_ops.FEW)

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        enc = outputs[self._boxes].reshape(-1, 4)
        logits = outputs[self._scores].reshape(len(enc), -1)[:, self.background:]
        return self._decode(enc, logits, self.anchors, threshold)

    def decode_model(self, model: Model, threshold: float) -> Decoded:
        """For int8 outputs: find the anchors whose stored score codes can reach the threshold,
        and dequantise only their rows (as `Model.output` would), instead of all of them. Most
        frames show nobody: then one max() over the stored scores settles it. (Right after an
        invoke every numpy call runs from cold caches, so fewer calls is what counts.)"""
        bound = self._raw_bound(threshold)
        if bound is None:
            return super().decode_model(model, threshold)
        if self.compiled is not None and self._int8:
            # The candidates found, dequantised and gathered by one call of the library, exactly
            # as the numpy code below does it; many candidates go the numpy way.
            at = getattr(model, "raw_at", None)  # an OutputCopy's buffers stay where they are
            if at is not None:
                where = at[self._scores], at[self._boxes]
            else:
                raw, boxes = model.raw_output(self._scores), model.raw_output(self._boxes)
                where = ((native.address(raw), native.address(boxes))
                         if raw.flags.c_contiguous and boxes.flags.c_contiguous else None)
            if where is not None:
                few = self._few
                n = self.compiled.edged_ssd_candidates(
                    where[0], self._rows, self._columns, self.background, bound, *self._quant[0],
                    where[1], *self._quant[1], self._anchors_at, few.cap, few.anchor_at, few.classes_at,
                    few.logits_at, few.boxes_at, few.anchors_at)
                if n == 0:
                    return Decoded.empty()
                if n <= few.cap:
                    return self._decode_few(few.boxes[:n].tolist(), few.logits[:n].tolist(),
                                            few.anchors[:n].tolist(), few.classes[:n].tolist(), logit(threshold))
        raw = model.raw_output(self._scores)
        raw = raw.reshape(-1, raw.shape[-1])[:, self.background:]
        if raw.max() < bound:
            return Decoded.empty()
        anchor_i, class_i = np.nonzero(raw >= bound)
        if anchor_i.size <= box_ops.FEW:
            logits = _dequantize(raw[anchor_i, class_i], self.outputs[self._scores])
            enc = _dequantize(model.raw_output(self._boxes).reshape(-1, 4)[anchor_i], self.outputs[self._boxes])
            return self._decode_few(enc.tolist(), logits.tolist(), self.anchors[anchor_i].tolist(),
                                    class_i.tolist(), logit(threshold))
        rows = np.unique(anchor_i)
        logits = _dequantize(raw[rows], self.outputs[self._scores])
        enc = model.raw_output(self._boxes)
        enc = _dequantize(enc.reshape(-1, 4)[rows], self.outputs[self._boxes])
        return self._decode(enc, logits, self.anchors[rows], threshold)

    def _raw_bound(self, threshold: float) -> int | None:
        """The lowest stored score code that may dequantise to at least the threshold's logit;
        None when the outputs are not int8 with a usable scale (then the float path runs)."""
        bounds = self._bounds
        if threshold not in bounds:
            boxes_spec, scores_spec = self.outputs[self._boxes], self.outputs[self._scores]
            limit = logit(threshold)
            bound = None
            if boxes_spec.quantized and scores_spec.quantized and scores_spec.scale > 0 and math.isfinite(limit):
                info = np.iinfo(scores_spec.dtype)
                # One code below the exact bound: float rounding may not cut where real arithmetic
                # does; the float comparison in _decode then decides, as on the full outputs.
                bound = math.floor(scores_spec.zero_point + limit / scores_spec.scale) - 1
                bound = min(max(bound, int(info.min)), int(info.max) + 1)
            bounds[threshold] = bound
        return bounds[threshold]

    def _decode(self, enc: np.ndarray, logits: np.ndarray, anchors: np.ndarray, threshold: float) -> Decoded:
        limit = logit(threshold)
        anchor_i, class_i = np.nonzero(logits >= limit)
        if anchor_i.size == 0:
            return Decoded.empty()
        if anchor_i.size <= box_ops.FEW:
            return self._decode_few(enc[anchor_i].tolist(), logits[anchor_i, class_i].tolist(),
                                    anchors[anchor_i].tolist(), class_i.tolist(), limit)
        a = anchors[anchor_i]
        t = enc[anchor_i] / self.box_scale
        cy = t[:, 0] * a[:, 2] + a[:, 0]
        cx = t[:, 1] * a[:, 3] + a[:, 1]
        h = np.exp(t[:, 2]) * a[:, 2]
        w = np.exp(t[:, 3]) * a[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = sigmoid(logits[anchor_i, class_i]).astype(np.float32)
        out_b, out_s, out_c = [], [], []
        for c in np.unique(class_i):
            sel = class_i == c
            b, s = nms(boxes[sel], scores[sel], self.nms_iou, self.max_detections)
            out_b.append(b)
            out_s.append(s)
            out_c.append(np.full(len(s), c, np.intp))
        return _top(np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c), self.max_detections)

    def _decode_few(self, enc: list, logits: list, anchors: list, classes: list, limit: float) -> Decoded:
        """`_decode` for a few candidates (logit `limit` and up), on Python floats (see box_ops.FEW)."""
        sy, sx, sh, sw = self._scale
        by_class: dict[int, list] = {}
        for (ty, tx, th, tw), z, (ay, ax, ah, aw), c in zip(enc, logits, anchors, classes):
            if z < limit:
                continue
            cy, cx = ty / sy * ah + ay, tx / sx * aw + ax
            h, w = math.exp(th / sh) * ah, math.exp(tw / sw) * aw
            by_class.setdefault(c, []).append((sigmoid_py(z), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        kept = [(sc, c, b) for c in sorted(by_class)
                for sc, b in nms_few(by_class[c], self.nms_iou, self.max_detections)]
        kept.sort(key=lambda k: -k[0])  # stable: ties stay in class order, as in _top
        kept = kept[:self.max_detections]
        return Decoded([b for _, _, b in kept], [sc for sc, _, _ in kept], [c for _, c, _ in kept])


def _dequantize(raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Stored codes → float32, computed as `Model.output` does (so results match it exactly)."""
    out = np.subtract(raw, spec.zero_point, dtype=np.float32)
    out *= spec.scale
    return out


def _top(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, k: int) -> Decoded:
    order = np.argsort(-scores, kind="stable")[:k]
    return Decoded.from_arrays(boxes[order], scores[order], classes[order])
