"""Skeletons as evidence for a detector's unsure boxes (a graph stage with `confirm = true`).

The person detector often gives the right box for someone it is unsure of (scored under its
threshold: dim, cut by an edge) or for someone standing in front of another person (a box the
merge drops because it overlaps the other's). A confirming stage looks at each such box with a
model that finds people by their parts (the `paf` decoder: keypoints joined by part affinity
fields) and reports the detector's own box, whose geometry matches a person's full extent far
better than keypoints do, when it finds a skeleton there that is nobody else's:

- **What it looks at** (`candidates`): every box the source stage decoded (frame and tiles, before
  its merge, from `from_score` up) that overlaps no box of the result so far by IoU `SAME` or more
  (those are the result's own people, seen again), the best first, one per place (IoU `SAME`
  among themselves), in a square crop around it.
- **What counts** (`confirmed`): in the crop, each skeleton with enough parts and confidence (the
  model's `min_parts` and score threshold) is claimed by the box it fits best (IoU of the
  skeleton's box with it, at least `CLAIM`), the result's boxes and the boxes confirmed before
  taking one skeleton each. A skeleton left over, with at least `INSIDE` of its parts inside the
  candidate and its box fitting the candidate by IoU `FIT` or more, confirms the candidate.
- A confirmed box is reported as the detector found it (its box and score, the confirming
  stage's name) and kept apart from the result's merge: it may overlap the person behind it.
"""

from __future__ import annotations

import numpy as np

from edged.stages.vision.boxes import iou_py

SAME = 0.6     # a candidate overlapping a result box this much is that box's person seen again
CLAIM = 0.1    # a skeleton's box must overlap a box at least this much to be claimed by it
INSIDE = 0.6   # share of a confirming skeleton's parts inside the candidate box
FIT = 0.5      # IoU of a confirming skeleton's box with the candidate box


def candidates(boxes: list, scores: list, result: list, from_score: float) -> list[int]:
    """Indices into boxes of those to look at, best first: scored from from_score, overlapping
    no result box and no better candidate by IoU SAME or more."""
    picked: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        b = boxes[i]
        if scores[i] < from_score:
            continue
        if any(iou_py(b, r) >= SAME for r in result) or any(iou_py(b, boxes[j]) >= SAME for j in picked):
            continue
        picked.append(i)
    return picked


def inside_share(points: np.ndarray, box) -> float:
    """Share of the points (n, 2), x and y, lying inside box (x0, y0, x1, y1)."""
    if not len(points):
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return float(((x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3])).mean())


def confirmed(skeletons: list, box, others: list) -> bool:
    """Whether a skeleton (box, parts (n, 2)) found around `box` is nobody else's and fits it.

    others: the boxes that claim skeletons first (the result's, and those confirmed before)."""
    pairs = sorted(((iou_py(s[0], o), i, j) for i, s in enumerate(skeletons) for j, o in enumerate(others)),
                   reverse=True)
    taken_s: set[int] = set()
    taken_o: set[int] = set()
    for v, i, j in pairs:
        if v < CLAIM:
            break
        if i in taken_s or j in taken_o:
            continue
        taken_s.add(i)
        taken_o.add(j)
    return any(i not in taken_s and inside_share(parts, box) >= INSIDE and iou_py(sbox, box) >= FIT
               for i, (sbox, parts) in enumerate(skeletons))
