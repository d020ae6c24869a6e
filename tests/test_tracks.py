"""Tracks and their events: no flapping on missed frames, confirmation, dwell, heartbeat, and the
events in both codecs against docs/schemas/events.schema.json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from edged.delivery import codec
from edged.records import DetectedObject
from edged.stages.vision.tracks import Tracker

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "schemas" / "events.schema.json").read_text())


def person(x: float, y: float = 0.3, w: float = 0.1, h: float = 0.4, score: float = 0.9, **kw) -> DetectedObject:
    return DetectedObject("person", score, (x, y, x + w, y + h), **kw)


def run(tracker: Tracker, frames, dt: float = 0.2, t0: float = 1000.0):
    out = []
    for n, objs in enumerate(frames):
        out += [(n, e) for e in tracker.update(t0 + n * dt, objs)]
    return out


def test_one_walk_is_one_track_with_new_and_end():
    frames = [[person(0.05 + 0.02 * n)] for n in range(20)] + [[]] * 15
    events = run(Tracker(hold_s=2.0, min_hits=2), frames)
    kinds = [(n, e.type, e.track_id) for n, e in events]
    assert kinds == [(1, "new", 1), (29, "end", 1)]
    end = events[-1][1]
    assert end.dwell_s == pytest.approx(19 * 0.2) and end.ts == pytest.approx(1000.0 + 19 * 0.2)


def test_missed_frames_within_the_hold_time_change_nothing():
    seen = [person(0.3)]
    frames = [seen, seen, [], seen, [], [], seen, seen, [], [], [], seen]
    events = run(Tracker(hold_s=1.0, min_hits=2), frames)
    assert [e.type for _, e in events] == ["new"]
    t = Tracker(hold_s=1.0, min_hits=2)
    run(t, frames)
    assert [tr.id for tr in t.live()] == [1]


def test_on_a_slow_device_two_missed_frames_longer_than_the_hold_change_nothing():
    # A frame every 1.5 s (the default chain on a slow Pi): two missed frames span 4.5 s, more
    # than hold_s, and still do not end the track; the third does.
    seen = [person(0.3)]
    frames = [seen, seen, [], [], seen, seen, [], [], [], []]
    events = run(Tracker(hold_s=2.0, min_hits=2), frames, dt=1.5)
    assert [(n, e.type) for n, e in events] == [(1, "new"), (8, "end")]


def test_a_one_frame_false_alarm_makes_no_event():
    frames = [[], [person(0.5)], [], [], [], [], [], [], [], [], [], [], []]
    assert run(Tracker(hold_s=1.0, min_hits=2), frames) == []


def test_two_people_crossing_keep_their_ids():
    # Walking towards each other at one box width per 5 frames; they overlap in the middle.
    frames = [[person(0.1 + 0.02 * n, score=0.9), person(0.8 - 0.02 * n, y=0.32, score=0.8)] for n in range(36)]
    t = Tracker(hold_s=1.0, min_hits=2)
    ids_left = []
    for n, objs in enumerate(frames):
        t.update(1000.0 + 0.2 * n, objs)
        ids_left.append(min(t.tracks, key=lambda tr: tr.box[0]).id)
    assert t.next_id == 3  # no track was ever started for a person already tracked
    assert ids_left[0] == 1 and ids_left[-1] == 2  # each kept its id as they passed


def test_fast_mover_continues_by_closeness_when_boxes_stop_overlapping():
    frames = [[person(0.1 + 0.07 * n)] for n in range(10)]  # 70 % of its width per frame: IoU 0.18
    events = run(Tracker(hold_s=1.0, min_hits=2, iou=0.3), frames)
    assert [e.type for _, e in events] == ["new"]


def test_update_on_heartbeat_and_when_a_face_appears_inside():
    face = DetectedObject("face", 0.8, (0.32, 0.31, 0.37, 0.36), parent=0)
    frames = [[person(0.3)]] * 3 + [[person(0.3), face]] * 3 + [[person(0.3)]] * 30
    events = run(Tracker(hold_s=1.0, min_hits=2, heartbeat_s=5.0), frames)
    people = [(n, e.type, e.inside) for n, e in events if e.label == "person"]
    assert people[0] == (1, "new", ())
    assert (3, "update", ("face",)) in people and (6, "update", ()) in people
    beats = [n for n, kind, _ in people if kind == "update" and n > 6]
    assert beats and all(b2 - b1 >= 25 for b1, b2 in zip([6] + beats, beats))
    faces = [e for _, e in events if e.label == "face"]
    person_id = next(e.track_id for _, e in events if e.label == "person")
    assert faces[0].type == "new" and faces[0].parent == person_id


@pytest.mark.parametrize("name", ["json", "cbor"])
def test_events_in_both_codecs_match_the_schema(name):
    face = DetectedObject("face", 0.8, (0.32, 0.31, 0.37, 0.36), stage="faces_in_people", parent=0)
    frames = [[person(0.3, stage="people"), face]] * 3 + [[]] * 12
    events = [e for _, e in run(Tracker(hold_s=1.0, min_hits=2), frames)]
    assert {e.type for e in events} == {"new", "end"}
    c = codec.get(name)
    for seq, e in enumerate(events, 1):
        msg = codec.decode(c.events(e, "dev-1", seq), c.content_type)
        jsonschema.validate(msg, SCHEMA)
        assert msg["type"] == e.type and msg["id"] == e.track_id and msg["label"] == e.label
    face_new = next(e for e in events if e.label == "face" and e.type == "new")
    person_id = next(e.track_id for e in events if e.label == "person")
    assert codec.decode(c.events(face_new, "d", 1), c.content_type)["parent"] == person_id


@pytest.mark.parametrize("publish, codec_name, has_event", [("labels", "json", False), ("events", "json", True),
                                                            ("both", "cbor", False)])
def test_home_assistant_gets_counts_and_a_track_event_entity(publish, codec_name, has_event):
    from edged.config import parse
    from edged.delivery import homeassistant as ha

    cfg = parse(f'device_id = "d1"\n[vision]\npublish = "{publish}"\n[mqtt]\ncodec = "{codec_name}"\n')
    configs = {t: json.loads(p) for t, p in ha.discovery(cfg, ["person", "face"])}
    count = configs["homeassistant/sensor/d1/person_count/config"]
    assert count["state_topic"] == "edged/d1/state" and "counts['person']" in count["value_template"]
    event = configs.get("homeassistant/event/d1/track/config")
    assert (event is not None) == has_event
    if event:
        assert event["state_topic"] == "edged/d1/events" and event["event_types"] == ["new", "update", "end"]


def test_the_track_event_entity_template_passes_posture_on_only_when_a_track_has_one():
    """Rendered as Home Assistant renders it (Jinja2's immutable sandbox, `value_json` the parsed
    payload): the event type and attributes, with `posture` for a person a pose stage saw."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edged.config import parse
    from edged.delivery import homeassistant as ha
    from edged.records import TrackEvent

    cfg = parse('device_id = "d1"\n')
    event = {t: json.loads(p) for t, p in ha.discovery(cfg, ["person", "face"])}["homeassistant/event/d1/track/config"]
    template = ImmutableSandboxedEnvironment().from_string(event["value_template"])

    def render(**kw) -> dict:
        e = TrackEvent(ts=1000.0, track_id=3, score=0.9, box=(0.1, 0.1, 0.5, 0.9), first_ts=990.0, dwell_s=10.0, **kw)
        return json.loads(template.render(value_json=json.loads(codec.JSON.events(e, "d1", 7))))

    assert render(type="update", label="person", posture="fallen") == {
        "event_type": "update", "label": "person", "id": 3, "dwell_s": 10.0, "posture": "fallen"}
    assert render(type="new", label="face", parent=2) == {"event_type": "new", "label": "face", "id": 3, "dwell_s": 10.0}
    assert render(type="end", label="person")["event_type"] in event["event_types"]
