"""Vision stages chained into a small graph: each stage runs one model on the whole frame (or on
overlapping tiles of it) or on the boxes of one label that an earlier stage found, cropped with a
margin and upscaled to the model's input by its own preprocessing.

`GraphSpec` is the declaration (from the config's `[[vision.stages]]` or `DEFAULT_CHAIN`);
`VisionGraph` runs it. Objects from every stage are merged per label (the best of overlapping
boxes is kept, and a box lying mostly inside a larger one of its label is dropped: a tile's or a
crop's partial view of something another pass saw whole). Each object says which stage found it
and, for an object found inside a crop, the index of the object it was found in (`parent`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edged.config import STAGE_INPUT_FRAME as FRAME, STAGE_REGIONS as REGIONS
from edged.config import check_stages as check_graph  # noqa: F401 — the declaration's checks live with the config
from edged.records import DetectedObject
from edged.stages.vision.boxes import iou_py


@dataclass(frozen=True)
class StageSpec:
    """One stage: a model and what it runs on."""

    name: str
    model: str
    input: str = FRAME                # "frame" or "<label>@<stage name>"
    score_threshold: float = 0.0      # 0 = the model's own
    tiles: int = 1                    # on the frame: 1 = whole frame; n = n×n overlapping tiles + the frame
    margin: float = 0.2               # crops: grown by this share of the box on each side
    region: str = "box"               # crops: "box", or "top" = a square at the box's top (a person's head)
    max_crops: int = 8                # crops per frame, largest boxes first
    min_crop_px: int = 12             # boxes smaller than this (either side, frame pixels) are not cropped

    @property
    def source(self) -> tuple[str, str] | None:
        """(label, stage) this stage crops, or None on the frame."""
        if self.input == FRAME:
            return None
        label, _, stage = self.input.partition("@")
        return label, stage


# The default chain, chosen by measurement on the labelled scene set (docs/models.md): people on
# the frame and on 2×2 tiles (small people), faces with the full-range model on the frame, and
# faces with the short-range model in the top of each person's box, where they are large enough.
DEFAULT_CHAIN: tuple[StageSpec, ...] = (
    StageSpec(name="people", model="person", tiles=2, score_threshold=0.4),
    StageSpec(name="faces", model="face_full_range"),
    StageSpec(name="faces_in_people", model="face", input="person@people", region="top"),
)


def _inside(a, b) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if ix > 0 and iy > 0 and area > 0 else 0.0


def _area(b) -> float:
    return (b[2] - b[0]) * (b[3] - b[1])


@dataclass
class _Found:
    obj: DetectedObject
    stage: str
    parent: int = -1   # index into the frame's list of found objects, before the merge


def merge(found: list[_Found], iou: float = 0.4, contain: float = 0.7) -> list[_Found]:
    """Per label: the best of boxes overlapping by `iou` or more; then drop boxes lying `contain`
    or more inside a larger kept box of their label."""
    keep: list[_Found] = []
    for f in sorted(found, key=lambda f: -f.obj.score):
        if all(k.obj.label != f.obj.label or iou_py(k.obj.box, f.obj.box) < iou for k in keep):
            keep.append(f)
    return [f for f in keep
            if not any(k is not f and k.obj.label == f.obj.label and _area(k.obj.box) > _area(f.obj.box)
                       and _inside(f.obj.box, k.obj.box) >= contain for k in keep)]


@dataclass
class StageRun:
    """A spec with its detector (`detect(image) -> objects`, boxes normalised to that image)."""

    spec: StageSpec
    detect: Callable[[np.ndarray], Sequence[DetectedObject]]
    last_ms: float = 0.0
    invokes: int = 0
    mean_ms: float = 0.0     # smoothed over about the last 20 frames
    mean_invokes: float = 0.0


class VisionGraph:
    """Runs stages in order on one frame and merges their objects."""

    def __init__(self, runs: Sequence[StageRun], *, tile_overlap: float = 0.25) -> None:
        self.runs = list(runs)
        self.stages: list = []   # the VisionStages behind the runs, when opened by open_graph
        self.tile_overlap = tile_overlap
        self._tiles: dict[tuple[int, int, int], list[tuple[int, int, int, int]]] = {}

    def _tile_boxes(self, n: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
        key = (n, h, w)
        if key not in self._tiles:
            ov = self.tile_overlap
            tw, th = w / (n - (n - 1) * ov), h / (n - (n - 1) * ov)
            boxes = []
            for j in range(n):
                for i in range(n):
                    x0, y0 = round(i * tw * (1 - ov)), round(j * th * (1 - ov))
                    boxes.append((x0, y0, min(w, round(x0 + tw)), min(h, round(y0 + th))))
            self._tiles[key] = boxes
        return self._tiles[key]

    def _on_region(self, run: StageRun, image: np.ndarray, x0: int, y0: int, x1: int, y1: int,
                   *, drop_cut: bool) -> list[DetectedObject]:
        h, w = image.shape[:2]
        sub = image[y0:y1, x0:x1]
        sw, sh = x1 - x0, y1 - y0
        out = []
        run.invokes += 1
        e = 0.01
        for o in run.detect(sub):
            b = o.box
            # A box cut by an edge of the region that is not the frame's is a partial view.
            if drop_cut and ((b[0] < e and x0 > 0) or (b[1] < e and y0 > 0)
                             or (b[2] > 1 - e and x1 < w) or (b[3] > 1 - e and y1 < h)):
                continue
            out.append(DetectedObject(o.label, o.score, ((x0 + b[0] * sw) / w, (y0 + b[1] * sh) / h,
                                                         (x0 + b[2] * sw) / w, (y0 + b[3] * sh) / h),
                                      signature=o.signature))
        return out

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        """Objects of every stage in an RGB uint8 image, merged, best first; each with its stage
        and, for objects found in a crop, the index of the object cropped (if it was kept)."""
        h, w = image.shape[:2]
        found: list[_Found] = []
        by_stage: dict[str, list[int]] = {}
        for run in self.runs:
            s = run.spec
            t0 = time.perf_counter()
            run.invokes = 0
            mine: list[int] = []
            if s.source is None:
                run.invokes += 1
                new = [(o, -1) for o in run.detect(image)]
                if s.tiles > 1:
                    for (x0, y0, x1, y1) in self._tile_boxes(s.tiles, h, w):
                        new += [(o, -1) for o in self._on_region(run, image, x0, y0, x1, y1, drop_cut=True)]
            else:
                label, src = s.source
                parents = [i for i in by_stage.get(src, ()) if found[i].obj.label == label]
                parents.sort(key=lambda i: -_area(found[i].obj.box))
                new = []
                for i in parents[: s.max_crops]:
                    bx = found[i].obj.box
                    x0, y0, x1, y1 = bx[0] * w, bx[1] * h, bx[2] * w, bx[3] * h
                    if s.region == "top":
                        y1 = min(y1, y0 + (x1 - x0))
                    if x1 - x0 < s.min_crop_px or y1 - y0 < s.min_crop_px:
                        continue
                    mx, my = (x1 - x0) * s.margin, (y1 - y0) * s.margin
                    cx0, cy0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
                    cx1, cy1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
                    new += [(o, i) for o in self._on_region(run, image, cx0, cy0, cx1, cy1, drop_cut=False)]
            for o, parent in new:
                mine.append(len(found))
                found.append(_Found(o, s.name, parent))
            # Overlaps within one stage (tiles against the frame) are merged before later stages crop.
            kept = {id(f) for f in merge([found[i] for i in mine])}
            by_stage[s.name] = [i for i in mine if id(found[i]) in kept]
            run.last_ms = (time.perf_counter() - t0) * 1000.0
            a = 0.05 if run.mean_ms else 1.0
            run.mean_ms += a * (run.last_ms - run.mean_ms)
            run.mean_invokes += a * (run.invokes - run.mean_invokes)
        final = merge(found)
        index = {id(f): n for n, f in enumerate(final)}
        out = []
        for f in final:
            parent = -1
            if f.parent >= 0:
                parent = index.get(id(found[f.parent]), -1)
            o = f.obj
            out.append(DetectedObject(o.label, o.score, o.box, f.stage, parent, o.signature))
        return tuple(out)

    @property
    def stage_ms(self) -> dict[str, float]:
        """Milliseconds each stage took on the last frame (all its invokes, crops and decoding)."""
        return {r.spec.name: round(r.last_ms, 2) for r in self.runs}

    @property
    def stats(self) -> dict[str, float]:
        """Per stage, smoothed: ms per frame and model invokes per frame (tiles and crops count)."""
        out = {}
        for r in self.runs:
            out[f"stage_{r.spec.name}_ms"] = round(r.mean_ms, 2)
            out[f"stage_{r.spec.name}_invokes"] = round(r.mean_invokes, 2)
        return out

    @property
    def labels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for st in self.stages:
            seen.update(dict.fromkeys(st.labels))
        return tuple(seen)

    @property
    def model(self):
        """The first stage's model: where the daemon reads the backend and its counters."""
        return self.stages[0].model if self.stages else None

    @property
    def models(self) -> list:
        return [st.model for st in self.stages]


def build_graph(specs: Sequence[StageSpec], open_stage: Callable[[StageSpec], object]) -> VisionGraph:
    """A graph whose stages come from `open_stage(spec)` (a VisionStage, or anything with detect)."""
    return VisionGraph([StageRun(s, open_stage(s).detect) for s in specs])


def open_graph(specs: Sequence, manifest, *, threads: int | None = None,
               open_entry: Callable | None = None) -> VisionGraph:
    """Open each stage's model from the manifest (one interpreter per stage). `specs` may be
    StageSpecs or config tables with the same fields; `open_entry(entry)` opens a model (default:
    on the CPU with `threads`)."""
    from edged.models import open_model, select
    from edged.stages.vision.stage import VisionStage

    if open_entry is None:
        def open_entry(entry):
            return open_model(entry, threads=threads)
    specs = [s if isinstance(s, StageSpec) else StageSpec(
        name=s.name, model=s.model, input=s.input, score_threshold=s.score_threshold, tiles=s.tiles,
        margin=s.margin, region=s.region, max_crops=s.max_crops) for s in specs]
    stages = []
    for i, s in enumerate(specs):
        entry = select(manifest, s.model, "vision", f"vision.stages[{i}].model")
        kind = VisionStage
        if entry.decoder == "pose_landmarks":  # keypoints, not boxes
            from edged.stages.vision.pose import PoseStage as kind
        stages.append(kind(open_entry(entry), entry, score_threshold=s.score_threshold or None))
    graph = VisionGraph([StageRun(s, st.detect) for s, st in zip(specs, stages)])
    graph.stages = stages
    return graph
