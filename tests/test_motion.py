"""The motion stage with the shipped int8 model and real BasicMotions recordings (no aeon needed).

Accuracy is measured on the TEST split as shipped in tests/data, through the same code the daemon
runs: MotionStage.push → prepare_window → int8 model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edged.cloud import signatures as sigs
from edged.sources.imu.imucsv import ImuCsvError, read_imu_csv, write_imu_csv
from edged.models import ModelError, load_manifest, open_model
from edged.stages.motion import GRAVITY, InputSpec, MotionStage, Preprocessor, iter_csv_windows, iter_windows, prepare_window
from edged.records import ImuBatch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
DEMO = ROOT / "samples" / "imu" / "basicmotions_demo.csv"
RATE = 10.0


@pytest.fixture(scope="module")
def entry():
    return load_manifest()["motion"]


@pytest.fixture(scope="module")
def model(entry):
    return open_model(entry, threads=1)


@pytest.fixture(scope="module")
def spec(entry):
    return InputSpec.from_entry(entry)


def load(split):
    d = np.load(DATA / f"basicmotions_{split}.npz")
    return d["X"], [str(v) for v in d["y"]]


def run_stage(model, entry, t, x):
    return MotionStage(model, entry).push(ImuBatch(np.asarray(t, np.float64), np.asarray(x, np.float32)))


def rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                     [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
                     [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d]])


def raw_imu_like(x10, rng, rate=100.0):
    """A 10 Hz recording as a tilted chip sampling at `rate` would report it.

    Band-limited (sinc) upsampling, the chip's axes rotated against the recording's, gravity
    added along a random direction, and white noise on every sample.
    """
    t10 = np.arange(len(x10)) / RATE
    t = np.arange(0.0, t10[-1] + 1e-9, 1.0 / rate)
    x = np.sinc((t[:, None] - t10[None, :]) * RATE) @ x10.astype(np.float64)
    r = rotation(rng)
    x[:, :3] = x[:, :3] @ r.T + GRAVITY * _unit(rng)
    x[:, 3:] = x[:, 3:] @ r.T
    x[:, :3] += rng.normal(0, 0.05, size=(len(t), 3))
    x[:, 3:] += rng.normal(0, 0.01, size=(len(t), 3))
    return t, x


def _unit(rng):
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def accuracy(model, entry, X, y, make):
    win_ok, win_n, rec_ok = 0, 0, 0
    per_rec = []
    for i in range(len(X)):
        out = run_stage(model, entry, *make(i))
        assert out, "every 10 s recording holds at least one window"
        win_ok += sum(o.label == y[i] for o in out)
        win_n += len(out)
        labels = [o.label for o in out]
        rec_ok += max(set(labels), key=labels.count) == y[i]
        per_rec.append(out)
    return win_ok / win_n, rec_ok / len(X), per_rec


# ---------------------------------------------------------------- the model file and manifest

def test_manifest_describes_an_int8_two_output_model(entry, model, spec):
    assert entry.task == "motion" and entry.labels == ["standing", "walking", "running", "badminton"]
    assert model.inputs[0].shape == (1, spec.window, len(spec.channels))
    assert model.inputs[0].dtype == np.int8 and all(o.dtype == np.int8 for o in model.outputs)
    sig = model.outputs[model.output_by_name(entry.params["signature_output"])]
    assert sig.shape[-1] == entry.params["signature_dim"] <= 16
    # A live daemon should hear about motion every few seconds at most.
    assert spec.window_s <= 4.0 and spec.hop_s <= 1.0


def test_manifest_input_errors_name_the_key(entry):
    bad = dict(entry.input, std=[1.0] * 3)
    n = len(entry.input["channels"])
    with pytest.raises(ModelError, match=rf"models\.motion\.input\.std: expected {n} values"):
        InputSpec.from_dict(bad, "models.motion.input")
    with pytest.raises(ModelError, match=r"input\.gravity: expected one of window-mean"):
        InputSpec.from_dict(dict(entry.input, gravity="highpass"))


# ---------------------------------------------------------------- preprocessing

def test_samples_on_the_model_grid_pass_through(spec):
    raw = load("test")[0][25][:spec.window + 6]
    t = np.arange(len(raw)) / RATE
    got = prepare_window(t, raw, spec, end=t[spec.window + 2])
    x = raw[3:spec.window + 3].astype(np.float64)
    g = x[:, :3].mean(axis=0)
    acc = x[:, :3] - g
    # BasicMotions is gravity-free (|g| far below 1 g): the vertical fades to g / (0.5 g).
    up = g / max(np.linalg.norm(g), 0.5 * GRAVITY)
    a_vert, g_vert = acc @ up, x[:, 3:] @ up
    a_norm, g_norm = np.linalg.norm(acc, axis=1), np.linalg.norm(x[:, 3:], axis=1)
    every = {"ax": acc[:, 0], "ay": acc[:, 1], "az": acc[:, 2], "gx": x[:, 3], "gy": x[:, 4], "gz": x[:, 5],
             "a_norm": a_norm, "g_norm": g_norm, "grav_x": np.full(len(x), g[0] / GRAVITY),
             "grav_y": np.full(len(x), g[1] / GRAVITY), "grav_z": np.full(len(x), g[2] / GRAVITY),
             "a_vert": a_vert, "a_horiz": np.sqrt(np.maximum(a_norm ** 2 - a_vert ** 2, 0)),
             "g_vert": g_vert, "g_horiz": np.sqrt(np.maximum(g_norm ** 2 - g_vert ** 2, 0))}
    want = np.column_stack([every[c] for c in spec.channels])
    np.testing.assert_allclose(got, (want - spec.mean) / spec.std, atol=1e-4)


def test_gravity_and_mounting_angle_only_rotate_the_axes(spec):
    rng = np.random.default_rng(3)
    x = load("test")[0][35][:40].astype(np.float64)
    t = np.arange(len(x)) / RATE
    r = rotation(rng)
    tilted = np.column_stack([x[:, :3] @ r.T + GRAVITY * _unit(rng), x[:, 3:] @ r.T])
    a, b = prepare_window(t, x, spec), prepare_window(t, tilted, spec)
    col = {c: i for i, c in enumerate(spec.channels)}
    un = lambda w, s: w[:, s] * spec.std[s] + spec.mean[s]  # noqa: E731
    # Magnitudes do not see the mounting at all; the axes turn with it.
    for c in ("a_norm", "g_norm"):
        np.testing.assert_allclose(a[:, col[c]], b[:, col[c]], atol=1e-4)
    np.testing.assert_allclose(un(a, slice(0, 3)) @ r.T, un(b, slice(0, 3)), atol=1e-3)
    np.testing.assert_allclose(un(a, slice(3, 6)) @ r.T, un(b, slice(3, 6)), atol=1e-3)
    # The tilt is the gravity just added, in the sensor's axes (in g).
    tilt = slice(col["grav_x"], col["grav_z"] + 1)
    g = un(b, tilt)[0]
    assert abs(np.linalg.norm(g) - 1.0) < 0.1
    np.testing.assert_allclose(un(b, tilt), np.tile(g, (len(b), 1)), atol=1e-6)


def test_vertical_channels_do_not_depend_on_the_mounting(spec):
    """Along and across gravity, a motion reads the same at every mounting angle; the tilt does not."""
    rng = np.random.default_rng(4)
    x = load("test")[0][35][:40].astype(np.float64)
    t = np.arange(len(x)) / RATE
    up = _unit(rng)
    col = {c: i for i, c in enumerate(spec.channels)}
    fixed = [col[c] for c in ("a_norm", "g_norm", "a_vert", "a_horiz", "g_vert", "g_horiz")]
    tilt = [col[c] for c in ("grav_x", "grav_y", "grav_z")]
    outs = []
    for _ in range(3):
        r = rotation(rng)
        chip = np.column_stack([(x[:, :3] + GRAVITY * up) @ r.T, x[:, 3:] @ r.T])
        outs.append((prepare_window(t, chip, spec), prepare_window(t, chip, spec, mounting="free")))
    for (w, free), (w0, _) in zip(outs, outs[:1] * 3):
        np.testing.assert_allclose(w[:, fixed], w0[:, fixed], atol=1e-3)
        np.testing.assert_allclose(free[:, fixed], w[:, fixed], atol=1e-6)
        # mounting="free" hands the model no tilt at all.
        np.testing.assert_allclose(free[:, tilt] * spec.std[tilt] + spec.mean[tilt], 0.0, atol=1e-6)
    assert np.abs(outs[0][0][:, tilt] - outs[1][0][:, tilt]).max() > 0.1
    with pytest.raises(ValueError, match="mounting: expected one of fixed, free"):
        Preprocessor(spec, mounting="sideways")


@pytest.mark.parametrize("rate", [50.0, 200.0])
def test_antialiasing_passes_motion_and_stops_what_would_alias(spec, rate):
    t = np.arange(0, spec.reach_s + spec.lookahead_s + 1e-9, 1.0 / rate)
    ones = InputSpec(spec.rate_hz, spec.window, spec.hop, spec.channels,
                     np.zeros_like(spec.mean), np.ones_like(spec.std))

    def gain(f):
        x = np.zeros((len(t), 6))
        x[:, 3] = np.sin(2 * np.pi * f * t)
        return np.abs(prepare_window(t, x, ones)[:, 3]).max()

    assert 0.9 < gain(1.0) < 1.1
    # 9 Hz would fold onto 1 Hz at the model's 10 Hz; 30 Hz onto 0 Hz.
    assert gain(9.0) < 0.15
    assert gain(30.0) < 0.05


def test_a_source_slower_than_the_model_is_refused(spec):
    t = np.arange(0, 6.0, 1 / 5.0)
    with pytest.raises(ValueError, match=r"IMU sample rate 5\.0 Hz is below the model's 10 Hz"):
        prepare_window(t, np.zeros((len(t), 6)), spec)


# ---------------------------------------------------------------- accuracy through the device path

def test_accuracy_on_test_as_recorded(model, entry):
    X, y = load("test")
    win, rec, per_rec = accuracy(model, entry, X, y, lambda i: (np.arange(len(X[i])) / RATE, X[i]))
    assert win >= 0.975, win
    assert rec >= 0.975, rec
    sig = per_rec[0][0]
    assert sig.window_s == pytest.approx(entry.input["window"] / entry.input["rate_hz"])
    assert 0.25 < sig.score <= 1.0 and sig.inference_ms >= 0.0
    assert all(-128 <= v <= 127 and isinstance(v, int) for v in sig.signature)
    # One window per hop once the first has full filter support: 10 s at 10 Hz (0 … 9.9 s) →
    # windows end at 3.2 s, 4.2 s, … 9.2 s, each reported once samples reach 0.3 s past its end.
    assert [round(s.ts, 3) for s in per_rec[0]] == [3.2 + k for k in range(7)]


def test_accuracy_on_raw_imu_style_input(model, entry):
    X, y = load("test")
    rng = np.random.default_rng(20261124)
    win, rec, _ = accuracy(model, entry, X, y, lambda i: raw_imu_like(X[i], rng))
    assert win >= 0.975, win
    assert rec >= 0.975, rec


# ---------------------------------------------------------------- signatures

def signatures_of(model, entry, split, raw_seed=None):
    X, y = load(split)
    rng = np.random.default_rng(raw_seed)
    s, lab = [], []
    for i in range(len(X)):
        t, x = (np.arange(len(X[i])) / RATE, X[i]) if raw_seed is None else raw_imu_like(X[i], rng)
        for o in run_stage(model, entry, t, x):
            s.append(o.signature)
            lab.append(y[i])
    return s, lab


@pytest.fixture(scope="module")
def test_signatures(model, entry):
    return signatures_of(model, entry, "test")


@pytest.fixture(scope="module")
def centroids(model, entry):
    # From TRAIN only: as recorded, and as a tilted 100 Hz chip would report it (the spread a
    # real mounting adds belongs in the thresholds).
    s, lab = signatures_of(model, entry, "train")
    s2, lab2 = signatures_of(model, entry, "train", raw_seed=11)
    return sigs.build_centroids(s + s2, lab + lab2, order=entry.labels)


def check_centroids(cents, test_signatures, max_unknown):
    s, truth = test_signatures
    matches = sigs.classify(cents, s)
    nearest = np.mean([m.nearest == t for m, t in zip(matches, truth)])
    assert nearest >= 0.95, nearest
    # The open-set thresholds must not turn known motions into "unknown" wholesale.
    unknown = np.mean([m.label == sigs.UNKNOWN for m in matches])
    assert unknown <= max_unknown, unknown


def test_nearest_centroid_on_test_signatures(centroids, test_signatures):
    check_centroids(centroids, test_signatures, max_unknown=0.10)


@pytest.mark.parametrize("which", ["built", "shipped"])
def test_a_motion_unlike_any_is_unknown(model, entry, centroids, which):
    if which == "shipped":
        centroids = sigs.load_centroids(ROOT / "models" / entry.params["centroids"])
    # A machine shaking the sensor back and forth along one axis (1 Hz, ±20 m/s², no rotation):
    # nothing a person standing, walking, running or playing badminton produces.
    t = np.arange(0, 6.0, 0.01)
    x = np.zeros((len(t), 6))
    x[:, 2] = GRAVITY
    x[:, 0] = 20.0 * np.sin(2 * np.pi * 1.0 * t)
    out = run_stage(model, entry, t, x)
    assert out
    assert {m.label for m in sigs.classify(centroids, [o.signature for o in out])} == {sigs.UNKNOWN}
    # ... while a sensor lying still is a person standing.
    x[:, 0] = 0.0
    still = run_stage(model, entry, t, x)
    assert {m.label for m in sigs.classify(centroids, [o.signature for o in still])} == {"standing"}


def test_shipped_centroids_fit_the_shipped_model(entry, test_signatures):
    shipped = sigs.load_centroids(ROOT / "models" / entry.params["centroids"])
    assert shipped.labels == tuple(entry.labels) and shipped.dim == entry.params["signature_dim"]
    check_centroids(shipped, test_signatures, max_unknown=0.08)


def test_centroid_files_round_trip_and_classify_jsonl(tmp_path, centroids):
    path = tmp_path / "c.json"
    sigs.save_centroids(centroids, path)
    back = sigs.load_centroids(path)
    np.testing.assert_allclose(back.centroids, centroids.centroids, atol=1e-3)
    lines = tmp_path / "s.jsonl"
    c0 = np.rint(centroids.centroids[0]).astype(int).tolist()
    lines.write_text(json.dumps({"label": "x", "signature": c0}) + "\n"
                     + json.dumps({"signature": [127] * len(c0)}) + "\n")
    got = sigs.classify_path(path, lines)
    assert got[0].label == centroids.labels[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"signature": [1, 2]}\n{"signature": "oops"}\n')
    with pytest.raises(sigs.SignatureError, match=r"bad\.jsonl:2: signature: expected a non-empty list"):
        sigs.read_signatures(bad, label_key=None)


# ---------------------------------------------------------------- streaming

def test_streaming_push_gives_the_same_windows_as_batch(model, entry, spec):
    batch = read_imu_csv(DEMO)
    whole = MotionStage(model, entry).push(batch)
    stage = MotionStage(model, entry, max_rate_hz=20.0)  # a small buffer, so it slides many times
    rng = np.random.default_rng(1)
    streamed, i = [], 0
    while i < len(batch):
        n = int(rng.integers(1, 40))
        streamed += stage.push(ImuBatch(batch.t[i:i + n], batch.data[i:i + n]))
        i += n
    key = lambda s: (round(s.ts, 6), s.label, s.signature)  # noqa: E731
    assert [key(s) for s in streamed] == [key(s) for s in whole]
    assert len(whole) == len(list(iter_windows(batch.t, batch.data, spec))) == 77
    assert [key(s) for s in iter_csv_windows(DEMO, MotionStage(model, entry))] == [key(s) for s in whole]
    # And the demo recording reads as what it is: 8 recordings of 10 s, one class each.
    truth = ["standing", "walking", "running", "badminton"] * 2
    inside = [s for s in whole if (s.ts % 10.0) >= 2.85]  # windows that lie within one recording
    assert np.mean([s.label == truth[int(s.ts // 10)] for s in inside]) >= 0.95


def test_stage_reuses_its_buffers_at_a_steady_rate(model, entry):
    stage = MotionStage(model, entry)
    t = np.arange(0, 30, 0.01)
    x = np.zeros((len(t), 6), np.float32)
    x[:, 2] = GRAVITY
    stage.push(ImuBatch(t[:100], x[:100]))
    buf = stage._t
    out = []
    for i in range(100, len(t), 37):
        out += stage.push(ImuBatch(t[i:i + 37], x[i:i + 37]))
    assert stage._t is buf
    assert len(out) == stage.windows == 27  # windows end at 3.2 s, 4.2 s, … 29.2 s


def test_a_break_in_the_samples_restarts_windowing(model, entry):
    t = np.concatenate([np.arange(0, 5, 0.01), np.arange(20, 25, 0.01)])
    x = np.zeros((len(t), 6), np.float32)
    stage = MotionStage(model, entry)
    out = stage.push(ImuBatch(t, x))
    ends = [round(s.ts, 2) for s in out]
    assert ends == [3.2, 4.2, 23.2, 24.2]
    assert stage.gaps == 1


def test_preprocessor_matches_prepare_window(spec):
    rng = np.random.default_rng(2)
    t = np.cumsum(rng.uniform(0.008, 0.012, size=400))
    x = rng.normal(size=(400, 6))
    pre = Preprocessor(spec, 64)  # grows on demand
    np.testing.assert_array_equal(pre(t, x), prepare_window(t, x, spec))


# ---------------------------------------------------------------- CSV input

@pytest.mark.parametrize("body, where, what", [
    ("time,ax,ay,az,gx,gy,gz\n0,0,0,0,0,0,0\n", ":1:", "header must be t,ax,ay,az,gx,gy,gz"),
    ("t,ax,ay,az,gx,gy,gz\n0,0,0,9.8,0,0,0\n0.1,0,0,9.8,0,zero,0\n", ":3:", "gy: not a number: 'zero'"),
    ("t,ax,ay,az,gx,gy,gz\n0,0,0,9.8,0,0,0\n0.1,0,0,9.8,0,0\n", ":3:", "expected 7 comma-separated values"),
    ("t,ax,ay,az,gx,gy,gz\n0,0,0,9.8,0,0,0\n\n0.1,0,0,9.8,0,0,0\n0.1,0,0,9.8,0,0,0\n", ":5:", "t: 0.1 is not after"),
    ("t,ax,ay,az,gx,gy,gz\n0,0,0,9.8,0,0,0\n0.1,nan,0,9.8,0,0,0\n", ":3:", "ax: value is not finite"),
    ("t,ax,ay,az,gx,gy,gz\n", "", "no samples after the header"),
    ("", ":1:", "header must be"),
])
def test_bad_csv_is_one_clear_line(tmp_path, body, where, what):
    path = tmp_path / "imu.csv"
    path.write_text(body)
    with pytest.raises(ImuCsvError) as err:
        read_imu_csv(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}{where}") and what in msg and "\n" not in msg, msg


def test_csv_round_trip(tmp_path):
    t = np.arange(5) / 100.0
    x = np.arange(30, dtype=np.float32).reshape(5, 6) / 7
    write_imu_csv(tmp_path / "r.csv", t, x)
    back = read_imu_csv(tmp_path / "r.csv")
    np.testing.assert_allclose(back.t, t)
    np.testing.assert_allclose(back.data, x, atol=1e-6)
    assert back.data.dtype == np.float32 and back.data.shape == (5, 6)
