"""edged/service/daemon.py, tune_malloc: glibc's malloc with a fixed mmap threshold and two
arenas (docs/benchmarks.md, "Memory and start-up"), checked in fresh processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# After a large block is freed, glibc (untuned) raises its mmap threshold to that block's size, so
# the next buffer below it comes from the heap and stays there; tuned, any buffer of 1 MB or more
# is a mapping of its own, given back to the system when freed.
PROBE = """
import sys
import numpy as np
from edged.service.daemon import tune_malloc
applied = tune_malloc()
block = bytearray(6 << 20)   # as a model file read to check its sha256
del block
buf = np.ones(3 << 20, np.uint8)
addr = buf.__array_interface__["data"][0]
heap = [l.split()[0] for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print(applied, lo <= addr < hi)
"""


def run(env_extra: dict[str, str]) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    return out[0], out[1]


def test_tuned_buffers_of_a_megabyte_or_more_stay_out_of_the_heap():
    assert run({}) == ("True", "False")


def test_any_malloc_variable_in_the_environment_leaves_glibc_as_configured():
    # MALLOC_ARENA_MAX alone: the threshold stays glibc's moving one, and the buffer lands in the heap.
    assert run({"MALLOC_ARENA_MAX": "8"}) == ("False", "True")
