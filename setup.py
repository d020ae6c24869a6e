"""The one thing setup.cfg cannot declare: the compiled resampler (edged/stages/vision/_resample.c).

Optional: on a machine without a C compiler the build of this one file fails, pip says so, and
edged installs anyway; the vision stages then use the numpy resampler (the same bytes, slower), and
`edged doctor` says which one runs. The file is plain C with no Python header, loaded with ctypes
(edged/stages/vision/native.py), so it needs gcc and the C library's headers, not python3-dev.
-ffp-contract=off: a plan's taps are computed in C with numpy's float64 operations one by one (no
fused multiply-add, which aarch64 compilers would otherwise emit), so they come out the same.
"""

from setuptools import Extension, setup

# scripts/check-aarch64 reads this line's list to cross-compile the file the same way.
COMPILE_ARGS = ["-O3", "-std=c99", "-ffp-contract=off"]

setup(ext_modules=[Extension("edged.stages.vision._resample", ["edged/stages/vision/_resample.c"],
                             extra_compile_args=COMPILE_ARGS, optional=True)])
