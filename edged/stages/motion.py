"""The motion stage: raw IMU samples → model windows → `MotionSignature` records.

This module owns the one preprocessing path shared by training (`scripts/train_motion.py`) and
the device: anti-alias filtering and resampling to the model's rate, gravity removal and
normalisation (`prepare_window`), the cutting of a sample stream into windows (`window_bounds`,
`iter_windows`), and the streaming stage that runs the model on each window (`MotionStage`).
Numpy only: it runs on the device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edged.sources.imu.imucsv import read_imu_csv
from edged.models import ModelEntry, ModelError
from edged.centroids import UNKNOWN, Centroids, SignatureError, classify, load_centroids
from edged.records import IMU_CHANNELS, ImuBatch, MotionSignature
from edged.runtime import Model

GRAVITY = 9.80665  # m/s², standard gravity

# Channels a model may ask for, beyond the raw six (accelerometer with the window's gravity removed,
# gyroscope):
#   a_norm, g_norm      magnitudes of the two; they do not change when the sensor is mounted at
#                       another angle.
#   grav_x/y/z          the window's gravity estimate (its mean acceleration) in units of g, in the
#                       sensor's axes: the sensor's tilt. Only meaningful where the mounting is
#                       fixed (a strapped wearable, a bolted board); `mounting="free"` feeds zeros.
#   a_vert, a_horiz     acceleration along gravity (signed) and the magnitude across it;
#   g_vert, g_horiz     the same for the angular rate (turning about the vertical, and tilting).
#                       These four are mounting-invariant too, but keep what the magnitudes lose:
#                       which part of a motion is up-down and which is sideways.
# A gravity-free recording (a window whose mean acceleration is far below 1 g) has no vertical:
# the direction fades out linearly below GRAVITY_FULL_G, so a_vert and g_vert go to 0 there.
DERIVED_CHANNELS = ("a_norm", "g_norm", "grav_x", "grav_y", "grav_z", "a_vert", "a_horiz", "g_vert", "g_horiz")
KNOWN_CHANNELS = IMU_CHANNELS + DERIVED_CHANNELS
MOUNTINGS = ("fixed", "free")
GRAVITY_FULL_G = 0.5
GRAVITY_METHODS = ("window-mean",)
ANTIALIAS_METHODS = ("lanczos3",)
UNITS = {"accel": "m/s^2", "gyro": "rad/s"}

# Lanczos kernel half-width in output periods: how far a window reaches before its first and after
# its last output sample, and the longest break in the samples a window may bridge.
_LOBES = 3
# Timestamps are float64 UNIX seconds: one rounding step is ~2.4e-7 s, so 1e-4 s is far above
# rounding and far below any real sample period.
_T_EPS = 1e-4
# A source may run somewhat slower than nominal (chip oscillators drift, FIFO timing jitters).
_RATE_TOLERANCE = 0.9


@dataclass(frozen=True)
class InputSpec:
    """What a motion model expects as input, from the manifest's `[models.<name>.input]` table."""

    rate_hz: float
    window: int  # samples per window at rate_hz
    hop: int  # samples at rate_hz between the ends of consecutive windows
    channels: tuple[str, ...]  # the model input's channel order
    mean: np.ndarray  # (channels,) normalisation: (x - mean) / std
    std: np.ndarray
    gravity: str = "window-mean"
    antialias: str = "lanczos3"

    @property
    def window_s(self) -> float:
        return self.window / self.rate_hz

    @property
    def hop_s(self) -> float:
        return self.hop / self.rate_hz

    @property
    def span_s(self) -> float:
        """Time from a window's first output sample to its last."""
        return (self.window - 1) / self.rate_hz

    @property
    def reach_s(self) -> float:
        """How far before a window's end it needs raw samples (its span plus the filter's half-width)."""
        return (self.window - 1 + _LOBES) / self.rate_hz

    @property
    def lookahead_s(self) -> float:
        """How far after a window's end it needs raw samples: the latency of a result."""
        return _LOBES / self.rate_hz

    @property
    def max_gap_s(self) -> float:
        """A longer break between samples ends a stream segment: the filter cannot bridge it."""
        return _LOBES / self.rate_hz

    @classmethod
    def from_dict(cls, d: dict, where: str = "input") -> "InputSpec":
        """Parse and check a manifest input table; errors name the key (`where.key`)."""

        def get(key, kind):
            if key not in d:
                raise ModelError(f"{where}.{key}: missing")
            value = d[key]
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if not ok:
                raise ModelError(f"{where}.{key}: expected {kind.__name__ if isinstance(kind, type) else 'a number'}, "
                                 f"got {value!r}")
            return value

        rate = float(get("rate_hz", (int, float)))
        window = get("window", int)
        hop = get("hop", int)
        if not rate > 0:
            raise ModelError(f"{where}.rate_hz: expected > 0, got {rate}")
        if window < 2:
            raise ModelError(f"{where}.window: expected at least 2 samples, got {window}")
        if hop < 1:
            raise ModelError(f"{where}.hop: expected at least 1 sample, got {hop}")
        channels = tuple(get("channels", list))
        unknown = [c for c in channels if c not in KNOWN_CHANNELS]
        if unknown or not channels:
            raise ModelError(f"{where}.channels: expected names from {', '.join(KNOWN_CHANNELS)}, "
                             f"got {list(channels)}")
        raw = tuple(d.get("raw_channels", IMU_CHANNELS))
        if raw != IMU_CHANNELS:
            raise ModelError(f"{where}.raw_channels: edged delivers {list(IMU_CHANNELS)}, got {list(raw)}")
        units = d.get("units", UNITS)
        if units != UNITS:
            raise ModelError(f"{where}.units: edged delivers {UNITS}, got {units}")
        mean = np.asarray(get("mean", list), dtype=np.float32)
        std = np.asarray(get("std", list), dtype=np.float32)
        for key, arr in (("mean", mean), ("std", std)):
            if arr.shape != (len(channels),):
                raise ModelError(f"{where}.{key}: expected {len(channels)} values (one per channel), "
                                 f"got {arr.size}")
        if not (std > 0).all():
            raise ModelError(f"{where}.std: every value must be > 0, got {std.tolist()}")
        gravity = d.get("gravity", "window-mean")
        if gravity not in GRAVITY_METHODS:
            raise ModelError(f"{where}.gravity: expected one of {', '.join(GRAVITY_METHODS)}, got {gravity!r}")
        antialias = d.get("antialias", "lanczos3")
        if antialias not in ANTIALIAS_METHODS:
            raise ModelError(f"{where}.antialias: expected one of {', '.join(ANTIALIAS_METHODS)}, "
                             f"got {antialias!r}")
        return cls(rate, window, hop, channels, mean, std, gravity, antialias)

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> "InputSpec":
        return cls.from_dict(entry.input, f"models.{entry.name}.input")

    def to_dict(self) -> dict:
        """The manifest table for this spec (the inverse of `from_dict`)."""
        return {
            "rate_hz": self.rate_hz,
            "window": self.window,
            "hop": self.hop,
            "raw_channels": list(IMU_CHANNELS),
            "channels": list(self.channels),
            "units": dict(UNITS),
            "antialias": self.antialias,
            "gravity": self.gravity,
            "mean": [round(float(v), 6) for v in self.mean],
            "std": [round(float(v), 6) for v in self.std],
        }


class Preprocessor:
    """`prepare_window` with its work arrays kept between calls (what the stage uses)."""

    def __init__(self, spec: InputSpec, max_samples: int = 0, *, mounting: str = "fixed") -> None:
        if mounting not in MOUNTINGS:
            raise ValueError(f"mounting: expected one of {', '.join(MOUNTINGS)}, got {mounting!r}")
        self.spec = spec
        self.mounting = mounting
        m = spec.window
        # Output sample times relative to the window's end, in output periods.
        self._tau = np.arange(m, dtype=np.float64) - (m - 1)
        self._cap = 0
        self._grow(max(max_samples, m))
        self._res = np.empty((m, len(IMU_CHANNELS)), np.float64)
        self._rowsum = np.empty((m, 1), np.float64)
        self._norm = np.empty(m, np.float64)
        self._dot = np.empty(m, np.float64)
        self._sq = np.empty(m, np.float64)
        self._cols = [KNOWN_CHANNELS.index(c) for c in spec.channels]
        self._feat = np.empty((m, len(KNOWN_CHANNELS)), np.float64)

    @property
    def resampled(self) -> np.ndarray:
        """The last window's raw samples on the model's grid (window, 6), before gravity removal."""
        return self._res

    def _grow(self, n: int) -> None:
        m = self.spec.window
        self._cap = n
        self._x = np.empty((m, n), np.float64)
        self._u = np.empty((m, n), np.float64)
        self._w = np.empty((m, n), np.float64)
        self._far = np.empty((m, n), bool)
        self._zero = np.empty((m, n), bool)
        self._tr = np.empty(n, np.float64)

    def __call__(self, t: np.ndarray, data: np.ndarray, out: np.ndarray | None = None,
                 end: float | None = None) -> np.ndarray:
        spec = self.spec
        n = len(t)
        if n < 2 or data.shape != (n, len(IMU_CHANNELS)):
            raise ValueError(f"expected t (N,) and data (N, {len(IMU_CHANNELS)}) with N >= 2, "
                             f"got {np.shape(t)} and {np.shape(data)}")
        if end is None:
            end = t[-1] - spec.lookahead_s
        half = 0.5 / spec.rate_hz
        if t[0] > end - spec.span_s + half or t[-1] < end - half:
            raise ValueError(f"samples from {t[0]:.3f} s to {t[-1]:.3f} s do not cover a window from "
                             f"{end - spec.span_s:.3f} s to {end:.3f} s")
        covered = t[-1] - t[0]
        rate = (n - 1) / covered
        if rate < _RATE_TOLERANCE * spec.rate_hz:
            raise ValueError(f"IMU sample rate {rate:.1f} Hz is below the model's {spec.rate_hz:g} Hz")
        if n > self._cap:
            self._grow(max(n, 2 * self._cap))
        x, u, w = self._x[:, :n], self._u[:, :n], self._w[:, :n]
        far, zero, tr = self._far[:, :n], self._zero[:, :n], self._tr[:n]

        # Anti-aliasing and resampling in one step: each output sample is a Lanczos-3 weighted
        # average of the raw samples around its time, the kernel scaled to the model's rate (so it
        # cuts off at the model's Nyquist frequency whatever the raw rate). The weights are
        # normalised per output sample, which keeps unit gain for any raw rate and for jittered
        # timestamps. Raw samples already on the model's grid pass through unchanged (the kernel
        # is 1 at 0 and 0 at other integers). The kernel is only a good low-pass when it has raw
        # samples on both sides, hence the windows' look-ahead.
        np.subtract(t, end, out=tr)
        tr *= spec.rate_hz
        np.subtract(self._tau[:, None], tr[None, :], out=x)
        np.abs(x, out=x)
        np.greater_equal(x, _LOBES, out=far)
        np.less(x, 1e-9, out=zero)
        np.multiply(x, np.pi, out=u)
        np.sin(u, out=w)
        u /= _LOBES
        np.sin(u, out=x)
        w *= x
        np.multiply(u, u, out=x)
        x *= _LOBES
        np.copyto(x, 1.0, where=zero)
        w /= x
        np.copyto(w, 1.0, where=zero)
        np.copyto(w, 0.0, where=far)
        np.sum(w, axis=1, keepdims=True, out=self._rowsum)
        if not (self._rowsum > 1e-6).all():
            raise ValueError("the samples do not cover the window (a break in the timestamps?)")
        w /= self._rowsum
        np.matmul(w, data, out=self._res)

        feat = self._feat
        feat[:, :6] = self._res
        acc = feat[:, :3]
        # Gravity: the mean acceleration over the window, removed per axis. Exact for a sensor
        # whose orientation holds still during the window, whatever the mounting tilt; what a
        # turning sensor leaves behind, training leaves behind too (it calls this same code).
        g = acc.mean(axis=0)
        acc -= g
        a2 = self._norm
        np.einsum("ij,ij->i", acc, acc, out=a2)
        np.sqrt(a2, out=feat[:, 6])
        gyr = feat[:, 3:6]
        g2 = self._dot
        np.einsum("ij,ij->i", gyr, gyr, out=g2)
        np.sqrt(g2, out=feat[:, 7])
        # The vertical: gravity's direction, faded out for a window with (almost) no gravity in it.
        g_len = math.sqrt(float(g @ g))
        up = g / max(g_len, GRAVITY_FULL_G * GRAVITY)
        feat[:, 8:11] = 0.0 if self.mounting == "free" else g / GRAVITY
        np.matmul(acc, up, out=feat[:, 11])
        np.matmul(gyr, up, out=feat[:, 13])
        # |x|² - (x·up)², clipped at 0 against rounding, is the squared magnitude across gravity.
        np.multiply(feat[:, 11], feat[:, 11], out=self._sq)
        a2 -= self._sq
        np.maximum(a2, 0.0, out=a2)
        np.sqrt(a2, out=feat[:, 12])
        np.multiply(feat[:, 13], feat[:, 13], out=self._sq)
        g2 -= self._sq
        np.maximum(g2, 0.0, out=g2)
        np.sqrt(g2, out=feat[:, 14])

        if out is None:
            out = np.empty((spec.window, len(spec.channels)), np.float32)
        for j, c in enumerate(self._cols):
            out[:, j] = feat[:, c]
        out -= spec.mean
        out /= spec.std
        return out


def prepare_window(t: np.ndarray, data: np.ndarray, spec: InputSpec,
                   out: np.ndarray | None = None, end: float | None = None, *,
                   mounting: str = "fixed") -> np.ndarray:
    """One model input window from raw IMU samples, as float32 (window, channels).

    `t` (N,) seconds and `data` (N, 6) in IMU_CHANNELS order — accelerometer in m/s² with
    gravity included or not, at any mounting angle; gyroscope in rad/s — at any rate at least the
    model's. The window's last output sample is at time `end` (default: `spec.lookahead_s`
    before `t[-1]`); for full filtering the samples reach `spec.reach_s` before `end` and
    `spec.lookahead_s` after it.
    """
    return Preprocessor(spec, len(t), mounting=mounting)(t, np.asarray(data), out, end)


def recording_problem(t: np.ndarray, spec: InputSpec) -> str | None:
    """Why a whole recording (a CSV) yields no window, or None: too slow a rate, or too short.

    The same rule as the stage's: a rate below 0.9 × the model's is refused, and a window needs
    `reach_s + lookahead_s` of samples.
    """
    n = len(t)
    need = spec.reach_s + spec.lookahead_s
    covered = float(t[-1] - t[0]) if n >= 2 else 0.0
    if n >= 2 and covered > 0:
        rate = (n - 1) / covered
        if rate < _RATE_TOLERANCE * spec.rate_hz:
            return (f"sample rate {rate:.3g} Hz is below the model's {spec.rate_hz:g} Hz "
                    f"(at least {_RATE_TOLERANCE * spec.rate_hz:g} Hz is accepted)")
    if covered < need - _T_EPS:
        return (f"{n} sample(s) over {covered:.2f} s: shorter than one window, which needs "
                f"{need:.2f} s of samples ({spec.window_s:g} s plus the filter's margins)")
    return None


def segments(t: np.ndarray, spec: InputSpec) -> list[tuple[int, int]]:
    """Split a sample stream at breaks longer than the filter can bridge (or where time goes back)."""
    steps = np.diff(t)
    cuts = np.flatnonzero((steps > spec.max_gap_s) | (steps <= 0)) + 1
    edges = [0, *cuts.tolist(), len(t)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def window_bounds(t: np.ndarray, end: float, spec: InputSpec) -> tuple[int, int] | None:
    """Sample range [start, stop) that the window ending at time `end` is computed from.

    None while the samples do not yet reach `spec.lookahead_s` past `end`.
    """
    if len(t) == 0 or t[-1] < end + spec.lookahead_s - _T_EPS:
        return None
    start = int(np.searchsorted(t, end - spec.reach_s - _T_EPS, side="left"))
    stop = int(np.searchsorted(t, end + spec.lookahead_s + _T_EPS, side="right"))
    return start, stop


def first_end(t0: float, spec: InputSpec) -> float:
    """End of the first window of a segment starting at `t0`: the first with full filter support."""
    return t0 + spec.reach_s


def iter_windows(t: np.ndarray, data: np.ndarray, spec: InputSpec) -> Iterator[tuple[int, int, float]]:
    """Every window the stage would cut from this stream, as (start, stop, end).

    [start, stop) is the sample range to hand `prepare_window` with `end`. Within each unbroken
    segment the first window ends `reach_s` after the segment's first sample, then one every
    `hop_s`: the same grid `MotionStage` follows, so batch and streaming agree.
    """
    for a, b in segments(t, spec):
        ts = t[a:b]
        k = 0
        while True:
            end = first_end(ts[0], spec) + k * spec.hop_s
            bounds = window_bounds(ts, end, spec)
            if bounds is None:
                break
            yield a + bounds[0], a + bounds[1], end
            k += 1


class MotionStage:
    """Turns a stream of `ImuBatch`es into one `MotionSignature` per completed window.

    Raw samples go into a preallocated buffer (grown only if the IMU runs faster than
    `max_rate_hz`); every `hop` model samples a window is preprocessed into a reused buffer, the
    model runs, and the result is returned. A window is complete once samples reach
    `spec.lookahead_s` past its end (the anti-aliasing filter looks both ways), so results lag
    the newest sample by that much; `ts` is the window's end. A break in the timestamps longer
    than the filter can bridge, or time going backwards, restarts the windowing (counted in `gaps`).

    `mounting` ("fixed" or "free", see DERIVED_CHANNELS) says whether the sensor's tilt means
    anything. With `centroids` (a file from `edged signatures build` / `enroll` for this model),
    each window is labelled by its nearest centroid — `unknown` beyond that motion's threshold —
    and its score says how well it fits (1 at the centroid, 0 at the threshold); without, by the
    model's own classifier. Either way the signature is the model's.
    """

    def __init__(self, model: Model, entry: ModelEntry, *, max_rate_hz: float = 1000.0,
                 mounting: str = "fixed", centroids: Centroids | None = None) -> None:
        self.model = model
        self.entry = entry
        self.spec = spec = InputSpec.from_entry(entry)
        self.labels = list(entry.labels)
        where = f"models.{entry.name}"
        self.signature_version = signature_version(entry)
        want = (1, spec.window, len(spec.channels))
        if len(model.inputs) != 1 or model.inputs[0].shape != want:
            got = [t.shape for t in model.inputs]
            raise ModelError(f"{entry.path}: model input is {got}, manifest {where}.input says {want}")
        self._scores_i, self._sig_i = _output_indices(model, entry)
        if model.outputs[self._scores_i].shape[-1] != len(self.labels):
            raise ModelError(f"{entry.path}: model has {model.outputs[self._scores_i].shape[-1]} classes, "
                             f"{where}.labels lists {len(self.labels)}")
        keep = math.ceil((spec.reach_s + spec.lookahead_s + spec.hop_s) * max_rate_hz) + 2
        self._t = np.empty(2 * keep, np.float64)
        self._x = np.empty((2 * keep, len(IMU_CHANNELS)), np.float32)
        self._n = 0
        self._base: float | None = None  # first sample time of the current segment
        self._k = 0  # windows emitted in the current segment
        self._pre = Preprocessor(spec, keep, mounting=mounting)
        self._win = np.empty((spec.window, len(spec.channels)), np.float32)
        self.centroids = centroids
        if centroids is not None:
            check_centroids(centroids, entry, model.outputs[self._sig_i].shape[-1])
        self.windows = 0
        self.gaps = 0
        # Sampling ([sampling]): `keep_window(label, ts)` says whether a window's raw samples are
        # wanted; those windows carry a copy of them in `MotionSignature.window`.
        self.keep_window = None

    @property
    def window_s(self) -> float:
        return self.spec.window_s

    @property
    def output_labels(self) -> list[str]:
        """Every label a window may get: the centroids' motions and "unknown", else the model's classes."""
        if self.centroids is None:
            return list(self.labels)
        return list(self.centroids.labels) + [UNKNOWN]

    def reset(self) -> None:
        """Forget buffered samples (e.g. after the IMU source restarted)."""
        self._n = 0
        self._base = None
        self._k = 0

    def push(self, batch: ImuBatch) -> list[MotionSignature]:
        """Buffer `batch` and return the signatures of every window it completed (often none)."""
        t, x = batch.t, batch.data
        if len(t) == 0:
            return []
        if x.shape != (len(t), len(IMU_CHANNELS)):
            raise ValueError(f"ImuBatch data must be (N, {len(IMU_CHANNELS)}), got {x.shape}")
        out: list[MotionSignature] = []
        spec = self.spec
        steps = np.diff(t)
        # Indices where the batch breaks (too long a pause, or time going back): a new segment.
        breaks = np.flatnonzero((steps > spec.max_gap_s) | (steps <= 0)) + 1
        i = 0
        while i < len(t):
            if self._n and not (0 < t[i] - self._t[self._n - 1] <= spec.max_gap_s):
                self.gaps += 1
                self.reset()
            # Take up to the next break (or the buffer's room) in one copy.
            k = int(np.searchsorted(breaks, i, side="right"))
            j = int(breaks[k]) if k < len(breaks) else len(t)
            j = min(j, i + self._room())
            n = self._n
            self._t[n:n + j - i] = t[i:j]
            self._x[n:n + j - i] = x[i:j]
            self._n = n + j - i
            if self._base is None:
                self._base = float(self._t[0])
                self._k = 0
            self._emit(out)
            i = j
        return out

    def _room(self) -> int:
        cap = len(self._t)
        if self._n < cap:
            return cap - self._n
        # Full: drop what no future window can reach, sliding the rest to the front.
        next_end = first_end(self._base, self.spec) + self._k * self.spec.hop_s
        drop = int(np.searchsorted(self._t[:self._n], next_end - self.spec.reach_s - 2 * _T_EPS, side="left"))
        drop = min(drop, self._n - 1)
        if drop <= 0:
            # Faster than max_rate_hz: grow once rather than lose samples.
            self._t = np.concatenate([self._t, np.empty_like(self._t)])
            self._x = np.concatenate([self._x, np.empty_like(self._x)])
            return len(self._t) - self._n
        keep = self._n - drop
        self._t[:keep] = self._t[drop:self._n]
        self._x[:keep] = self._x[drop:self._n]
        self._n = keep
        return len(self._t) - keep

    def _emit(self, out: list[MotionSignature]) -> None:
        spec = self.spec
        while True:
            end = first_end(self._base, spec) + self._k * spec.hop_s
            bounds = window_bounds(self._t[:self._n], end, spec)
            if bounds is None:
                return
            a, b = bounds
            out.append(self._run(self._t[a:b], self._x[a:b], end))
            self._k += 1

    def _run(self, t: np.ndarray, x: np.ndarray, end: float) -> MotionSignature:
        self._pre(t, x, self._win, end)
        model = self.model
        model.set_input(0, self._win)
        t0 = time.perf_counter()
        model.invoke()
        ms = (time.perf_counter() - t0) * 1000.0
        raw = model.raw_output(self._scores_i).reshape(-1)
        top = int(np.argmax(raw))  # dequantisation is monotonic (scale > 0): argmax on the raw values
        sig = tuple(int(v) for v in model.raw_output(self._sig_i).reshape(-1))
        self.windows += 1
        if self.centroids is None:
            label, score = self.labels[top], _dequantize(model, self._scores_i, raw[top])
        else:
            match = classify(self.centroids, (sig,))[0]
            label, score = match.label, match.score
        keep = self.keep_window
        window = ImuBatch(t.copy(), x.copy()) if keep is not None and keep(label, float(end)) else None
        return MotionSignature(
            ts=float(end),
            label=label,
            score=score,
            signature=sig,
            window_s=self.spec.window_s,
            inference_ms=ms,
            signature_v=self.signature_version,
            window=window,
        )


def load_stage_centroids(path: str | Path, entry: ModelEntry) -> Centroids | None:
    """The `motion.centroids` file for `entry`'s model, checked against it; None for "" (no file)."""
    if not path:
        return None
    try:
        cents = load_centroids(path)
    except SignatureError as exc:
        raise ModelError(f"motion.centroids: {exc}") from None
    dim = entry.params.get("signature_dim")
    check_centroids(cents, entry, dim if isinstance(dim, int) else cents.dim, f"motion.centroids: {path}")
    return cents


def signature_version(entry: ModelEntry) -> int:
    """The model's `params.signature_version` (1 for models from before the field existed)."""
    v = entry.params.get("signature_version", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ModelError(f"models.{entry.name}.params.signature_version: expected an integer >= 1, got {v!r}")
    return v


def check_centroids(centroids: Centroids, entry: ModelEntry, dim: int, where: str = "centroids") -> None:
    """Refuse centroids made for another model's signatures (one line naming both)."""
    version = signature_version(entry)
    if centroids.dim != dim:
        raise ModelError(f"{where}: centroids have {centroids.dim} values, model {entry.name}'s signatures {dim}")
    if centroids.signature_version != version or (centroids.model and centroids.model != entry.name):
        made = f"{centroids.model or 'a model'} signature version {centroids.signature_version}"
        raise ModelError(f"{where}: made for {made}, but model {entry.name} has signature version {version}; "
                         "rebuild them from this model's signatures")


def _dequantize(model: Model, i: int, value) -> float:
    spec = model.outputs[i]
    if not spec.quantized:
        return float(value)
    # In Python ints: int8 arithmetic would wrap around (127 - (-128) overflows).
    return (int(value) - spec.zero_point) * spec.scale


def _output_indices(model: Model, entry: ModelEntry) -> tuple[int, int]:
    """(scores, signature) output indices, by the tensor names the manifest records."""
    where = f"models.{entry.name}.params"
    found = []
    for key in ("scores_output", "signature_output"):
        name = entry.params.get(key)
        if not isinstance(name, str):
            raise ModelError(f"{where}.{key}: missing (the model's output tensor name)")
        try:
            found.append(model.output_by_name(name))
        except KeyError:
            names = [t.name for t in model.outputs]
            raise ModelError(f"{where}.{key}: {entry.path.name} has no output {name!r} (has {names})") from None
    return found[0], found[1]


def iter_csv_windows(path: str | Path, stage: MotionStage, *, chunk: int = 50) -> Iterator[MotionSignature]:
    """Replay an IMU CSV file (see `edged.sources.imu.imucsv`) through `stage`, `chunk` samples per push."""
    batch = read_imu_csv(path)
    for i in range(0, len(batch), chunk):
        yield from stage.push(ImuBatch(batch.t[i:i + chunk], batch.data[i:i + chunk]))
