"""Fallen, from a track's postures over time (edged/posture.py `FallWatch`, fed by the device's
tracks): the rule on posture sequences, and the real chain (people on the frame and turned, pose
in each person) on two sequences built from shipped photos: a pedestrian of OpenCV's vtest clip
pasted into the Leuven street standing, then falling (lying a second later), and the same person
lying down slowly. The events carry the posture in both codecs, against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from edged.cloud.payloads import check
from edged.delivery import codec
from edged.models import load_manifest
from edged.posture import FALLEN, FallRule, FallWatch, Posture
from edged.records import DetectedObject
from edged.stages.vision.graph import StageSpec, open_graph
from edged.stages.vision.tracks import Tracker

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "tests" / "data" / "vision" / "scenes"
SCHEMA = json.loads((REPO / "docs" / "schemas" / "events.schema.json").read_text())

STAND, SIT, LIE = Posture("standing", 3.0, 10.0), Posture("sitting", 5.0, 80.0), Posture("lying", 88.0)


def watch(seq, rule=None) -> tuple[FallWatch, list[tuple[float, str]]]:
    """Feed (ts, posture) pairs; the (ts, state) at each change of `fallen`."""
    w, changes = FallWatch(rule), []
    for ts, p in seq:
        if w.see(ts, p):
            changes.append((ts, w.state))
    return w, changes


def test_standing_then_lying_within_fall_s_and_down_for_down_s_is_fallen():
    seq = [(t / 2, STAND) for t in range(6)] + [(3.5, LIE)] + [(4 + t / 2, LIE) for t in range(8)]
    w, changes = watch(seq)
    assert changes == [(6.5, FALLEN)]   # 3 s after the first lying frame (3.5)
    assert w.state == FALLEN
    # Getting up: one standing frame is not enough (a misread), two are.
    w2, more = watch(seq + [(8.0, STAND), (8.5, LIE), (9.0, STAND), (9.5, STAND)])
    assert more == [(6.5, FALLEN), (9.5, "standing")]


def test_a_stumble_a_slow_lie_down_and_lying_back_from_sitting_are_not_falls():
    # Down for a second, then up again.
    _, c = watch([(0, STAND), (0.5, STAND), (1.0, LIE), (1.5, LIE), (2.0, STAND), (2.5, STAND)]
                 + [(3 + t, STAND) for t in range(5)])
    assert c == []
    # Standing, then lying 3 s after the last upright frame.
    w, c = watch([(0, STAND), (1, STAND), (4, LIE)] + [(5 + t, LIE) for t in range(10)])
    assert c == [] and w.state == "lying"
    # Sitting on a bed, then lying back at once.
    w, c = watch([(0, STAND), (4, SIT), (5, SIT), (5.5, LIE)] + [(6 + t, LIE) for t in range(10)])
    assert c == [] and w.state == "lying"


def test_frames_without_a_posture_change_nothing():
    unknown = Posture("unknown")
    w, c = watch([(0, STAND), (0.5, unknown), (1.0, LIE), (2.0, unknown), (3.0, unknown), (4.0, LIE)])
    assert c == [(4.0, FALLEN)]
    # A leaning torso (40°) is not upright enough to start a fall from.
    lean = Posture("standing", 40.0, 10.0)
    _, c = watch([(0, STAND), (1, lean), (2.5, lean), (3.0, LIE), (7.0, LIE)])
    assert c == []
    # The rule's times are parameters.
    _, c = watch([(0, STAND), (2.5, LIE), (7.0, LIE)], FallRule(fall_s=3.0, down_s=4.0))
    assert c == [(7.0, FALLEN)]


def test_a_tall_box_turned_wide_where_it_stood_continues_the_track():
    t = Tracker()
    standing = DetectedObject("person", 0.9, (0.30, 0.50, 0.40, 0.90))
    lying = DetectedObject("person", 0.9, (0.34, 0.78, 0.68, 0.92))   # IoU with the tall box ~0.07
    events = []
    for n in range(4):
        events += t.update(n * 0.5, [standing])
    for n in range(4, 10):
        events += t.update(n * 0.5, [lying])
    assert [(e.type, e.track_id) for e in events] == [("new", 1)]
    # Someone else appearing far away is not taken for the fall.
    other = DetectedObject("person", 0.9, (0.70, 0.80, 0.98, 0.95))
    assert [e.type for e in t.update(5.0, [lying, other])] == []
    assert [e.type for e in t.update(5.5, [lying, other])] == ["new"]


# ---- The real chain on sequences built from shipped photos ---------------------------------------

PEDESTRIAN = (405, 152, 427, 203)   # vtest_0700's person 1, hand-measured (scenes.json)
FEET = (250, 533)                   # where they stand in the Leuven street (leuvenA.jpg, 751x563)


@pytest.fixture(scope="module")
def scene():
    bg = np.asarray(Image.open(SCENES / "leuvenA.jpg").convert("RGB"))
    img = np.asarray(Image.open(SCENES / "vtest_0700.jpg").convert("RGB"))
    x0, y0, x1, y1 = PEDESTRIAN
    crop = Image.fromarray(img[y0 - 8:y1 + 8, x0 - 8:x1 + 8])
    crop = crop.resize((round(crop.width * 260 / crop.height), 260), Image.BILINEAR).convert("RGBA")
    # People on the frame and on the frame turned a quarter either way (the person model finds
    # only upright people), the pose in each person's crop.
    graph = open_graph([StageSpec("people", "person", score_threshold=0.4, turned=True),
                        StageSpec("poses", "pose", input="person@people")],
                       load_manifest(REPO / "models"), threads=1)
    found: dict[int, tuple] = {}

    def objects(angle: int) -> tuple:
        """The chain's objects with the person turned `angle`° clockwise about their feet (head to
        the right), lying on the ground from 90°; each distinct frame is detected once."""
        if angle not in found:
            c = crop.rotate(-angle, Image.BILINEAR, expand=True)
            feet_dx = -(crop.height / 2) * np.sin(np.radians(angle))   # feet from the centre, turned
            frame = Image.fromarray(bg.copy())
            frame.paste(c, (round(FEET[0] - c.width / 2 - feet_dx), FEET[1] - c.height), c)
            found[angle] = graph.detect(np.asarray(frame))
        return found[angle]
    return objects, bg.shape[0] / bg.shape[1]


T0 = 1_764_000_000.0   # capture times: a real clock's


def play(scene, seq):
    objects, aspect = scene
    tracker, events = Tracker(), []
    for ts, angle in seq:
        events += tracker.update(T0 + ts, objects(angle), aspect)
    return [e for e in events if e.label == "person"]


@pytest.mark.parametrize("name", ["json", "cbor"])
def test_a_person_who_falls_is_reported_fallen_on_the_track_that_stood(scene, name):
    # 2 fps: standing 4 s, half-way down at 4.0 s, lying from 4.5 s on.
    seq = [(t / 2, 0) for t in range(8)] + [(4.0, 45)] + [(4.5 + t / 2, 90) for t in range(10)]
    events = play(scene, seq)
    assert [(e.type, e.track_id, e.posture) for e in events] == [("new", 1, "standing"), ("update", 1, FALLEN)]
    assert events[1].ts == pytest.approx(T0 + 7.5)   # lying since 4.5 s, down 3 s
    c = codec.get(name)
    for seq_no, e in enumerate(events, 1):
        msg = codec.decode(c.events(e, "dev-1", seq_no), c.content_type)
        jsonschema.validate(msg, SCHEMA)
        assert msg["posture"] == e.posture
        assert check("events", msg, now=T0 + 100) is None


def test_a_person_who_lies_down_slowly_is_lying_not_fallen(scene):
    # 1 fps: standing, leaning 10° and 20° (still upright), unseen while 30-40° (the person model
    # misses them; the track holds), lying from 9 s: 3 s after the last upright frame.
    seq = ([(float(t), 0) for t in range(5)] + [(5.0, 10), (6.0, 20), (7.0, 30), (8.0, 40)]
           + [(9.0 + t, 90) for t in range(8)])
    objects, aspect = scene
    tracker, events = Tracker(), []
    for ts, angle in seq:
        events += tracker.update(T0 + ts, objects(angle), aspect)
    people = [e for e in events if e.label == "person"]
    assert [(e.type, e.track_id) for e in people] == [("new", 1)]
    (track,) = [t for t in tracker.live() if t.label == "person"]
    assert track.id == 1 and track.watch.state == "lying"


def test_the_cloud_refuses_an_unknown_posture():
    msg = json.loads(codec.get("json").events(
        Tracker()._event("update", _track(), T0 + 5), "dev-1", 1))
    assert msg["posture"] == "lying" and check("events", msg, now=T0 + 100) is None
    msg["posture"] = "dancing"
    assert "posture" in check("events", msg, now=T0 + 100)


def _track():
    from edged.stages.vision.tracks import Track
    t = Track(1, "person", (0.1, 0.1, 0.2, 0.4), 0.9, T0 + 1, T0 + 5)
    t.watch = FallWatch()
    t.watch.see(T0 + 5, LIE)
    return t


def test_only_a_stage_on_the_frame_can_be_turned():
    from edged.config import VisionStageConfig, check_stages

    problems = check_stages([VisionStageConfig(name="people", model="person", turned=True),
                             VisionStageConfig(name="poses", model="pose", input="person@people", turned=True)])
    assert problems == ["vision.stages[1].turned: only a stage on the frame can turn it"]


def test_a_turned_stage_finds_the_people_of_a_scene_turned_on_its_side():
    # vtest_0700's six hand-labelled pedestrians, the frame turned a quarter: lying across it.
    labels = json.loads((REPO / "tests" / "data" / "vision" / "scenes.json").read_text())["images"]
    entry = labels["tests/data/vision/scenes/vtest_0700.jpg"]
    img = np.asarray(Image.open(SCENES / "vtest_0700.jpg").convert("RGB"))
    h, w = img.shape[:2]
    frame = np.ascontiguousarray(np.rot90(img, 1))   # anticlockwise: (x, y) -> (y, 1 - x)
    truth = [(o["box"][1] / h, 1 - o["box"][2] / w, o["box"][3] / h, 1 - o["box"][0] / w)
             for o in (entry if isinstance(entry, list) else entry["objects"]) if o["label"] == "person"]
    manifest = load_manifest(REPO / "models")
    from edged.stages.vision.boxes import iou_py

    def hits(image, truth, turned: bool) -> int:
        g = open_graph([StageSpec("people", "person", score_threshold=0.4, turned=turned)], manifest, threads=1)
        found = [o.box for o in g.detect(image) if o.label == "person"]
        return sum(any(iou_py(b, t) >= 0.5 for b in found) for t in truth)
    upright = [tuple(np.array(o["box"]) / [w, h, w, h])
               for o in (entry if isinstance(entry, list) else entry["objects"]) if o["label"] == "person"]
    # The turned view of the turned frame is the upright frame, pixel for pixel: the same people
    # (4 of 6 on the frame alone, without tiles), their boxes turned back into the frame's axes.
    n = hits(img, upright, False)
    assert n >= 4
    assert hits(frame, truth, False) == 0
    assert hits(frame, truth, True) == n
