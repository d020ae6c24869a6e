"""The compiled resampler (`_resample.c`, built by setup.py when the machine has a C compiler),
loaded with ctypes; which resampler runs, and why.

The library is found next to this module under any of the interpreter's extension suffixes
(`_resample.cpython-311-aarch64-linux-gnu.so`, ...). It is not a Python extension module and is
never imported: ctypes opens it, the function signatures are set once here, and a call releases
the GIL while it runs. `EDGED_RESAMPLER=numpy` in the environment keeps the numpy code even when
the library is there (for comparisons); the numpy code also runs when the library is missing.
The same library also builds plans' taps and runs the SSD and BlazeFace decoders' candidate scans
(the same values as their numpy code, which runs whenever `LIB` is None).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from pathlib import Path

ENV = "EDGED_RESAMPLER"
INSTALL_HINT = ("install a C compiler (Debian: sudo apt-get install gcc libc6-dev) and reinstall edged "
                "(pip install -e . in the checkout, or scripts/provision)")
_STEM = "_resample"


def library_path() -> Path | None:
    """The built library, or None when the install did not build it."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / (_STEM + suffix)
        if p.is_file():
            return p
    return None


def open_library() -> tuple[ctypes.CDLL | None, str]:
    """The library with its signatures set, or None and one line saying why not."""
    path = library_path()
    if path is None:
        return None, "not built: no C compiler when edged was installed"
    try:
        lib = ctypes.CDLL(str(path))
        bilinear, mapping, taps = lib.edged_bilinear, lib.edged_map, lib.edged_taps
        ssd, floats = lib.edged_ssd_candidates, lib.edged_float_candidates
    except (OSError, AttributeError) as exc:
        return None, f"{path.name}: cannot load: {exc}"
    p, d, i = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int
    bilinear.argtypes = [p, d, d, d, p, i, i, p, d, p, i, p, d, p]
    bilinear.restype = i
    mapping.argtypes = [p, d, d, d, i, i, p, i, p, d, p]
    mapping.restype = i
    taps.argtypes = [i, i, i, i, i, p]
    taps.restype = None
    f = ctypes.c_float
    ssd.argtypes = [p, i, i, i, i, f, f, p, f, f, p, i, p, p, p, p, p]
    ssd.restype = i
    floats.argtypes = [p, i, f, p, i, p, i, p, p, p, p]
    floats.restype = i
    return lib, str(path)


_opened: tuple[ctypes.CDLL | None, str] | None = None


def library() -> tuple[ctypes.CDLL | None, str]:
    """open_library(), once per process, whatever EDGED_RESAMPLER says (tests and the benchmark
    compare both resamplers in one process)."""
    global _opened
    if _opened is None:
        _opened = open_library()
    return _opened


def _choose() -> tuple[ctypes.CDLL | None, str]:
    want = os.environ.get(ENV, "").strip().lower()
    if want == "numpy":
        return None, f"numpy: {ENV}=numpy"
    lib, why = library()
    if lib is None:
        return None, f"numpy: compiled resampler {why}"
    note = "" if want in ("", "compiled") else f" ({ENV}={want!r} not understood: expected numpy or compiled)"
    return lib, f"compiled: {why}{note}"


LIB, STATUS = _choose()


def address(a) -> int:
    """Where a numpy array's first element lies, for the library's calls: what `a.ctypes.data`
    gives, without the ctypes helper object numpy builds for it (several microseconds a call, many
    times that right after an invoke has emptied the caches). Buffers reused from frame to frame
    keep theirs (`preprocess.Scratch`, `runtime.OutputCopy`)."""
    return a.__array_interface__["data"][0]


def fell_back() -> bool:
    """The numpy resampler runs because the compiled one could not be used (not built, or not
    loadable), rather than because EDGED_RESAMPLER=numpy asked for it."""
    return LIB is None and not STATUS.startswith(f"numpy: {ENV}=")


def name() -> str:
    """"compiled" or "numpy": the resampler the vision stages use in this process."""
    return "compiled" if LIB is not None else "numpy"
