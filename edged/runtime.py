"""The in-process TFLite runtime: picks the interpreter library, loads one model, reuses its buffers.

edged runs models inside the daemon's own process. The interpreter comes from LiteRT
(`ai_edge_litert`, the default on 64-bit Pi OS and x86_64) or, where LiteRT has no wheel
(32-bit Pi OS), from `tflite_runtime`. A `Model` owns one interpreter; an interpreter is not
thread-safe, so a `Model` is called from one thread. Stages of a vision graph that name the same
model share its `Model`, used by one unit at a time (edged.stages.vision.graph.open_graph).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Tried in this order; the first importable one wins.
_RUNTIMES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
)

INSTALL_HINT = (
    "no TFLite runtime is installed: on 64-bit Pi OS or x86_64 run "
    "'pip install ai-edge-litert'; on 32-bit Pi OS run \"pip install tflite-runtime 'numpy<2'\""
)


class RuntimeUnavailable(RuntimeError):
    """No usable TFLite interpreter library, or a model the runtime cannot load."""


@dataclass(frozen=True)
class Runtime:
    name: str
    version: str
    interpreter_cls: Any
    load_delegate: Callable[..., Any]
    libdir: str = ""  # the package directory holding its shared libraries (see release_start_pages)


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """The interpreter library this process uses (imported once, on first use)."""
    global _runtime
    if _runtime is None:
        for dist, module in _RUNTIMES:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            top = importlib.import_module(dist)
            version = getattr(top, "__version__", None) or _dist_version(dist)
            _runtime = Runtime(dist, version, mod.Interpreter, mod.load_delegate,
                               os.path.dirname(os.path.realpath(top.__file__)))
            release_start_pages(None, _runtime.libdir)  # what loading the libraries ran once
            break
        else:
            raise RuntimeUnavailable(INSTALL_HINT)
    return _runtime


def _dist_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor as the model declares it."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float  # 0.0 when the tensor is not quantised
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)

    @classmethod
    def from_details(cls, d: dict) -> "TensorSpec":
        scale, zero = d.get("quantization", (0.0, 0))
        return cls(
            index=d["index"],
            name=d["name"],
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]),
            scale=float(scale),
            zero_point=int(zero),
        )


def default_threads() -> int:
    """One interpreter thread per core, at most 4 (a Pi 4 has 4 cores)."""
    return max(1, min(4, os.cpu_count() or 1))


class Model:
    """One loaded model with preallocated input and output buffers.

    `set_input` quantises float data into a reused buffer when the input tensor is integer;
    `output` dequantises into a reused float32 buffer. Callers must copy what they keep
    across calls.
    """

    def __init__(self, path: Path, *, threads: int | None = None, delegates: list | None = None,
                 backend: str = "cpu", rt: Runtime | None = None) -> None:
        rt = rt or runtime()
        self.path = Path(path)
        self.backend = backend
        self.runtime = f"{rt.name} {rt.version}"
        if not delegates and EDGETPU_OP in custom_ops(self.path):
            # The interpreter would only say "unresolved custom op"; say what it means.
            raise RuntimeUnavailable(
                f"{self.path}: compiled for the Edge TPU (it contains {EDGETPU_OP}), so it cannot run "
                "on the CPU: give the manifest the uncompiled model as `file` and this one as "
                "`edgetpu_file`, and set accelerator.device")
        try:
            with _quiet_native_info():
                self._interp = rt.interpreter_cls(
                    model_path=str(self.path),
                    num_threads=threads or default_threads(),
                    experimental_delegates=delegates or None,
                )
                self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeUnavailable(f"{self.path}: cannot load model: {_first_line(exc)}") from None
        self.inputs = tuple(TensorSpec.from_details(d) for d in self._interp.get_input_details())
        self.outputs = tuple(TensorSpec.from_details(d) for d in self._interp.get_output_details())
        self._in_bufs = [np.zeros(t.shape, t.dtype) for t in self.inputs]
        # output()'s float32 buffers, made on first use: the vision decoders read the outputs as
        # stored (raw_output, output copies) and never ask for them.
        self._out_bufs: list[np.ndarray | None] = [None] * len(self.outputs)
        # set_input's float work buffer for an integer input, made on its first float input: the
        # vision stages fill input_buffer() with integers and never need it (1 MB at 300x300x3).
        self._scratch: list[np.ndarray | None] = [None] * len(self.inputs)
        # Last: the tensor details above are read from the mapped file too.
        release_start_pages(self.path, getattr(rt, "libdir", ""))

    def input_buffer(self, i: int = 0) -> np.ndarray:
        """The reused array `set_input(i)` copies from; fill it in place, then call `commit_input`."""
        return self._in_bufs[i]

    def set_input(self, i: int, data: np.ndarray) -> None:
        """Copy (and quantise, for integer inputs) `data` into input tensor `i`."""
        spec = self.inputs[i]
        buf = self._in_bufs[i]
        if spec.quantized and not np.issubdtype(data.dtype, np.integer):
            tmp = self._scratch[i]
            if tmp is None:
                tmp = self._scratch[i] = np.zeros(spec.shape, np.float32)
            np.divide(data, spec.scale, out=tmp, casting="unsafe")
            np.add(tmp, spec.zero_point, out=tmp)
            np.rint(tmp, out=tmp)
            info = np.iinfo(spec.dtype)
            np.clip(tmp, info.min, info.max, out=tmp)
            buf[...] = tmp
        else:
            buf[...] = data
        self._interp.set_tensor(spec.index, buf)

    def commit_input(self, i: int = 0, buf: np.ndarray | None = None) -> None:
        """Hand `input_buffer(i)`, filled in place by the caller, to the interpreter; or `buf`, an
        array of the input's shape and dtype the caller owns (a second input slot, filled while
        the interpreter runs on the first). The interpreter copies it: `buf` may be refilled
        once this returns."""
        self._interp.set_tensor(self.inputs[i].index, self._in_bufs[i] if buf is None else buf)

    def invoke(self) -> None:
        self._interp.invoke()

    def output(self, i: int) -> np.ndarray:
        """Output tensor `i` as float32 (dequantised), in a buffer reused by the next call."""
        spec = self.outputs[i]
        out = self._out_bufs[i]
        if out is None:
            out = self._out_bufs[i] = np.zeros(spec.shape, np.float32)
        return _dequantise(spec, self._interp.get_tensor(spec.index), out)

    def raw_output(self, i: int) -> np.ndarray:
        """Output tensor `i` as the model stores it (e.g. int8), a fresh copy."""
        return self._interp.get_tensor(self.outputs[i].index)

    def copy_output(self, i: int, out: np.ndarray) -> None:
        """Copy output tensor `i`, as stored, into `out` (its shape and dtype): `raw_output`
        without a new array per call."""
        view = self._interp.tensor(self.outputs[i].index)()
        np.copyto(out, view)
        del view  # the interpreter refuses to invoke while a view of its buffers is alive

    def output_by_name(self, name: str) -> int:
        for i, t in enumerate(self.outputs):
            if t.name == name:
                return i
        raise KeyError(f"{self.path.name}: no output tensor named {name!r}")


class OutputCopy:
    """Some of a model's outputs, copied right after an invoke, read like the model's own
    (`raw_output`, `output`): so they can be decoded while the model already runs on its next
    input. `output` dequantises exactly as `Model.output` does."""

    def __init__(self, model: Model, indices: tuple[int, ...]) -> None:
        self.outputs = model.outputs
        self.indices = tuple(indices)
        self._raw = {i: np.zeros(model.outputs[i].shape, model.outputs[i].dtype) for i in self.indices}
        self._out: dict[int, np.ndarray] = {}  # output()'s float32 buffers, made on first use, as Model's
        # Where each raw buffer lies (C-contiguous, never moved), for compiled decoders.
        self.raw_at = {i: a.__array_interface__["data"][0] for i, a in self._raw.items()}

    def capture(self, model: Model) -> None:
        """Copy the outputs from `model` (the interpreter's buffers are reused by its next invoke)
        into this copy's own buffers, reused from invoke to invoke."""
        for i in self.indices:
            model.copy_output(i, self._raw[i])

    def raw_output(self, i: int) -> np.ndarray:
        return self._raw[i]

    def output(self, i: int) -> np.ndarray:
        spec, out = self.outputs[i], self._out.get(i)
        if out is None:
            out = self._out[i] = np.zeros(spec.shape, np.float32)
        return _dequantise(spec, self._raw[i], out)


def _dequantise(spec: TensorSpec, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`raw` as float32 into `out` (its shape), by the tensor's scale and zero point if it is
    quantised. Returns `out`."""
    if spec.quantized:
        # Compute in float32: int8 arithmetic would wrap (127 - (-128) overflows).
        np.subtract(raw, spec.zero_point, out=out, dtype=np.float32)
        out *= spec.scale
    else:
        out[...] = raw
    return out


_MADV_DONTNEED = 4  # Linux <sys/mman.h>, the same on every architecture
_madvise: Any = None
# A mapping's first line in /proc/self/smaps (start-end perms offset dev inode path), its fields.
_SMAPS_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+ *(.*)$", re.M)
_SMAPS_FIELD = re.compile(r"^(Rss|Private_Dirty|Anonymous): +(\d+) kB$", re.M)


def release_start_pages(model_path: str | Path | None, libdir: str = "") -> int:
    """Unmap from this process the file pages that opening an interpreter touched and running
    it does not need; kB released (0 where there is no /proc/self/smaps, as outside Linux).

    The runtime maps the model file and reads it all while it builds the interpreter: XNNPack
    packs every weight into memory of its own, and the file's pages are not read again (none
    comes back over the default chain's frames, docs/benchmarks.md section 3). Building also runs
    much of the runtime's code once (operator registrations, graph preparation, kernels of other
    operators); a frame needs about a quarter of it. Both stay mapped, and counted in the
    daemon's RSS, until told otherwise: this drops them with madvise(MADV_DONTNEED). They are
    clean pages of files, so what is dropped stays in the page cache, and a page needed again is
    mapped back from it on first use (a minor fault, once). Only read-only mappings without a
    private (written) page are touched: the model file, and the code and read-only data of the
    runtime's own libraries (files under `libdir`)."""
    global _madvise
    target = os.path.realpath(model_path) if model_path is not None else None
    libdir = os.path.join(libdir, "") if libdir else ""
    try:
        with open("/proc/self/smaps") as fh:
            text = fh.read()
    except OSError:
        return 0
    heads = list(_SMAPS_HEAD.finditer(text))
    spans: list[tuple[int, int, int]] = []
    for k, head in enumerate(heads):
        name, perms = head[4], head[3]
        if "w" in perms or not (name == target or (libdir and name.startswith(libdir))):
            continue
        block = text[head.end():heads[k + 1].start() if k + 1 < len(heads) else len(text)]
        kb = {key: int(value) for key, value in _SMAPS_FIELD.findall(block)}
        if kb.get("Rss", 0) and kb.get("Private_Dirty", 1) == 0 and kb.get("Anonymous", 1) == 0:
            spans.append((int(head[1], 16), int(head[2], 16), kb["Rss"]))
    if not spans:
        return 0
    if _madvise is None:
        import ctypes

        try:
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            _madvise = False
        else:
            _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if not _madvise:
        return 0
    return sum(kb for lo, hi, kb in spans if _madvise(lo, hi - lo, _MADV_DONTNEED) == 0)


EDGETPU_OP = "edgetpu-custom-op"  # the one custom op edgetpu_compiler puts in a compiled model


def custom_ops(path: Path) -> set[str]:
    """Names of the custom operators a .tflite file declares (empty if it cannot be parsed).

    Reads the flatbuffer directly (Model.operator_codes[].custom_code) so it works with every
    runtime, including tflite_runtime, which ships no schema module."""
    try:
        buf = Path(path).read_bytes()
        return _flatbuffer_custom_codes(buf)
    except (OSError, struct.error, IndexError, UnicodeDecodeError):
        return set()


def _flatbuffer_custom_codes(buf: bytes) -> set[str]:
    u32 = lambda at: struct.unpack_from("<I", buf, at)[0]  # noqa: E731
    u16 = lambda at: struct.unpack_from("<H", buf, at)[0]  # noqa: E731

    def field(table: int, index: int) -> int | None:
        """Absolute position of field `index` of the table at `table`, None when absent."""
        vtable = table - struct.unpack_from("<i", buf, table)[0]
        slot = 4 + 2 * index
        if slot >= u16(vtable):
            return None
        off = u16(vtable + slot)
        return table + off if off else None

    model = u32(0)
    codes_at = field(model, 1)  # Model.operator_codes
    if codes_at is None:
        return set()
    vec = codes_at + u32(codes_at)
    names = set()
    for k in range(u32(vec)):
        elem = vec + 4 + 4 * k
        code = elem + u32(elem)
        s_at = field(code, 1)  # OperatorCode.custom_code
        if s_at is not None:
            s = s_at + u32(s_at)
            names.add(buf[s + 4:s + 4 + u32(s)].decode())
    return names


@contextlib.contextmanager
def _quiet_native_info():
    """Drop the runtime's native `INFO:` banner lines (one per interpreter, on stderr) so the
    daemon's output stays structured; anything else the native code prints is passed through."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("INFO: "):
                    sys.stderr.write(line)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
