"""Cost of a chain of vision stages (issue 14): each stage's ms per frame and invokes per frame,
what each added stage and each crop costs, and the chain's frame time against the sum of the bare
invokes it makes.

Runs in this process on one core (threads = 1) on a real scene of the labelled set (a 768x576
frame of OpenCV's pedestrian clip, 6 people, and a group photo, 3 people): per frame the default
chain makes 5 person invokes (frame + 2x2 tiles), 1 full-range face invoke and one short-range
face invoke per person crop. "Bare" is `model.invoke()` alone on an input already in place, the
floor any frame path has to pay.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import Figure, at_least, median

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "tests" / "data" / "vision" / "scenes"
FRAMES = ("vtest_0300.jpg", "group_leuven.jpg")


def _bare_ms(stage, n: int) -> float:
    """Median ms of invoke() alone, the input tensor filled once by the stage's preprocessing."""
    stage.preprocess(np.zeros((stage.preprocess.height, stage.preprocess.width, 3), np.uint8))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stage.model.invoke()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def stages(quick: bool = False) -> list[Figure]:
    from edged.models import load_manifest
    from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph

    manifest = load_manifest(REPO / "models")
    n_bare, n_frames = (5, 3) if quick else (60, 30)
    figures: list[Figure] = []
    # The chain built up one stage at a time: the cost each stage adds.
    chains = [DEFAULT_CHAIN[:k] for k in range(1, len(DEFAULT_CHAIN) + 1)]
    full = open_graph(DEFAULT_CHAIN, manifest, threads=1)
    bare = {r.spec.name: _bare_ms(st, n_bare) for r, st in zip(full.runs, full.stages)}
    for name, ms in bare.items():
        model = next(r.spec.model for r in full.runs if r.spec.name == name)
        figures.append(Figure("stages", f"bare invoke, {model}", round(ms, 2), "ms",
                              note="median of invoke() alone, one thread"))
    for frame_name in FRAMES:
        img = np.asarray(Image.open(SCENES / frame_name).convert("RGB"))
        h, w = img.shape[:2]
        prev = 0.0
        for specs in chains:
            g = full if len(specs) == len(DEFAULT_CHAIN) else open_graph(specs, manifest, threads=1)
            g.detect(img)  # warm: buffers and index maps for this frame size
            frame_ms, per_stage, invokes = [], {s.name: [] for s in specs}, {s.name: 0 for s in specs}
            for _ in range(n_frames):
                t0 = time.perf_counter()
                g.detect(img)
                frame_ms.append((time.perf_counter() - t0) * 1000)
                for r in g.runs:
                    per_stage[r.spec.name].append(r.last_ms)
                    invokes[r.spec.name] = r.invokes
            total = median(frame_ms)
            last = specs[-1].name
            figures.append(Figure("stages", f"{frame_name} ({w}x{h}): frame with stages up to {last}",
                                  round(total, 1), "ms", note=f"adds {total - prev:.1f} ms; "
                                  f"{last}: {invokes[last]} invoke(s) per frame"))
            prev = total
            if len(specs) == len(DEFAULT_CHAIN):
                for s in specs:
                    ms = median(per_stage[s.name])
                    figures.append(Figure("stages", f"{frame_name}: stage {s.name}", round(ms, 2), "ms",
                                          note=f"{invokes[s.name]} invoke(s); "
                                               f"{ms / max(invokes[s.name], 1):.2f} ms per invoke or crop"))
                floor = sum(bare[s.name] * invokes[s.name] for s in specs)
                figures.append(Figure("stages", f"{frame_name}: summed bare invokes / chain frame time",
                                      round(floor / total, 3), "×", goal="≥ 0.95",
                                      ok=at_least(floor / total, 0.95),
                                      note=f"{floor:.1f} ms of bare invokes in a {total:.1f} ms frame, one core"))
    return figures
