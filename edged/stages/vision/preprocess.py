"""Frame → model input: letterbox or stretch, nearest or bilinear resampling through precomputed
index maps (bilinear in integer fixed point), normalisation and quantisation through a 256-entry
lookup table, all into buffers reused from frame to frame. A region of a frame (a tile, a crop) is
read in place of the frame, without a copy.

Two implementations give the same bytes: the compiled resampler (`_resample.c` through
`edged.stages.vision.native`), which resamples and applies the table in one pass and reads any
strided view (a region, a turned frame) where it lies; and the numpy code below, which runs when
the library was not built or `EDGED_RESAMPLER=numpy` is set."""

from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edged.models import ModelEntry, ModelError
from edged.runtime import Model, TensorSpec
from edged.stages.vision import native
from edged.stages.vision.entry import number, per_channel, where


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


class Scratch:
    """A stage's work buffers, by name: flat arrays grown to the largest size asked for and never
    shrunk, handed out as a prefix in the shape asked for. All plans of a stage draw on the same
    ones (a stage handles one image at a time), so crops of ever-changing sizes reuse them instead
    of keeping buffers of their own for every size they ever had."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._owner: dict[str, object] = {}
        self._at: dict[str, int] = {}

    def get(self, name: str, dtype, shape: tuple[int, ...], init=None) -> np.ndarray:
        """`init(flat)` fills a newly made buffer (it must not depend on the shape asked for)."""
        n = math.prod(shape)
        buf = self._buffer(name, dtype, n, init)
        return buf[:n].reshape(shape)

    def _buffer(self, name: str, dtype, n: int, init=None) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = self._bufs[name] = np.zeros(n, dtype)
            self._at[name] = native.address(buf)
            self._owner.pop(name, None)
            if init is not None:
                init(buf)
        return buf

    def at(self, name: str, dtype, n: int) -> int:
        """The address of buffer `name` (made or grown to `n` items as `get` would): where a
        prefix `get` hands out starts, for the compiled resampler."""
        self._buffer(name, dtype, n)
        return self._at[name]

    def held(self, name: str, dtype, shape: tuple[int, ...], owner: object, fill) -> np.ndarray:
        """Buffer `name` as `get` gives it, holding what `fill(array)` writes for `owner`: filled
        only when another owner (or nobody) filled it last."""
        out = self.get(name, dtype, shape)
        if self._owner.get(name) is not owner:
            fill(out)
            self._owner[name] = owner
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())


def _preset_channels(idx: np.ndarray) -> None:
    """LUT indices are pixel + 256 * channel: preset the channel byte of every element (pixels
    are stored channel-last, so element k is channel k % 3); the pixel byte is written per frame."""
    b = idx.view(np.uint8).reshape(-1, idx.itemsize)
    b[:, _HIGH] = np.arange(len(b)) % 3


_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (np.dtype(np.intp).itemsize - 1, np.dtype(np.intp).itemsize - 2)


class _Plan:
    """Index maps for one frame size, built once and reused for every frame; the buffers they fill
    come from the stage's `Scratch` (a fresh one when none is given)."""

    def __init__(self, frame_h: int, frame_w: int, model_h: int, model_w: int, letterbox: bool,
                 bilinear: bool, in_dtype: np.dtype, *, gather: bool = True,
                 scratch: Scratch | None = None, resampler: str | None = None) -> None:
        if letterbox:
            s = min(model_h / frame_h, model_w / frame_w)
            rh = min(model_h, max(1, round(frame_h * s)))
            rw = min(model_w, max(1, round(frame_w * s)))
        else:
            rh, rw = model_h, model_w
        self.shape = (rh, rw, 3)
        self.in_dtype = in_dtype
        self.work = Scratch() if scratch is None else scratch
        self.box = Letterbox((model_h - rh) // 2, (model_w - rw) // 2, rh, rw)
        self.identity = (rh, rw) == (frame_h, frame_w)
        self.full = (rh, rw) == (model_h, model_w)
        self.bilinear = bilinear and not self.identity
        self.src = (frame_h, frame_w)
        self.gather = gather
        self._views: dict[str, np.ndarray] = {}
        self.lib = _library(resampler)
        if self.lib is not None:
            if not self.identity:
                self._compiled_taps(frame_h, frame_w, rh, rw)
            return
        if self.bilinear:
            # Half-pixel centres, as TF's ResizeBilinear and OpenCV's INTER_LINEAR sample: each
            # output pixel blends the 2x2 source pixels around its centre. In fixed point, in two
            # passes: down the columns first (8-bit weights, uint16; the rows are gathered by a
            # plain copy, and the pass runs on the region's own width), then along the rows
            # (16-bit weights, uint32), whose two gathers are the only per-element index lookups.
            # The result differs from an exact blend by less than one level before rounding, so
            # by at most 1 after it.
            y0, y1, wy = _taps(frame_h, rh)
            x0, x1, wx = _taps(frame_w, rw)
            self.y0, self.y1 = y0, y1
            c = np.tile(np.arange(3, dtype=np.intp), rw)
            self.x0 = np.repeat(x0 * 3, 3) + c   # element (pixel * 3 + channel) of a row
            self.x1 = np.repeat(x1 * 3, 3) + c
            # One weight per row and per column; spread to full size in the stage's work buffers
            # when used (numpy allocates a buffer per call for a broadcast ufunc operand, not for
            # a broadcast copy), so a plan keeps no table of its own.
            self.by = _fixed(wy, 256, np.uint16)[:, None]
            self.bx = np.repeat(_fixed(wx, 65536, np.uint32), 3)[None, :]
        elif not self.identity:
            # Pixel centres of the resampled grid mapped back to the nearest source pixel.
            self.rows = _nearest(frame_h, rh)
            self.cols = np.repeat(_nearest(frame_w, rw) * 3, 3) + np.tile(np.arange(3, dtype=np.intp), rw)

    def _compiled_taps(self, frame_h: int, frame_w: int, rh: int, rw: int) -> None:
        """The compiled resampler's taps, one int32 run each: source rows above and below each
        output row and the bottom row's weight, then source pixels left and right of each output
        pixel, and the right one's weight per value. The same numbers as the numpy code's index
        maps and weights (`reference_taps`), computed by the library in one call: a crop of a new
        size costs its plan every frame, and the numpy expressions took a dozen calls."""
        self.taps = np.empty(3 * rh + 5 * rw, np.int32)
        self.lib.edged_taps(frame_h, frame_w, rh, rw, int(self.bilinear), self.taps.ctypes.data)
        self._taps_at = self.taps.ctypes.data

    def _view(self, name: str, dtype, shape: tuple[int, ...], init=None) -> np.ndarray:
        """The stage's work buffer `name` in this plan's shape; the same view object while the
        buffer underneath stays the same."""
        got = self.work.get(name, dtype, shape, init)
        cached = self._views.get(name)
        if cached is not None and cached.base is got.base and cached.shape == got.shape:
            return cached
        self._views[name] = got
        return got

    @property
    def region(self) -> np.ndarray | None:
        return None if self.identity else self._view("region", np.uint8, self.shape)

    @property
    def region_at(self) -> int:
        """The address of `region` (the start of the stage's "region" work buffer)."""
        return self.work.at("region", np.uint8, math.prod(self.shape))

    @property
    def mask(self) -> np.ndarray:
        return self._view("mask", np.bool_, self.shape)

    @property
    def idx(self) -> np.ndarray | None:
        # np.take wants intp indices; writing the pixel into the low byte of a buffer whose
        # channel byte is preset is a plain uint8 copy: no per-call cast, no conversion array.
        return self._view("idx", np.intp, self.shape, _preset_channels) if self.gather else None

    @property
    def idx_low(self) -> np.ndarray | None:
        idx = self.idx
        if idx is None:
            return None
        low = self._views.get("idx_low")
        if low is None or low.base is not idx.base:
            low = self._views["idx_low"] = idx.view(np.uint8).reshape(*self.shape, -1)[..., _LOW]
        return low

    @property
    def values(self) -> np.ndarray | None:
        return None if self.full or not self.gather else self._view("values", self.in_dtype, self.shape)

    def resample(self, image: np.ndarray, base: np.ndarray | None = None,
                 at: tuple[int, int] = (0, 0)) -> np.ndarray:
        """The frame resampled to the region size (uint8), or the frame itself at identity.

        `image` may be a region of a larger frame `base` whose top-left pixel is at `at` = (x, y)
        of `base` (a tile, a crop): its rows are then gathered from `base` itself, so a region
        needs no copy of its own."""
        if self.identity:
            return image
        if self.lib is not None:
            region = self.region
            self.run(image, region)
            return region
        if base is None:
            base, at = image, (0, 0)
        if not base.flags.c_contiguous:
            base, at = np.ascontiguousarray(image), (0, 0)  # a caller's strided array: copied once
        ox, oy = at
        rh, rw, _ = self.shape
        h, w = self.src
        n = rw * 3
        flat = base.reshape(base.shape[0], -1)
        region = self.region
        rows = self.work.get("rows", np.uint8, (rh, flat.shape[1]))
        at_y = self.work.get("at_y", np.intp, (rh,))
        cols = slice(ox * 3, (ox + w) * 3)
        if not self.bilinear:
            at_x = self.work.get("at_x", np.intp, (n,))
            np.add(self.rows, oy, out=at_y)
            np.add(self.cols, ox * 3, out=at_x)
            np.take(flat, at_y, axis=0, out=rows, mode="clip")
            np.take(rows, at_x, axis=1, out=region.reshape(rh, n), mode="clip")
            return region
        # Down the columns: v = 256 * top + (bottom - top) * b, b the bottom row's weight in
        # 1/256. Its value lies in 0..255 * 256, so uint16 arithmetic, which wraps, gives it
        # exactly, negative differences included.
        v = self.work.get("v", np.uint16, (rh, w * 3))
        t = self.work.get("t", np.uint16, (rh, w * 3))
        np.add(self.y0, oy, out=at_y)
        np.take(flat, at_y, axis=0, out=rows, mode="clip")
        np.copyto(v, rows[:, cols])  # a cast copy: no scratch buffer, unlike a mixed-dtype ufunc
        np.add(self.y1, oy, out=at_y)
        np.take(flat, at_y, axis=0, out=rows, mode="clip")
        np.copyto(t, rows[:, cols])
        np.subtract(t, v, out=t)
        # The full-size weights of this plan: spread again only after another plan used them.
        wy = self.work.held("wy", np.uint16, (rh, w * 3), self, lambda a: np.copyto(a, self.by))
        np.multiply(t, wy, out=t)
        np.left_shift(v, 8, out=v)
        np.add(v, t, out=v)
        # Along the rows, the same in 1/65536 and uint32 (at most 255 * 2^24), plus 2^23: the top
        # byte is the blend rounded to the nearest level.
        left = self.work.get("t", np.uint16, (rh, n))  # t is free again
        right = self.work.get("right", np.uint16, (rh, n))
        np.take(v, self.x0, axis=1, out=left, mode="clip")
        np.take(v, self.x1, axis=1, out=right, mode="clip")
        o = self.work.get("o", np.uint32, (rh, n))
        d = self.work.get("d", np.uint32, (rh, n))
        np.copyto(o, left)
        np.copyto(d, right)
        np.subtract(d, o, out=d)
        wx = self.work.held("wx", np.uint32, (rh, n), self, lambda a: np.copyto(a, self.bx))
        np.multiply(d, wx, out=d)
        np.left_shift(o, 16, out=o)
        np.add(o, d, out=o)
        np.add(o, _HALF, out=o)
        np.copyto(region.reshape(rh, n), o.view(np.uint8).reshape(rh, n, 4)[..., _TOP])
        return region


    def run(self, image: np.ndarray, pixels: np.ndarray, lut: np.ndarray | None = None,
            dst: np.ndarray | None = None) -> None:
        """The compiled resampler: `image` (uint8 RGB, any strides) into `pixels` (this plan's
        region buffer); with `lut`, each value also mapped through it into `dst` (rows of packed
        values in the table's dtype, e.g. the model input's covered rectangle)."""
        at = native.address
        if lut is None:
            self.run_at(at(image), image.strides, at(pixels), pixels.strides[0], None, 0, None, 0)
        else:
            self.run_at(at(image), image.strides, at(pixels), pixels.strides[0], at(lut), lut.itemsize,
                        at(dst), dst.strides[0])

    def run_at(self, src: int, strides: tuple[int, int, int], pixels: int, pixels_row: int,
               lut: int | None, item: int, dst: int | None, dst_row: int) -> None:
        """`run` on addresses (rows `pixels_row` and `dst_row` bytes apart), for callers that keep
        their buffers' addresses."""
        rh, rw, _ = self.shape
        s0, s1, s2 = strides
        n = 3 * self.src[1] + 6 * rw + 3  # as _resample.c says
        if self.lib.edged_bilinear(src, s0, s1, s2, self._taps_at, rh, rw, pixels, pixels_row, lut, item, dst,
                                   dst_row, self.work.at("row", np.uint16, n)):
            raise RuntimeError(f"vision: the compiled resampler refused a table of {item}-byte values")

    def map(self, pixels: np.ndarray, lut: np.ndarray, dst: np.ndarray) -> None:
        """The compiled table alone: uint8 `pixels` (any strides) mapped through `lut` into `dst`."""
        h, w, _ = pixels.shape
        s0, s1, s2 = pixels.strides
        at = native.address
        if self.lib.edged_map(at(pixels), s0, s1, s2, h, w, at(lut), lut.itemsize, at(dst), dst.strides[0],
                              self.work.at("map_row", np.uint8, w * 3)):
            raise RuntimeError(f"vision: the compiled resampler refused a {lut.dtype} table")


def _library(resampler: str | None):
    """The compiled library a plan uses, or None for the numpy code. `resampler`: None for this
    process's choice (native.LIB), "numpy", or "compiled" (an error when it was not built)."""
    if resampler is None:
        return native.LIB
    if resampler == "numpy":
        return None
    if resampler == "compiled":
        lib, why = native.library()
        if lib is None:
            raise RuntimeError(f"vision: compiled resampler {why}; {native.INSTALL_HINT}")
        return lib
    raise ValueError(f"resampler: expected None, 'numpy' or 'compiled', got {resampler!r}")


_HALF = np.uint32(1 << 23)
_TOP = 3 if sys.byteorder == "little" else 0  # the byte of a uint32 holding bits 24..31


def check_image(image: np.ndarray) -> None:
    """Raise ValueError, with one line saying why, for anything but a non-empty RGB uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"vision: expected an RGB uint8 image of shape (H, W, 3), "
                         f"got shape {image.shape} dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"vision: empty image of shape {image.shape}")


def resize_frame(image: np.ndarray, height: int, width: int, *, letterbox: bool = False,
                 bilinear: bool = False, resampler: str | None = None) -> np.ndarray:
    """One frame resampled exactly as the stage would (without padding), as a new array.

    For tools (calibration, evaluation) that must feed a model what the device feeds it; the
    stage itself keeps its plans and buffers. `resampler`: "numpy" or "compiled" to choose the
    implementation (the same bytes either way), None for this process's choice.
    """
    plan = _Plan(image.shape[0], image.shape[1], height, width, letterbox, bilinear, np.dtype(np.uint8),
                 gather=False, resampler=resampler)
    return np.array(plan.resample(image), copy=True)


def reference_taps(frame_h: int, frame_w: int, rh: int, rw: int, bilinear: bool) -> np.ndarray:
    """A compiled plan's taps (see `_Plan._compiled_taps`) by the numpy code's own expressions:
    what `edged_taps` must reproduce exactly (tests/test_resample.py)."""
    if bilinear:
        y0, y1, wy = _taps(frame_h, rh)
        x0, x1, wx = _taps(frame_w, rw)
        runs = (y0, y1, _fixed(wy, 256, np.uint16), x0, x1, np.repeat(_fixed(wx, 65536, np.uint32), 3))
    else:
        rows, cols = _nearest(frame_h, rh), _nearest(frame_w, rw)
        runs = (rows, rows, np.zeros(rh, np.intp), cols, cols, np.zeros(rw * 3, np.intp))
    return np.concatenate(runs, dtype=np.int32, casting="unsafe")


def _nearest(src: int, dst: int) -> np.ndarray:
    """Nearest resampling: the source index of each of `dst` pixel centres mapped back."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.intp), src - 1)


def _fixed(w: np.ndarray, one: int, dtype) -> np.ndarray:
    """Blend weights in fixed point, `one` being a weight of 1 (256 down the columns, 65536 along
    the rows)."""
    return np.rint(w.astype(np.float64) * one).astype(dtype)


def _taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0.0, src - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (pos - i0).astype(np.float32)


class Preprocessor:
    """Turns RGB uint8 frames of any size into the model's input tensor, in place.

    Resampling is `resize = "nearest"` (default, cheapest) or `"bilinear"` (what most training
    pipelines used; half-pixel centres in fixed point, within one level of an exact blend). A frame already at the model's size
    is not resampled at all. `letterbox = true` keeps the aspect ratio and pads with pixel value
    `pad` (default 0); false stretches the frame to the input size.

    Normalisation comes from the manifest's `[input]` table: `range = [lo, hi]` maps pixel
    0..255 linearly to lo..hi; `mean`/`std` (scalars or per channel) compute (pixel - mean) /
    std; with neither, an integer input receives raw pixel values. The real value is then
    quantised with the tensor's own scale and zero point.
    """

    MAX_PLANS = 4  # frame sizes remembered; a camera rarely switches between more

    def __init__(self, model: Model, entry: ModelEntry, input_index: int = 0, *,
                 resampler: str | None = None) -> None:
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
            raise ModelError(f"{where(entry, 'input')}.letterbox: expected true or false, got {letterbox!r}")
        self.letterbox = letterbox
        resize = cfg.get("resize", "nearest")
        if resize not in ("nearest", "bilinear"):
            raise ModelError(f"{where(entry, 'input')}.resize: expected \"nearest\" or "
                             f"\"bilinear\", got {resize!r}")
        self.bilinear = resize == "bilinear"
        pad = number(entry, cfg, "input", "pad", 0, lo=0, hi=255)
        self._lut, affine = _input_lut(entry, spec)
        self._map = PixelMap(self._lut, spec.dtype, affine)
        self._offsets = np.array([0, 256, 512], np.intp)
        self._pad_values = self._lut[self._offsets + int(pad)]
        # The padding as pixels for the compiled table (a zero-stride view: one pixel everywhere).
        self._pad_pixels = np.broadcast_to(np.full(3, int(pad), np.uint8), (self.height, self.width, 3))
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._work = Scratch()  # the work buffers of all plans, at the largest size any needed
        # Input slots: 0 is the model's own input buffer (or, see own_input, one of this
        # preprocessor's own); 1, made on first use, is filled while the
        # interpreter runs on slot 0's input (edged.stages.vision.overlap). Per slot, the plan and
        # buffer whose padding is painted.
        self._slot0: np.ndarray | None = None  # slot 0 of its own (own_input), else the model's buffer
        self._slot1: np.ndarray | None = None
        self._painted: list[tuple[_Plan, np.ndarray] | None] = [None, None]
        self._filled: list[np.ndarray | None] = [None, None]  # per slot: the array the last fill filled
        self._slot_at: list[tuple | None] = [None, None]  # per slot: (its array, address, contiguous)
        self._lut_at = native.address(self._lut)
        self._base: tuple | None = None  # (weakref to the last frame, its address)
        self.resamples = 0  # images resampled (fills given another stage's pixels do not count)
        self.resampler = resampler  # None: this process's choice (edged.stages.vision.native)

    def plan(self, frame_h: int, frame_w: int) -> _Plan:
        key = (frame_h, frame_w)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            plan = _Plan(frame_h, frame_w, self.height, self.width, self.letterbox, self.bilinear,
                         self.model.inputs[self.index].dtype, gather=self._map.kind == "gather",
                         scratch=self._work, resampler=self.resampler)
            self._plans[key] = plan
        return plan

    def __call__(self, image: np.ndarray) -> Letterbox:
        """Fill and commit the model input from `image`; return where the frame landed."""
        check_image(image)
        box, _ = self.fill(image)
        self.commit()
        return box

    def own_input(self) -> None:
        """Fill slot 0 into an array of this preprocessor's own rather than the model's input
        buffer: for a stage whose model another stage shares (edged.stages.vision.graph.open_graph),
        so that neither fills an input the other has prepared and not yet committed."""
        if self._slot0 is None:
            self._slot0 = np.zeros_like(self.model.input_buffer(self.index))

    def buffer(self, slot: int = 0) -> np.ndarray:
        """Input slot `slot`: an array of the input tensor's shape and dtype."""
        if slot == 0:
            return self.model.input_buffer(self.index) if self._slot0 is None else self._slot0
        if self._slot1 is None:
            self._slot1 = np.zeros_like(self.model.input_buffer(self.index))
        return self._slot1

    def fill(self, image: np.ndarray, slot: int = 0, pixels: np.ndarray | None = None, *,
             base: np.ndarray | None = None, at: tuple[int, int] = (0, 0)) -> tuple[Letterbox, np.ndarray]:
        """Fill input slot `slot` from a checked `image` (see check_image), without committing it;
        return where the image landed and its resampled pixels (uint8, the region's size; a
        buffer reused by the next fill, or `image` itself when no resampling was needed).
        `pixels`, when given, are those pixels already resampled (by another stage with the same
        input geometry, see `geometry`): only the normalisation runs. `image` may be a region of
        the frame `base`, its top-left pixel at `at` = (x, y) of it (see `_Plan.resample`)."""
        plan = self.plan(image.shape[0], image.shape[1])
        whole = self.buffer(slot)
        self._filled[slot] = whole
        buf = whole[0]
        painted = self._painted[slot]
        known = self._slot_at[slot]
        if known is None or known[0] is not whole:  # the slot's array, its address, and whether
            # the compiled path can write it; the same until a model moved off the Edge TPU
            known = self._slot_at[slot] = (whole, native.address(whole), bool(whole.flags.c_contiguous))
        compiled = plan.lib is not None and whole.dtype == self._lut.dtype and known[2]
        if painted is None or painted[0] is not plan or painted[1] is not whole:
            if not plan.full:
                if compiled:
                    self._paint(plan, buf)
                else:
                    buf[...] = self._pad_values
            self._painted[slot] = (plan, whole)
        b = plan.box
        if compiled:
            # Compiled: resampled and mapped through the table in one pass, or only mapped (a
            # frame at the model's size, pixels of another stage).
            if pixels is None:
                self.resamples += 1
                if not plan.identity:
                    # On addresses kept with their buffers: the slot's, the table's, the work
                    # buffers', and the frame's (a region's is the frame's plus its offset).
                    pixels = plan.region
                    row = buf.strides[0]
                    dst_at = known[1] + b.top * row + b.left * buf.strides[1]
                    plan.run_at(self._source_at(image, base, at), image.strides, plan.region_at, pixels.strides[0],
                                self._lut_at, self._lut.itemsize, dst_at, row)
                    return plan.box, pixels
                pixels = image
            dst = buf if plan.full else buf[b.top:b.top + b.height, b.left:b.left + b.width]
            plan.map(pixels, self._lut, dst)
            return plan.box, pixels
        if pixels is None:
            pixels = plan.resample(image, base, at)
            self.resamples += 1
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
        return plan.box, pixels

    def _source_at(self, image: np.ndarray, base: np.ndarray | None, at: tuple[int, int]) -> int:
        """The address of `image`'s first pixel: from the frame's own (kept while the frame is the
        same) when `image` is the region of `base` at `at`."""
        if base is None:
            return native.address(image)
        known = self._base
        if known is None or known[0]() is not base:
            known = self._base = (weakref.ref(base), native.address(base))
        return known[1] + at[1] * base.strides[0] + at[0] * base.strides[1]

    def _paint(self, plan: _Plan, buf: np.ndarray) -> None:
        """The letterbox padding of `plan` in `buf` (one input slot, (height, width, 3)): the pad
        pixel through the table (compiled, from a zero-stride pad pixel), on the bands around the
        rectangle the fill covers, which it overwrites anyway. The same bytes as painting all of
        `buf` first, in the time of the bands (a new crop size repaints: every frame)."""
        b = plan.box
        bottom, right = b.top + b.height, b.left + b.width
        for y0, y1, x0, x1 in ((0, b.top, 0, self.width), (bottom, self.height, 0, self.width),
                               (b.top, bottom, 0, b.left), (b.top, bottom, right, self.width)):
            if y1 > y0 and x1 > x0:
                plan.map(self._pad_pixels[: y1 - y0, : x1 - x0], self._lut, buf[y0:y1, x0:x1])

    def commit(self, slot: int = 0) -> None:
        """Hand input slot `slot` to the interpreter (it copies it: the slot is free again). The
        array committed is the one `fill` filled: slot 0 is the model's own buffer (unless
        `own_input`), and a model that moved from the Edge TPU to the CPU meanwhile has another one."""
        self.model.commit_input(self.index, self._filled[slot])

    @property
    def geometry(self) -> tuple:
        """What the resampled pixels depend on besides the image: two stages with the same
        geometry resample any image to the same pixels."""
        return (self.height, self.width, self.letterbox, self.bilinear)


def _input_lut(entry: ModelEntry, spec: TensorSpec) -> tuple[np.ndarray, tuple | None]:
    """Pixel value → model input value, for each channel: shape (3*256,), channel-major; and the
    affine map it comes from, (form, a, b) per channel, when there is one (see PixelMap)."""
    cfg = entry.input
    pixels = np.arange(256, dtype=np.float64)
    if "range" in cfg:
        rng = cfg["range"]
        if (not isinstance(rng, list) or len(rng) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng)):
            raise ModelError(f"{where(entry, 'input')}.range: expected [low, high], got {rng!r}")
        lo, hi = float(rng[0]), float(rng[1])
        real = np.tile(lo + pixels * ((hi - lo) / 255.0), 3)
        affine = ("scale", np.full(3, (hi - lo) / 255.0), np.full(3, lo))
    elif "mean" in cfg or "std" in cfg:
        mean = per_channel(entry, "mean", cfg.get("mean", 0.0))
        std = per_channel(entry, "std", cfg.get("std", 1.0))
        if np.any(std == 0):
            raise ModelError(f"{where(entry, 'input')}.std: must not be 0")
        real = ((pixels[None, :] - mean[:, None]) / std[:, None]).reshape(-1)
        affine = ("standardise", mean, std)
    elif spec.dtype == np.uint8:
        return np.tile(pixels, 3).astype(np.uint8), None
    else:
        raise ModelError(f"{where(entry, 'input')}: a {spec.dtype} input needs `range` or `mean`/`std`")
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
