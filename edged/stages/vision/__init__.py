"""The vision stage: one detector model turned into `DetectedObject`s for any RGB frame.

`VisionStage` owns the frame → model-input path (letterbox or stretch, nearest or bilinear
resampling through precomputed index maps, normalisation and quantisation through a 256-entry
lookup table, all into buffers reused from frame to frame) and the model-output → objects path.
How outputs become boxes is a small decoder plugin chosen by the manifest's `decoder` key:

- `blazeface`: MediaPipe-style SSD anchors, raw box regression, sigmoid scores, weighted NMS.
- `ssd`: TF Object Detection API box encoding (centre/size with scale factors), sigmoid class
  logits with a background column, per-class NMS; anchors from a `.npy` table beside the model.
- `tflite_detection_postprocess`: models whose graph already ends in the
  TFLite_Detection_PostProcess op (Coral's Edge TPU SSD models): boxes, classes, scores, count.

Decoders return boxes normalised to the model input as [x0, y0, x1, y1]; the stage maps them back
to the original frame (undoing the letterbox) and clips to [0, 1].
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.records import DetectedObject, Detections, Frame
from edged.runtime import Model, TensorSpec

__all__ = [
    "VisionStage", "Preprocessor", "Decoder", "DECODERS", "ssd_anchors", "nms", "nms_few", "resize_frame",
    "BlazeFaceDecoder", "SsdDecoder", "PostprocessDecoder",
]


def _where(entry: ModelEntry, key: str) -> str:
    return f"{entry.manifest or entry.path.parent / 'manifest.toml'}: models.{entry.name}.{key}"


def _num(entry: ModelEntry, table: dict, section: str, key: str, default: Any = None, *,
         lo: float | None = None, hi: float | None = None) -> float:
    value = table.get(key, default)
    if value is None:
        raise ModelError(f"{_where(entry, section)}.{key}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"{_where(entry, section)}.{key}: expected a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ModelError(f"{_where(entry, section)}.{key}: expected {lo}..{hi}, got {value!r}")
    return float(value)


def _per_channel(entry: ModelEntry, key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)):
        raise ModelError(f"{_where(entry, 'input')}.{key}: expected a number or 3 numbers, got {value!r}")
    return arr


# --------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Letterbox:
    """Where the resampled frame sits inside the model input, in model pixels."""

    top: int
    left: int
    height: int  # rows of model input covered by the frame
    width: int

    def to_frame(self, box: Sequence[float], model_h: int, model_w: int) -> tuple[float, float, float, float]:
        """One model-normalised (x0, y0, x1, y1) → frame-normalised, clipped to [0, 1]."""
        x0, y0, x1, y1 = box
        fx = lambda x: min(1.0, max(0.0, (x * model_w - self.left) / self.width))  # noqa: E731
        fy = lambda y: min(1.0, max(0.0, (y * model_h - self.top) / self.height))  # noqa: E731
        return fx(x0), fy(y0), fx(x1), fy(y1)


class _Plan:
    """Index maps and buffers for one frame size; built once, reused for every frame.

    `scratch` holds the buffers that depend only on the region's size (the resampled image,
    the bilinear blend's work arrays): plans for frame sizes that land on the same region share
    them, since one stage runs one frame at a time. Without it the plan allocates its own.
    """

    def __init__(self, frame_h: int, frame_w: int, model_h: int, model_w: int, letterbox: bool,
                 bilinear: bool, in_dtype: np.dtype, *, gather: bool = True,
                 scratch: dict | None = None) -> None:
        if letterbox:
            s = min(model_h / frame_h, model_w / frame_w)
            rh = min(model_h, max(1, round(frame_h * s)))
            rw = min(model_w, max(1, round(frame_w * s)))
        else:
            rh, rw = model_h, model_w
        shape = (rh, rw, 3)
        scratch = {} if scratch is None else scratch

        def shared(name: str, dtype, count: int | None = None):
            if name not in scratch:
                scratch[name] = (np.empty(shape, dtype) if count is None
                                 else [np.empty(shape, dtype) for _ in range(count)])
            return scratch[name]

        self.box = Letterbox((model_h - rh) // 2, (model_w - rw) // 2, rh, rw)
        self.identity = (rh, rw) == (frame_h, frame_w)
        self.full = (rh, rw) == (model_h, model_w)
        self.bilinear = bilinear and not self.identity
        if self.bilinear:
            # Half-pixel centres, as TF's ResizeBilinear and OpenCV's INTER_LINEAR sample: each
            # output pixel blends the 2x2 source pixels around its centre.
            self.y0, self.y1, wy = _taps(frame_h, rh)
            self.x0, self.x1, wx = _taps(frame_w, rw)
            # Full-size weights: a broadcast operand makes numpy allocate a scratch buffer per call.
            self.wy = np.ascontiguousarray(np.broadcast_to(wy[:, None, None], shape))
            self.wx = np.ascontiguousarray(np.broadcast_to(wx[None, :, None], shape))
            # Gather the four neighbours as uint8 first, so the float work is on the model-sized
            # region only, whatever the frame size.
            self.row_buf = np.empty((rh, frame_w, 3), np.uint8)
            self.corners = shared("corners", np.uint8, 4)
            self.f = shared("blend", np.float32, 3)
        elif not self.identity:
            # Pixel centres of the resampled grid mapped back to the nearest source pixel.
            self.rows = np.minimum(((np.arange(rh) + 0.5) * (frame_h / rh)).astype(np.intp), frame_h - 1)
            self.cols = np.minimum(((np.arange(rw) + 0.5) * (frame_w / rw)).astype(np.intp), frame_w - 1)
            self.row_buf = np.empty((rh, frame_w, 3), np.uint8)
        self.region = None if self.identity else shared("region", np.uint8)
        self.mask = shared("mask", np.bool_)
        self.idx = self.idx_low = self.values = None
        if gather:
            # LUT indices are pixel + 256 * channel, and np.take wants them as intp. Writing the
            # pixel into the low byte of a preset intp buffer (channel already in the next byte)
            # is a plain uint8 copy: no per-call cast buffer, no conversion array.
            self.idx = np.zeros(shape, np.intp)
            size = self.idx.itemsize
            b = self.idx.view(np.uint8).reshape(rh, rw, 3, size)
            low, high = (0, 1) if sys.byteorder == "little" else (size - 1, size - 2)
            b[..., high] = np.arange(3, dtype=np.uint8)
            self.idx_low = b[..., low]
            self.values = None if self.full else shared("values", in_dtype)

    def resample(self, image: np.ndarray) -> np.ndarray:
        """The frame resampled to the region size (uint8), or the frame itself at identity."""
        if self.identity:
            return image
        if not self.bilinear:
            np.take(image, self.rows, axis=0, out=self.row_buf, mode="clip")
            np.take(self.row_buf, self.cols, axis=1, out=self.region, mode="clip")
            return self.region
        c00, c01, c10, c11 = self.corners
        for rows, left, right in ((self.y0, c00, c01), (self.y1, c10, c11)):
            np.take(image, rows, axis=0, out=self.row_buf, mode="clip")
            np.take(self.row_buf, self.x0, axis=1, out=left, mode="clip")
            np.take(self.row_buf, self.x1, axis=1, out=right, mode="clip")
        top, bottom, tmp = self.f
        # copyto casts without the scratch buffer a mixed-dtype ufunc would allocate per call.
        for out, left, right in ((top, c00, c01), (bottom, c10, c11)):
            np.copyto(out, left)
            np.copyto(tmp, right)
            np.subtract(tmp, out, out=tmp)
            np.multiply(tmp, self.wx, out=tmp)
            np.add(out, tmp, out=out)
        np.subtract(bottom, top, out=bottom)
        np.multiply(bottom, self.wy, out=bottom)
        np.add(top, bottom, out=top)
        np.rint(top, out=top)
        np.copyto(self.region, top, casting="unsafe")  # blends of 0..255 stay within 0..255
        return self.region


def resize_frame(image: np.ndarray, height: int, width: int, *, letterbox: bool = False,
                 bilinear: bool = False) -> np.ndarray:
    """One frame resampled exactly as the stage would (without padding), as a new array.

    For tools (calibration, evaluation) that must feed a model what the device feeds it; the
    stage itself keeps its plans and buffers.
    """
    plan = _Plan(image.shape[0], image.shape[1], height, width, letterbox, bilinear, np.dtype(np.uint8),
                 gather=False)
    return np.array(plan.resample(image), copy=True)


def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (pos - i0).astype(np.float32)


class Preprocessor:
    """Turns RGB uint8 frames of any size into the model's input tensor, in place.

    Resampling is `resize = "nearest"` (default, cheapest) or `"bilinear"` (what most training
    pipelines used; a few float passes over the rows kept). A frame already at the model's size
    is not resampled at all. `letterbox = true` keeps the aspect ratio and pads with pixel value
    `pad` (default 0); false stretches the frame to the input size.

    Normalisation comes from the manifest's `[input]` table: `range = [lo, hi]` maps pixel
    0..255 linearly to lo..hi; `mean`/`std` (scalars or per channel) compute (pixel - mean) /
    std; with neither, an integer input receives raw pixel values. The real value is then
    quantised with the tensor's own scale and zero point.
    """

    MAX_PLANS = 4  # frame sizes remembered; a camera rarely switches between more

    def __init__(self, model: Model, entry: ModelEntry, input_index: int = 0) -> None:
        spec = model.inputs[input_index]
        if len(spec.shape) != 4 or spec.shape[0] != 1 or spec.shape[3] != 3:
            raise ModelError(f"{entry.path.name}: input {spec.name!r} has shape {spec.shape}; "
                             "the vision stage needs [1, height, width, 3]")
        self.model = model
        self.index = input_index
        self.height, self.width = spec.shape[1], spec.shape[2]
        cfg = entry.input
        letterbox = cfg.get("letterbox", False)
        if not isinstance(letterbox, bool):
            raise ModelError(f"{_where(entry, 'input')}.letterbox: expected true or false, got {letterbox!r}")
        self.letterbox = letterbox
        resize = cfg.get("resize", "nearest")
        if resize not in ("nearest", "bilinear"):
            raise ModelError(f"{_where(entry, 'input')}.resize: expected \"nearest\" or "
                             f"\"bilinear\", got {resize!r}")
        self.bilinear = resize == "bilinear"
        pad = _num(entry, cfg, "input", "pad", 0, lo=0, hi=255)
        self._lut, affine = _input_lut(entry, spec)
        self._map = PixelMap(self._lut, spec.dtype, affine)
        self._offsets = np.array([0, 256, 512], np.intp)
        self._pad_values = self._lut[self._offsets + int(pad)]
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._scratch: dict[tuple[int, int], dict] = {}  # per region size, shared by plans
        self._painted: _Plan | None = None

    def plan(self, frame_h: int, frame_w: int) -> _Plan:
        key = (frame_h, frame_w)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = _Plan(frame_h, frame_w, self.height, self.width, self.letterbox, self.bilinear,
                         self.model.inputs[self.index].dtype, gather=self._map.kind == "gather",
                         scratch=self._scratch.setdefault(self._region_size(frame_h, frame_w), {}))
            self._plans[key] = plan
        return plan

    def __call__(self, image: np.ndarray) -> Letterbox:
        """Fill and commit the model input from `image`; return where the frame landed."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"vision: expected an RGB uint8 image of shape (H, W, 3), "
                             f"got shape {image.shape} dtype {image.dtype}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"vision: empty image of shape {image.shape}")
        plan = self.plan(image.shape[0], image.shape[1])
        buf = self.model.input_buffer(self.index)[0]
        if plan is not self._painted:
            if not plan.full:
                buf[...] = self._pad_values
            self._painted = plan
        pixels = plan.resample(image)
        b = plan.box
        dst = buf if plan.full else buf[b.top:b.top + b.height, b.left:b.left + b.width]
        if self._map.kind == "gather":
            np.copyto(plan.idx_low, pixels)
            if plan.full:
                np.take(self._lut, plan.idx, out=buf, mode="clip")
            else:
                np.take(self._lut, plan.idx, out=plan.values, mode="clip")
                dst[...] = plan.values
        else:
            self._map(pixels, dst, plan.mask)
        self.model.commit_input(self.index)
        return plan.box

    def _region_size(self, frame_h: int, frame_w: int) -> tuple[int, int]:
        if not self.letterbox:
            return self.height, self.width
        s = min(self.height / frame_h, self.width / frame_w)
        return (min(self.height, max(1, round(frame_h * s))), min(self.width, max(1, round(frame_w * s))))


def _input_lut(entry: ModelEntry, spec: TensorSpec) -> tuple[np.ndarray, tuple | None]:
    """Pixel value → model input value, for each channel: shape (3*256,), channel-major; and the
    affine map it comes from, (form, a, b) per channel, when there is one (see PixelMap)."""
    cfg = entry.input
    pixels = np.arange(256, dtype=np.float64)
    if "range" in cfg:
        rng = cfg["range"]
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
            raise ModelError(f"{_where(entry, 'input')}.range: expected [low, high], got {rng!r}")
        lo, hi = float(rng[0]), float(rng[1])
        real = np.tile(lo + pixels * ((hi - lo) / 255.0), 3)
        affine = ("scale", np.full(3, (hi - lo) / 255.0), np.full(3, lo))
    elif "mean" in cfg or "std" in cfg:
        mean = _per_channel(entry, "mean", cfg.get("mean", 0.0))
        std = _per_channel(entry, "std", cfg.get("std", 1.0))
        if np.any(std == 0):
            raise ModelError(f"{_where(entry, 'input')}.std: must not be 0")
        real = ((pixels[None, :] - mean[:, None]) / std[:, None]).reshape(-1)
        affine = ("standardise", mean, std)
    elif spec.dtype == np.uint8:
        return np.tile(pixels, 3).astype(np.uint8), None
    else:
        raise ModelError(f"{_where(entry, 'input')}: a {spec.dtype} input needs `range` or `mean`/`std`")
    if spec.quantized:
        info = np.iinfo(spec.dtype)
        q = np.rint(real / spec.scale + spec.zero_point)
        return np.clip(q, info.min, info.max).astype(spec.dtype), None
    if np.issubdtype(spec.dtype, np.integer):
        raise ModelError(f"{entry.path.name}: integer input {spec.name!r} has no quantisation "
                         "parameters; remove `range`/`mean`/`std` from its [input] table")
    return real.astype(spec.dtype), affine


class PixelMap:
    """Applies the 256-entry lookup table (pixel → model input value) to a whole region, by the
    cheapest numpy route that gives exactly the table's values. Each route is checked against
    the table for all 256 pixel values when the map is built; a route that differs anywhere is
    not used.

    - `steps`, for 1-byte inputs (uint8, or int8 viewed as its bytes): the table minus the pixel
      value, modulo 256, is constant except for a few steps (a quantisation whose scale is close
      to one code per pixel value: `p`, `p - 128`, `p - (p >= 128)`...). One wrapping add, then a
      compare and an add per step, on bytes: a few times faster than a gather through 8-byte
      indices, and no index buffer.
    - `affine`, for float inputs from `range` or scalar `mean`/`std`: a cast copy and two
      in-place float ops with scalars.
    - `gather`: np.take through the table (anything else: per-channel tables, wide integers).
    """

    MAX_STEPS = 3

    def __init__(self, lut: np.ndarray, dtype: np.dtype, affine: tuple | None) -> None:
        self.dtype = np.dtype(dtype)
        self.kind = "gather"
        self.base = 0
        self.steps: list[tuple[np.uint8, int]] = []
        self.ops: tuple = ()
        tables = lut.reshape(3, 256)
        same = bool((tables == tables[0]).all())
        if same and self.dtype.itemsize == 1:
            d = (tables[0].view(np.uint8).astype(np.int16) - np.arange(256)) % 256
            jumps = np.flatnonzero(np.diff(d)) + 1
            if len(jumps) <= self.MAX_STEPS:
                self.kind = "steps"
                self.base = int(d[0])
                self.steps = [(np.uint8(p), int((d[p] - d[p - 1]) % 256)) for p in jumps]
        elif same and self.dtype.kind == "f" and affine is not None:
            # Scalar forms of the map, tried in turn; the first that reproduces the table wins.
            # A range lo..hi is also (p - c) / s with s = 255 / (hi - lo), c = -lo * s, which
            # rounds like the table's float64 values more often than p * step + lo does.
            kind, a, b = affine
            if np.all(a == a[0]) and np.all(b == b[0]):
                a, b = float(a[0]), float(b[0])
                if kind == "scale":
                    s = 1.0 / a
                    candidates = [(np.subtract, -b * s, np.divide, s), (np.multiply, a, np.add, b)]
                else:
                    candidates = [(np.subtract, a, np.divide, b), (np.multiply, 1.0 / b, np.add, -a / b)]
                t = self.dtype.type
                for op1, x, op2, y in candidates:
                    self.kind, self.ops = "affine", (op1, t(x), op2, t(y))
                    if self._reproduces(lut):
                        break
                    self.kind = "gather"
        if self.kind == "steps" and not self._reproduces(lut):
            self.kind = "gather"

    def _reproduces(self, lut: np.ndarray) -> bool:
        probe = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3)
        out = np.empty(probe.shape, self.dtype)
        self(probe, out, np.empty(probe.shape, np.bool_))
        return np.array_equal(out.reshape(256, 3).T.reshape(-1), lut)

    def __call__(self, pixels: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
        """Map uint8 `pixels` into `out` (same shape, the model's dtype; may be a strided view
        into the input tensor). `mask` is a bool scratch array of the same shape."""
        if self.kind == "steps":
            raw = out.view(np.uint8)
            if self.base:
                np.add(pixels, np.uint8(self.base), out=raw)  # uint8 arithmetic wraps: mod 256
            else:
                np.copyto(raw, pixels)
            m8 = mask.view(np.uint8)
            for threshold, delta in self.steps:
                np.greater_equal(pixels, threshold, out=mask)
                if delta == 1:
                    np.add(raw, m8, out=raw)
                elif delta == 255:
                    np.subtract(raw, m8, out=raw)
                else:
                    np.multiply(m8, np.uint8(delta), out=m8)
                    np.add(raw, m8, out=raw)
        elif self.kind == "affine":
            op1, a, op2, b = self.ops
            np.copyto(out, pixels)  # the cast copy needs no scratch buffer, unlike a mixed ufunc
            op1(out, a, out=out)
            op2(out, b, out=out)
        else:
            raise RuntimeError("PixelMap: the gather route is run by the Preprocessor")


# --------------------------------------------------------------------------- shared decoding

def ssd_anchors(*, input_size: Sequence[int], strides: Sequence[int], min_scale: float,
                max_scale: float, aspect_ratios: Sequence[float] = (1.0,), offset: float = 0.5,
                interpolated_scale_aspect_ratio: float = 1.0,
                reduce_boxes_in_lowest_layer: bool = False, fixed_anchor_size: bool = False,
                feature_map_sizes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """SSD anchor boxes as (N, 4) float32 [cx, cy, w, h], normalised to the input.

    Scales grow linearly from `min_scale` to `max_scale` over the layers; each layer adds one
    anchor per aspect ratio plus, if `interpolated_scale_aspect_ratio` > 0, one at the geometric
    mean of its scale and the next layer's. Consecutive layers with the same stride share one
    feature map (their anchors interleave per cell), the grouping MediaPipe uses for BlazeFace.
    Anchor order: layer, row, column, anchor-in-cell.
    """
    in_h, in_w = int(input_size[0]), int(input_size[1])
    n = len(strides)

    def scale_at(i: int) -> float:
        return (min_scale + max_scale) / 2 if n == 1 else min_scale + (max_scale - min_scale) * i / (n - 1)

    out = []
    layer = 0
    while layer < n:
        scales, ratios = [], []
        last = layer
        while last < n and strides[last] == strides[layer]:
            s = scale_at(last)
            if last == 0 and reduce_boxes_in_lowest_layer:
                scales += [0.1, s, s]
                ratios += [1.0, 2.0, 0.5]
            else:
                for ar in aspect_ratios:
                    scales.append(s)
                    ratios.append(float(ar))
                if interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == n - 1 else scale_at(last + 1)
                    scales.append(math.sqrt(s * nxt))
                    ratios.append(float(interpolated_scale_aspect_ratio))
            last += 1
        sq = np.sqrt(np.asarray(ratios))
        heights = np.asarray(scales) / sq
        widths = np.asarray(scales) * sq
        if feature_map_sizes is not None:
            fh, fw = (int(v) for v in feature_map_sizes[layer])
        else:
            fh, fw = math.ceil(in_h / strides[layer]), math.ceil(in_w / strides[layer])
        cy, cx = np.meshgrid((np.arange(fh) + offset) / fh, (np.arange(fw) + offset) / fw, indexing="ij")
        k = len(scales)
        a = np.empty((fh, fw, k, 4), np.float32)
        a[..., 0] = cx[..., None]
        a[..., 1] = cy[..., None]
        if fixed_anchor_size:
            a[..., 2:] = 1.0
        else:
            a[..., 2] = widths
            a[..., 3] = heights
        out.append(a.reshape(-1, 4))
        layer = last
    return np.concatenate(out)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_one(box: np.ndarray, boxes: np.ndarray, areas: np.ndarray | None = None) -> np.ndarray:
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    # np.maximum, not np.clip: the same result without clip's Python-level dispatch.
    inter = np.maximum(ix1 - ix0, 0) * np.maximum(iy1 - iy0, 0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (_areas(boxes) if areas is None else areas) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_out: int, *,
        weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Non-maximum suppression over [x0, y0, x1, y1] boxes; returns (boxes, scores) kept.

    Weighted NMS (BlazeFace's tie resolution) replaces each kept box by the score-weighted mean
    of the boxes it suppresses, which steadies boxes between frames; the score stays the best one.
    The loop runs once per kept detection, never per anchor.
    """
    if len(scores) == 0 or max_out < 1:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    if len(scores) == 1:  # the common case of one object in view: nothing to suppress
        return np.asarray(boxes, np.float32).reshape(1, 4), np.asarray(scores, np.float32).reshape(1)
    order = np.argsort(-scores, kind="stable")
    boxes, scores = boxes[order], scores[order]
    areas = _areas(boxes)
    kept_b, kept_s = [], []
    alive = np.ones(len(scores), bool)
    while len(kept_s) < max_out:
        live = np.flatnonzero(alive)
        if live.size == 0:
            break
        i = live[0]  # the best box still alive
        group = (_iou_one(boxes[i], boxes, areas) > iou) & alive
        group[i] = True
        if weighted:
            w = scores[group]
            kept_b.append((boxes[group] * w[:, None]).sum(axis=0) / w.sum())
        else:
            kept_b.append(boxes[i])
        kept_s.append(scores[i])
        alive &= ~group
    return np.asarray(kept_b, np.float32), np.asarray(kept_s, np.float32)


# Up to this many candidate boxes, decoding runs on Python floats instead of numpy: right after
# an invoke every numpy call starts from cold caches and costs 5-15 µs however small its arrays,
# while a Python float operation stays well under one. A person in view gives a handful of
# candidates; only crowded scenes take the numpy route.
FEW = 32


def _iou_py(a: Sequence[float], b: Sequence[float]) -> float:
    """`_iou_one` for two boxes, on Python floats."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms_few(cands: list[tuple[float, tuple[float, float, float, float]]], iou: float, max_out: int, *,
            weighted: bool = False) -> list[tuple[float, tuple[float, float, float, float]]]:
    """`nms` for a few (score, box) candidates on Python floats; kept (score, box), best first."""
    cands = sorted(cands, key=lambda c: -c[0])  # stable, as nms's argsort
    alive = [True] * len(cands)
    kept = []
    for i, (score, box) in enumerate(cands):
        if len(kept) >= max_out:
            break
        if not alive[i]:
            continue
        group = [j for j in range(i, len(cands)) if alive[j] and (j == i or _iou_py(box, cands[j][1]) > iou)]
        for j in group:
            alive[j] = False
        if weighted and len(group) > 1:
            total = sum(cands[j][0] for j in group)
            box = tuple(sum(cands[j][0] * cands[j][1][k] for j in group) / total for k in range(4))
        kept.append((score, box))
    return kept


def _sigmoid_py(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= -700.0 else 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    """Score threshold as a logit: comparing raw logits leaves exp() to the few candidates."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class Decoded:
    """Detections in model-input coordinates, best first, as Python values: boxes
    (x0, y0, x1, y1), scores and label ids. There are few, and the stage turns each into an
    object with Python code; lists spare it a numpy call per field."""

    boxes: list[tuple[float, float, float, float]]
    scores: list[float]
    classes: list[int]

    @classmethod
    def empty(cls) -> "Decoded":
        return cls([], [], [])

    @classmethod
    def from_arrays(cls, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> "Decoded":
        return cls([tuple(b) for b in boxes.tolist()], scores.tolist(), [int(c) for c in classes.tolist()])


class Decoder:
    """Base of the decoder plugins: built once from the model's output specs and the manifest.

    `decode(outputs, threshold)` receives the model's outputs as float32 arrays in the model's
    output order; it never sees the interpreter, so tests can feed it arrays of the right shape.
    """

    name = ""

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        self.entry = entry
        self.params = entry.params
        self.outputs = tuple(outputs)
        self.input_hw = input_hw
        self.labels = _label_map(entry)
        self.score_threshold = _num(entry, self.params, "params", "score_threshold", 0.5, lo=0.0, hi=1.0)
        self.max_detections = int(_num(entry, self.params, "params", "max_detections", 20, lo=1, hi=1000))

    def label(self, class_id: int) -> str | None:
        return self.labels.get(int(class_id))

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        raise NotImplementedError

    def decode_model(self, model: Model, threshold: float) -> Decoded:
        """`decode` on the model's current outputs. A decoder may override this to read the
        outputs as stored (e.g. int8) and dequantise only what it needs."""
        return self.decode([model.output(i) for i in range(len(model.outputs))], threshold)

    def _output(self, key: str, default_name: str, pick: Callable[[TensorSpec], bool]) -> int:
        """Index of an output: by the name in params[key], else the one spec `pick` accepts."""
        name = self.params.get(key)
        if name is not None:
            for i, t in enumerate(self.outputs):
                if t.name == name:
                    return i
            raise ModelError(f"{_where(self.entry, 'params')}.{key}: model has no output named {name!r} "
                             f"(outputs: {', '.join(t.name for t in self.outputs)})")
        hits = [i for i, t in enumerate(self.outputs) if pick(t)]
        if len(hits) != 1:
            raise ModelError(f"{self.entry.path.name}: cannot tell which output holds the {default_name}; "
                             f"set models.{self.entry.name}.params.{key} to one of "
                             f"{', '.join(t.name for t in self.outputs)}")
        return hits[0]


_NUMBERED = re.compile(r"^(\d+)[\s:]+(.+)$")


def _label_map(entry: ModelEntry) -> dict[int, str]:
    """Label id → plain lowercase label. Accepts `name` per line or `id name` (Coral's files)."""
    numbered = [_NUMBERED.match(ln) for ln in entry.labels]
    if entry.labels and all(numbered):
        pairs = [(int(m.group(1)), m.group(2).strip().lower()) for m in numbered]
    else:
        pairs = [(i, ln.strip().lower()) for i, ln in enumerate(entry.labels)]
    # "n/a" (and "???") mark ids a dataset does not use (COCO has ten): no label, so no object.
    return {i: lb for i, lb in pairs if lb not in ("n/a", "???")}


class BlazeFaceDecoder(Decoder):
    """BlazeFace: 896 anchors, 16 regressors per anchor (box centre/size, then 6 keypoints)."""

    name = "blazeface"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        p = self.params
        self._boxes = self._output("boxes_output", "box regressors",
                                   lambda t: len(t.shape) == 3 and t.shape[-1] >= 4)
        self._scores = self._output("scores_output", "scores",
                                    lambda t: len(t.shape) == 3 and t.shape[-1] == 1)
        a = p.get("anchors")
        if not isinstance(a, dict):
            raise ModelError(f"{_where(entry, 'params')}.anchors: missing table of SSD anchor options")
        try:
            self.anchors = ssd_anchors(input_size=input_hw, **a)
        except TypeError as exc:
            raise ModelError(f"{_where(entry, 'params')}.anchors: {exc}") from None
        n = self.outputs[self._boxes].shape[1]
        if len(self.anchors) != n:
            raise ModelError(f"{_where(entry, 'params')}.anchors: generate {len(self.anchors)} anchors, "
                             f"the model has {n}")
        h, w = input_hw
        self.box_scale = _per4(entry, "box_scale", p.get("box_scale", [w, h, w, h]))
        self._scale = tuple(self.box_scale.tolist())
        self.score_clip = _num(entry, p, "params", "score_clip", 100.0, lo=0.0)
        self.nms_iou = _num(entry, p, "params", "nms_iou", 0.3, lo=0.0, hi=1.0)
        nms_kind = p.get("nms", "weighted")
        if nms_kind not in ("weighted", "hard"):
            raise ModelError(f"{_where(entry, 'params')}.nms: expected \"weighted\" or \"hard\", "
                             f"got {nms_kind!r}")
        self.weighted = nms_kind == "weighted"

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        raw = outputs[self._boxes].reshape(-1, outputs[self._boxes].shape[-1])
        logits = outputs[self._scores].reshape(-1)
        limit = _logit(threshold)
        hit = np.flatnonzero(logits >= limit)
        if hit.size == 0:
            return Decoded.empty()
        if hit.size <= FEW:
            return self._decode_few(raw[hit, :4].tolist(), logits[hit].tolist(), self.anchors[hit].tolist())
        a = self.anchors[hit]
        r = raw[hit, :4] / self.box_scale
        cx = r[:, 0] * a[:, 2] + a[:, 0]
        cy = r[:, 1] * a[:, 3] + a[:, 1]
        w = r[:, 2] * a[:, 2]
        h = r[:, 3] * a[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = _sigmoid(np.clip(logits[hit], -self.score_clip, self.score_clip)).astype(np.float32)
        boxes, scores = nms(boxes, scores, self.nms_iou, self.max_detections, weighted=self.weighted)
        return Decoded.from_arrays(boxes, scores, np.zeros(len(scores), np.intp))

    def _decode_few(self, raw: list, logits: list, anchors: list) -> Decoded:
        """`decode` for a few candidates, on Python floats (see FEW)."""
        sx, sy, sw, sh = self._scale
        clip = self.score_clip
        cands = []
        for (rx, ry, rw, rh), z, (ax, ay, aw, ah) in zip(raw, logits, anchors):
            cx, cy = rx / sx * aw + ax, ry / sy * ah + ay
            w, h = rw / sw * aw, rh / sh * ah
            cands.append((_sigmoid_py(min(max(z, -clip), clip)), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        kept = nms_few(cands, self.nms_iou, self.max_detections, weighted=self.weighted)
        return Decoded([b for _, b in kept], [sc for sc, _ in kept], [0] * len(kept))


def _per4(entry: ModelEntry, key: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 4)
    if arr.size != 4 or np.any(arr == 0):
        raise ModelError(f"{_where(entry, 'params')}.{key}: expected 1 or 4 non-zero numbers, got {value!r}")
    return arr


class SsdDecoder(Decoder):
    """TF Object Detection API SSD heads: box encodings [ty, tx, th, tw] and class logits.

    Anchors ([ycenter, xcenter, h, w] per row, as the API stores them) come from the `.npy`
    file named by `params.anchors_file`, relative to the model. Column 0..`background_classes`-1
    of the logits is background; the next column is label 0.
    """

    name = "ssd"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        p = self.params
        self._boxes = self._output("boxes_output", "box encodings", lambda t: t.shape[-1] == 4)
        self._scores = self._output("scores_output", "class logits", lambda t: t.shape[-1] != 4)
        fname = p.get("anchors_file")
        if not isinstance(fname, str):
            raise ModelError(f"{_where(entry, 'params')}.anchors_file: missing (a .npy beside the model)")
        path = entry.path.parent / fname
        try:
            anchors = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read anchors: {exc}") from None
        n = self.outputs[self._boxes].shape[-2]
        if anchors.shape != (n, 4):
            raise ModelError(f"{path}: anchors have shape {anchors.shape}, the model needs ({n}, 4)")
        self.anchors = anchors.astype(np.float32)
        self.box_scale = _per4(entry, "box_scale", p.get("box_scale", [10.0, 10.0, 5.0, 5.0]))
        self._scale = tuple(self.box_scale.tolist())
        self.background = int(_num(entry, p, "params", "background_classes", 1, lo=0, hi=10))
        self.nms_iou = _num(entry, p, "params", "nms_iou", 0.6, lo=0.0, hi=1.0)
        self._bounds: dict[float, int | None] = {}  # score threshold → lowest stored code to look at

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        enc = outputs[self._boxes].reshape(-1, 4)
        logits = outputs[self._scores].reshape(len(enc), -1)[:, self.background:]
        return self._decode(enc, logits, self.anchors, threshold)

    def decode_model(self, model: Model, threshold: float) -> Decoded:
        """For int8 outputs: find the anchors whose stored score codes can reach the threshold,
        and dequantise only their rows (as `Model.output` would), instead of all of them. Most
        frames show nobody: then one max() over the stored scores settles it. (Right after an
        invoke every numpy call runs from cold caches, so fewer calls is what counts.)"""
        bound = self._raw_bound(threshold)
        if bound is None:
            return super().decode_model(model, threshold)
        raw = model.raw_output(self._scores)
        raw = raw.reshape(-1, raw.shape[-1])[:, self.background:]
        if raw.max() < bound:
            return Decoded.empty()
        anchor_i, class_i = np.nonzero(raw >= bound)
        if anchor_i.size <= FEW:
            logits = _dequantize(raw[anchor_i, class_i], self.outputs[self._scores])
            enc = _dequantize(model.raw_output(self._boxes).reshape(-1, 4)[anchor_i], self.outputs[self._boxes])
            return self._decode_few(enc.tolist(), logits.tolist(), self.anchors[anchor_i].tolist(),
                                    class_i.tolist(), _logit(threshold))
        rows = np.unique(anchor_i)
        logits = _dequantize(raw[rows], self.outputs[self._scores])
        enc = model.raw_output(self._boxes)
        enc = _dequantize(enc.reshape(-1, 4)[rows], self.outputs[self._boxes])
        return self._decode(enc, logits, self.anchors[rows], threshold)

    def _raw_bound(self, threshold: float) -> int | None:
        """The lowest stored score code that may dequantise to at least the threshold's logit;
        None when the outputs are not int8 with a usable scale (then the float path runs)."""
        bounds = self._bounds
        if threshold not in bounds:
            boxes_spec, scores_spec = self.outputs[self._boxes], self.outputs[self._scores]
            limit = _logit(threshold)
            bound = None
            if boxes_spec.quantized and scores_spec.quantized and scores_spec.scale > 0 and math.isfinite(limit):
                info = np.iinfo(scores_spec.dtype)
                # One code below the exact bound: float rounding may not cut where real arithmetic
                # does; the float comparison in _decode then decides, as on the full outputs.
                bound = math.floor(scores_spec.zero_point + limit / scores_spec.scale) - 1
                bound = min(max(bound, int(info.min)), int(info.max) + 1)
            bounds[threshold] = bound
        return bounds[threshold]

    def _decode(self, enc: np.ndarray, logits: np.ndarray, anchors: np.ndarray, threshold: float) -> Decoded:
        limit = _logit(threshold)
        anchor_i, class_i = np.nonzero(logits >= limit)
        if anchor_i.size == 0:
            return Decoded.empty()
        if anchor_i.size <= FEW:
            return self._decode_few(enc[anchor_i].tolist(), logits[anchor_i, class_i].tolist(),
                                    anchors[anchor_i].tolist(), class_i.tolist(), limit)
        a = anchors[anchor_i]
        t = enc[anchor_i] / self.box_scale
        cy = t[:, 0] * a[:, 2] + a[:, 0]
        cx = t[:, 1] * a[:, 3] + a[:, 1]
        h = np.exp(t[:, 2]) * a[:, 2]
        w = np.exp(t[:, 3]) * a[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores = _sigmoid(logits[anchor_i, class_i]).astype(np.float32)
        out_b, out_s, out_c = [], [], []
        for c in np.unique(class_i):
            sel = class_i == c
            b, s = nms(boxes[sel], scores[sel], self.nms_iou, self.max_detections)
            out_b.append(b)
            out_s.append(s)
            out_c.append(np.full(len(s), c, np.intp))
        return _top(np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_c), self.max_detections)

    def _decode_few(self, enc: list, logits: list, anchors: list, classes: list, limit: float) -> Decoded:
        """`_decode` for a few candidates (logit `limit` and up), on Python floats (see FEW)."""
        sy, sx, sh, sw = self._scale
        by_class: dict[int, list] = {}
        for (ty, tx, th, tw), z, (ay, ax, ah, aw), c in zip(enc, logits, anchors, classes):
            if z < limit:
                continue
            cy, cx = ty / sy * ah + ay, tx / sx * aw + ax
            h, w = math.exp(th / sh) * ah, math.exp(tw / sw) * aw
            by_class.setdefault(c, []).append((_sigmoid_py(z), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        kept = [(sc, c, b) for c in sorted(by_class)
                for sc, b in nms_few(by_class[c], self.nms_iou, self.max_detections)]
        kept.sort(key=lambda k: -k[0])  # stable: ties stay in class order, as in _top
        kept = kept[:self.max_detections]
        return Decoded([b for _, _, b in kept], [sc for sc, _, _ in kept], [c for _, c, _ in kept])


def _dequantize(raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Stored codes → float32, computed as `Model.output` does (so results match it exactly)."""
    out = np.subtract(raw, spec.zero_point, dtype=np.float32)
    out *= spec.scale
    return out


def _top(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, k: int) -> Decoded:
    order = np.argsort(-scores, kind="stable")[:k]
    return Decoded.from_arrays(boxes[order], scores[order], classes[order])


class PostprocessDecoder(Decoder):
    """Models ending in TFLite_Detection_PostProcess: boxes [1, N, 4] as ymin, xmin, ymax, xmax,
    classes [1, N], scores [1, N], count [1]. The op already ran NMS; this keeps the first
    `count` rows above the threshold and adds `params.label_offset` to class ids."""

    name = "tflite_detection_postprocess"

    def __init__(self, entry: ModelEntry, outputs: Sequence[TensorSpec], input_hw: tuple[int, int]):
        super().__init__(entry, outputs, input_hw)
        if len(self.outputs) != 4:
            raise ModelError(f"{entry.path.name}: decoder {self.name!r} needs 4 outputs "
                             f"(boxes, classes, scores, count), the model has {len(self.outputs)}")
        # The op's documented output order; names differ between converter versions.
        order = self.params.get("output_order", ["boxes", "classes", "scores", "count"])
        if sorted(order) != ["boxes", "classes", "count", "scores"]:
            raise ModelError(f"{_where(entry, 'params')}.output_order: expected a permutation of "
                             f"boxes, classes, scores, count, got {order!r}")
        self._i = {k: order.index(k) for k in order}
        self.label_offset = int(_num(entry, self.params, "params", "label_offset", 0, lo=-10, hi=10))

    def decode(self, outputs: Sequence[np.ndarray], threshold: float) -> Decoded:
        boxes = outputs[self._i["boxes"]].reshape(-1, 4)
        classes = outputs[self._i["classes"]].reshape(-1)
        scores = outputs[self._i["scores"]].reshape(-1)
        count = int(np.clip(outputs[self._i["count"]].reshape(-1)[0], 0, len(scores)))
        keep = np.flatnonzero(scores[:count] >= threshold)[: self.max_detections]
        b = boxes[keep][:, [1, 0, 3, 2]].astype(np.float32)
        return Decoded.from_arrays(b, scores[keep].astype(np.float32),
                                   np.rint(classes[keep]).astype(np.intp) + self.label_offset)


DECODERS: dict[str, type[Decoder]] = {
    d.name: d for d in (BlazeFaceDecoder, SsdDecoder, PostprocessDecoder)
}


# --------------------------------------------------------------------------- the stage

class VisionStage:
    """Runs one detector on frames: preprocess → invoke → decode → frame-normalised objects.

    Owns its `Model` (call from one thread). Results are fresh tuples; all intermediate arrays
    are reused between calls.
    """

    def __init__(self, model: Model, entry: ModelEntry, *, score_threshold: float | None = None) -> None:
        if entry.task != "vision":
            raise ModelError(f"{_where(entry, 'task')}: the vision stage needs a vision model, "
                             f"got {entry.task!r}")
        cls = DECODERS.get(entry.decoder)
        if cls is None:
            raise ModelError(f"{_where(entry, 'decoder')}: unknown decoder {entry.decoder!r} "
                             f"(known: {', '.join(sorted(DECODERS))})")
        self.model = model
        self.entry = entry
        self.preprocess = Preprocessor(model, entry)
        self.decoder = cls(entry, model.outputs, (self.preprocess.height, self.preprocess.width))
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"vision: score_threshold must be within 0..1, got {score_threshold}")
        self.score_threshold = (self.decoder.score_threshold if score_threshold is None
                                else float(score_threshold))
        self.last_inference_ms = 0.0

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.decoder.labels.values())

    def detect(self, image: np.ndarray) -> tuple[DetectedObject, ...]:
        """Objects in an RGB uint8 (H, W, 3) image, boxes normalised to that image, best first."""
        box = self.preprocess(image)
        t0 = time.perf_counter()
        self.model.invoke()
        self.last_inference_ms = (time.perf_counter() - t0) * 1000.0
        dec = self.decoder.decode_model(self.model, self.score_threshold)
        if not dec.scores:
            return ()
        mh, mw = self.preprocess.height, self.preprocess.width
        objs = []
        for model_box, s, c in zip(dec.boxes, dec.scores, dec.classes):
            b = box.to_frame(model_box, mh, mw)
            label = self.decoder.label(c)
            # Degenerate after clipping means the box lay in the letterbox padding only.
            if label is None or b[2] <= b[0] or b[3] <= b[1]:
                continue
            objs.append(DetectedObject(label, float(s), (b[0], b[1], b[2], b[3])))
        return tuple(objs)

    def process(self, frame: Frame) -> Detections:
        """`detect` on a camera frame, wrapped with its capture time and the inference time."""
        objects = self.detect(frame.image)
        return Detections(ts=frame.ts, objects=objects, inference_ms=self.last_inference_ms)
