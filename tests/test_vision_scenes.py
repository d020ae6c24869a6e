"""The multi-person scene set (tests/data/vision/scenes.json) and the full-range face model on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import iou
from edged.models import load_manifest, open_model
from edged.stages.vision import VisionStage

REPO = Path(__file__).resolve().parent.parent
SCENES = json.loads((REPO / "tests" / "data" / "vision" / "scenes.json").read_text())["images"]
CLOSEUPS = json.loads((REPO / "tests" / "data" / "vision" / "labels.json").read_text())["images"]
LABELS = {"person", "face", "person?", "face?"}


def load(rel: str) -> np.ndarray:
    return np.asarray(Image.open(REPO / rel).convert("RGB"))


@pytest.fixture(scope="module")
def full_range():
    entry = load_manifest(REPO / "models")["face_full_range"]
    return VisionStage(open_model(entry, threads=1), entry)


@pytest.mark.parametrize("rel", sorted(SCENES))
def test_scene_boxes_lie_inside_their_image(rel):
    entry = SCENES[rel]
    w, h = Image.open(REPO / rel).size
    assert set(entry) <= {"objects", "skip"}
    for o in entry["objects"]:
        x0, y0, x1, y1 = o["box"]
        assert o["label"] in LABELS
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (rel, o)


def test_scene_set_has_people_faces_and_empty_scenes():
    people = sum(o["label"] == "person" for e in SCENES.values() for o in e["objects"])
    faces = sum(o["label"] == "face" for e in SCENES.values() for o in e["objects"])
    empty = [r for r, e in SCENES.items() if not e["objects"]]
    assert people >= 42 and faces >= 17 and len(empty) >= 24


def test_full_range_model_reads_its_input_and_anchor_layout(full_range):
    assert (full_range.preprocess.height, full_range.preprocess.width) == (192, 192)
    assert len(full_range.decoder.anchors) == 2304


def test_full_range_finds_the_astronaut_face(full_range):
    truth = next(o["box"] for o in CLOSEUPS["samples/images/astronaut.jpg"] if o["label"] == "face")
    (o,) = full_range.detect(load("samples/images/astronaut.jpg"))
    assert o.score > 0.8
    assert iou(np.array(o.box) * 512, truth) > 0.5


def test_full_range_finds_faces_the_short_range_model_misses():
    # The smaller face in pair.jpg is 54 px in a 600-px frame: under the short-range model's
    # 15-model-pixel limit, within the full-range model's.
    m = load_manifest(REPO / "models")
    short = VisionStage(open_model(m["face"], threads=1), m["face"])
    far = VisionStage(open_model(m["face_full_range"], threads=1), m["face_full_range"])
    rel = "tests/data/vision/images/pair.jpg"
    img = load(rel)
    h, w = img.shape[:2]
    truth = [o["box"] for o in CLOSEUPS[rel] if o["label"] == "face"]

    def found(stage):
        return sum(any(iou(np.array(d.box) * [w, h, w, h], t) >= 0.5 for d in stage.detect(img)) for t in truth)

    assert found(short) == 1 and found(far) == 2


@pytest.mark.parametrize("rel", sorted(r for r, e in SCENES.items() if not e["objects"]))
def test_full_range_finds_no_face_in_people_free_scenes(full_range, rel):
    assert full_range.detect(load(rel)) == ()
