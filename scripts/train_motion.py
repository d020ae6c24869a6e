#!/usr/bin/env python3
"""Train edged's motion model on BasicMotions and export it as a full-integer int8 TFLite file.

The "cloud" side of the motion stage. It trains a small 1-D convolutional network with two
outputs — class scores and a 16-value embedding, the motion *signature* — on the BasicMotions
TRAIN split shipped inside `aeon` (nothing is downloaded), and reports on TEST. Every window,
in training and in evaluation, goes through `edged.stages.motion.prepare_window`, the function the
device runs. Training windows are augmented so the model does not depend on how the IMU is
mounted or sampled: random 3-D rotation of accelerometer and gyroscope together, gravity added
at a random tilt or turning with the sensor as its gyroscope says, amplitude scaling, playback
speed, sensor noise, and raw sample rates from 10 to 200 Hz.

Writes models/motion.tflite (int8 input and outputs, as the Edge TPU compiler needs),
models/motion.labels, models/motion.centroids.json (signature centroids from TRAIN, for
`edged.cloud.signatures`) and the [models.motion] tables of models/manifest.toml.

    PYTHONPATH=. /tmp/trainenv/bin/python scripts/train_motion.py
"""

from __future__ import annotations

import argparse
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
from edged.stages.motion import GRAVITY, InputSpec, Preprocessor, iter_windows  # noqa: E402
from export_basicmotions import RATE_HZ, load_split  # noqa: E402

LABELS = ("standing", "walking", "running", "badminton")
CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz", "a_norm", "g_norm")
SIGNATURE_DIM = 16
NAME = "motion"
SOURCE = ("trained by scripts/train_motion.py on the BasicMotions TRAIN split (UEA multivariate "
          "time series archive, as shipped in the aeon package); 1-D CNN, int8 post-training quantisation")
LICENSE = "Apache-2.0"

# Raw-IMU-style evaluation (and the test suite's): what a chip on a tilted mount would report.
RAW_EVAL_RATE_HZ = 100.0
RAW_EVAL_NOISE = (0.05, 0.01)  # accelerometer m/s², gyroscope rad/s (1 sigma per sample)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- augmentation

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


def gravity_following(gyro: np.ndarray, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """Gravity in the sensor frame while the sensor turns as its gyroscope says (N, 3).

    Starts at a random orientation and integrates the angular rate, so the accelerometer sees
    gravity swing between axes the way a chip on a moving wrist does.
    """
    r = random_rotation(rng)
    up = np.array([0.0, 0.0, GRAVITY])
    out = np.empty((len(gyro), 3))
    for k in range(len(gyro)):  # sequential by nature; training side only
        out[k] = r.T @ up
        r = r @ so3_exp(gyro[k] / rate_hz)
    return out


def as_raw_imu(x10: np.ndarray, rng: np.random.Generator, *, rate_hz: float, speed: float = 1.0,
               rotate: bool = True, gravity: str = "tilt", noise: tuple[float, float] = (0.0, 0.0),
               scale: tuple[float, float] = (1.0, 1.0), jitter: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """What an IMU chip would report for a 10 Hz BasicMotions recording.

    Rotates accelerometer and gyroscope together (the chip mounted at another angle), resamples
    to `rate_hz` by linear interpolation, played back `speed` times faster, and adds gravity (the
    recordings are gravity-free; a real chip reads 9.8 m/s² at rest): `gravity="tilt"` along one
    random direction, `"follow"` turning with the sensor (see `gravity_following`), `"none"`.
    Returns (t seconds from 0, data (N, 6) float32).
    """
    x = x10.astype(np.float64).copy()
    if rotate:
        r = random_rotation(rng)
        x[:, :3] = x[:, :3] @ r.T
        x[:, 3:] = x[:, 3:] @ r.T
    x[:, :3] *= scale[0]
    x[:, 3:] *= scale[1] * speed  # faster playback turns faster
    src_t = np.arange(len(x)) / RATE_HZ / speed
    if rate_hz == RATE_HZ and speed == 1.0 and jitter == 0.0:
        t, out = src_t, x
    else:
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
    return t - t[0], out.astype(np.float32)


def augmented(x10: np.ndarray, rng: np.random.Generator, follow: float) -> tuple[np.ndarray, np.ndarray]:
    rate = float(rng.choice([10.0, 20.0, 25.0, 50.0, 100.0, 200.0]))
    return as_raw_imu(
        x10, rng, rate_hz=rate, speed=rng.uniform(0.9, 1.1),
        gravity="follow" if rng.uniform() < follow else "tilt",
        scale=(rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)),
        noise=(rng.uniform(0, 0.15), rng.uniform(0, 0.03)),
        jitter=rng.uniform(0, 0.2),
    )


# ---------------------------------------------------------------- windows

def windows_of(t: np.ndarray, x: np.ndarray, spec: InputSpec, pre: Preprocessor) -> np.ndarray:
    """Every window `iter_windows` cuts (at spec.hop), prepared exactly as on the device."""
    bounds = list(iter_windows(t, x, spec))
    out = np.empty((len(bounds), spec.window, len(spec.channels)), np.float32)
    for k, (a, b, end) in enumerate(bounds):
        pre(t[a:b], x[a:b], out[k], end)
    return out


def training_windows(X: np.ndarray, y: np.ndarray, spec: InputSpec, copies: int, seed: int,
                     stride: int, follow: float) -> tuple[np.ndarray, np.ndarray]:
    """Windows (every `stride` model samples) from each recording as recorded plus `copies` augmented versions."""
    dense = InputSpec(spec.rate_hz, spec.window, stride, spec.channels, spec.mean, spec.std,
                      spec.gravity, spec.antialias)
    pre = Preprocessor(dense, 4096)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(len(X)):
        for c in range(copies + 1):
            if c == 0:
                t, x = np.arange(len(X[i])) / RATE_HZ, X[i]
            else:
                t, x = augmented(X[i], rng, follow)
            w = windows_of(t, x, dense, pre)
            xs.append(w)
            ys.append(np.full(len(w), y[i]))
    return np.concatenate(xs), np.concatenate(ys)


def channel_stats(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std, pooled over the three axes of each sensor.

    Pooling keeps the normalisation the same for every axis, as it must be for a model meant to
    work at any mounting angle; axis means are 0 by symmetry (the rotations are uniform).
    """
    flat = w.reshape(-1, w.shape[-1]).astype(np.float64)
    mean = np.zeros(len(CHANNELS))
    std = np.ones(len(CHANNELS))
    for group in ((0, 1, 2), (3, 4, 5)):
        std[list(group)] = np.sqrt((flat[:, group] ** 2).mean())
    for c in (6, 7):
        mean[c] = flat[:, c].mean()
        std[c] = flat[:, c].std()
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------- model

def build_model(window: int, channels: int, n_classes: int, batch_size: int | None = None):
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
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(0.3)(x)
    signature = layers.Dense(SIGNATURE_DIM, name="signature")(x)
    scores = layers.Dense(n_classes, activation="softmax", name="scores")(signature)
    return keras.Model(inp, {"scores": scores, "signature": signature})


def train(wx: np.ndarray, wy: np.ndarray, args) -> object:
    import keras

    model = build_model(wx.shape[1], wx.shape[2], len(LABELS))
    # The signature gets no loss of its own: it is the bottleneck the scores are computed from.
    trainer = keras.Model(model.inputs, model.get_layer("scores").output)
    steps = args.epochs * int(np.ceil(len(wx) / args.batch))
    trainer.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(args.lr, steps)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.05),
        metrics=["accuracy"],
    )
    onehot = np.eye(len(LABELS), dtype=np.float32)[wy]
    rng = np.random.default_rng(args.seed + 1)
    order = rng.permutation(len(wx))

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            log(f"epoch {epoch + 1}/{args.epochs}: loss {logs.get('loss', float('nan')):.4f}, "
                f"train accuracy {logs.get('accuracy', float('nan')):.4f}")

    trainer.fit(wx[order], onehot[order], batch_size=args.batch, epochs=args.epochs,
                shuffle=True, verbose=0, callbacks=[Progress()])
    return model


def export_int8(model, rep: np.ndarray, path: Path) -> bytes:
    """Full-integer int8 TFLite (int8 input and outputs), calibrated on training windows."""
    import tensorflow as tf

    fixed = build_model(rep.shape[1], rep.shape[2], len(LABELS), batch_size=1)
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


# ---------------------------------------------------------------- evaluation (device path)

class DevicePath:
    """The int8 model run the way MotionStage runs it: prepare_window → quantise → invoke."""

    def __init__(self, path: Path, spec: InputSpec, names: dict[str, str]):
        from edged.runtime import Model

        self.model = Model(path, threads=1)
        self.spec = spec
        self.pre = Preprocessor(spec, 4096)
        self.si = self.model.output_by_name(names["scores"])
        self.gi = self.model.output_by_name(names["signature"])
        self.buf = np.empty((spec.window, len(spec.channels)), np.float32)

    def run(self, t: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores (windows, classes) float, signatures (windows, dim) int8) over a recording."""
        scores, sig = [], []
        for a, b, end in iter_windows(t, x, self.spec):
            self.pre(t[a:b], x[a:b], self.buf, end)
            self.model.set_input(0, self.buf)
            self.model.invoke()
            spec = self.model.outputs[self.si]
            raw = self.model.raw_output(self.si)[0].astype(np.float32)
            scores.append((raw - spec.zero_point) * spec.scale)
            sig.append(self.model.raw_output(self.gi)[0])
        return np.array(scores), np.array(sig)


def evaluate(dev: DevicePath, X: np.ndarray, y: np.ndarray, make_input, label: str) -> dict:
    """Window and recording accuracy, confusion matrix, and all signatures, for one input style."""
    all_scores, all_sigs, win_y, rec_pred = [], [], [], []
    for i in range(len(X)):
        t, x = make_input(i)
        s, g = dev.run(t, x)
        all_scores.append(s)
        all_sigs.append(g)
        win_y.append(np.full(len(s), y[i]))
        rec_pred.append(int(np.argmax(s.mean(axis=0))))
    scores = np.concatenate(all_scores)
    wy = np.concatenate(win_y)
    pred = scores.argmax(axis=1)
    conf = np.zeros((len(LABELS), len(LABELS)), int)
    np.add.at(conf, (wy, pred), 1)
    res = {
        "windows": int(len(wy)),
        "window_accuracy": float((pred == wy).mean()),
        "recording_accuracy": float((np.array(rec_pred) == y).mean()),
        "confusion": conf,
        "signatures": np.concatenate(all_sigs),
        "signature_labels": wy,
    }
    log(f"{label}: window accuracy {res['window_accuracy']:.4f} ({int((pred == wy).sum())}/{len(wy)}), "
        f"recording accuracy {res['recording_accuracy']:.4f}")
    return res


def format_confusion(conf: np.ndarray) -> str:
    width = max(len(s) for s in LABELS) + 2
    lines = ["true \\ predicted".ljust(width + 6) + "".join(s.rjust(width) for s in LABELS)]
    for i, name in enumerate(LABELS):
        lines.append(name.ljust(width + 6) + "".join(str(v).rjust(width) for v in conf[i]))
    return "\n".join(lines)


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


def render_tables(name: str, top: dict, subtables: dict[str, dict]) -> str:
    lines = [f"[models.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for sub, table in subtables.items():
        lines += ["", f"[models.{name}.{sub}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def update_manifest(path: Path, name: str, block: str) -> None:
    """Replace this model's tables in the manifest, leaving every other table as it is.

    Other tools edit other models' tables in the same file, so this re-reads it just before
    writing and swaps in the new text atomically.
    """
    import tomllib

    header = "# edged model manifest: one table per shipped model.\n"
    text = path.read_text() if path.exists() else header
    own = (f"[models.{name}]", f"[models.{name}.")
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

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=30, help="window length in samples at 10 Hz (default: %(default)s)")
    ap.add_argument("--hop", type=int, default=10, help="samples between windows on the device (default: %(default)s)")
    ap.add_argument("--copies", type=int, default=30,
                    help="augmented copies of each TRAIN recording (default: %(default)s)")
    ap.add_argument("--stride", type=int, default=2,
                    help="model samples between training windows cut from one recording (default: %(default)s)")
    ap.add_argument("--follow", type=float, default=0.5,
                    help="share of augmented copies whose gravity turns with the sensor, integrated from "
                         "the gyroscope, rather than staying at one tilt (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=2e-3,
                    help="initial learning rate, cosine-decayed (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=7,
                    help="seed for augmentation, initialisation and order (default: %(default)s)")
    ap.add_argument("--unknown-quantile", type=float, default=sigs.DEFAULT_QUANTILE,
                    help="TRAIN distance quantile that sets the open-set threshold (default: %(default)s)")
    ap.add_argument("--unknown-margin", type=float, default=sigs.DEFAULT_MARGIN,
                    help="factor on that quantile, headroom for unseen recordings (default: %(default)s)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models",
                    help="where motion.tflite, motion.labels and manifest.toml go (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow CPU threads (default: %(default)s)")
    args = ap.parse_args(argv)

    import tensorflow as tf
    import keras

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    t_start = time.time()
    Xtr, ytr_s = load_split("train")
    Xte, yte_s = load_split("test")
    ytr = np.array([LABELS.index(v) for v in ytr_s])
    yte = np.array([LABELS.index(v) for v in yte_s])
    log(f"BasicMotions: TRAIN {Xtr.shape}, TEST {Xte.shape} (recordings, samples, channels) at {RATE_HZ:g} Hz")

    # Normalisation first, from a subset, so that every training window then comes out of
    # prepare_window with the final spec — the same call, the same numbers, as on the device.
    ident = InputSpec(RATE_HZ, args.window, args.hop, CHANNELS, np.zeros(len(CHANNELS), np.float32),
                      np.ones(len(CHANNELS), np.float32))
    sx, _ = training_windows(Xtr, ytr, ident, copies=3, seed=args.seed + 100, stride=args.stride,
                             follow=args.follow)
    mean, std = channel_stats(sx)
    spec = InputSpec(RATE_HZ, args.window, args.hop, CHANNELS, mean, std)
    log(f"normalisation: mean {np.round(mean, 3).tolist()}, std {np.round(std, 3).tolist()}")

    log(f"cutting training windows: {len(Xtr)} recordings x (1 + {args.copies} augmented copies), "
        f"window {args.window} samples, stride {args.stride}")
    wx, wy = training_windows(Xtr, ytr, spec, copies=args.copies, seed=args.seed, stride=args.stride,
                              follow=args.follow)
    log(f"{len(wx)} training windows")

    model = train(wx, wy, args)

    args.models_dir.mkdir(parents=True, exist_ok=True)
    tfl = args.models_dir / f"{NAME}.tflite"
    rep_rng = np.random.default_rng(args.seed + 2)
    rep = wx[rep_rng.choice(len(wx), size=min(1000, len(wx)), replace=False)]
    blob = export_int8(model, rep, tfl)
    names = output_names(tfl)
    log(f"wrote {tfl} ({len(blob)} bytes), outputs {names}")
    (args.models_dir / f"{NAME}.labels").write_text("\n".join(LABELS) + "\n")

    dev = DevicePath(tfl, spec, names)
    test10 = evaluate(dev, Xte, yte, lambda i: (np.arange(len(Xte[i])) / RATE_HZ, Xte[i]),
                      "TEST as recorded (10 Hz)")
    raw_rng = np.random.default_rng(1234)
    test_raw = evaluate(dev, Xte, yte, lambda i: as_raw_imu(Xte[i], raw_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                            noise=RAW_EVAL_NOISE),
                        f"TEST raw-IMU style ({RAW_EVAL_RATE_HZ:g} Hz, random tilt, gravity, noise)")
    follow_rng = np.random.default_rng(4321)
    test_follow = evaluate(dev, Xte, yte, lambda i: as_raw_imu(Xte[i], follow_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                               noise=RAW_EVAL_NOISE, gravity="follow"),
                           f"TEST raw-IMU style, gravity turning with the sensor")
    train10 = evaluate(dev, Xtr, ytr, lambda i: (np.arange(len(Xtr[i])) / RATE_HZ, Xtr[i]),
                       "TRAIN as recorded (10 Hz)")
    cal_rng = np.random.default_rng(args.seed + 3)
    train_tilt = evaluate(dev, Xtr, ytr, lambda i: as_raw_imu(Xtr[i], cal_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                              noise=RAW_EVAL_NOISE),
                          "TRAIN raw-IMU style (calibration)")
    train_follow = evaluate(dev, Xtr, ytr, lambda i: as_raw_imu(Xtr[i], cal_rng, rate_hz=RAW_EVAL_RATE_HZ,
                                                                noise=RAW_EVAL_NOISE, gravity="follow"),
                            "TRAIN gravity turning (calibration)")
    for name, res in (("10 Hz", test10), ("raw-IMU style", test_raw), ("gravity turning", test_follow)):
        log(f"TEST confusion (windows, {name}):")
        print(format_confusion(res["confusion"]), flush=True)

    # Signature centroids and open-set thresholds from TRAIN windows only: as recorded and as a
    # tilted chip would report them (gravity fixed, and turning with the sensor), so the
    # thresholds allow for the spread a real mounting adds.
    cal = (train10, train_tilt, train_follow)
    cents = sigs.build_centroids(np.concatenate([r["signatures"] for r in cal]),
                                 [LABELS[i] for r in cal for i in r["signature_labels"]],
                                 quantile=args.unknown_quantile, margin=args.unknown_margin, order=LABELS)
    cents_path = args.models_dir / f"{NAME}.centroids.json"
    sigs.save_centroids(cents, cents_path)
    nc = {}
    for key, res in (("test", test10), ("test_raw", test_raw), ("test_follow", test_follow)):
        matches = sigs.classify(cents, res["signatures"])
        truth = [LABELS[i] for i in res["signature_labels"]]
        nearest = np.mean([m.nearest == tr for m, tr in zip(matches, truth)])
        open_set = np.mean([m.label == tr for m, tr in zip(matches, truth)])
        unknown = np.mean([m.label == sigs.UNKNOWN for m in matches])
        nc[key] = (float(nearest), float(open_set), float(unknown))
        log(f"nearest centroid on {key}: accuracy {nearest:.4f}; with the open-set threshold "
            f"{open_set:.4f} correct, {unknown:.4f} unknown")
    log(f"wrote {cents_path}: thresholds {np.round(cents.thresholds, 1).tolist()} "
        f"({args.unknown_quantile} quantile of TRAIN distances x {args.unknown_margin})")

    sha = __import__("hashlib").sha256(blob).hexdigest()
    top = {
        "file": f"{NAME}.tflite",
        "sha256": sha,
        "size": len(blob),
        "task": "motion",
        "decoder": "classifier+embedding",
        "labels": f"{NAME}.labels",
        "source": SOURCE,
        "license": LICENSE,
    }
    metrics = {
        "dataset": "BasicMotions TEST (40 recordings, 10 s at 10 Hz)",
        "test_windows": test10["windows"],
        "test_window_accuracy": round(test10["window_accuracy"], 4),
        "test_recording_accuracy": round(test10["recording_accuracy"], 4),
        "test_raw_window_accuracy": round(test_raw["window_accuracy"], 4),
        "test_raw_recording_accuracy": round(test_raw["recording_accuracy"], 4),
        "test_raw_style": f"{RAW_EVAL_RATE_HZ:g} Hz, random rotation, gravity, noise "
                          f"{RAW_EVAL_NOISE[0]} m/s^2 / {RAW_EVAL_NOISE[1]} rad/s",
        "test_follow_window_accuracy": round(test_follow["window_accuracy"], 4),
        "test_follow_style": "as test_raw_style, but gravity turns with the sensor (integrated gyroscope)",
        "train_window_accuracy": round(train10["window_accuracy"], 4),
        "centroid_test_accuracy": round(nc["test"][0], 4),
        "centroid_test_raw_accuracy": round(nc["test_raw"][0], 4),
        "centroid_test_follow_accuracy": round(nc["test_follow"][0], 4),
        "centroid_test_unknown_rate": round(nc["test"][2], 4),
        "centroid_test_raw_unknown_rate": round(nc["test_raw"][2], 4),
        "centroid_test_follow_unknown_rate": round(nc["test_follow"][2], 4),
        "confusion_labels": list(LABELS),
        "test_confusion": [list(map(int, r)) for r in test10["confusion"]],
        "seed": args.seed,
    }
    params = {
        "scores_output": names["scores"],
        "signature_output": names["signature"],
        "signature_dim": SIGNATURE_DIM,
        "centroids": cents_path.name,
        "unknown_quantile": args.unknown_quantile,
        "unknown_margin": args.unknown_margin,
    }
    block = render_tables(NAME, top, {"input": spec.to_dict(), "params": params, "metrics": metrics})
    manifest = args.models_dir / "manifest.toml"
    update_manifest(manifest, NAME, block)
    log(f"updated {manifest} [models.{NAME}]; sha256 {sha[:12]}…; total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
