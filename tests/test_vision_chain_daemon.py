"""The daemon running a chain of vision stages from `[[vision.stages]]` (real models, real broker)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from conftest import write_config

from edged.delivery import codec

REPO = Path(__file__).resolve().parent.parent
SCENE = REPO / "tests" / "data" / "vision" / "scenes" / "group_leuven.jpg"
EVENTS_SCHEMA = json.loads((REPO / "docs" / "schemas" / "events.schema.json").read_text())

CHAIN = """
[camera]
path = "{images}"
fps = 2
[imu]
enabled = false
[stats]
interval_s = 1
[vision]
threads = 1
publish = "labels"      # each frame's objects, with their stage and parent index
[[vision.stages]]
name = "people"
model = "person"
[[vision.stages]]
name = "faces_in_people"
model = "face"
input = "person@people"
region = "top"
"""


def test_daemon_publishes_objects_with_stage_and_parent(tmp_path, broker, subscriber, daemon_factory):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(SCENE, images / SCENE.name)
    cfg = write_config(tmp_path / "edged.toml", broker, extra=CHAIN.format(images=images))
    d = daemon_factory(cfg).start()
    # A stage has figures in the stats only once it has finished a frame, and the faces stage
    # finishes a frame's crops after the people stage did: a stats message can fall between.
    both = ("vision_stage_people_ms", "vision_stage_faces_in_people_ms")
    assert subscriber.wait(lambda: any(m["objects"] for m in subscriber.json("detections"))
                           and any(all(k in m for k in both) for m in subscriber.json("stats")), 60), d.output()
    objs = next(m["objects"] for m in subscriber.json("detections") if m["objects"])
    people = [i for i, o in enumerate(objs) if o["label"] == "person"]
    faces = [o for o in objs if o["label"] == "face"]
    assert people and faces
    assert all(objs[i]["stage"] == "people" for i in people)
    assert all(f["stage"] == "faces_in_people" and f["parent"] in people for f in faces)
    stats = next(m for m in subscriber.json("stats") if all(k in m for k in both))
    assert stats["vision_stage_people_ms"] > 0 and stats["vision_stage_faces_in_people_ms"] > 0
    assert stats["vision_stage_faces_in_people_invokes"] >= 1
    assert d.stop() == 0


EVENTS = """
[camera]
path = "{images}"
fps = 5
[imu]
enabled = false
[vision]
model = "face"          # one cheap model: the vision thread keeps up with every frame
threads = 1
publish = "both"
hold_s = 2.0
"""


@pytest.mark.parametrize("name", ["json", "cbor"])
def test_a_face_missing_every_other_frame_is_one_track_not_a_flapping_presence(
        tmp_path, broker, subscriber, daemon_factory, name):
    # The replay alternates a portrait and an empty scene: the labels policy publishes every
    # change, the tracker holds the one face across the gaps (new once, no end while it lasts).
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(REPO / "samples" / "images" / "astronaut.jpg", images / "a.jpg")
    shutil.copy(REPO / "samples" / "images" / "coffee.jpg", images / "b.jpg")
    cfg = write_config(tmp_path / "edged.toml", broker, extra=EVENTS.format(images=images),
                       mqtt=f'codec = "{name}"\n')
    d = daemon_factory(cfg).start()
    assert subscriber.wait(lambda: len(subscriber.on("detections")) >= 8 and subscriber.on("events"), 60), d.output()
    assert d.stop() == 0
    c = codec.get(name)
    events = [codec.decode(p, c.content_type) for p in subscriber.on("events")]
    for e in events:
        jsonschema.validate(e, EVENTS_SCHEMA)
    assert [(e["type"], e["label"]) for e in events] == [("new", "face")]
    assert len(subscriber.on("detections")) >= 8
    states = [json.loads(p) for p in subscriber.on("state")]
    assert states[-1]["labels"] == [] and states[-1]["motion"] is None  # the clean stop's: nothing in view
    states = states[:-1]
    assert states and all(s["labels"] == ["face"] for s in states[1:]), states
