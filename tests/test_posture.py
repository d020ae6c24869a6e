"""Postures from pose signatures (edged/posture.py, edged/cloud/posture.py): the geometry on drawn skeletons, the
pose model's real signatures of a standing player and of a pedestrian turned on his side, and
`edged signatures posture` on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edged.cloud.posture import PostureError, aspect_from_box, classify

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "tests" / "data" / "vision" / "scenes"

# A skeleton drawn in crop units (x, y), -127..127, y down: COCO order nose, eyes, ears,
# shoulders, elbows, wrists, hips, knees, ankles (left, right).
STANDING = [(0, -100), (-5, -105), (5, -105), (-10, -100), (10, -100), (-40, -70), (40, -70), (-50, -30),
            (50, -30), (-50, 0), (50, 0), (-25, 0), (25, 0), (-25, 50), (25, 50), (-25, 100), (25, 100)]
# Seen from the side on a chair: torso up, thighs forward, shins down.
SITTING = [(0, -100), (-3, -105), (3, -105), (-6, -100), (6, -100), (-5, -70), (5, -70), (10, -35), (12, -35),
           (30, -20), (32, -20), (-5, 0), (5, 0), (95, 0), (100, 0), (95, 100), (100, 100)]


def signature(points, visible=None) -> list[int]:
    out = []
    for i, (x, y) in enumerate(points):
        out += [x, y, 127 if visible is None or i in visible else 0]
    return out


def turned(points):
    """The same body a quarter turn clockwise (lying on its side)."""
    return [(-y, x) for x, y in points]


def test_the_geometry_tells_standing_sitting_and_lying():
    s = classify(signature(STANDING), crop_aspect=2.5)
    assert (s.label, s.torso_deg, s.thigh_deg, s.knee_deg) == ("standing", 0.0, 0.0, 180.0)
    lying = classify(signature(turned(STANDING)), crop_aspect=1 / 2.5)
    assert lying.label == "lying" and lying.torso_deg == 90.0
    sat = classify(signature(SITTING), crop_aspect=1.0)
    assert sat.label == "sitting" and sat.torso_deg < 10 and sat.thigh_deg == 90.0 and sat.knee_deg == 90.0


def test_without_knees_upright_without_hips_unknown():
    no_legs = set(range(13))  # nose .. hips
    assert classify(signature(STANDING, no_legs), 2.5).label == "upright"
    assert classify(signature(turned(STANDING), no_legs), 0.4).label == "lying"  # the torso suffices
    assert classify(signature(STANDING, set(range(11))), 2.5).label == "unknown"  # no hips
    # A knee on the crop's edge was clipped there by the stage: outside the crop, not seen.
    clipped = [p if i < 13 else (p[0], 127) for i, p in enumerate(STANDING)]
    assert classify(signature(clipped), 2.5).label == "upright"


def test_the_crop_shape_matters_and_comes_from_the_box():
    # Drawn in crop units, a 45° lean is 45° only in a square crop; in a crop twice as tall
    # as wide the same numbers are a body nearer upright.
    lean = [(x - y // 2, y) for x, y in STANDING]  # shoulders half their height to the right
    assert classify(signature(lean), 1.0).torso_deg > classify(signature(lean), 2.0).torso_deg
    # Keypoints spanning x -50..50 and y -105..100 (0.39 of the crop's width, 0.81 of its
    # height) in a pose box 0.2 of the frame wide and 0.3 tall: the crop is 0.2 / 0.39 of the
    # frame's width and 0.3 / 0.81 of its height; in a 4:3 frame, in pixels:
    aspect = aspect_from_box(signature(STANDING), (0.4, 0.3, 0.6, 0.6), 0.75)
    crop_w, crop_h = 0.2 / (100 / 254), 0.3 / (205 / 254)
    assert aspect == pytest.approx(crop_h / crop_w * 0.75)
    with pytest.raises(PostureError):
        classify(signature(STANDING)[:-3])
    with pytest.raises(PostureError):
        classify([300] * 51)


def test_the_pose_models_signatures_of_real_people(tmp_path):
    from edged.models import load_manifest, open_model
    from edged.stages.vision.pose import PoseStage

    entry = load_manifest(REPO / "models")["pose"]
    pose = PoseStage(open_model(entry, threads=1), entry)

    def crop(name, box, margin=0.2):
        img = np.asarray(Image.open(SCENES / name).convert("RGB"))
        x0, y0, x1, y1 = box
        mx, my = (x1 - x0) * margin, (y1 - y0) * margin
        h, w = img.shape[:2]
        return img[max(0, int(y0 - my)):min(h, int(np.ceil(y1 + my))), max(0, int(x0 - mx)):min(w, int(np.ceil(x1 + mx)))]

    # The player on the left of the basketball photo (hand-labelled box), standing.
    player = crop("basketball1.jpg", (33, 80, 163, 479))
    (p,) = pose.detect(player)
    got = classify(p.signature, player.shape[0] / player.shape[1])
    assert got.label == "standing" and got.torso_deg < 15 and got.thigh_deg < 30, got
    # A pedestrian of the clip, and the same crop turned a quarter: what a camera sees of him
    # lying on his side.
    walker = np.ascontiguousarray(np.rot90(crop("vtest_0700.jpg", (520, 166, 544, 234)), 1))
    (p,) = pose.detect(walker)
    assert classify(p.signature, walker.shape[0] / walker.shape[1]).label == "lying"

    # The same, from the command line: a pose object per line, and a detections-like record.
    lines = tmp_path / "poses.jsonl"
    lines.write_text(json.dumps({"signature": list(p.signature)}) + "\n"
                     + json.dumps({"image": "x.jpg", "objects": [{"label": "person", "box": [0, 0, 1, 1]},
                                                                 {"label": "pose", "signature": signature(STANDING),
                                                                  "box": [0.4, 0.2, 0.6, 0.9]}]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "edged", "signatures", "posture", str(lines), "--frame-aspect", "0.75"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(o["line"], o["posture"]) for o in out] == [(1, "lying"), (2, "standing")]
    assert out[1]["image"] == "x.jpg"
    lines.write_text('{"signature": [1, 2, 3]}\n')
    r = subprocess.run([sys.executable, "-m", "edged", "signatures", "posture", str(lines)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"edged: signatures posture: {lines}:1: expected a pose signature of 51 numbers, got 3"
