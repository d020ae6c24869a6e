"""The pose stage (MediaPipe's pose landmark model) on person crops: keypoints where the body is,
the int8 keypoint signature, and the signature in both codecs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from edged.delivery import codec
from edged.models import load_manifest, open_model
from edged.records import Detections
from edged.stages.vision.graph import StageSpec, open_graph
from edged.stages.vision.pose import PoseStage

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "schemas" / "detections.schema.json").read_text())
# Hand-measured on samples/images/astronaut.jpg (tests/data/vision/labels.json).
PERSON = (18, 14, 362, 512)
FACE = (180, 82, 272, 185)
NOSE, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 0, 5, 6, 11, 12


@pytest.fixture(scope="module")
def pose():
    entry = load_manifest(REPO / "models")["pose"]
    return PoseStage(open_model(entry, threads=1), entry)


def keypoints(sig, box):
    """Signature → (x, y, visibility) in image pixels of the crop `box`."""
    k = np.array(sig, float).reshape(-1, 3)
    x0, y0, x1, y1 = box
    return np.stack([x0 + (k[:, 0] + 127) / 254 * (x1 - x0), y0 + (k[:, 1] + 127) / 254 * (y1 - y0),
                     k[:, 2] / 127], axis=1)


def test_keypoints_land_on_the_astronaut(pose):
    img = np.asarray(Image.open(REPO / "samples" / "images" / "astronaut.jpg").convert("RGB"))
    crop = np.ascontiguousarray(img[PERSON[1]:PERSON[3], PERSON[0]:PERSON[2]])
    (o,) = pose.detect(crop)
    assert o.label == "pose" and o.score >= 0.5
    assert len(o.signature) == 17 * 3 and all(-128 <= v <= 127 for v in o.signature)
    k = keypoints(o.signature, PERSON)
    nx, ny, nv = k[NOSE]
    assert FACE[0] <= nx <= FACE[2] and FACE[1] <= ny <= FACE[3] and nv > 0.5
    # Shoulders below the nose, on either side of it; hips below the shoulders.
    assert k[L_SHOULDER, 1] > ny and k[R_SHOULDER, 1] > ny
    assert min(k[L_SHOULDER, 0], k[R_SHOULDER, 0]) < nx < max(k[L_SHOULDER, 0], k[R_SHOULDER, 0])
    assert min(k[L_HIP, 1], k[R_HIP, 1]) > max(k[L_SHOULDER, 1], k[R_SHOULDER, 1])


def test_no_pose_in_a_scene_without_people(pose):
    img = np.asarray(Image.open(REPO / "samples" / "images" / "coffee.jpg").convert("RGB"))
    assert pose.detect(img) == ()


def test_pose_of_each_person_in_a_chain_names_its_person():
    g = open_graph([StageSpec("people", "person"), StageSpec("poses", "pose", input="person@people", margin=0.1)],
                   load_manifest(REPO / "models"), threads=1)
    img = np.asarray(Image.open(REPO / "tests" / "data" / "vision" / "scenes" / "basketball1.jpg").convert("RGB"))
    objs = g.detect(img)
    people = [i for i, o in enumerate(objs) if o.label == "person"]
    poses = [o for o in objs if o.label == "pose"]
    assert len(people) == 2 and len(poses) == 2
    assert sorted(p.parent for p in poses) == sorted(people)


@pytest.mark.parametrize("name", ["json", "cbor"])
def test_signature_in_both_codecs(pose, name):
    img = np.asarray(Image.open(REPO / "samples" / "images" / "astronaut.jpg").convert("RGB"))
    (o,) = pose.detect(np.ascontiguousarray(img[14:512, 18:362]))
    c = codec.get(name)
    msg = codec.decode(c.detections(Detections(1.0, (o,), 5.0), "dev-1", 1), c.content_type)
    jsonschema.validate(msg, SCHEMA)
    assert msg["objects"][0]["signature"] == list(o.signature)


def turned_crop(k: int) -> np.ndarray:
    """The astronaut's crop turned k quarter turns (np.rot90): as someone lying is seen."""
    img = np.asarray(Image.open(REPO / "samples" / "images" / "astronaut.jpg").convert("RGB"))
    return np.ascontiguousarray(np.rot90(img[PERSON[1]:PERSON[3], PERSON[0]:PERSON[2]], k))


def xy(sig) -> np.ndarray:
    return (np.array(sig, float).reshape(-1, 3)[:, :2] + 127) / 254


@pytest.mark.parametrize("k", [1, 3])
def test_a_person_lying_is_shown_upright_and_the_keypoints_turned_back(pose, k):
    (upright,) = pose.detect(turned_crop(0))
    assert pose.last_turn == 0 and pose.turns(*turned_crop(0).shape[:2]) == (0,)
    lying = turned_crop(k)
    assert pose.turns(*lying.shape[:2]) == (0, 1, 3)  # 1.45 times as wide as tall
    (o,) = pose.detect(lying)
    # The view turned back upright won, out of the three.
    assert pose.last_turn == (4 - k) % 4
    # Its keypoints, in the lying crop's own axes, are the upright crop's turned with it: turned
    # anticlockwise (k = 1), the crop's top went to the left and its right edge to the top.
    u, v = xy(upright.signature).T
    want = np.stack([v, 1 - u] if k == 1 else [1 - v, u], axis=1)
    seen = np.array(o.signature).reshape(-1, 3)[:, 2] >= 64
    assert seen.sum() >= 9
    assert np.abs(xy(o.signature) - want)[seen].max() < 0.02


def test_the_turns_follow_the_crop_shape(pose):
    assert pose.turns(100, 99) == (0,)
    assert pose.turns(100, 100) == (0, 1, 3)   # as wide as tall: could be anything
    assert pose.turns(100, 199) == (0, 1, 3)
    assert pose.turns(100, 200) == (1, 3)      # no one upright is twice as wide as tall


@pytest.mark.parametrize("overlap", [False, True])
def test_the_graph_keeps_the_best_view_of_a_wide_crop(pose, overlap):
    # A pose stage on the frame (a wide one: the lying astronaut), in a graph with and without the
    # invoke thread: the same pose as the stage's own detect, at three invokes.
    from edged.stages.vision.overlap import FrameRunner

    g = open_graph([StageSpec("poses", "pose")], load_manifest(REPO / "models"), threads=1)
    frame = turned_crop(1)
    runner = FrameRunner(g, overlap=overlap)
    try:
        out = runner.push(frame, "a") + runner.flush()
    finally:
        assert runner.close()
    ((tag, objs, _),) = out
    (want,) = pose.detect(frame)
    assert [o.label for o in objs] == ["pose"] and objs[0].signature == want.signature
    assert objs[0].box == pytest.approx(want.box)
    assert g.runs[0].invokes == 3
