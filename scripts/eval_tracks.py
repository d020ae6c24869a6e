#!/usr/bin/env python3
"""Measure edged's tracker on a synthetic clip with ground truth, and count the messages each
publish policy sends.

The clip: 30 s at 10 fps on OpenCV's leuvenA.jpg street (Debian's opencv-doc), three people cut
out of the repository's portraits (MediaPipe selfie segmentation, as scripts/make_scenes_testset.py
does) walking along known paths, standing cut by the frame's bottom edge: the astronaut crosses
left to right, Grace Hopper right to left behind her (the nearer person hides the farther one for
about a second), the cameraman walks in, stands for ten seconds and walks out, and comes back
1.5 s later (a new identity in the ground truth: nothing here re-identifies people). Ground truth per frame: each person's visible box and identity; a person more than 60 %
hidden is left out for that frame.

Each frame runs the default chain's `people` stage (person detector on the frame and 2x2 tiles),
then the tracker. py-motmetrics scores the confirmed tracks against the ground truth (IoU >= 0.5):
MOTA, IDF1, identity switches, fragmentations. Messages: what `vision.publish = "labels"` and
`"events"` would have sent over the clip, per minute.

    python scripts/eval_tracks.py --opencv-doc opencv-doc_4.6.0+dfsg-12_all.deb \\
        --mediapipe mediapipe-0.10.14-...whl [--save-frames DIR]

Needs py-motmetrics (pip install motmetrics) beside edged's own requirements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_scenes_testset import PEOPLE, Deb, Segmenter  # noqa: E402

from edged.models import load_manifest  # noqa: E402
from edged.records import Detections  # noqa: E402
from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph  # noqa: E402
from edged.stages.vision.tracks import Tracker  # noqa: E402

FPS = 10
SECONDS = 30
# who, scale, (frame, x of the cut-out's left edge) waypoints; linear in between; absent outside.
PATHS = [
    ("astronaut", 0.40, [(0, -150), (160, 760)]),
    ("hopper", 0.26, [(20, 760), (200, -140)]),
    ("camera", 0.34, [(60, -180), (110, 300), (210, 300), (260, 760)]),
    ("camera", 0.34, [(275, 760), (300, 520)]),
]
HIDDEN = 0.6


def position(way, n):
    for (f0, x0), (f1, x1) in zip(way, way[1:]):
        if f0 <= n <= f1:
            return x0 + (x1 - x0) * (n - f0) / (f1 - f0)
    return None


def build(deb: Deb, seg: Segmenter):
    bg = Image.open(deb.path("leuvenA.jpg")).convert("RGB")
    W, H = bg.size
    cuts = {}
    for who, (rel, pbox, _) in PEOPLE.items():
        im = Image.open(REPO / rel).convert("RGB").crop(pbox)
        cuts[who] = (im, seg(im))
    sprites = []
    for who, s, way in PATHS:
        im, m = cuts[who]
        w, h = round(im.width * s), round(im.height * s)
        sprites.append((im.resize((w, h), Image.LANCZOS), Image.fromarray(m).resize((w, h), Image.BILINEAR),
                        np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR)) > 127, way))
    # Nearer (larger) people are drawn last: they hide the smaller ones.
    order = sorted(range(len(sprites)), key=lambda i: sprites[i][0].height)
    for n in range(FPS * SECONDS):
        frame = bg.copy()
        cover = np.zeros((H, W), bool)
        truth = {}
        for i in reversed(order):  # nearest first, to know what each hides
            im, alpha, mask, way = sprites[i]
            x = position(way, n)
            if x is None:
                continue
            x, y = round(x), H - im.height
            full = np.zeros((H, W), bool)
            xs0, xs1 = max(0, x), min(W, x + im.width)
            if xs1 <= xs0:
                continue
            full[y:y + im.height, xs0:xs1] = mask[:, xs0 - x:xs1 - x]
            visible = full & ~cover
            if full.sum() and visible.sum() / full.sum() >= 1 - HIDDEN:
                ys, xs = np.nonzero(visible)
                truth[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            cover |= full
        for i in order:
            im, alpha, mask, way = sprites[i]
            x = position(way, n)
            if x is not None:
                frame.paste(im, (round(x), H - im.height), alpha)
        yield n, np.asarray(frame), truth


def iou_distances(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5) -> np.ndarray:
    """1 - IoU between [x, y, w, h] rows, NaN (no match) under `min_iou` (py-motmetrics' convention;
    its own iou_matrix uses a function NumPy 2 removed)."""
    out = np.full((len(a), len(b)), np.nan)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ix = max(0.0, min(p[0] + p[2], q[0] + q[2]) - max(p[0], q[0]))
            iy = max(0.0, min(p[1] + p[3], q[1] + q[3]) - max(p[1], q[1]))
            inter = ix * iy
            iou = inter / (p[2] * p[3] + q[2] * q[3] - inter)
            if iou >= min_iou:
                out[i, j] = 1.0 - iou
    return out


class NorfairRun:
    """norfair's tracker on the same boxes: IoU distance, its defaults otherwise; a track counts
    once norfair reports it (initialization_delay) and while it keeps it alive (hit_counter)."""

    def __init__(self):
        from norfair import Tracker as NT
        self.t = NT(distance_function="iou", distance_threshold=0.7, hit_counter_max=FPS * 2,
                    initialization_delay=1)

    def update(self, objs):
        from norfair import Detection
        dets = [Detection(np.array([[o.box[0], o.box[1]], [o.box[2], o.box[3]]]), scores=np.array([o.score, o.score]))
                for o in objs]
        out = []
        for t in self.t.update(dets):
            if t.last_detection is not None and t.last_detection in dets:
                p = t.estimate
                out.append((t.id, (p[0][0], p[0][1], p[1][0], p[1][1])))
        return out


class MotpyRun:
    """motpy's MultiObjectTracker on the same boxes (Kalman filter, IoU matching), at 10 fps."""

    def __init__(self):
        from motpy import MultiObjectTracker
        self.t = MultiObjectTracker(dt=1 / FPS, tracker_kwargs={"max_staleness": FPS * 2},
                                    active_tracks_kwargs={"min_steps_alive": 2, "max_staleness": 1})
        self.ids: dict[str, int] = {}

    def update(self, objs):
        from motpy import Detection
        self.t.step([Detection(box=np.array(o.box) * 1000, score=o.score) for o in objs])
        return [(self.ids.setdefault(t.id, len(self.ids) + 1), tuple(np.array(t.box) / 1000))
                for t in self.t.active_tracks()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--opencv-doc", required=True)
    ap.add_argument("--mediapipe", required=True)
    ap.add_argument("--save-frames", help="write every 10th frame with boxes here")
    ap.add_argument("--hold", type=float, default=2.0)
    ap.add_argument("--min-hits", type=int, default=2)
    ap.add_argument("--tracker", default="edged", choices=("edged", "norfair", "motpy"),
                    help="whose tracker follows the detections (norfair and motpy for comparison)")
    args = ap.parse_args()
    import motmetrics as mm

    from edged.service.pipeline import DetectionPolicy

    people = open_graph(DEFAULT_CHAIN[:1], load_manifest(REPO / "models"), threads=1)
    tracker = Tracker(hold_s=args.hold, min_hits=args.min_hits, heartbeat_s=30.0)
    policy = DetectionPolicy(30.0)
    acc = mm.MOTAccumulator(auto_id=True)
    other = {"norfair": NorfairRun, "motpy": MotpyRun}.get(args.tracker, lambda: None)()
    labels_msgs = events_msgs = 0
    kinds: dict[str, int] = {}
    H = W = None
    for n, img, truth in build(Deb(args.opencv_doc), Segmenter(args.mediapipe)):
        H, W = img.shape[:2]
        ts = n / FPS
        objs = [o for o in people.detect(img) if o.label == "person"]
        if policy.should_publish(Detections(ts, tuple(objs), 0.0)):
            labels_msgs += 1
        if args.tracker == "edged":
            for e in tracker.update(ts, objs):
                events_msgs += 1
                kinds[e.type] = kinds.get(e.type, 0) + 1
            hyp = [(t.id, t.box) for t in tracker.live() if t.last_ts == ts]
        else:
            hyp = other.update(objs)
        gt_ids = sorted(truth)
        gt = np.array([[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in (truth[i] for i in gt_ids)], float).reshape(-1, 4)
        hb = np.array([[b[0] * W, b[1] * H, (b[2] - b[0]) * W, (b[3] - b[1]) * H]
                       for _, b in hyp], float).reshape(-1, 4)
        acc.update(gt_ids, [i for i, _ in hyp], iou_distances(gt, hb))
        if args.save_frames and n % 10 == 0:
            from PIL import ImageDraw
            out = Image.fromarray(img)
            d = ImageDraw.Draw(out)
            for i, b in truth.items():
                d.rectangle(b, outline=(0, 255, 0))
            for tid, b in hyp:
                b = [b[0] * W, b[1] * H, b[2] * W, b[3] * H]
                d.rectangle(b, outline=(255, 0, 0))
                d.text((b[0] + 2, b[1] + 2), str(tid), fill=(255, 255, 0))
            Path(args.save_frames).mkdir(parents=True, exist_ok=True)
            out.save(Path(args.save_frames) / f"f{n:04d}.png")
    mh = mm.metrics.create()
    names = ["num_frames", "num_unique_objects", "mota", "motp", "idf1", "num_switches",
             "num_fragmentations", "mostly_tracked", "num_false_positives", "num_misses"]
    summary = mh.compute(acc, metrics=names, name="clip")
    print(summary.to_string())
    minutes = SECONDS / 60
    if args.tracker != "edged":
        return 0
    print(f"messages per minute: labels policy {labels_msgs / minutes:.0f}, events {events_msgs / minutes:.0f} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) over {SECONDS} s at {FPS} fps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
