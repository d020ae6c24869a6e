#!/usr/bin/env python3
"""Score edged's vision models on the labelled test set (tests/data/vision/labels.json).

For each model and each image: what the VisionStage reports; then precision and recall at
IoU >= 0.5 for the model's label (a detection matches at most one labelled box), and the median
and worst per-frame time of `detect` on this machine.

    PYTHONPATH=. /tmp/devenv/bin/python scripts/eval_vision.py [--models face,person] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.models import load_manifest, open_model  # noqa: E402
from edged.stages.vision import VisionStage  # noqa: E402

LABELS = REPO / "tests" / "data" / "vision" / "labels.json"


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def load_set(path: Path = LABELS) -> dict[str, list[dict]]:
    return json.loads(path.read_text())["images"]


def evaluate(stage: VisionStage, label: str, labelled: dict[str, list[dict]], *, min_iou: float = 0.5,
             repeats: int = 1) -> dict:
    """Precision/recall of `stage` for `label` over the labelled images, plus per-image results."""
    tp = fp = fn = 0
    per_image, times = {}, []
    for rel, objs in labelled.items():
        img = np.asarray(Image.open(REPO / rel).convert("RGB"))
        h, w = img.shape[:2]
        for _ in range(repeats):
            t0 = time.perf_counter()
            dets = stage.detect(img)
            times.append((time.perf_counter() - t0) * 1000)
        truth = [np.array(o["box"]) / [w, h, w, h] for o in objs if o["label"] == label]
        found = [d for d in dets if d.label == label]
        free = list(range(len(truth)))
        rows = []
        for d in found:
            best = max(free, key=lambda i: iou(d.box, truth[i]), default=None)
            ok = best is not None and iou(d.box, truth[best]) >= min_iou
            if ok:
                free.remove(best)
            tp += ok
            fp += not ok
            rows.append({"score": round(d.score, 3), "box_px": [round(v) for v in np.array(d.box) * [w, h, w, h]],
                         "iou": round(iou(d.box, truth[best]), 3) if best is not None else 0.0, "match": ok})
        fn += len(free)
        per_image[rel] = {"labelled": len(truth), "detections": rows}
    return {
        "label": label, "images": len(labelled), "labelled_objects": tp + fn, "true_positives": tp,
        "false_positives": fp, "false_negatives": fn,
        "precision": round(tp / (tp + fp), 3) if tp + fp else None,
        "recall": round(tp / (tp + fn), 3) if tp + fn else None,
        "detect_ms_median": round(statistics.median(times), 2), "detect_ms_max": round(max(times), 2),
        "per_image": per_image,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="face,person")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per image")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = ap.parse_args()
    manifest = load_manifest(REPO / "models")
    labelled = load_set()
    results = []
    for name in args.models.split(","):
        entry = manifest[name]
        stage = VisionStage(open_model(entry, threads=args.threads), entry)
        for label in stage.labels:
            r = evaluate(stage, label, labelled, repeats=args.repeats)
            r["model"] = name
            results.append(r)
            if not args.json:
                print(f"{name} ({label}): precision {r['precision']} recall {r['recall']} "
                      f"(TP {r['true_positives']}, FP {r['false_positives']}, FN {r['false_negatives']}; "
                      f"{r['labelled_objects']} labelled in {r['images']} images); detect "
                      f"{r['detect_ms_median']} ms median, {r['detect_ms_max']} ms max, {args.threads} thread(s)")
                for rel, v in r["per_image"].items():
                    dets = ", ".join(f"{d['score']:.2f}@{d['box_px']}{'' if d['match'] else ' (no match)'}"
                                     for d in v["detections"]) or "-"
                    print(f"  {rel}: labelled {v['labelled']}; found {dets}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
