"""Vision stages chained into a small graph: each stage runs one model on the whole frame (or on
overlapping tiles of it) or on the boxes of one label that an earlier stage found, cropped with a
margin and upscaled to the model's input by its own preprocessing.

`GraphSpec` is the declaration (from the config's `[[vision.stages]]` or `DEFAULT_CHAIN`);
`VisionGraph` runs it. Objects from every stage are merged per label (the best of overlapping
boxes is kept, and a box lying mostly inside a larger one of its label is dropped: a tile's or a
crop's partial view of something another pass saw whole). Each object says which stage found it
and, for an object found inside a crop, the index of the object it was found in (`parent`).

A stage may show one region in several views (`turns(height, width)`: the pose stage shows a crop
wider than tall turned a quarter either way too, as someone lying is seen); the objects of the
view with the most `evidence` count, and the stage maps them back into the region's own axes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from edged.config import DEFAULT_STAGES, STAGE_INPUT_FRAME as FRAME, STAGE_REGIONS as REGIONS
from edged.config import check_stages as check_graph  # noqa: F401 — the declaration's checks live with the config
from edged.records import DetectedObject
from edged.runtime import OutputCopy
from edged.stages.vision import confirm as confirming
from edged.stages.vision.boxes import iou_py, turn_box_back
from edged.stages.vision.preprocess import Letterbox, check_image


def _spec(s) -> "StageSpec":
    """A StageSpec with the fields of a config table (edged.config.VisionStageConfig)."""
    return StageSpec(name=s.name, model=s.model, input=s.input, score_threshold=s.score_threshold, tiles=s.tiles,
                     margin=s.margin, region=s.region, max_crops=s.max_crops, turned=s.turned,
                     max_box=s.max_box, replace=s.replace, from_score=s.from_score, confirm=s.confirm,
                     within=s.within, alone_score=s.alone_score)


@dataclass(frozen=True)
class StageSpec:
    """One stage: a model and what it runs on."""

    name: str
    model: str
    input: str = FRAME                # "frame" or "<label>@<stage name>"
    score_threshold: float = 0.0      # 0 = the model's own
    tiles: int = 1                    # on the frame: 1 = whole frame; n = n×n overlapping tiles + the frame
    margin: float = 0.2               # crops: grown by this share of the box on each side
    region: str = "box"               # crops: "box", "top" = a square at the box's top (a person's head),
                                      # "square" = a square around the box (its longer side grown by margin)
    max_crops: int = 8                # crops per frame, largest boxes first
    min_crop_px: int = 12             # boxes smaller than this (either side, frame pixels) are not cropped
    turned: bool = False              # on the frame: also on the frame turned a quarter either way
    max_box: float = 1.0              # crops: only boxes under this share of the frame (both sides)
    replace: bool = False             # crops: objects of the source's label found in a box replace it
    from_score: float = 0.0           # crops: also the source's unreported boxes from this score up
    confirm: bool = False             # crops: the source's boxes left out of the result so far, each
                                      # reported if a skeleton found there is nobody else's (confirm.py)
    within: str = ""                  # a label whose reported boxes vouch for this stage's objects:
    alone_score: float = 0.0          # an object lying in none of them needs this score (ALONE_INSIDE)

    @property
    def source(self) -> tuple[str, str] | None:
        """(label, stage) this stage crops, or None on the frame."""
        if self.input == FRAME:
            return None
        label, _, stage = self.input.partition("@")
        return label, stage


# The default chain (edged.config.DEFAULT_STAGES, where the daemon's default lives, and why).
DEFAULT_CHAIN: tuple[StageSpec, ...] = tuple(
    _spec(s) for s in DEFAULT_STAGES)

# Tiles are for objects the frame pass sees too small. A box spanning more than this share of its
# tile (either side) spans more than ~0.43 of a 2×2-tiled frame, several times the size at which
# the frame pass finds its objects: if that pass did not, the tile's close view is not trusted
# (on the scene set, the one such box was a false person on a people-free close-up; true
# tile-only people span at most 0.62 of their tile). docs/models.md has the measurement.
TILE_MAX_SIDE = 0.75
# The other way round: a box of the frame pass spanning at least this share of the frame (either
# side) covers several tiles, and the tiles see the same object closer, at least in part (a head
# and shoulders, a torso). Kept only if some tile saw something of its label lying mostly inside
# it. On the labelled sets every such person had a tile's view inside; the two false people
# (an orange and an apple filling a close-up) had none.
FRAME_CHECK_SIDE = 0.5
# A stage that replaces the boxes it crops (StageSpec.replace) takes only what lies at least this
# much inside the box: a second look at one person, or at two in one loose box, not at their
# neighbours, whom the first look reported (or not) on its own.
REPLACE_INSIDE = 0.5


# An object of a stage with `within` lies in a box of that label when at least this share of it
# is inside the box: a face at the top edge of its person's box, partly above it, still counts.
ALONE_INSIDE = 0.5


def _inside(a, b) -> float:
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if ix > 0 and iy > 0 and area > 0 else 0.0


def _replacement(final: list, f: "_Found", src: "_Found") -> int:
    """Index in `final` of the object of `src`'s label that replaced `src` (found in its crop by a
    replacing stage) holding most of `f`'s box, at least REPLACE_INSIDE of it; -1 if none does."""
    best, at = REPLACE_INSIDE, -1
    for n, g in enumerate(final):
        if g is not f and g.parent == f.parent and g.obj.label == src.obj.label:
            v = _inside(f.obj.box, g.obj.box)
            if v >= best:
                best, at = v, n
    return at


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
    """A spec with its stage (a VisionStage or PoseStage: `preprocess`, `finish`, `reads`,
    `model`), and what it cost on the last frame."""

    spec: StageSpec
    stage: object
    last_ms: float = 0.0     # its preprocessing, invokes and decoding on the last frame
    invokes: int = 0         # on the last frame
    mean_ms: float = 0.0     # smoothed over about the last 20 frames
    mean_invokes: float = 0.0
    frames: int = 0          # frames it has finished: its figures mean something once this is > 0
    slot: int = 0            # the input slot its next unit fills (alternates when overlapping)
    copies: list = field(default_factory=lambda: [None, None])  # per slot: its OutputCopy
    share_from: int = -1     # index of an earlier stage with the same input and geometry
    shared_to: bool = False  # a later stage reads this stage's resampled pixels
    report: float = 0.0      # its objects scored under this are only candidates for a later stage's
                             # second look (StageSpec.from_score), never in the result


@dataclass
class Unit:
    """One invoke of a frame's work: a stage's model on one region (the frame, a tile or a crop),
    its input prepared in `slot`. `outputs` is where `finish` reads the result: the model itself,
    or a copy taken right after the invoke (when the next invoke may already run)."""

    run: StageRun
    frame: "FrameWork"
    region: tuple[int, int, int, int]
    drop_cut: bool
    parent: int
    slot: int
    box: Letterbox
    outputs: object = None
    ms: float = 0.0          # preprocessing, on the vision thread (finish adds its decoding)
    invoke_ms: float = 0.0
    ready: float = 0.0       # perf_counter() when its input was prepared
    invoked: float = 0.0     # perf_counter() when its invoke started (after the commit)
    decode_ms: float = 0.0   # its decoding, on the vision thread
    error: BaseException | None = None
    turn: int = 0            # the region shown turned this many quarter turns (np.rot90)
    views: int = 1           # views of this region (turns) the stage asked for; the best one counts
    last_view: bool = True   # the last of them

    def invoke(self) -> None:
        """Commit the prepared input, invoke, and (with a copy to fill) copy the outputs."""
        st = self.run.stage
        st.preprocess.commit(self.slot)
        self.invoked = t0 = time.perf_counter()
        st.model.invoke()
        self.invoke_ms = (time.perf_counter() - t0) * 1000.0
        copy = self.outputs
        if copy is not st.model:
            copy.capture(st.model)


@dataclass(frozen=True)
class Wait:
    """Yielded by `VisionGraph.units` when the next stage crops what `stage` found: every unit
    of that stage must be finished first."""

    stage: str


@dataclass
class FrameWork:
    """One frame's progress through the graph."""

    image: np.ndarray
    tag: object = None
    found: list = field(default_factory=list)
    by_stage: dict = field(default_factory=dict)   # stage name -> indices into found, once complete
    mine: dict = field(default_factory=dict)       # stage name -> indices into found so far
    left: dict = field(default_factory=dict)       # stage name -> units not finished yet
    ms: dict = field(default_factory=dict)         # stage name -> ms so far
    invokes: dict = field(default_factory=dict)    # stage name -> units prepared
    shared: dict = field(default_factory=dict)     # (region, geometry) -> resampled pixels
    whole: dict = field(default_factory=dict)      # stage name -> indices into found from the frame pass
    views: dict = field(default_factory=dict)      # stage name -> (label, frame box) of all its tiles saw
    dropped: set = field(default_factory=set)      # indices into found left out of the result: failed the
                                                   # scale check, replaced, or candidates only
    cands: dict = field(default_factory=dict)      # stage name -> indices into found of its candidates
    best_view: dict = field(default_factory=dict)  # (stage, region) -> (evidence, objects) of its best view so far
    claims: dict = field(default_factory=dict)     # confirming stage name -> boxes of the result before it, and
                                                   # those it confirmed so far (they claim skeletons first)
    apart: list = field(default_factory=list)      # indices into found of confirmed boxes: kept out of the merge
    started: float = field(default_factory=time.perf_counter)
    objects: tuple | None = None                   # set when every stage is complete
    finished: float = 0.0                          # perf_counter() then

    def complete(self, stage: str) -> bool:
        return stage in self.by_stage


class VisionGraph:
    """Runs stages in order on one frame and merges their objects.

    A frame's work is a sequence of units (one model invoke each, see `units`), prepared in order
    and finished in order. `detect` runs them one after the other; `edged.stages.vision.overlap`
    runs the invokes on a thread of their own, preparing the next unit and finishing the last one
    meanwhile, with the same results.
    """

    def __init__(self, runs: Sequence[StageRun], *, tile_overlap: float = 0.25, share_input: bool = True) -> None:
        self.runs = list(runs)
        self.tile_overlap = tile_overlap
        self._tiles: dict[tuple[int, int, int], list[tuple[int, int, int, int]]] = {}
        self._share_bufs: dict[tuple[int, int], np.ndarray] = {}
        self.invoke_ms = 0.0  # all invokes of all finished units so far: how long the interpreters ran
        self.trace: list | None = None  # when a list, every finished unit is appended (benchmarks/stages.py)
        # stage name -> (label, score): its objects in no reported box of that label need the score
        self._alone = {r.spec.name: (r.spec.within, r.spec.alone_score) for r in self.runs
                       if r.spec.within and r.spec.alone_score > 0}
        if share_input:
            self._link_shared()

    @property
    def stages(self) -> list:
        return [r.stage for r in self.runs]

    def _link_shared(self) -> None:
        """Stages whose units get the same pixels (the same input, cropped alike, and the same
        resampling geometry) resample once: the later ones read the first one's pixels."""
        def key(r: StageRun) -> tuple:
            s = r.spec
            crop = None if s.source is None else (s.input, s.region, s.margin, s.max_crops, s.min_crop_px,
                                                  s.max_box, s.from_score)
            return (crop, s.tiles if crop is None else 1, r.stage.preprocess.geometry)
        first: dict[tuple, int] = {}
        for i, r in enumerate(self.runs):
            k = key(r)
            if k in first:
                r.share_from = first[k]
                self.runs[first[k]].shared_to = True
            else:
                first[k] = i

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

    def _regions(self, run: StageRun, fw: FrameWork) -> list[tuple[tuple[int, int, int, int], bool, int]]:
        """(region, drop_cut, parent) of each unit of `run` on this frame."""
        s = run.spec
        h, w = fw.image.shape[:2]
        if s.source is None:
            out = [((0, 0, w, h), False, -1)]
            if s.tiles > 1:
                out += [(t, True, -1) for t in self._tile_boxes(s.tiles, h, w)]
            return out
        label, src = s.source
        found = fw.found

        def small(i: int) -> bool:
            b = found[i].obj.box
            return found[i].obj.label == label and b[2] - b[0] < s.max_box and b[3] - b[1] < s.max_box
        if s.confirm:
            # The source's boxes the result so far left out (every earlier stage is complete).
            result = [f.obj.box for f in merge([f for i, f in enumerate(found) if i not in fw.dropped
                                                and f.obj.label == label])]
            fw.claims[s.name] = result
            mine = [i for i, f in enumerate(found) if f.stage == src and small(i)]
            parents = [mine[k] for k in confirming.candidates([found[i].obj.box for i in mine],
                                                              [found[i].obj.score for i in mine],
                                                              result, s.from_score)]
        else:
            parents = [i for i in fw.by_stage.get(src, ()) if small(i)]
            parents.sort(key=lambda i: -_area(found[i].obj.box))
        if s.from_score > 0 and not s.confirm:  # then the source's unreported boxes, best first
            parents += sorted((i for i in fw.cands.get(src, ()) if found[i].obj.score >= s.from_score and small(i)),
                              key=lambda i: -found[i].obj.score)
        out = []
        for i in parents[: s.max_crops]:
            bx = found[i].obj.box
            x0, y0, x1, y1 = bx[0] * w, bx[1] * h, bx[2] * w, bx[3] * h
            if s.region == "top":
                y1 = min(y1, y0 + (x1 - x0))
            if x1 - x0 < s.min_crop_px or y1 - y0 < s.min_crop_px:
                continue
            if s.region == "square":
                # Centred on the box, moved to lie inside the frame; a partial view of something
                # at its edge is left out (drop_cut), as in a tile.
                side = min(max(x1 - x0, y1 - y0) * (1 + 2 * s.margin), w, h)
                cx0 = int(min(max(0.0, (x0 + x1 - side) / 2), w - side))
                cy0 = int(min(max(0.0, (y0 + y1 - side) / 2), h - side))
                out.append(((cx0, cy0, min(w, cx0 + int(np.ceil(side))), min(h, cy0 + int(np.ceil(side)))), True, i))
                continue
            mx, my = (x1 - x0) * s.margin, (y1 - y0) * s.margin
            cx0, cy0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
            cx1, cy1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
            out.append(((cx0, cy0, cx1, cy1), False, i))
        return out

    def start(self, image: np.ndarray, tag: object = None) -> FrameWork:
        """A frame's work, for `units`; `image` must have passed preprocess.check_image."""
        return FrameWork(image, tag)

    def units(self, fw: FrameWork, *, overlap: bool = False) -> Iterator[Unit | Wait]:
        """The frame's units, each with its input prepared, in order; a `Wait` before a stage that
        crops an earlier stage's objects while that stage is not complete. With `overlap`, a
        stage's units alternate between its two input slots and outputs are copied after each
        invoke (the unit prepared next may be on the same model)."""
        for idx, run in enumerate(self.runs):
            s = run.spec
            if s.source is not None:
                # A confirming stage looks at what the result so far left out: all earlier stages.
                for name in ([r.spec.name for r in self.runs[:idx]] if s.confirm else [s.source[1]]):
                    while not fw.complete(name):
                        yield Wait(name)
            t0 = time.perf_counter()
            st = run.stage
            turns_of = getattr(st, "turns", None)  # a pose stage shows a wide crop turned upright too
            views = []
            for region, drop_cut, parent in self._regions(run, fw):
                turns = (0,) if turns_of is None else turns_of(region[3] - region[1], region[2] - region[0])
                views += [(region, drop_cut, parent, t, len(turns), k == len(turns) - 1) for k, t in enumerate(turns)]
            if s.turned and s.source is None:
                # The frame turned a quarter either way, each a view of its own whose objects all
                # count: a detector of upright people sees someone lying across the view upright.
                h, w = fw.image.shape[:2]
                views += [((0, 0, w, h), False, -1, t, 1, True) for t in (1, 3)]
            fw.left[s.name] = fw.invokes[s.name] = len(views)
            fw.mine[s.name] = []
            fw.ms[s.name] = (time.perf_counter() - t0) * 1000.0
            if not views:
                self._complete(run, fw)
            for n, (region, drop_cut, parent, turn, nviews, last) in enumerate(views):
                t0 = time.perf_counter()
                x0, y0, x1, y1 = region
                sub = fw.image[y0:y1, x0:x1]
                if turn:
                    sub = np.rot90(sub, turn)  # a view: the resampling reads it as it is
                geo = st.preprocess.geometry
                pixels = fw.shared.get((region, geo)) if run.share_from >= 0 and not turn else None
                slot = run.slot
                if overlap:
                    run.slot ^= 1
                # A region is resampled from the frame itself; a turned view (rot90) is not a
                # plain region of it, and is read as the view it is.
                box, got = st.preprocess.fill(sub, slot, pixels, base=None if turn else fw.image, at=(x0, y0))
                if run.shared_to and pixels is None and not turn:
                    fw.shared[(region, geo)] = self._keep(idx, n, got)
                outputs = st.model
                if overlap:
                    outputs = run.copies[slot]
                    if outputs is None:
                        outputs = run.copies[slot] = OutputCopy(st.model, tuple(st.reads))
                now = time.perf_counter()
                yield Unit(run, fw, region, drop_cut, parent, slot, box, outputs, ms=(now - t0) * 1000.0,
                           ready=now, turn=turn, views=nviews, last_view=last)

    def _keep(self, stage: int, n: int, pixels: np.ndarray) -> np.ndarray:
        """A copy of a unit's resampled pixels that outlives the stage's next unit, in a buffer
        reused from frame to frame (grown when a region needs more)."""
        buf = self._share_bufs.get((stage, n))
        if buf is None or buf.size < pixels.size:
            buf = self._share_bufs[(stage, n)] = np.empty(pixels.size, np.uint8)
        out = buf[: pixels.size].reshape(pixels.shape)
        np.copyto(out, pixels)
        return out

    def finish(self, unit: Unit) -> None:
        """Decode an invoked unit into its frame's objects; completes the stage after its last unit
        (and the frame after its last stage)."""
        t0 = time.perf_counter()
        run, fw = unit.run, unit.frame
        s = run.spec
        h, w = fw.image.shape[:2]
        x0, y0, x1, y1 = unit.region
        sw, sh = x1 - x0, y1 - y0
        e = 0.01
        whole = (sw, sh) == (w, h)
        if unit.views > 1:
            # One region in several views (turns): its objects are those of the view the stage
            # saw most clearly, known once its last view is decoded.
            key = (s.name, unit.region, unit.parent)
            ev = run.stage.evidence(unit.outputs)
            best = fw.best_view.get(key)
            if best is None or ev > best[0]:
                best = fw.best_view[key] = (ev, run.stage.finish(unit.outputs, unit.box, unit.turn))
            objects = best[1] if unit.last_view else ()
        elif s.confirm:
            objects = ()
            self._confirm(unit)
        else:
            objects = run.stage.finish(unit.outputs, unit.box)
        for o in objects:
            b = o.box
            cand = o.score < run.report  # kept aside for a later stage's second look only
            to = fw.cands.setdefault(s.name, []) if cand else fw.mine[s.name]
            if unit.turn and unit.views == 1:  # the frame turned: boxes back into its own axes
                # Not subject to the frame/tile scale check, whose tiles are of the upright frame.
                to.append(len(fw.found))
                fw.found.append(_Found(DetectedObject(o.label, o.score, turn_box_back(b, unit.turn),
                                                      signature=o.signature), s.name, unit.parent))
                continue
            if whole and unit.parent < 0:
                to.append(len(fw.found))
                if not cand:
                    fw.whole.setdefault(s.name, []).append(len(fw.found))
                fw.found.append(_Found(o, s.name, unit.parent))
                continue
            fb = ((x0 + b[0] * sw) / w, (y0 + b[1] * sh) / h, (x0 + b[2] * sw) / w, (y0 + b[3] * sh) / h)
            if unit.drop_cut:  # a tile: what it saw (and reports) supports the frame pass's large boxes
                if not cand:
                    fw.views.setdefault(s.name, []).append((o.label, fb))
                # A box cut by an edge of the region that is not the frame's is a partial view;
                # one filling most of the tile is the frame pass's to find (TILE_MAX_SIDE).
                if ((b[0] < e and x0 > 0) or (b[1] < e and y0 > 0) or (b[2] > 1 - e and x1 < w)
                        or (b[3] > 1 - e and y1 < h) or max(b[2] - b[0], b[3] - b[1]) > TILE_MAX_SIDE):
                    continue
            src = fw.found[unit.parent] if s.replace else None
            if src is not None and o.label == src.obj.label:
                # What it finds of the box's label, mostly inside the box, replaces the box (other
                # labels are objects of their own, as in any crop).
                if _inside(fb, src.obj.box) < REPLACE_INSIDE:
                    continue
                fw.dropped.add(unit.parent)
            to.append(len(fw.found))
            fw.found.append(_Found(DetectedObject(o.label, o.score, fb, signature=o.signature), s.name, unit.parent))
        self.invoke_ms += unit.invoke_ms
        unit.decode_ms = (time.perf_counter() - t0) * 1000.0
        fw.ms[s.name] += unit.ms + unit.invoke_ms + unit.decode_ms
        fw.left[s.name] -= 1
        if fw.left[s.name] == 0:
            self._complete(run, fw)
        if self.trace is not None:
            self.trace.append(unit)

    def _confirm(self, unit: Unit) -> None:
        """A confirming stage's crop: report its candidate box if a skeleton there is nobody else's."""
        run, fw = unit.run, unit.frame
        st = run.stage
        dec = st.decoder.decode_model(unit.outputs, st.score_threshold)
        h, w = fw.image.shape[:2]
        x0, y0, x1, y1 = unit.region
        lb, mh, mw = unit.box, st.preprocess.height, st.preprocess.width
        # model-normalised → frame-normalised, without clipping (a part may lie in the padding)
        ax, bx = (mw / lb.width) * (x1 - x0) / w, x0 / w - (lb.left / lb.width) * (x1 - x0) / w
        ay, by = (mh / lb.height) * (y1 - y0) / h, y0 / h - (lb.top / lb.height) * (y1 - y0) / h
        skeletons = []
        for b, kp in zip(dec.boxes, dec.keypoints or ()):
            parts = kp[kp[:, 2] > 0, :2] * (ax, ay) + (bx, by)
            skeletons.append(((b[0] * ax + bx, b[1] * ay + by, b[2] * ax + bx, b[3] * ay + by), parts))
        src = fw.found[unit.parent]
        others = fw.claims[run.spec.name]
        if skeletons and confirming.confirmed(skeletons, src.obj.box, others):
            others.append(src.obj.box)
            o = src.obj
            fw.mine[run.spec.name].append(len(fw.found))
            fw.apart.append(len(fw.found))
            fw.found.append(_Found(DetectedObject(o.label, o.score, o.box), run.spec.name))

    def _complete(self, run: StageRun, fw: FrameWork) -> None:
        s = run.spec
        t0 = time.perf_counter()
        mine = fw.mine[s.name]
        if s.tiles > 1:  # a large box of the frame pass needs a tile's view inside it (FRAME_CHECK_SIDE)
            views = fw.views.get(s.name, ())
            found = fw.found

            def unsupported(i: int) -> bool:
                o = found[i].obj
                return (max(o.box[2] - o.box[0], o.box[3] - o.box[1]) >= FRAME_CHECK_SIDE
                        and not any(lb == o.label and _inside(v, o.box) >= 0.7 for lb, v in views))
            drop = {i for i in fw.whole.get(s.name, ()) if unsupported(i)}
            fw.dropped |= drop
            mine = fw.mine[s.name] = [i for i in mine if i not in drop]
        # Overlaps within one stage (tiles against the frame) are merged before later stages crop.
        kept = {id(f) for f in merge([fw.found[i] for i in mine])}
        fw.by_stage[s.name] = [i for i in mine if id(fw.found[i]) in kept]
        if s.name in fw.cands:  # candidates: merged alike, and none where a reported box is
            fw.dropped.update(fw.cands[s.name])
            found, boxes = fw.found, [fw.found[i] for i in fw.by_stage[s.name]]
            ck = {id(f) for f in merge([found[i] for i in fw.cands[s.name]])
                  if not any(k.obj.label == f.obj.label and (iou_py(k.obj.box, f.obj.box) >= 0.4
                             or _inside(f.obj.box, k.obj.box) >= 0.7) for k in boxes)}
            fw.cands[s.name] = [i for i in fw.cands[s.name] if id(found[i]) in ck]
        run.last_ms = fw.ms[s.name] + (time.perf_counter() - t0) * 1000.0
        run.invokes = fw.invokes[s.name]
        a = 0.05 if run.frames else 1.0
        run.frames += 1
        run.mean_ms += a * (run.last_ms - run.mean_ms)
        run.mean_invokes += a * (run.invokes - run.mean_invokes)
        if len(fw.by_stage) == len(self.runs):
            fw.objects = self._result(fw, self._alone)
            fw.finished = time.perf_counter()

    @staticmethod
    def _result(fw: FrameWork, alone: dict | None = None) -> tuple[DetectedObject, ...]:
        found = fw.found
        apart = set(fw.apart)
        final = merge([f for i, f in enumerate(found) if i not in fw.dropped and i not in apart])
        if apart:
            final = sorted(final + [found[i] for i in fw.apart], key=lambda f: -f.obj.score)
        if alone:
            # A stage's objects outside every reported box of its `within` label need `alone_score`.
            def vouched(f: _Found, label: str) -> bool:
                return any(g.obj.label == label and _inside(f.obj.box, g.obj.box) >= ALONE_INSIDE for g in final)
            final = [f for f in final if f.stage not in alone or f.obj.score >= alone[f.stage][1]
                     or vouched(f, alone[f.stage][0])]
        index = {id(f): n for n, f in enumerate(final)}
        out = []
        for f in final:
            parent = -1
            if f.parent >= 0:
                src = found[f.parent]
                parent = index.get(id(src), -1)
                if parent < 0 and f.parent in fw.dropped:
                    # Its box was replaced by a closer look: the replacement it lies in, if any.
                    parent = _replacement(final, f, src)
            o = f.obj
            out.append(DetectedObject(o.label, o.score, o.box, f.stage, parent, o.signature))
        return tuple(out)

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        """Objects of every stage in an RGB uint8 image, merged, best first; each with its stage
        and, for objects found in a crop, the index of the object cropped (if it was kept)."""
        check_image(image)
        fw = self.start(image)
        for unit in self.units(fw):
            # One after the other: a stage that crops finds its source complete, never a Wait.
            unit.invoke()
            self.finish(unit)
        return fw.objects

    @property
    def stage_ms(self) -> dict[str, float]:
        """Milliseconds each stage took on the last frame (its preprocessing, invokes and decoding)."""
        return {r.spec.name: round(r.last_ms, 2) for r in self.runs}

    @property
    def stats(self) -> dict[str, float]:
        """Per stage, smoothed: ms per frame and model invokes per frame (tiles and crops count);
        a stage that has not finished a frame yet has no figures rather than a false 0."""
        out = {}
        for r in self.runs:
            if not r.frames:
                continue
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
        return self.runs[0].stage.model if self.runs else None

    @property
    def models(self) -> list:
        """Every model the stages run, once each (stages naming one model share it)."""
        return list({id(st.model): st.model for st in self.stages}.values())


def open_graph(specs: Sequence, manifest, *, threads: int | None = None,
               open_entry: Callable | None = None, share_input: bool = True,
               share_models: bool = True) -> VisionGraph:
    """Open each stage's model from the manifest. `specs` may be StageSpecs or config tables with
    the same fields; `open_entry(entry)` opens a model (default: on the CPU with `threads`).

    Stages naming the same model share one interpreter (`share_models`; false: one per stage, for
    comparisons). That is safe because the interpreter is only ever used a unit at a time: a
    unit's input committed, its invoke, and its outputs copied (or decoded, without overlap) all
    happen before the next unit's input is committed, on the one thread that invokes. What a unit
    is prepared in stays the stage's own: its input slots (a stage on a model an earlier stage
    opened does not fill the model's own input buffer, which that stage's slot 0 is), its output
    copies and its decoder. The person model in the default chain (people, people_closer) is
    opened once: about 13 MB less (docs/benchmarks.md, section 3)."""
    from edged.models import open_model, select
    from edged.stages.vision.stage import VisionStage

    if open_entry is None:
        def open_entry(entry):
            return open_model(entry, threads=threads)
    specs = [s if isinstance(s, StageSpec) else _spec(s) for s in specs]
    stages = []
    opened: dict[str, object] = {}  # model name -> its model, opened for the first stage naming it
    for i, s in enumerate(specs):
        entry = select(manifest, s.model, "vision", f"vision.stages[{i}].model")
        if s.confirm and entry.decoder != "paf":
            from edged.models import ModelError
            raise ModelError(f"vision.stages[{i}].model: a confirming stage needs a model that finds "
                             f"skeletons (decoder \"paf\"); {entry.name!r} has decoder {entry.decoder!r}")
        kind = VisionStage
        if entry.decoder == "pose_landmarks":  # keypoints, not boxes
            from edged.stages.vision.pose import PoseStage as kind
        model = opened.get(entry.name) if share_models else None
        shared = model is not None
        if model is None:
            model = opened[entry.name] = open_entry(entry)
        stage = kind(model, entry, score_threshold=s.score_threshold or None)
        if shared:
            stage.preprocess.own_input()
        stages.append(stage)
    runs = [StageRun(s, st) for s, st in zip(specs, stages)]
    for s in specs:  # a second look at a stage's unsure boxes: it decodes down to them, reports as before
        if s.source is not None and s.from_score > 0:
            run = next(r for r in runs if r.spec.name == s.source[1])
            if s.from_score < run.stage.score_threshold:
                run.report = max(run.report, run.stage.score_threshold)
                run.stage.score_threshold = s.from_score
    return VisionGraph(runs, share_input=share_input)
