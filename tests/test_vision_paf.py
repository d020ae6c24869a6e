"""The `paf` decoder (people from part confidence maps and part affinity fields) on maps drawn
here, the `openpose` model on real photos, and the confirming stage of the default chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import iou
from edged.models import ModelError, load_manifest, open_model
from edged.runtime import TensorSpec
from edged.stages.vision import VisionStage
from edged.stages.vision import confirm
from edged.config import PEOPLE_CONFIRMED
from edged.stages.vision.graph import DEFAULT_CHAIN, StageSpec, check_graph, open_graph
from edged.stages.vision.paf import LIMBS, PARTS, PafDecoder, assemble, limb_pairs, peaks

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "vision"
GRID = 24

# A person standing, as grid cells (x, y) per part: nose, neck, right shoulder, elbow, wrist, left
# shoulder, elbow, wrist, right hip, knee, ankle, left hip, knee, ankle, right eye, left eye, ears.
STANDING = np.array([(5, 3), (5, 5), (4, 5), (3.5, 8), (3.5, 10.5), (6, 5), (6.5, 8), (6.5, 10.5),
                     (4.5, 11), (4.5, 15), (4.5, 19), (5.5, 11), (5.5, 15), (5.5, 19),
                     (4.7, 2.7), (5.3, 2.7), (4.3, 3), (5.7, 3)], np.float32)


def draw(people, grid=GRID, height=0.9, limbs=True):
    """Maps (grid, grid, 57) with each person (PARTS, 2) drawn: a Gaussian blob per part, and each
    limb's unit vector on the cells within 0.7 of its segment."""
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32)
    maps = np.zeros((grid, grid, PARTS + 1 + 2 * len(LIMBS)), np.float32)
    for kp in people:
        for p in range(PARTS):
            if np.isnan(kp[p, 0]):
                continue
            blob = height * np.exp(-((xx - kp[p, 0]) ** 2 + (yy - kp[p, 1]) ** 2) / (2 * 0.6 ** 2))
            maps[..., p] = np.maximum(maps[..., p], blob)
        if not limbs:
            continue
        for a, b, cx, cy in LIMBS:
            pa, pb = kp[a], kp[b]
            if np.isnan(pa[0]) or np.isnan(pb[0]):
                continue
            d = pb - pa
            n = float(np.hypot(*d))
            u = d / n
            t = np.clip(((xx - pa[0]) * u[0] + (yy - pa[1]) * u[1]) / n, 0, 1)
            dist = np.hypot(xx - (pa[0] + t * d[0]), yy - (pa[1] + t * d[1]))
            on = dist <= 0.7
            maps[..., PARTS + 1 + cx][on] = u[0]
            maps[..., PARTS + 1 + cy][on] = u[1]
    maps[..., PARTS] = 1.0 - maps[..., :PARTS].max(-1)
    return maps


class _Entry:
    def __init__(self, **params):
        self.name, self.path, self.labels = "openpose", Path("openpose.tflite"), ["person"]
        self.params = {"score_threshold": 0.3, "min_parts": 8, **params}


def decoder(**params) -> PafDecoder:
    spec = TensorSpec(index=0, name="maps", shape=(1, GRID, GRID, 57), dtype=np.float32, scale=0.0, zero_point=0)
    return PafDecoder(_Entry(**params), [spec], (GRID * 8, GRID * 8))


def test_peaks_are_local_maxima_placed_between_cells():
    maps = draw([STANDING + 0.3], limbs=False)
    ps, xs, ys, vs = peaks(maps[..., :PARTS], 0.1)
    assert list(ps) == list(range(PARTS))  # one per part, in part order
    # The parabola through three cells places a blob lying between cells within 0.15 cell (the
    # nearest cell alone would be up to 0.5 off).
    err = np.hypot(xs - (STANDING[:, 0] + 0.3), ys - (STANDING[:, 1] + 0.3))
    assert err.max() < 0.15 * np.sqrt(2), err
    assert vs.min() > 0.5


def test_a_plateau_gives_one_peak_and_the_threshold_holds():
    heat = np.zeros((6, 6, 1), np.float32)
    heat[2:4, 2:4, 0] = 0.5  # four equal cells
    ps, xs, ys, _ = peaks(heat, 0.1)
    assert len(ps) == 1
    assert len(peaks(heat, 0.5)[0]) == 0


def test_limbs_pair_parts_along_their_field_and_not_across():
    left, right = STANDING.copy(), STANDING.copy()
    right[:, 0] += 8
    maps = draw([left, right])
    a = np.array([left[1], right[1]])    # necks
    b = np.array([right[2], left[2]])    # right shoulders, listed the other way round
    field = maps[..., PARTS + 1 + np.array([12, 13])]
    pairs = limb_pairs(field, a, b, samples=10, paf_threshold=0.05, min_aligned=0.8, span=12)
    assert sorted((i, j) for i, j, _ in pairs) == [(0, 1), (1, 0)]
    # The field pointing the other way (shoulder to neck) pairs nothing.
    assert limb_pairs(-field, a, b, samples=10, paf_threshold=0.05, min_aligned=0.8, span=12) == []


def test_two_people_are_assembled_apart_with_their_boxes():
    left, right = STANDING.copy(), STANDING.copy()
    right[:, 0] += 10
    right[:, 1] += 1
    dec = decoder()
    out = dec.decode([draw([left, right])[None]], 0.3)
    assert len(out.boxes) == 2 and out.classes == [0, 0]
    for kp, truth in zip(sorted(out.keypoints, key=lambda k: k[:, 0].max()), (left, right)):
        assert (kp[:, 2] > 0).all()  # all 18 parts found
        # model-normalised: cell centres are (cell + 0.5) / GRID
        assert np.abs(kp[:, 0] - (truth[:, 0] + 0.5) / GRID).max() < 0.01
    for b in out.boxes:
        assert 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1
        h = b[3] - b[1]
        assert 0.7 < h < 0.9  # nose to ankles is 16 cells of 24, grown by a tenth each way


def test_a_person_with_too_few_parts_or_too_little_confidence_is_not_reported():
    upper = STANDING.copy()
    upper[6:14] = np.nan  # left arm, both legs gone: 10 parts
    dec = decoder(min_parts=12)
    assert dec.decode([draw([upper])[None]], 0.3).boxes == []
    assert len(decoder().decode([draw([upper])[None]], 0.3).boxes) == 1
    faint = draw([STANDING], height=0.25)
    assert decoder().decode([faint[None]], 0.3).boxes == []
    assert decoder().decode([np.zeros((1, GRID, GRID, 57), np.float32)], 0.0).boxes == []


def test_without_a_head_the_box_reaches_above_the_shoulders():
    headless = STANDING.copy()
    headless[[0, 14, 15, 16, 17]] = np.nan
    (b,) = decoder().decode([draw([headless])[None]], 0.3).boxes
    neck_y = (STANDING[1, 1] + 0.5) / GRID
    assert b[1] < neck_y - 0.1


def test_assembly_merges_pieces_that_share_no_part():
    # Two limbs found before the one joining them: neck-rshoulder, then rhip-rknee, then neck-rhip.
    ps = np.array([1, 2, 8, 9])
    connections = [[] for _ in LIMBS]
    connections[0] = [(0, 1, 1.0)]
    connections[7] = [(2, 3, 1.0)]
    connections[6] = [(0, 2, 1.0)]
    # limbs are taken in LIMBS order, so neck-rhip (6) comes before rhip-rknee (7): one person
    (p,) = assemble(ps, connections)
    assert p[1] == 0 and p[2] == 1 and p[8] == 2 and p[9] == 3


def test_the_decoder_refuses_a_model_with_other_outputs():
    with pytest.raises(ModelError, match="57 channels"):
        PafDecoder(_Entry(), [TensorSpec(0, "x", (1, 24, 24, 19), np.float32, 0.0, 0)], (192, 192))


# The real model.

@pytest.fixture(scope="module")
def openpose():
    entry = load_manifest(REPO / "models")["openpose"]
    return VisionStage(open_model(entry, threads=1), entry)


def load(rel: str) -> np.ndarray:
    return np.asarray(Image.open(REPO / rel).convert("RGB"))


def test_the_model_finds_a_portrait_and_nobody_in_people_free_photos(openpose):
    assert (openpose.preprocess.height, openpose.preprocess.width) == (192, 192)
    (o,) = openpose.detect(load("samples/images/astronaut.jpg"))
    assert o.label == "person" and o.score > 0.4
    labels = json.loads((DATA / "labels.json").read_text())["images"]
    empty = [rel for rel, e in labels.items() if not (e if isinstance(e, list) else e["objects"])]
    assert len(empty) >= 7
    for rel in empty:
        assert openpose.detect(load(rel)) == (), rel


def test_the_model_finds_each_of_two_people_side_by_side(openpose):
    rel = "tests/data/vision/images/pair.jpg"
    truth = [o["box"] for o in json.loads((DATA / "labels.json").read_text())["images"][rel] if o["label"] == "person"]
    img = load(rel)
    h, w = img.shape[:2]
    found = openpose.detect(img)
    assert len(found) == len(truth) == 2
    for t in truth:
        assert max(iou(np.array(o.box) * (w, h, w, h), t) for o in found) > 0.4


# The confirming stage.

def test_confirm_candidates_skip_the_results_people_and_repeats():
    result = [(0.1, 0.1, 0.3, 0.9)]
    boxes = [(0.11, 0.1, 0.3, 0.88), (0.25, 0.1, 0.45, 0.9), (0.26, 0.1, 0.45, 0.9), (0.6, 0.1, 0.8, 0.9)]
    scores = [0.9, 0.4, 0.35, 0.1]
    assert confirm.candidates(boxes, scores, result, 0.15) == [1]
    assert confirm.candidates(boxes, scores, result, 0.05) == [1, 3]


def test_a_skeleton_confirms_a_box_only_when_no_reported_box_claims_it():
    man, woman = (0.5, 0.0, 0.9, 0.8), (0.7, 0.25, 1.0, 0.8)
    parts_man = np.array([[0.7, 0.1], [0.7, 0.2], [0.6, 0.4], [0.8, 0.4], [0.65, 0.7]])
    parts_woman = np.array([[0.85, 0.3], [0.85, 0.4], [0.8, 0.5], [0.9, 0.5], [0.85, 0.75]])
    sk_man = ((0.55, 0.02, 0.88, 0.78), parts_man)
    sk_woman = ((0.75, 0.27, 0.98, 0.8), parts_woman)
    # The woman's box, seen with both skeletons: the man's box claims his, hers is left.
    assert confirm.confirmed([sk_man, sk_woman], woman, [man])
    # Without her skeleton, the one there is the man's: nothing to confirm.
    assert not confirm.confirmed([sk_man], woman, [man])
    # A skeleton that does not fit the box (parts outside it) confirms nothing.
    assert not confirm.confirmed([sk_woman], (0.0, 0.0, 0.3, 0.3), [])


def test_a_confirming_stage_must_crop_and_must_not_replace():
    bad = [StageSpec("p", "person", confirm=True),
           StageSpec("q", "openpose", input="person@p", confirm=True, replace=True)]
    problems = check_graph(bad)
    assert any("vision.stages[0].confirm: only a stage that crops" in p for p in problems), problems
    assert any("vision.stages[1].confirm: a confirming stage" in p for p in problems), problems
    with pytest.raises(ModelError, match="decoder \"paf\""):
        open_graph([DEFAULT_CHAIN[0], StageSpec("c", "person", input="person@people", confirm=True)],
                   load_manifest(REPO / "models"), threads=1)


@pytest.fixture(scope="module")
def vtest():
    """The 700th frame of OpenCV's vtest clip (scenes set): the default chain without and with the
    confirming stage."""
    manifest = load_manifest(REPO / "models")
    img = load("tests/data/vision/scenes/vtest_0700.jpg")
    before = open_graph(DEFAULT_CHAIN, manifest, threads=1).detect(img)
    return img, before, open_graph(list(DEFAULT_CHAIN) + [PEOPLE_CONFIRMED], manifest, threads=1).detect(img)


def test_the_confirming_stage_reports_a_walker_the_person_model_was_unsure_of(vtest):
    # docs/models.md, "People confirmed by their skeletons": the walker at the right of the frame,
    # scored 0.22 by the people stage, is reported with the people stage's own box.
    img, before, after = vtest
    h, w = img.shape[:2]
    walker = (680, 207, 728, 306)
    px = lambda o: np.array(o.box) * (w, h, w, h)  # noqa: E731
    assert max((iou(px(o), walker) for o in before if o.label == "person"), default=0) < 0.5
    (o,) = [o for o in after if o.stage == "people_confirmed"]
    assert o.label == "person" and 0.15 <= o.score < 0.3 and iou(px(o), walker) >= 0.5 and o.parent == -1
    # Everything else is as before.
    assert sorted(b.box for b in before) == sorted(b.box for b in after if b is not o)


def test_the_confirming_stage_looks_at_people_free_photos_and_reports_nobody():
    # The people-free photos where the people stage leaves unsure boxes for it to look at (the
    # fruit close-ups' round shapes, a toy, the shuttle): it looks, and finds no skeleton there.
    chain = open_graph(list(DEFAULT_CHAIN) + [PEOPLE_CONFIRMED], load_manifest(REPO / "models"), threads=1)
    looked = 0
    for rel in ("scenes/apple.jpg", "scenes/fruits.jpg", "scenes/orange.jpg", "scenes/rubberwhale1.jpg",
                "heldout/space_shuttle.jpg"):
        assert chain.detect(load(f"tests/data/vision/{rel}")) == (), rel
        looked += chain.runs[-1].invokes
    assert looked >= 5
