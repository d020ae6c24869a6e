"""The vision stage: one detector model turned into `DetectedObject`s for any RGB frame, with the
decoder plugin the manifest's `decoder` key names."""

from __future__ import annotations

import time

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.records import DetectedObject, Detections, Frame
from edged.runtime import Model
from edged.stages.vision.blazeface import BlazeFaceDecoder
from edged.stages.vision.decoder import Decoder
from edged.stages.vision.paf import PafDecoder
from edged.stages.vision.postprocess import PostprocessDecoder
from edged.stages.vision.preprocess import Letterbox, Preprocessor
from edged.stages.vision.ssd import SsdDecoder
from edged.stages.vision.entry import where


DECODERS: dict[str, type[Decoder]] = {
    d.name: d for d in (BlazeFaceDecoder, SsdDecoder, PostprocessDecoder, PafDecoder)
}



class VisionStage:
    """Runs one detector on frames: preprocess → invoke → decode → frame-normalised objects.

    Calls its `Model` from one thread (in a graph, stages naming one model share it: see
    `edged.stages.vision.graph.open_graph`). Results are fresh tuples; all intermediate arrays
    are reused between calls.
    """

    def __init__(self, model: Model, entry: ModelEntry, *, score_threshold: float | None = None) -> None:
        if entry.task != "vision":
            raise ModelError(f"{where(entry, 'task')}: the vision stage needs a vision model, "
                             f"got {entry.task!r}")
        cls = DECODERS.get(entry.decoder)
        if cls is None:
            raise ModelError(f"{where(entry, 'decoder')}: unknown decoder {entry.decoder!r} "
                             f"(known: {', '.join(sorted(DECODERS))})")
        self.model = model
        self.entry = entry
        self.preprocess = Preprocessor(model, entry)
        self.decoder = cls(entry, model.outputs, (self.preprocess.height, self.preprocess.width))
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"vision: score_threshold must be within 0..1, got {score_threshold}")
        self.score_threshold = (self.decoder.score_threshold if score_threshold is None
                                else float(score_threshold))
        self.last_inference_ms = 0.0

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.decoder.labels.values())

    @property
    def reads(self) -> tuple[int, ...]:
        """The outputs `finish` reads."""
        return self.decoder.reads

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        """Objects in an RGB uint8 (H, W, 3) image, boxes normalised to that image, best first."""
        box = self.preprocess(image)
        t0 = time.perf_counter()
        self.model.invoke()
        self.last_inference_ms = (time.perf_counter() - t0) * 1000.0
        return self.finish(self.model, box)

    def finish(self, outputs, box: Letterbox) -> tuple[DetectedObject, ...]:
        """Objects from the outputs of an invoke on an input that landed at `box`: `outputs` is the
        model itself, or an `OutputCopy` taken from it."""
        dec = self.decoder.decode_model(outputs, self.score_threshold)
        if not dec.scores:
            return ()
        mh, mw = self.preprocess.height, self.preprocess.width
        objs = []
        for model_box, s, c in zip(dec.boxes, dec.scores, dec.classes):
            b = box.to_frame(model_box, mh, mw)
            label = self.decoder.label(c)
            # Degenerate after clipping means the box lay in the letterbox padding only.
            if label is None or b[2] <= b[0] or b[3] <= b[1]:
                continue
            objs.append(DetectedObject(label, float(s), (b[0], b[1], b[2], b[3])))
        return tuple(objs)

    def process(self, frame: Frame) -> Detections:
        """`detect` on a camera frame, wrapped with its capture time and the inference time."""
        objects = self.detect(frame.image)
        return Detections(ts=frame.ts, objects=objects, inference_ms=self.last_inference_ms)
