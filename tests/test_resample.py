"""The compiled resampler (edged/stages/vision/_resample.c through native.py) against the numpy one:
the same bytes, for the resampled pixels and for the model input they are mapped into, on random
sizes, regions read in place, turned views and every normalisation the shipped models use."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from conftest import REPO
from edged.models import load_manifest, open_model
from edged.stages.vision import native
from edged.stages.vision.preprocess import Preprocessor, resize_frame


def test_the_compiled_resampler_is_built_where_a_compiler_is():
    # `make test` installs gcc and builds edged with it: the library must be there and load. Without
    # a compiler the install could not build it, and the numpy code runs, saying why.
    lib, why = native.library()
    if shutil.which("gcc") or shutil.which("cc"):
        assert lib is not None, (f"the compiled resampler is missing ({why}) on a machine with a C "
                                 "compiler: reinstall edged (make test-venv, or pip install -e .)")
        assert native.library_path().name.startswith("_resample.")
    else:
        assert lib is None and why.startswith("not built")


def _cases(rng, n):
    """Random (source size, model size, letterbox, region offset, quarter turns, bilinear): down and
    up, stretched and letterboxed, a region of a larger frame, and its turned views."""
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 420, 2))
        mh, mw = (int(v) for v in rng.integers(1, 320, 2))
        yield (h, w, mh, mw, bool(rng.integers(0, 2)), (int(rng.integers(0, 9)), int(rng.integers(0, 9))),
               int(rng.integers(0, 4)), bool(rng.integers(0, 4)))


def test_compiled_and_numpy_resample_to_the_same_pixels():
    rng = np.random.default_rng(1405)
    for h, w, mh, mw, letterbox, (ox, oy), turn, bilinear in _cases(rng, 300):
        frame = rng.integers(0, 256, (h + oy + 2, w + ox + 3, 3), dtype=np.uint8)
        view = frame[oy:oy + h, ox:ox + w]
        if turn:
            view = np.rot90(view, turn)  # strides swapped and negated: read as the view it is
        want = resize_frame(view, mh, mw, letterbox=letterbox, bilinear=bilinear, resampler="numpy")
        got = resize_frame(view, mh, mw, letterbox=letterbox, bilinear=bilinear, resampler="compiled")
        assert np.array_equal(got, want), (h, w, mh, mw, letterbox, ox, oy, turn, bilinear)


@pytest.mark.skipif(native.LIB is None, reason="the compiled resampler is not built (see the first test)")
def test_the_compiled_taps_are_the_numpy_expressions_exactly():
    # A plan's taps (source rows and pixels, 8- and 16-bit weights) are computed by the library in
    # float64, one IEEE operation at a time like numpy's; a weight one unit off would change some
    # pixels only now and then, so the taps themselves are compared, on every pair of sizes a crop
    # upscaled or a frame downscaled meets (and the extremes: one pixel, 1600 wide).
    from edged.stages.vision.preprocess import reference_taps

    def taps(frame_h, frame_w, rh, rw, bilinear):
        out = np.empty(3 * rh + 5 * rw, np.int32)
        native.LIB.edged_taps(frame_h, frame_w, rh, rw, int(bilinear), out.ctypes.data)
        return out

    sizes = [(s, d) for s in range(1, 260) for d in (1, 2, 3, 96, 128, 192, 256, 300)]
    sizes += [(s, d) for s in (1, 2, 439, 576, 768, 1080, 1600) for d in range(1, 321)]
    for bilinear in (True, False):
        for src, dst in sizes:
            for args in ((src, 9, dst, 7), (9, src, 7, dst)):  # the pair on either axis
                assert np.array_equal(taps(*args, bilinear), reference_taps(*args, bilinear)), (args, bilinear)


@pytest.mark.skipif(native.LIB is None, reason="the compiled resampler is not built (see the first test)")
def test_one_byte_tables_map_exactly_whether_applied_as_steps_or_looked_up():
    # A one-byte table alike for the three channels and made of at most three steps over the pixel
    # value (a quantised uint8 input's) is applied with compares and adds; any other by lookup. Both
    # must give the table's bytes, at the step counts either side of the limit.
    from edged.stages.vision.preprocess import Scratch, _Plan

    rng = np.random.default_rng(1407)
    p = np.arange(256)
    tables = {"identity": p, "p - 128": p - 128, "random": rng.integers(0, 256, 256)}
    for n in (1, 2, 3, 4):
        at = np.sort(rng.choice(np.arange(1, 256), n, replace=False))
        tables[f"{n} steps"] = p + 7 + sum(((p >= a) * int(rng.integers(1, 256))) for a in at)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    plan = _Plan(37, 53, 37, 53, False, True, np.dtype(np.uint8), gather=False, scratch=Scratch(),
                 resampler="compiled")
    for name, t in tables.items():
        for lut in (np.tile(t % 256, 3), np.concatenate([t % 256, (t + 1) % 256, t % 256])):
            lut = lut.astype(np.uint8)
            out = np.zeros((37, 53, 3), np.uint8)
            plan.map(pixels, lut, out)
            want = lut.reshape(3, 256)[np.arange(3), pixels]
            assert np.array_equal(out, want), name


def test_a_turned_view_is_read_without_a_copy():
    # np.rot90 gives swapped and negative strides; the compiled path reads the view where it lies,
    # where the numpy code first copies it (a pose stage shows wide crops turned upright).
    from edged.stages.vision.preprocess import Scratch, _Plan

    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for turn in (1, 2, 3):
        view = np.rot90(frame[40:440, 100:400], turn)
        assert any(s < 0 for s in view.strides)
        plan = _Plan(*view.shape[:2], 256, 256, True, True, np.dtype(np.uint8), gather=False,
                     scratch=Scratch(), resampler="compiled")
        plan.resample(view)
        tracemalloc.start()
        try:
            got = plan.resample(view)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16_000, peak  # a copy of the view would be 360 kB
        assert np.array_equal(got, resize_frame(np.ascontiguousarray(view), 256, 256, letterbox=True,
                                                bilinear=True, resampler="numpy"))


@pytest.fixture(scope="module")
def models():
    manifest = load_manifest(REPO / "models")
    return {name: (open_model(manifest[name], threads=1), manifest[name])
            for name in ("face", "face_full_range", "person", "pose")}


def _normalisations(models):
    """Every shipped vision model with its own [input] table (float32 from [-1, 1] and [0, 1]
    through the affine route, the quantised uint8 input through the steps route), and two with
    per-channel mean/std (the table-gather route, float and quantised) and padding of 7."""
    for name, (model, entry) in models.items():
        yield name, model, entry
    for name in ("face", "person"):
        model, entry = models[name]
        spread = dict(entry.input, mean=[120.0, 110.0, 100.0], std=[60.0, 62.0, 58.0], pad=7)
        spread.pop("range", None)
        yield f"{name} per-channel", model, dataclasses.replace(entry, input=spread)


def test_compiled_and_numpy_fill_the_same_model_input(models):
    # The compiled path resamples and maps through the table in one pass; the numpy one resamples,
    # then normalises by its cheapest route. Both must leave the same bytes in the input slot, and
    # hand back the same pixels, for regions read in place, turned views, frames already at the
    # model's size, and pixels another stage resampled.
    rng = np.random.default_rng(1406)
    for label, model, entry in _normalisations(models):
        ref = Preprocessor(model, entry, resampler="numpy")
        fast = Preprocessor(model, entry, resampler="compiled")
        assert ref._map.kind == {"person": "steps"}.get(label, "gather" if "per-channel" in label else "affine")
        sizes = [(int(a), int(b)) for a, b in rng.integers(1, 400, (40, 2))]
        sizes += [(ref.height, ref.width), (ref.height, max(1, ref.width // 2))]  # nothing to resample
        for n, (h, w) in enumerate(sizes):
            ox, oy = (int(v) for v in rng.integers(0, 9, 2))
            frame = rng.integers(0, 256, (h + oy + 2, w + ox + 3, 3), dtype=np.uint8)
            sub = frame[oy:oy + h, ox:ox + w]
            turn = n % 4 if n < 40 else 0
            if turn:
                sub = np.rot90(sub, turn)
            base = None if turn else frame
            box_a, px_a = ref.fill(sub, 1, base=base, at=(ox, oy))
            box_b, px_b = fast.fill(sub, 1, base=base, at=(ox, oy))
            where = (label, h, w, ox, oy, turn)
            assert box_a == box_b, where
            assert np.array_equal(px_a, px_b), where
            assert np.array_equal(ref.buffer(1).view(np.uint8), fast.buffer(1).view(np.uint8)), where
            shared = px_a.copy()  # another stage's pixels: only the table runs
            ref.fill(sub, 1, shared, base=base, at=(ox, oy))
            fast.fill(sub, 1, shared, base=base, at=(ox, oy))
            assert np.array_equal(ref.buffer(1).view(np.uint8), fast.buffer(1).view(np.uint8)), where


def test_edged_resampler_numpy_keeps_the_numpy_code():
    code = ("from edged.stages.vision import native, preprocess; import numpy as np; "
            "p = preprocess._Plan(40, 50, 30, 30, False, True, np.dtype(np.uint8)); "
            "print(native.name(), native.STATUS, p.lib is None)")
    env = dict(os.environ, EDGED_RESAMPLER="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "numpy" and "EDGED_RESAMPLER=numpy" in out and out.split()[-1] == "True"


def test_doctor_says_which_resampler_runs():
    from edged.config import Config
    from edged.service import doctor

    cfg = Config()
    check = doctor.check_resampler(cfg)
    assert (check.status, check.detail.split(":")[0]) == (("ok", "compiled") if native.LIB is not None
                                                          else ("warn", "numpy"))
    code = ("from edged.config import Config; from edged.service import doctor; "
            "c = doctor.check_resampler(Config()); print(c.status, c.detail)")
    env = dict(os.environ, EDGED_RESAMPLER="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "info numpy: EDGED_RESAMPLER=numpy"
