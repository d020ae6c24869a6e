"""The `tflite_detection_postprocess` decoder: models whose graph already ends in the
TFLite_Detection_PostProcess op (Coral's Edge TPU SSD models): boxes, classes, scores, count."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import TensorSpec
from edged.stages.vision.decoder import Decoded, Decoder
from edged.stages.vision.entry import number, where


class PostprocessDecoder(Decoder):
    """Models ending in TFLite_Detection_PostProcess: boxes [1, N, 4] as ymin, xmin, ymax, xmax,
    classes [1, N], scores [1, N], count [1]. The op already ran NMS; this keeps the first
    `count` rows above the threshold and adds `params.label_offset` to class ids."""

    name = "tflite_detection_postprocess"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        if len(self.outputs) != 4:
            raise ModelError(f"{entry.path.name}: decoder {self.name!r} needs 4 outputs "
                             f"(boxes, classes, scores, count), the model has {len(self.outputs)}")
        # The op's documented output order; names differ between converter versions.
        order = self.params.get("output_order", ["boxes", "classes", "scores", "count"])
        if sorted(order) != ["boxes", "classes", "count", "scores"]:
            raise ModelError(f"{where(entry, 'params')}.output_order: expected a permutation of "
                             f"boxes, classes, scores, count, got {order!r}")
        self._i = {k: order.index(k) for k in order}
        self.label_offset = int(number(entry, self.params, "params", "label_offset", 0, lo=-10, hi=10))

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        boxes = outputs[self._i["boxes"]].reshape(-1, 4)
        classes = outputs[self._i["classes"]].reshape(-1)
        scores = outputs[self._i["scores"]].reshape(-1)
        count = int(np.clip(outputs[self._i["count"]].reshape(-1)[0], 0, len(scores)))
        keep = np.flatnonzero(scores[:count] >= threshold)[: self.max_detections]
        b = boxes[keep][:, [1, 0, 3, 2]].astype(np.float32)
        return Decoded.from_arrays(b, scores[keep].astype(np.float32),
                                   np.rint(classes[keep]).astype(np.intp) + self.label_offset)
