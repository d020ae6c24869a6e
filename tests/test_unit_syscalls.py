"""The unit's system call filter against what edged's libraries really call.

`SystemCallFilter=~@privileged @resources` denies `mbind`, and numpy's bundled OpenBLAS calls it
for every buffer it allocates (a NUMA placement hint). With `SystemCallErrorNumber=EPERM` the
call fails and OpenBLAS carries on; without it systemd kills the daemon (status 31/SYS). These
tests keep the directive in the unit and show both outcomes with the same seccomp action systemd
installs, on the real numpy.
"""

from __future__ import annotations

import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edged.service"
DEPLOY = REPO / "docs" / "deploy.md"

_ARCH = {  # machine: (AUDIT_ARCH_*, __NR_mbind)
    "x86_64": (0xC000003E, 237),
    "aarch64": (0xC00000B7, 235),
}
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO_EPERM = 0x00050000 | 1

# Installs "mbind -> action" on itself (everything else allowed), then does what the daemon's
# numpy does: a matrix product big enough for OpenBLAS to allocate its buffers.
_CHILD = r"""
import ctypes, struct, sys
audit_arch, nr_mbind, action = (int(x) for x in sys.argv[1:4])
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
ALLOW = 0x7FFF0000
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(LD_W_ABS, 0, 0, 4),        # seccomp_data.arch
    ins(JEQ_K, 1, 0, audit_arch),
    ins(RET_K, 0, 0, ALLOW),
    ins(LD_W_ABS, 0, 0, 0),        # seccomp_data.nr
    ins(JEQ_K, 0, 1, nr_mbind),
    ins(RET_K, 0, 0, action),
    ins(RET_K, 0, 0, ALLOW),
])
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
assert libc.prctl(38, 1, None, 0, 0) == 0                                     # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
print("filter on", flush=True)
import numpy as np
a = np.arange(512 * 512, dtype=np.float64).reshape(512, 512) % 7
b = np.ones((512, 512))
print("product", float((a @ b).sum()), flush=True)
"""


def _run(action: int) -> subprocess.CompletedProcess:
    arch = _ARCH.get(platform.machine())
    assert arch, f"no seccomp table for {platform.machine()}"
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, arch), str(action)],
                          capture_output=True, text=True, timeout=120)


def _service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and line[0] not in "#;" and section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_mbind_is_outside_the_units_filter():
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    service = _service()
    denied = [g for v in service["SystemCallFilter"] if v.startswith("~") for g in v[1:].split()]
    listing = subprocess.run([analyze, "syscall-filter", *denied], capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "mbind" in listing.stdout.split(), f"{denied} no longer denies mbind"
    # So the error number is what keeps numpy alive, and it must stay.
    assert service["SystemCallErrorNumber"] == ["EPERM"]
    doc = DEPLOY.read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `SystemCallErrorNumber=`"))
    assert "mbind" in row and "31/SYS" in row


def test_numpy_survives_mbind_refused_with_eperm():
    res = _run(SECCOMP_RET_ERRNO_EPERM)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.split("\n")
    assert "filter on" in lines
    # Each entry of a @ ones is its row's sum, so the product's sum is 512 times a's.
    got = float(next(line for line in lines if line.startswith("product ")).split()[1])
    assert got == pytest.approx(_reference_sum())


def test_numpy_is_killed_when_mbind_is_not_answered_with_an_error():
    """What an empty SystemCallErrorNumber= would do: the default action, kill the process."""
    res = _run(SECCOMP_RET_KILL_PROCESS)
    assert "filter on" in res.stdout.split("\n"), res.stderr[-2000:]
    assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr[-2000:])


def _reference_sum() -> float:
    import numpy as np

    a = np.arange(512 * 512, dtype=np.float64).reshape(512, 512) % 7
    return float(a.sum() * 512)
