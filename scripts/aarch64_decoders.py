#!/usr/bin/env python3
"""The detection decoders' compiled candidate scans on another machine, from recorded outputs.

`record OUT` (here, with LiteRT): the raw outputs of the `person`, `face` and `face_full_range`
models on three labelled photos, with what each decoder is built from, and the detections both
routes (the compiled library, numpy) give at three thresholds. `compare IN` (on the other
machine, e.g. aarch64 under qemu, where no interpreter need run): the same outputs through the
same decoders, both routes, against each other there and against the recording. One line per
difference; exit status 1 if the routes disagree with each other there, 0 otherwise (a
difference from the recording alone is printed with its size: float32 arithmetic may differ by
a step between machines). Run by scripts/check-aarch64.
"""

from __future__ import annotations

import argparse
import pickle
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHOTOS = ("tests/data/vision/scenes/vtest_0300.jpg", "tests/data/vision/scenes/group_leuven.jpg",
          "tests/data/vision/heldout/tram_street.jpg")
MODELS = ("person", "face", "face_full_range")


def _decode(dec, source, threshold: float, compiled: bool):
    saved = dec.compiled
    if not compiled:
        dec.compiled = None
    try:
        d = dec.decode_model(source, threshold)
    finally:
        dec.compiled = saved
    return np.asarray(d.boxes, np.float64), np.asarray(d.scores, np.float64), np.asarray(d.classes).tolist()


class _Stored:
    """What a decoder reads of a model: its outputs as stored."""

    def __init__(self, raws: dict[int, np.ndarray]) -> None:
        self.raws = raws

    def raw_output(self, i: int) -> np.ndarray:
        return self.raws[i].copy()


def record(out: Path) -> int:
    from PIL import Image

    from edged.models import load_manifest, open_model
    from edged.stages.vision import VisionStage

    manifest = load_manifest(REPO / "models")
    data = {}
    for name in MODELS:
        entry = manifest[name]
        stage = VisionStage(open_model(entry, threads=1), entry)
        dec, rows = stage.decoder, []
        for rel in PHOTOS:
            stage.preprocess(np.asarray(Image.open(REPO / rel).convert("RGB")))
            stage.model.invoke()
            raws = {i: stage.model.raw_output(i).copy() for i in range(len(stage.model.outputs))}
            got = {(t, c): _decode(dec, _Stored(raws), t, c)
                   for t in (dec.score_threshold, 0.3, 0.02) for c in (True, False)}
            rows.append((rel, raws, got))
        data[name] = (entry, stage.model.outputs, (stage.preprocess.height, stage.preprocess.width), rows)
    out.write_bytes(pickle.dumps(data))
    print(f"{out}: {len(MODELS)} models × {len(PHOTOS)} photos recorded on {platform.machine()}")
    return 0


def compare(path: Path) -> int:
    from edged.stages.vision import DECODERS, native

    if native.LIB is None:
        print(f"the compiled library does not load here: {native.library()[1]}")
        return 1
    data = pickle.loads(path.read_bytes())
    cases = apart = off = 0
    for name, (entry, outputs, hw, rows) in data.items():
        dec = DECODERS[entry.decoder](entry, outputs, hw)
        for rel, raws, want in rows:
            for (threshold, compiled), (wb, ws, wc) in want.items():
                if not compiled:
                    continue
                cases += 1
                c = _decode(dec, _Stored(raws), threshold, True)
                n = _decode(dec, _Stored(raws), threshold, False)
                if not (np.array_equal(c[0], n[0]) and np.array_equal(c[1], n[1]) and c[2] == n[2]):
                    apart += 1
                    print(f"{name} {rel} at {threshold}: the compiled and numpy routes differ here")
                if c[2] != wc or c[0].shape != wb.shape:
                    off += 1
                    print(f"{name} {rel} at {threshold}: other detections than recorded")
                elif not (np.array_equal(c[0], wb) and np.array_equal(c[1], ws)):
                    off += 1
                    print(f"{name} {rel} at {threshold}: the recorded detections within "
                          f"{max(np.abs(c[0] - wb).max(initial=0), np.abs(c[1] - ws).max(initial=0)):.2g}")
    print(f"{platform.machine()}: {cases} cases; the two routes differ in {apart}; "
          f"{off} differ from the recording")
    return 1 if apart else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("record", help="record the outputs and detections here").add_argument("out", type=Path)
    sub.add_parser("compare", help="decode the recording here and compare").add_argument("path", type=Path)
    args = ap.parse_args()
    return record(args.out) if args.what == "record" else compare(args.path)


if __name__ == "__main__":
    sys.exit(main())
