"""The decoder plugin interface: `Decoder` (built once from the model's output specs and the
manifest) and `Decoded` (boxes, scores and label ids in model-input coordinates)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import Model, TensorSpec
from edged.stages.vision.entry import number, where
from edged.stages.vision.native import address


@dataclass(frozen=True)
class Decoded:
    """Detections in model-input coordinates, best first, as Python values: boxes
    (x0, y0, x1, y1), scores and label ids. There are few, and the stage turns each into an
    object with Python code; lists spare it a numpy call per field."""

    boxes: list[tuple[float, float, float, float]]
    scores: list[float]
    classes: list[int]
    # Per detection, for decoders that find keypoints ("paf"): an (n, 3) array of x, y
    # (model-normalised) and confidence (0: not found). None for box-only decoders.
    keypoints: list | None = None

    @classmethod
    def empty(cls) -> "Decoded":
        return cls([], [], [])

    @classmethod
    def from_arrays(cls, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> "Decoded":
        return cls([tuple(b) for b in boxes.tolist()], scores.tolist(), [int(c) for c in classes.tolist()])


class Candidates:
    """Where the compiled library's candidate scans (edged_ssd_candidates, edged_float_candidates
    in _resample.c) write up to `cap` candidates: anchor and class indices, logits (or scores),
    four box values and the anchor's four values, all float32 as numpy would hold them; made
    once per decoder, with their addresses."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.anchor = np.zeros(cap, np.int32)
        self.classes = np.zeros(cap, np.int32)
        self.logits = np.zeros(cap, np.float32)
        self.boxes = np.zeros((cap, 4), np.float32)
        self.anchors = np.zeros((cap, 4), np.float32)
        self.anchor_at, self.classes_at, self.logits_at, self.boxes_at, self.anchors_at = (
            address(a) for a in (self.anchor, self.classes, self.logits, self.boxes, self.anchors))


class Decoder:
    """Base of the decoder plugins: built once from the model's output specs and the manifest.

    `decode(outputs, threshold)` receives the model's outputs as float32 arrays in the model's
    output order; it never sees the interpreter, so tests can feed it arrays of the right shape.
    """

    name = ""

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        self.entry = entry
        self.params = entry.params
        self.outputs = tuple(outputs)
        self.input_hw = input_hw
        self.labels = label_map(entry)
        self.score_threshold = number(entry, self.params, "params", "score_threshold", 0.5, lo=0.0, hi=1.0)
        self.max_detections = int(number(entry, self.params, "params", "max_detections", 20, lo=1, hi=1000))
        # The outputs `decode_model` reads (a subclass narrows it): what is copied after each
        # invoke when decoding overlaps the next one.
        self.reads: tuple[int, ...] = tuple(range(len(self.outputs)))

    def label(self, class_id: int) -> str | None:
        return self.labels.get(int(class_id))

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        raise NotImplementedError

    def decode_model(self, model: Model, threshold: float) -> Decoded:
        """`decode` on the model's current outputs. A decoder may override this to read the
        outputs as stored (e.g. int8) and dequantise only what it needs."""
        return self.decode([model.output(i) for i in range(len(model.outputs))], threshold)

    def _output(self, key: str, default_name: str, pick: Callable[[TensorSpec], bool]) -> int:
        """Index of an output: by the name in params[key], else the one spec `pick` accepts."""
        name = self.params.get(key)
        if name is not None:
            for i, t in enumerate(self.outputs):
                if t.name == name:
                    return i
            raise ModelError(f"{where(self.entry, 'params')}.{key}: model has no output named {name!r} "
                             f"(outputs: {', '.join(t.name for t in self.outputs)})")
        hits = [i for i, t in enumerate(self.outputs) if pick(t)]
        if len(hits) != 1:
            raise ModelError(f"{self.entry.path.name}: cannot tell which output holds the {default_name}; "
                             f"set models.{self.entry.name}.params.{key} to one of "
                             f"{', '.join(t.name for t in self.outputs)}")
        return hits[0]


_NUMBERED = re.compile(r"^(\d+)[\s:]+(.+)$")


def label_map(entry: ModelEntry) -> dict[int, str]:
    """Label id → plain lowercase label. Accepts `name` per line or `id name` (Coral's files)."""
    numbered = [_NUMBERED.match(ln) for ln in entry.labels]
    if entry.labels and all(numbered):
        pairs = [(int(m.group(1)), m.group(2).strip().lower()) for m in numbered]
    else:
        pairs = [(i, ln.strip().lower()) for i, ln in enumerate(entry.labels)]
    # "n/a" (and "???") mark ids a dataset does not use (COCO has ten): no label, so no object.
    return {i: lb for i, lb in pairs if lb not in ("n/a", "???")}
