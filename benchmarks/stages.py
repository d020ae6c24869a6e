"""Cost of a chain of vision stages (issue 14): each stage's ms per frame and invokes per frame,
what each added stage and each crop costs, and the frame path's efficiency: the summed bare
invokes of all its stages against the chain's frame time, with the invokes overlapped with the
vision thread's Python work (`vision.overlap`, edged/stages/vision/overlap.py) and without, on one
core and on two.

Runs in this process with one interpreter thread per model, on two real scenes of the labelled set
(a 768x576 frame of OpenCV's pedestrian clip, 6 people, and a group photo, 3 people): per frame the
default chain makes 5 person invokes (frame + 2x2 tiles), 1 full-range face invoke and one
short-range face invoke per person crop. "Bare" is `model.invoke()` alone on an input already in
place, the floor any frame path has to pay. The efficiency is measured on a stream of frames (the
two scenes in turn) through `FrameRunner`, the daemon's own path, in rounds: each round times the
stream with overlap off and on, pinned to one core and then to two, each stream between two runs
of the same invokes bare on the same cores (their mean is its floor), so that a ratio is taken
within a few seconds of load. The resampling of one view is timed with both resamplers (numpy and
the compiled one, which give the same bytes), and each round also streams once with the numpy
one for its CPU ratio beside the compiled one's.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import Figure, at_least, cpus, median, pin, thread_cpu_s

REPO = Path(__file__).resolve().parent.parent
SCENES = REPO / "tests" / "data" / "vision" / "scenes"
FRAMES = ("vtest_0300.jpg", "group_leuven.jpg")
GOALS = {1: 0.95, 2: 0.98}  # issue 14: on one core, and with a second core free


def _bare_ms(stage, n: int) -> float:
    """Median ms of invoke() alone, the input tensor filled once by the stage's preprocessing."""
    stage.preprocess(np.zeros((stage.preprocess.height, stage.preprocess.width, 3), np.uint8))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stage.model.invoke()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def _view_ms(stage, image: np.ndarray, region: tuple[int, int, int, int], n: int,
             resampler: str) -> tuple[float, float, float, float]:
    """Median and fastest ms of the stage's resampling of one region of `image` (read in place,
    as the graph reads its tiles and crops), then the same of the whole fill (resampled and
    normalised into an input slot: a view's preprocessing), by `resampler` ("numpy" or
    "compiled"), with its plan and buffers warm. On a shared machine the fastest is the closer to
    the work itself: the median carries the time other work took."""
    from edged.stages.vision.preprocess import Preprocessor

    x0, y0, x1, y1 = region
    sub = image[y0:y1, x0:x1]
    pre = Preprocessor(stage.model, stage.entry, resampler=resampler)
    plan = pre.plan(*sub.shape[:2])
    out = []
    for work in (lambda: plan.resample(sub, image, (x0, y0)), lambda: pre.fill(sub, 1, base=image, at=(x0, y0))):
        work()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            work()
            times.append((time.perf_counter() - t0) * 1000)
        out += [median(times), min(times)]
    return tuple(out)


def _use(graph, resampler: str | None) -> None:
    """Every stage of `graph` resamples by `resampler` from its next fill on ("numpy", or None for
    this process's choice); each keeps the plans it made for either, so a switch builds none."""
    for r in graph.runs:
        pre = r.stage.preprocess
        kept = pre.__dict__.setdefault("_bench_plans", {})
        kept[pre.resampler] = pre._plans
        pre._plans = kept.get(resampler, {})
        pre.resampler = resampler


def _stream_ms(graph, images: list, n: int, overlap: bool,
               trace: list | None = None) -> tuple[float, float, float]:
    """ms per frame of `n` frames (the images in turn) through the daemon's FrameRunner; the
    share of that time an interpreter was invoking (the invokes as timed where they ran); and,
    with overlap, the vision thread's CPU time over the invoke thread's (what a free core must
    hide). With `trace` (a list), the stream's finished units are appended to it, followed by
    the stream's start and end (perf_counter)."""
    from edged.stages.vision.overlap import FrameRunner

    runner = FrameRunner(graph, overlap=overlap)  # its invoke thread inherits this thread's CPUs
    graph.trace = [] if trace is not None else None
    try:
        busy = graph.invoke_ms
        cpu0 = thread_cpu_s()
        t0 = time.perf_counter()
        for k in range(n):
            runner.push(images[k % len(images)])
        runner.flush()
        t1 = time.perf_counter()
        wall = (t1 - t0) * 1000
        cpu1 = thread_cpu_s()
        me = threading.current_thread().name
        cpu = {t: cpu1.get(t, 0.0) - cpu0.get(t, 0.0) for t in (me, "vision-invoke")}
        if trace is not None:
            trace.append((graph.trace, t0, t1))
        return wall / n, (graph.invoke_ms - busy) / wall, cpu[me] / max(cpu["vision-invoke"], 1e-9)
    finally:
        graph.trace = None
        runner.close()


IDLE_CAUSES = {
    "crop": "the next crop's input not ready (its Python outran the invoke before it)",
    "frame": "between frames (the next frame's first input, the last frame's end)",
    "other": "another unit's input not ready",
    "handoff": "input ready: commit, the last invoke's output copy, the thread switch",
    "ends": "the stream's first input and its last decoding",
}


def idle_causes(units: list, start: float, end: float) -> dict[str, float]:
    """Where the interpreter idled during a stream, as shares of its time (perf_counter `start`
    to `end`): between one invoke's end and the next one's start, the part until the next unit's
    input was ready is that unit's preparation (by kind: a crop, a frame's first unit, another),
    the rest hand-off; before the first invoke and after the last, the stream's ends. With
    the interpreter's busy share they sum to 1."""
    order = sorted(units, key=lambda u: u.invoked)
    out = dict.fromkeys(IDLE_CAUSES, 0.0)
    wall = end - start
    if not order or wall <= 0:
        return out
    out["ends"] = (order[0].invoked - start) + (end - order[-1].invoked - order[-1].invoke_ms / 1000.0)
    for prev, u in zip(order, order[1:]):
        done = prev.invoked + prev.invoke_ms / 1000.0
        gap = max(0.0, u.invoked - done)
        late = min(gap, max(0.0, u.ready - done))
        kind = ("frame" if u.frame is not prev.frame else
                "crop" if u.run.spec.source is not None else "other")
        out[kind] += late
        out["handoff"] += gap - late
    return {k: v / wall for k, v in out.items()}


def unit_python(units: list) -> dict[str, tuple[float, float, float, float]]:
    """Per stage: (median, fastest) ms of a unit's preparation and of its decoding on the vision
    thread."""
    by: dict[str, tuple[list, list]] = {}
    for u in units:
        prep, dec = by.setdefault(u.run.spec.name, ([], []))
        prep.append(u.ms)
        dec.append(u.decode_ms)
    return {name: (median(p), min(p), median(d), min(d)) for name, (p, d) in by.items()}


def stages(quick: bool = False) -> list[Figure]:
    from edged.models import load_manifest
    from edged.stages.vision import native
    from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph

    manifest = load_manifest(REPO / "models")
    n_bare, n_frames, n_stream, rounds = (3, 2, 2, 1) if quick else (40, 12, 4, 8)
    figures: list[Figure] = []
    # The chain built up one stage at a time: the cost each stage adds.
    chains = [DEFAULT_CHAIN[:k] for k in range(1, len(DEFAULT_CHAIN) + 1)]
    full = open_graph(DEFAULT_CHAIN, manifest, threads=1)
    bare = {r.spec.name: _bare_ms(r.stage, n_bare) for r in full.runs}
    for r in full.runs:
        figures.append(Figure("stages", f"bare invoke, {r.spec.model}", round(bare[r.spec.name], 2), "ms",
                              note="median of invoke() alone, one thread"))
    # The bilinear resampling of one view: the frame to the person model's 300x300, one of its
    # 2x2 tiles, and the frame letterboxed to the full-range face model's 192x192.
    img = np.asarray(Image.open(SCENES / FRAMES[0]).convert("RGB"))
    h, w = img.shape[:2]
    tile = full._tile_boxes(2, h, w)[3]
    people, faces = full.runs[0], full.runs[1]
    # Both resamplers: the numpy code and the compiled one (edged/stages/vision/_resample.c, the
    # same bytes), each resampling alone and as the whole fill of the model input.
    kinds = ["numpy"] + (["compiled"] if native.library()[0] is not None else [])
    for label, run, region in (("frame", people, (0, 0, w, h)), ("2x2 tile", people, tile),
                               ("frame, letterboxed", faces, (0, 0, w, h))):
        pre = run.stage.preprocess
        view = f"{label} ({region[2] - region[0]}x{region[3] - region[1]}) to {pre.width}x{pre.height}"
        fastest = {}
        for kind in kinds:
            ms, best, fill_ms, fill_best = _view_ms(run.stage, img, region, n_bare, kind)
            fastest[kind] = (best, fill_best)
            figures.append(Figure("stages", f"resample {view}, {kind}", round(ms, 3), "ms",
                                  note=f"median (fastest {best:.3f} ms); bilinear in fixed point, the region "
                                       "read in place"))
            figures.append(Figure("stages", f"fill {view}, {kind}", round(fill_ms, 3), "ms",
                                  note=f"median (fastest {fill_best:.3f} ms); resampled and normalised "
                                       "into the model input"))
        if len(kinds) == 2:
            (a, fa), (b, fb) = fastest["numpy"], fastest["compiled"]
            figures.append(Figure("stages", f"resample {view}: numpy ÷ compiled", round(a / b, 2), "×",
                                  note=f"fastest of {n_bare} each; the whole fill: {fa / fb:.2f}×"))
    images = []
    invokes_of: list[dict[str, int]] = []   # per frame of the stream: invokes per stage
    for frame_name in FRAMES:
        img = np.asarray(Image.open(SCENES / frame_name).convert("RGB"))
        images.append(img)
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
                invokes_of.append(dict(invokes))
                for s in specs:
                    ms = median(per_stage[s.name])
                    k = max(invokes[s.name], 1)
                    python = (ms - bare[s.name] * invokes[s.name]) / k
                    figures.append(Figure("stages", f"{frame_name}: stage {s.name}", round(ms, 2), "ms",
                                          note=f"{invokes[s.name]} invoke(s); {ms / k:.2f} ms per invoke "
                                               f"or crop, of which {python:.2f} ms besides the bare invoke"))
    figures += _efficiency(full, images, invokes_of, n_stream=n_stream, rounds=rounds)
    figures += _pose_turns(manifest, 3 if quick else 20)
    figures += _confirming(manifest, 2 if quick else 10)
    return figures


def _confirming(manifest, n: int) -> list[Figure]:
    """The optional confirming stage (people_confirmed, the openpose model; docs/models.md,
    "People confirmed by their skeletons"): its bare invoke, and what it adds to the default chain's
    frame on vtest_0700, where it looks at the people stage's unsure boxes and confirms a walker."""
    from edged.config import PEOPLE_CONFIRMED
    from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph

    img = np.asarray(Image.open(SCENES / "vtest_0700.jpg").convert("RGB"))
    plain = open_graph(DEFAULT_CHAIN, manifest, threads=1)
    chain = open_graph(list(DEFAULT_CHAIN) + [PEOPLE_CONFIRMED], manifest, threads=1)
    run = chain.runs[-1]
    bare = _bare_ms(run.stage, n)
    figures = [Figure("stages", "bare invoke, openpose (optional people_confirmed stage)", round(bare, 2), "ms",
                      note="median of invoke() alone, one thread; 1.15 GMAC at 192x192")]
    ms = {}
    for name, g in (("default chain", plain), ("with people_confirmed", chain)):
        g.detect(img)  # warm
        times, stage_ms = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            g.detect(img)
            times.append((time.perf_counter() - t0) * 1000)
            stage_ms.append(g.runs[-1].last_ms)
        ms[name] = (median(times), median(stage_ms))
    k = max(run.invokes, 1)
    added = ms["with people_confirmed"][0] - ms["default chain"][0]
    figures.append(Figure("stages", "vtest_0700: frame, default chain + people_confirmed",
                          round(ms["with people_confirmed"][0], 1), "ms",
                          note=f"adds {added:.1f} ms; {run.invokes} crop(s), "
                               f"{ms['with people_confirmed'][1] / k:.2f} ms per crop, of which "
                               f"{ms['with people_confirmed'][1] / k - bare:.2f} ms besides the bare invoke"))
    return figures


def _pose_turns(manifest, n: int) -> list[Figure]:
    """What a lying person costs the pose stage: a crop wider than tall is shown in 2 or 3 views
    (edged/stages/vision/pose.py). ms of `PoseStage.detect` (preprocessing, invokes, decoding)
    on one person's crop upright, and turned a quarter: the astronaut (1.45 times as wide as tall
    turned: 3 views) and a pedestrian of the vtest clip (more than twice as wide: 2 views)."""
    from edged.models import open_model
    from edged.stages.vision.pose import PoseStage

    entry = manifest["pose"]
    pose = PoseStage(open_model(entry, threads=1), entry)
    astronaut = np.asarray(Image.open(REPO / "samples" / "images" / "astronaut.jpg").convert("RGB"))[14:512, 18:362]
    vtest = np.asarray(Image.open(SCENES / "vtest_0700.jpg").convert("RGB"))[158:260, 394:438]
    figures = []
    for name, crop in (("astronaut", astronaut), ("pedestrian", vtest)):
        ms = {}
        for k in (0, 1):
            c = np.ascontiguousarray(np.rot90(crop, k))
            pose.detect(c)  # warm: this size's plan
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                pose.detect(c)
                times.append((time.perf_counter() - t0) * 1000)
            ms[k] = median(times)
            views = len(pose.turns(*c.shape[:2]))
            figures.append(Figure("stages", f"pose, {name} {'lying' if k else 'upright'} ({c.shape[1]}x{c.shape[0]})",
                                  round(ms[k], 1), "ms", note=f"{views} view(s), median of {n}"))
        figures.append(Figure("stages", f"pose, {name}: lying ÷ upright", round(ms[1] / ms[0], 2), "",
                              note="the extra invokes of a wide crop"))
    return figures


def _bare_frames_ms(graph, invokes_of) -> float:
    """ms per frame of the stream's invokes alone, in the frames' order: each stage's model invoked
    as often as the frame invokes it, on the input its preprocessing left in place."""
    models = {r.spec.name: r.stage.model for r in graph.runs}
    t0 = time.perf_counter()
    for inv in invokes_of:
        for name, k in inv.items():
            m = models[name]
            for _ in range(k):
                m.invoke()
    return (time.perf_counter() - t0) * 1000 / len(invokes_of)


def _efficiency(graph, images, invokes_of, *, n_stream: int, rounds: int) -> list[Figure]:
    """Summed bare invokes / frame time on the stream, overlap off and on, 1 core and 2, with this
    process's resampler (the compiled one when built). Each stream is timed between two runs of
    the same invokes bare, on the same cores: their mean is its floor, so a change in the
    machine's load between segments moves both sides. Each round also streams once with the
    numpy resampler, for its CPU ratio."""
    from edged.stages.vision import native

    have = cpus()
    sets = [(1, {have[0]})] + ([(2, set(have[:2]))] if len(have) >= 2 else [])
    ratios: dict[tuple[int, bool], list[float]] = {}
    frames: dict[tuple[int, bool], list[float]] = {}
    floors: dict[tuple[int, bool], list[float]] = {}
    for r in graph.runs:  # an input in place for the bare invokes
        r.stage.preprocess(np.zeros((r.stage.preprocess.height, r.stage.preprocess.width, 3), np.uint8))
    busy: dict[tuple[int, bool], list[float]] = {}
    pythons: list[float] = []
    traces: list = []  # the two-core overlapped streams: (units, start, end)
    numpy_pythons: list[float] = []
    compiled = native.LIB is not None
    _stream_ms(graph, images, len(images), True)  # warm: the second input slots and output copies
    if compiled:  # and the numpy resampler's plans, for the comparison below
        _use(graph, "numpy")
        _stream_ms(graph, images, len(images), True)
        _use(graph, None)
    saved = os.sched_getaffinity(0)
    try:
        for _ in range(rounds):
            for n_cores, cores in sets:
                pin(cores)
                for overlap in (False, True):
                    before = _bare_frames_ms(graph, invokes_of)
                    traced = traces if overlap and n_cores == len(sets) else None
                    ms, share, python = _stream_ms(graph, images, n_stream, overlap, traced)
                    after = _bare_frames_ms(graph, invokes_of)
                    floor = (before + after) / 2
                    key = (n_cores, overlap)
                    ratios.setdefault(key, []).append(floor / ms)
                    frames.setdefault(key, []).append(ms)
                    floors.setdefault(key, []).append(floor)
                    busy.setdefault(key, []).append(share)
                    if overlap:
                        pythons.append(python)
            if compiled:
                # The same stream with the numpy resampler, overlap on, on the last core set: its
                # Python work against the invokes, in CPU time as above.
                _use(graph, "numpy")
                try:
                    numpy_pythons.append(_stream_ms(graph, images, n_stream, True)[2])
                finally:
                    _use(graph, None)
    finally:
        pin(saved)
    out = []
    for (n_cores, overlap), rs in ratios.items():
        value = median(rs)
        goal = GOALS[n_cores] if overlap or n_cores == 1 else None
        where = "one core" if n_cores == 1 else "two cores"
        out.append(Figure(
            "stages", f"efficiency, {where}, overlap {'on' if overlap else 'off'}", round(value, 3), "×",
            goal=f"≥ {goal}" if goal else "", ok=at_least(value, goal) if goal else None,
            note=f"{native.name()} resampler; summed bare invokes {median(floors[(n_cores, overlap)]):.1f} ms per frame / frame time "
                 f"{median(frames[(n_cores, overlap)]):.1f} ms; rounds: {', '.join(f'{r:.3f}' for r in rs)}"))
        out.append(Figure(
            "stages", f"interpreter busy, {where}, overlap {'on' if overlap else 'off'}",
            round(median(busy[(n_cores, overlap)]), 3), "×",
            note="share of the stream's time some invoke ran, the invokes timed where they ran: "
                 "the efficiency without the slowdown of invokes beside other work; rounds: "
                 + ", ".join(f"{b:.3f}" for b in busy[(n_cores, overlap)])))
    out.append(Figure("stages", "vision thread CPU ÷ invoke thread CPU, overlap on", round(median(pythons), 3), "×",
                      note=f"{native.name()} resampler; the Python work per frame (preparing, decoding, merging) "
                           "against the invokes, in CPU time: below 1, a free second core can hide all of it; "
                           "rounds: " + ", ".join(f"{p:.3f}" for p in pythons)))
    if numpy_pythons:
        out.append(Figure("stages", "vision thread CPU ÷ invoke thread CPU, overlap on, numpy resampler",
                          round(median(numpy_pythons), 3), "×",
                          note="the same stream with EDGED_RESAMPLER=numpy's code, in the same rounds: "
                               + ", ".join(f"{p:.3f}" for p in numpy_pythons)))
    where = "one core" if len(sets) == 1 else "two cores"
    shares = [idle_causes(*t) for t in traces]
    for cause, what in IDLE_CAUSES.items():
        values = [sh[cause] for sh in shares]
        out.append(Figure("stages", f"interpreter idle, {where}, overlap on: {cause}", round(median(values), 4), "×",
                          note=f"share of the stream's time: {what}; rounds: "
                               + ", ".join(f"{v:.4f}" for v in values)))
    steady = [sum(u.invoke_ms for u in t[0]) / 1000.0 / ((t[2] - t[1]) * (1.0 - sh["ends"]))
              for t, sh in zip(traces, shares)]
    out.append(Figure("stages", f"interpreter busy, {where}, overlap on, within the stream", round(median(steady), 3), "×",
                      note="the busy share without the stream's first input and last decoding, which a "
                           "daemon's endless stream does not have; rounds: " + ", ".join(f"{v:.3f}" for v in steady)))
    units = [u for t in traces for u in t[0]]
    for name, (prep, prep_min, dec, dec_min) in unit_python(units).items():
        out.append(Figure("stages", f"Python per unit, stage {name}: prepare", round(prep, 3), "ms",
                          note=f"median (fastest {prep_min:.3f} ms): crop or view, resampling, normalisation, "
                               "on the vision thread, overlap on"))
        out.append(Figure("stages", f"Python per unit, stage {name}: decode", round(dec, 3), "ms",
                          note=f"median (fastest {dec_min:.3f} ms): decoding and placing its objects"))
    for n_cores, _ in sets:
        if (n_cores, True) in ratios:
            gain = [a / b for a, b in zip(ratios[(n_cores, True)], ratios[(n_cores, False)])]
            out.append(Figure("stages", f"efficiency with overlap ÷ without, {n_cores} core{'s' if n_cores > 1 else ''}",
                              round(median(gain), 3), "×",
                              note=f"rounds: {', '.join(f'{g:.3f}' for g in gain)}"))
    return out
