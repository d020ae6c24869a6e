#!/usr/bin/env python3
"""Score the cloud's posture rules (edged/cloud/posture.py) on pose signatures from the labelled sets.

Every hand-labelled person of tests/data/vision (labels.json, scenes.json) whose posture is
written below gets the pose stage's crop (its box grown by 20 % per side, as the chain crops),
and the pose model's signature of it is classified. Lying people are the same crops turned a
quarter turn either way: what a camera sees of someone lying on their side, keypoint for keypoint
(the background turns too, which the pose model sees only inside the crop). Prints one line per
person and the confusion matrix (true posture → predicted), `--json` for the full result.

    .venv/bin/python scripts/eval_posture.py [-v] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edged.cloud.posture import POSTURES, classify, confusion  # noqa: E402
from edged.models import load_manifest, open_model  # noqa: E402
from edged.stages.vision.pose import PoseStage  # noqa: E402

DATA = REPO / "tests" / "data" / "vision"
MARGIN = 0.2
# The posture of every labelled person, by image and index among its people. Everyone labelled
# here stands: the pedestrians and players in full, the astronaut and the cameraman (and their
# cut-outs in the groups) down to the thighs, so the pose model places their knees from what it
# sees. Grace Hopper's portrait shows too little to say whether she stands or sits: left out,
# with her cut-outs. No shipped photo shows someone sitting with their legs in view.
HOPPER = {"group_leuven": {1}, "group_building": {2}, "group_home": {0}, "group_street": {0, 3}}
STANDING = ("vtest_0000", "vtest_0300", "vtest_0600", "vtest_0700", "basketball1", "basketball2", "messi5",
            "group_leuven", "group_street", "group_building", "group_home", "astronaut", "camera", "pair",
            "astronaut_mirror_crop")


def people() -> list[tuple[str, np.ndarray, str]]:
    """(name, crop, posture) of each labelled person with a posture."""
    out = []
    for name in ("labels.json", "scenes.json"):
        for rel, e in json.loads((DATA / name).read_text())["images"].items():
            e = e if isinstance(e, dict) else {"objects": e}
            stem = Path(rel).stem
            if stem not in STANDING:
                continue
            img = np.asarray(Image.open(REPO / rel).convert("RGB"))
            h, w = img.shape[:2]
            for n, o in enumerate(x for x in e["objects"] if x["label"] == "person"):
                if n in HOPPER.get(stem, ()):
                    continue
                x0, y0, x1, y1 = o["box"]
                mx, my = (x1 - x0) * MARGIN, (y1 - y0) * MARGIN
                c = img[max(0, int(y0 - my)):min(h, int(np.ceil(y1 + my))),
                        max(0, int(x0 - mx)):min(w, int(np.ceil(x1 + mx)))]
                out.append((f"{stem}#{n}", c, "standing"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per crop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    entry = load_manifest(REPO / "models")["pose"]
    pose = PoseStage(open_model(entry, threads=1), entry)
    rows = []
    for name, crop, truth in people():
        for turn, want in ((0, truth), (1, "lying"), (3, "lying")):
            c = np.ascontiguousarray(np.rot90(crop, turn))
            found = pose.detect(c)
            if not found:
                rows.append({"person": name, "turn": turn * 90, "truth": want, "predicted": "no pose"})
                continue
            p = classify(found[0].signature, c.shape[0] / c.shape[1])
            rows.append({"person": name, "turn": turn * 90, "truth": want, "predicted": p.label,
                         "torso_deg": p.torso_deg, "thigh_deg": p.thigh_deg, "knee_deg": p.knee_deg})
    table = confusion([r["truth"] for r in rows], [r["predicted"] for r in rows])
    right = sum(r["truth"] == r["predicted"] for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "confusion": table, "correct": right, "total": len(rows)}, indent=1))
        return 0
    if args.verbose:
        for r in rows:
            mark = "" if r["truth"] == r["predicted"] else "   <-- wrong"
            print(f"{r['person']:26s} {r['turn']:3d}° {r['truth']:9s} -> {r['predicted']:9s} "
                  f"torso {r.get('torso_deg')} thigh {r.get('thigh_deg')} knee {r.get('knee_deg')}{mark}")
    cols = [p for p in (*POSTURES, "no pose") if any(p in row for row in table.values())]
    print("true \\ predicted  " + "".join(f"{c:>10s}" for c in cols))
    for t, row in table.items():
        print(f"{t:17s} " + "".join(f"{row.get(c, 0):10d}" for c in cols))
    print(f"correct: {right} of {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
