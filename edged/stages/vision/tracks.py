"""Tracks across frames, and the events they make (`new`, `update`, `end`).

A small tracker on purpose: per label, each frame's objects are matched to the live tracks by the
overlap (IoU) of their boxes with where each track's box should be by now (its last box moved at
its smoothed pace, so two people crossing keep their ids), the best pairs first; an object that overlaps no track may still continue one whose
box centre is close (within one box width sideways, half its height up or down), as a person
walking fast across the view at a low frame rate does. A track is confirmed (`new`) once seen in `min_hits` frames within its
hold time, so a one-frame false alarm makes no event; it ends (`end`, with its dwell time) only
when it has not been seen for `hold_s` seconds and in at least `min_missed` (3) frames, so one or
two missed frames change nothing, however slow the frames come.
`update` is sent every `heartbeat_s` while a track lives and whenever the set of labels found
inside it changes (a face appears in a person's box, or leaves it).

With a pose stage, each pose's posture (edged/posture.py) goes to the track of the person it was
found in, and the track watches how it came to lie (`FallWatch`): every event of the track says
its `posture` ("fallen" once a fall is confirmed), and an `update` is sent when it falls and
when it gets up. A person who falls turns a tall box into a wide one lying where they stood,
which overlaps the old box little: such a box continues the track too (`_fell`), so the fall is
seen on the track that stood.

Costs O(tracks × objects) per label and frame in plain Python: a handful of each on a camera.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from edged.posture import FallRule, FallWatch, aspect_from_box, classify
from edged.records import DetectedObject, TrackEvent
from edged.stages.vision.boxes import iou_py


def _near(track_box, box) -> bool:
    """Centres within the track box's width sideways and half its height up or down."""
    tw, th = track_box[2] - track_box[0], track_box[3] - track_box[1]
    dx = (box[0] + box[2] - track_box[0] - track_box[2]) / 2
    dy = (box[1] + box[3] - track_box[1] - track_box[3]) / 2
    return abs(dx) <= tw and abs(dy) <= th / 2


def _fell(track_box, box) -> bool:
    """A tall box become a wide one where it stood, or the other way round (fallen, got up): the
    body pivots about the feet, so the wide box holds the tall one's bottom centre (give or take a
    quarter of its width), its bottom within half the tall box's height of the tall one's, and it
    is no longer than the tall one was high, give or take a half."""
    def one_way(tall, wide) -> bool:
        tw, th = tall[2] - tall[0], tall[3] - tall[1]
        ww, wh = wide[2] - wide[0], wide[3] - wide[1]
        if not (th > tw and ww > wh and ww <= 1.5 * th):
            return False
        fx = (tall[0] + tall[2]) / 2
        return wide[0] - ww / 4 <= fx <= wide[2] + ww / 4 and abs(wide[3] - tall[3]) <= th / 2
    return one_way(track_box, box) or one_way(box, track_box)


@dataclass
class Track:
    id: int
    label: str
    box: tuple[float, float, float, float]
    score: float
    first_ts: float
    last_ts: float
    hits: int = 1
    confirmed: bool = False
    last_event_ts: float = 0.0
    inside: frozenset[str] = frozenset()     # labels of objects found inside this track's box
    best_score: float = 0.0
    stage: str = ""
    parent: int = -1                         # the enclosing track's id, -1 for none
    velocity: tuple[float, float] = (0.0, 0.0)   # box centre, frame widths/heights per second
    missed: int = 0                          # frames since it was last seen
    watch: FallWatch | None = None           # its postures, once a pose was found in it

    def predicted(self, ts: float) -> tuple[float, float, float, float]:
        """Where the box should be at `ts` if the track keeps its pace (and no further than
        a hold time's worth of it: a stopped person is not sent across the frame)."""
        dt = min(ts - self.last_ts, 1.0)
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        b = self.box
        return (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy)


@dataclass
class Tracker:
    iou: float = 0.3
    hold_s: float = 2.0
    min_hits: int = 2
    heartbeat_s: float = 30.0
    # A track also outlives this many frames without it, however long they take: on a device
    # slower than the camera (a Pi Zero 2 W running the default chain, a frame or so a second),
    # two missed frames may span the hold time, and must not end it.
    min_missed: int = 3
    fall: FallRule = field(default_factory=FallRule)
    tracks: list[Track] = field(default_factory=list)
    next_id: int = 1

    def update(self, ts: float, objects: Sequence[DetectedObject], frame_aspect: float = 0.75) -> list[TrackEvent]:
        """Feed one frame's objects (taken at `ts`, seconds, in a frame of height / width
        `frame_aspect`: a pose's angles need it); the events this frame makes."""
        events: list[TrackEvent] = []
        matched_track_of: dict[int, Track] = {}   # object index → track
        fell: set[int] = set()                    # objects matched as a fall (or getting up)
        for label in sorted({o.label for o in objects} | {t.label for t in self.tracks}):
            idx = [i for i, o in enumerate(objects) if o.label == label]
            live = [t for t in self.tracks if t.label == label]
            guess = [t.predicted(ts) for t in live]
            pairs = sorted(((iou_py(guess[n], objects[i].box), n, i) for n in range(len(live)) for i in idx),
                           reverse=True)
            used_t, used_o = set(), set()
            for ov, n, i in pairs:
                if ov < self.iou:
                    break
                if n in used_t or i in used_o:
                    continue
                used_t.add(n)
                used_o.add(i)
                matched_track_of[i] = live[n]
            for i in idx:  # fall back on closeness for what overlapped nothing
                if i in used_o:
                    continue
                for n, t in enumerate(live):
                    if n not in used_t and _near(guess[n], objects[i].box):
                        used_t.add(n)
                        used_o.add(i)
                        matched_track_of[i] = t
                        break
            for i in idx:  # then on a fall: a tall box turned wide where it stood
                if i in used_o:
                    continue
                for n, t in enumerate(live):
                    if n not in used_t and _fell(t.box, objects[i].box):
                        used_t.add(n)
                        used_o.add(i)
                        matched_track_of[i] = t
                        fell.add(i)
                        break
            for i in idx:
                if i in used_o:
                    continue
                o = objects[i]
                t = Track(self.next_id, label, o.box, o.score, ts, ts, stage=o.stage)
                self.next_id += 1
                self.tracks.append(t)
                matched_track_of[i] = t
        for i, t in matched_track_of.items():
            o = objects[i]
            if t.last_ts != ts:
                t.hits += 1
                dt = ts - t.last_ts
                vx = ((o.box[0] + o.box[2]) - (t.box[0] + t.box[2])) / 2 / dt
                vy = ((o.box[1] + o.box[3]) - (t.box[1] + t.box[3])) / 2 / dt
                a = 0.5 if t.hits > 2 else 1.0
                t.velocity = (t.velocity[0] + a * (vx - t.velocity[0]), t.velocity[1] + a * (vy - t.velocity[1]))
                if i in fell:  # the box's centre jumped as the body turned: it does not go on moving
                    t.velocity = (0.0, 0.0)
            t.box, t.score, t.last_ts, t.stage = o.box, o.score, ts, o.stage or t.stage
            t.missed = 0
            t.best_score = max(t.best_score, o.score)
        # Which labels sit inside each track (a face found in a person's crop names its parent).
        inside: dict[int, set[str]] = {}
        for i, o in enumerate(objects):
            if 0 <= o.parent < len(objects) and i in matched_track_of and o.parent in matched_track_of:
                parent = matched_track_of[o.parent]
                inside.setdefault(parent.id, set()).add(o.label)
                matched_track_of[i].parent = parent.id
        # Postures: each pose's goes to the person it was found in (or, alone, to its own track).
        turned: set[int] = set()   # tracks that fell or got up on this frame
        for i, o in enumerate(objects):
            if not o.signature or o.label != "pose" or i not in matched_track_of:
                continue
            owner = matched_track_of.get(o.parent, matched_track_of[i]) if o.parent >= 0 else matched_track_of[i]
            try:
                p = classify(o.signature, aspect_from_box(o.signature, o.box, frame_aspect) or 1.0)
            except ValueError:
                continue  # not a pose signature (another model's label "pose")
            if owner.watch is None:
                owner.watch = FallWatch(self.fall)
            if owner.watch.see(ts, p):
                turned.add(owner.id)
        for t in list(self.tracks):
            if t.last_ts == ts:
                labels = frozenset(inside.get(t.id, ()))
                if not t.confirmed:
                    if t.hits >= self.min_hits:
                        t.confirmed = True
                        t.inside = labels
                        t.last_event_ts = ts
                        events.append(self._event("new", t, ts))
                elif labels != t.inside or ts - t.last_event_ts >= self.heartbeat_s or t.id in turned:
                    t.inside = labels
                    t.last_event_ts = ts
                    events.append(self._event("update", t, ts))
            else:
                t.missed += 1
                if t.missed >= self.min_missed and ts - t.last_ts >= self.hold_s:
                    self.tracks.remove(t)
                    if t.confirmed:
                        events.append(self._event("end", t, ts))
        return events

    def live(self) -> list[Track]:
        """Confirmed tracks not yet ended."""
        return [t for t in self.tracks if t.confirmed]

    def _event(self, kind: str, t: Track, ts: float) -> TrackEvent:
        return TrackEvent(ts=t.last_ts if kind == "end" else ts, type=kind, track_id=t.id, label=t.label,
                          score=t.score, box=t.box, first_ts=t.first_ts,
                          dwell_s=max(0.0, t.last_ts - t.first_ts), inside=tuple(sorted(t.inside)),
                          stage=t.stage, parent=t.parent, posture=t.watch.state if t.watch else "")
