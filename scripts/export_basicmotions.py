#!/usr/bin/env python3
"""Regenerate edged's BasicMotions data files from the copy shipped inside the `aeon` package.

Writes
  tests/data/basicmotions_test.npz   the 40 TEST recordings + labels (what the tests check accuracy on)
  tests/data/basicmotions_train.npz  the 40 TRAIN recordings + labels (centroids for the signature tests)
  samples/imu/basicmotions_demo.csv  2 TEST recordings per class, concatenated, for the daemon demo

Each npz holds X float32 (recordings, 100 samples, 6) in edged's channel order ax,ay,az [m/s²],
gx,gy,gz [rad/s]; y the lowercase class names; rate_hz. Needs aeon (the training environment);
nothing is downloaded.

    /tmp/trainenv/bin/python scripts/export_basicmotions.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edged.sources.imu.imucsv import write_imu_csv  # noqa: E402

RATE_HZ = 10.0
# The demo plays each class in turn, twice, so a viewer sees every label change.
DEMO_ORDER = ("standing", "walking", "running", "badminton")
DEMO_PER_CLASS = 2


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(X (n, 100, 6) float32, y (n,) str) for one split, from aeon's bundled copy."""
    try:
        from aeon.datasets import load_basic_motions
    except ImportError:
        sys.exit("aeon is not installed: run this with the training environment (pip install aeon)")
    X, y = load_basic_motions(split=split)
    # aeon gives (cases, channels, time); edged keeps samples in rows.
    X = np.ascontiguousarray(np.transpose(X, (0, 2, 1)), dtype=np.float32)
    y = np.array([str(v).lower() for v in y])
    return X, y


def demo_recordings(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, list[str], list[int]]:
    picks = []
    for round_ in range(DEMO_PER_CLASS):
        for label in DEMO_ORDER:
            picks.append(int(np.flatnonzero(y == label)[round_]))
    order = [DEMO_ORDER[i % len(DEMO_ORDER)] for i in range(len(picks))]
    return np.concatenate([X[i] for i in picks]), order, picks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Outputs: tests/data/basicmotions_{train,test}.npz, "
                                        "samples/imu/basicmotions_demo.csv")
    ap.add_argument("--root", type=Path, default=ROOT, help="project checkout to write into (default: %(default)s)")
    args = ap.parse_args(argv)

    data_dir = args.root / "tests" / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        X, y = load_split(split)
        path = data_dir / f"basicmotions_{split}.npz"
        np.savez_compressed(path, X=X, y=y, rate_hz=np.float32(RATE_HZ))
        counts = ", ".join(f"{c} {int((y == c).sum())}" for c in sorted(set(y)))
        print(f"{path.relative_to(args.root)}: {len(X)} recordings ({counts}), {path.stat().st_size} bytes")

    X, y = load_split("test")
    data, order, picks = demo_recordings(X, y)
    t = np.arange(len(data)) / RATE_HZ
    demo = args.root / "samples" / "imu" / "basicmotions_demo.csv"
    demo.parent.mkdir(parents=True, exist_ok=True)
    write_imu_csv(demo, t, data)
    print(f"{demo.relative_to(args.root)}: {len(data)} samples, {len(data) / RATE_HZ:.0f} s; "
          f"TEST recordings {picks} = {', '.join(order)} (10 s each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
