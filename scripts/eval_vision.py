#!/usr/bin/env python3
"""Score edged's vision models, and OpenCV's classic detectors beside them, on the labelled sets.

Sets: `closeups` (tests/data/vision/labels.json: portraits and people-free scenes) and `scenes`
(tests/data/vision/scenes.json: multi-person street and indoor scenes, people 1-5 m away, and
people-free scenes). Precision and recall at IoU >= 0.5 per label; a detection matches at most
one labelled box, best score first. A label ending in "?" marks a region to ignore (a blurred
crowd, a face turned away): a detection that matches nothing and lies at least half inside such a
region counts neither way. An image's "skip" list names labels it does not label (faces too small
to box in a surveillance view); it is left out of that label's figures.

Peers (`--peers`): OpenCV's Haar frontal-face cascade (haarcascade_frontalface_default.xml,
scaleFactor 1.1, minNeighbors 5, minSize 20 px) and its HOG people detector (the default
Dalal-Triggs SVM, winStride 8, padding 8, scale 1.05, run on the frame upscaled 2x so that people
from 64 px tall fit its 128-px window; each box shrunk to the window's middle, where its training
people stand). Both need OpenCV 4 (OpenCV 5 moved the cascades out of the main package).

    .venv/bin/python scripts/eval_vision.py [--models face,face_full_range,person] [--chain] [--confirm] [--peers] [-v]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.models import load_manifest, open_model  # noqa: E402
from edged.records import DetectedObject  # noqa: E402

SETS = {"closeups": REPO / "tests" / "data" / "vision" / "labels.json",
        "scenes": REPO / "tests" / "data" / "vision" / "scenes.json",
        "heldout": REPO / "tests" / "data" / "vision" / "heldout.json",
        "darknet": REPO / "tests" / "data" / "vision" / "darknet.json"}

Detector = Callable[[np.ndarray], Iterable[DetectedObject]]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def inside(a, b) -> float:
    """The share of box a's area that lies inside box b."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = (a[2] - a[0]) * (a[3] - a[1])
    return ix * iy / area if area > 0 else 0.0


def load_set(path: Path) -> dict[str, dict]:
    """{image path relative to the repository: {"objects": [...], "skip": [...]}}.

    Images marked "extra" (labelled, not committed) are left out when they are not on disk."""
    images = json.loads(path.read_text())["images"]
    out = {rel: (v if isinstance(v, dict) else {"objects": v}) for rel, v in images.items()}
    missing = [rel for rel, v in out.items() if v.get("extra") and not (REPO / rel).exists()]
    if missing:
        print(f"{path.name}: {len(missing)} extra images not on disk, left out "
              "(scripts/make_heldout_testset.py --sdists writes them)", file=sys.stderr)
    return {rel: v for rel, v in out.items() if rel not in missing}


def score(detect: Detector, labelled: dict[str, dict], label: str, *, min_iou: float = 0.5) -> dict:
    tp = fp = fn = 0
    times, per_image = [], {}
    for rel, entry in labelled.items():
        if label in entry.get("skip", ()):
            continue
        img = np.asarray(Image.open(REPO / rel).convert("RGB"))
        h, w = img.shape[:2]
        t0 = time.perf_counter()
        found = sorted((d for d in detect(img) if d.label == label), key=lambda d: -d.score)
        times.append((time.perf_counter() - t0) * 1000)
        scale = np.array([w, h, w, h], float)
        truth = [np.array(o["box"]) / scale for o in entry["objects"] if o["label"] == label]
        ignore = [np.array(o["box"]) / scale for o in entry["objects"] if o["label"] == label + "?"]
        free = list(range(len(truth)))
        rows = []
        for d in found:
            best = max(free, key=lambda i: iou(d.box, truth[i]), default=None)
            ok = best is not None and iou(d.box, truth[best]) >= min_iou
            if ok:
                free.remove(best)
                tp += 1
            elif any(inside(d.box, g) >= 0.5 for g in ignore):
                continue
            else:
                fp += 1
            rows.append({"score": round(d.score, 3), "box_px": [round(v) for v in np.array(d.box) * scale],
                         "match": bool(ok)})
        fn += len(free)
        per_image[rel] = {"labelled": len(truth), "detections": rows,
                          "missed": [[round(v) for v in truth[i] * scale] for i in free]}
    return {"label": label, "labelled_objects": tp + fn, "true_positives": tp, "false_positives": fp,
            "false_negatives": fn,
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None,
            "ms_median": round(statistics.median(times), 1) if times else None, "per_image": per_image}


def model_detector(manifest, name: str, threads: int) -> tuple[Detector, tuple[str, ...]]:
    from edged.stages.vision import VisionStage
    entry = manifest[name]
    stage = VisionStage(open_model(entry, threads=threads), entry)
    return stage.detect, stage.labels


def peers() -> dict[str, tuple[Detector, tuple[str, ...]]]:
    import cv2
    if not hasattr(cv2, "CascadeClassifier"):
        raise SystemExit(f"--peers needs OpenCV 4 (this is {cv2.__version__}): "
                         "pip install 'opencv-python-headless<5' in another venv")
    haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    def faces(img):
        h, w = img.shape[:2]
        found = haar.detectMultiScale(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), scaleFactor=1.1,
                                      minNeighbors=5, minSize=(20, 20))
        return [DetectedObject("face", 1.0, (x / w, y / h, (x + bw) / w, (y + bh) / h))
                for x, y, bw, bh in (found if len(found) else [])]

    def people(img, up=2):
        h, w = img.shape[:2]
        big = cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2BGR), (w * up, h * up), interpolation=cv2.INTER_LINEAR)
        found, weights = hog.detectMultiScale(big, winStride=(8, 8), padding=(8, 8), scale=1.05)
        out = []
        for (x, y, bw, bh), s in zip(found if len(found) else [], np.ravel(weights) if len(found) else []):
            if s < 0.5:
                continue
            # The 64x128 window holds its person in the middle 40x104 pixels.
            out.append(DetectedObject("person", float(s), ((x + bw * 12 / 64) / (w * up), (y + bh * 12 / 128) / (h * up),
                                                           (x + bw * 52 / 64) / (w * up), (y + bh * 116 / 128) / (h * up))))
        keep = []
        for o in sorted(out, key=lambda o: -o.score):
            if all(iou(o.box, k.box) < 0.5 for k in keep):
                keep.append(o)
        return keep

    return {"opencv-haar-frontalface": (faces, ("face",)), "opencv-hog-people": (people, ("person",))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="face,face_full_range,person")
    ap.add_argument("--sets", default="closeups,scenes")
    ap.add_argument("--chain", action="store_true", help="also score the default chain of stages")
    ap.add_argument("--confirm", action="store_true",
                    help="also score the default chain followed by the confirming stage (people_confirmed)")
    ap.add_argument("--peers", action="store_true", help="also score OpenCV's Haar and HOG detectors")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="list misses and false alarms")
    args = ap.parse_args()
    manifest = load_manifest(REPO / "models")
    unknown = [n for n in args.models.split(",") if n and n not in manifest]
    bad_sets = [s for s in args.sets.split(",") if s not in SETS]
    if unknown or bad_sets:
        ap.error("; ".join([f"--models: no model named {n!r} in models/manifest.toml (have: "
                            f"{', '.join(sorted(manifest))})" for n in unknown]
                           + [f"--sets: no set named {s!r} (have: {', '.join(SETS)})" for s in bad_sets]))
    detectors = {n: model_detector(manifest, n, args.threads) for n in args.models.split(",") if n}
    if args.chain:
        from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph
        detectors["default chain"] = (open_graph(DEFAULT_CHAIN, manifest, threads=args.threads).detect,
                                      ("person", "face"))
    if args.confirm:
        from edged.config import PEOPLE_CONFIRMED
        from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph
        detectors["chain + people_confirmed"] = (
            open_graph(list(DEFAULT_CHAIN) + [PEOPLE_CONFIRMED], manifest, threads=args.threads).detect,
            ("person", "face"))
    if args.peers:
        detectors.update(peers())
    results = []
    for set_name in args.sets.split(","):
        labelled = load_set(SETS[set_name])
        for name, (detect, labels) in detectors.items():
            for label in labels:
                r = score(detect, labelled, label) | {"detector": name, "set": set_name}
                results.append(r)
                if args.json:
                    continue
                p = "-" if r["precision"] is None else f"{r['precision']:.2f}"
                rc = "-" if r["recall"] is None else f"{r['recall']:.2f}"
                print(f"{set_name:8s} {name:24s} {label:6s} precision {p:>4s} recall {rc:>4s} "
                      f"(TP {r['true_positives']}, FP {r['false_positives']}, FN {r['false_negatives']}) "
                      f"{r['ms_median']} ms median")
                if args.verbose:
                    for rel, v in r["per_image"].items():
                        bad = [f"FP {d['score']:.2f}@{d['box_px']}" for d in v["detections"] if not d["match"]]
                        bad += [f"FN {b}" for b in v["missed"]]
                        if bad:
                            print(f"    {Path(rel).name}: {'; '.join(bad)}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
