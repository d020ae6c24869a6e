"""The systemd side of edged: the unit file (verify, security exposure, documented directives),
the notify protocol against a real NOTIFY_SOCKET, and the progress-gated watchdog.

PID 1 is not systemd where these tests run, so systemd-analyze is used in its offline modes and
the service manager's end of the notify protocol is played by a datagram socket the test binds,
exactly as systemd binds /run/systemd/notify.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edged.service.notify import Notifier, ProgressWatchdog

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edged.service"
DEPLOY = REPO / "docs" / "deploy.md"
EXEC_START = "/opt/edged/venv/bin/edged run --config /etc/edged/edged.toml"
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return found


def unit_directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment; unit files repeat keys, so no dict."""
    out, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def runnable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine.

    `systemd-analyze verify` refuses a unit whose ExecStart binary is missing, and the venv
    under /opt/edged only exists on a provisioned device. Only that path is replaced.
    """
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START}\n" in text
    copy = tmp_path / "edged.service"
    copy.write_text(text.replace("/opt/edged/venv/bin/edged", shutil.which("true")))
    return copy


# ---------------------------------------------------------------------------------------------
# The unit file
# ---------------------------------------------------------------------------------------------

def test_unit_verifies(tmp_path):
    as_shipped = subprocess.run([systemd_analyze(), "verify", str(UNIT)], capture_output=True,
                                text=True, timeout=60)
    if os.access("/opt/edged/venv/bin/edged", os.X_OK):  # a provisioned device
        assert as_shipped.returncode == 0 and as_shipped.stderr.strip() == "", as_shipped.stderr
    else:
        # The only complaint about the shipped file is the venv that provisioning creates
        # (once for ExecStart=, once for ExecReload=).
        assert as_shipped.returncode != 0
        lines = as_shipped.stderr.strip().splitlines()
        assert lines and all("/opt/edged/venv/bin/edged" in line for line in lines), as_shipped.stderr

    res = subprocess.run([systemd_analyze(), "verify", str(runnable_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_unit_security_exposure(tmp_path):
    res = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    m = re.search(r"Overall exposure level for edged\.service: (\d+(?:\.\d+)?)", res.stdout)
    assert m, res.stdout[-2000:]
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, res.stdout

    # Each remaining exposure is one docs/deploy.md explains, under its exact name.
    failing = re.findall(r"^✗ (\S+)", res.stdout, flags=re.M)
    assert failing, "systemd-analyze output changed shape"
    section = DEPLOY.read_text().split("### Remaining exposures", 1)[1].split("\n## ", 1)[0]
    explained = set(re.findall(r"^- `([^`]+)`", section, flags=re.M))
    version = subprocess.run([systemd_analyze(), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    assert set(failing) == explained, (f"{version}: unexplained {set(failing) - explained}, "
                                       f"no longer exposed {explained - set(failing)}")


def test_unit_shape():
    d = unit_directives(UNIT.read_text())
    service = {k: v for s, k, v in d if s == "Service"}
    assert service["Type"] == "notify"
    assert service["ExecStart"] == EXEC_START
    # edged itself signals and waits: no procps, and `systemctl reload` tells the outcome.
    assert service["ExecReload"] == "/opt/edged/venv/bin/edged reload --pid $MAINPID"
    assert service["RuntimeDirectory"] == "edged"  # where the outcome is recorded
    assert service["User"] == "edged"
    assert set(service["SupplementaryGroups"].split()) == {"video", "i2c", "plugdev", "apex"}
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "edged"
    assert service["ConfigurationDirectory"] == "edged"
    assert service["DevicePolicy"] == "closed"
    assert service["CapabilityBoundingSet"] == ""
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert int(service["WatchdogSec"].rstrip("s")) > 0
    # An exit status the daemon uses for configuration errors must not be restarted.
    assert "2" in service["RestartPreventExitStatus"].split()

    families = set(service["RestrictAddressFamilies"].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}

    allowed = {v.split()[0] for s, k, v in d if k == "DeviceAllow"}
    # camera (V4L2 nodes, media controller, DMA heaps, VideoCore), IMU, PCIe and USB Edge TPU
    assert allowed == {"char-video4linux", "char-media", "char-dma_heap", "/dev/vchiq",
                       "char-i2c", "char-apex", "char-usb_device"}

    unit = {k: v for s, k, v in d if s == "Unit"}
    burst, interval = int(unit["StartLimitBurst"]), unit["StartLimitIntervalSec"]
    assert burst >= 3 and interval


def test_every_directive_is_documented():
    docs = DEPLOY.read_text()
    for section, key, _ in unit_directives(UNIT.read_text()):
        if section == "Service":
            assert f"`{key}=" in docs, f"docs/deploy.md does not explain {key}="


# ---------------------------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes with the real inference runtime
# ---------------------------------------------------------------------------------------------

# systemd implements MemoryDenyWriteExecute= as a seccomp filter: mmap() asking for
# PROT_WRITE|PROT_EXEC, and mprotect()/pkey_mprotect() asking for PROT_EXEC, fail with EPERM.
# The child below installs the same filter on itself and then runs a shipped vision model, so a
# runtime that needs JIT or executable stacks would fail here instead of on the device.
_ARCH = {  # machine: (AUDIT_ARCH_*, mmap, mprotect, pkey_mprotect)
    "x86_64": (0xC000003E, 9, 10, 329),
    "aarch64": (0xC00000B7, 222, 226, 288),
}

_MDWE_CHILD = r"""
import ctypes, mmap, os, struct, sys
audit_arch, nr_mmap, nr_mprotect, nr_pkey = (int(x) for x in sys.argv[1:5])
model_path = sys.argv[5]
PROT_WRITE, PROT_EXEC = 2, 4
LD_W_ABS, JEQ_K, JSET_K, AND_K, RET_K = 0x20, 0x15, 0x45, 0x54, 0x06
ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(LD_W_ABS, 0, 0, 4),                # seccomp_data.arch
    ins(JEQ_K, 1, 0, audit_arch),
    ins(RET_K, 0, 0, ALLOW),
    ins(LD_W_ABS, 0, 0, 0),                # seccomp_data.nr
    ins(JEQ_K, 3, 0, nr_mmap),
    ins(JEQ_K, 5, 0, nr_mprotect),
    ins(JEQ_K, 4, 0, nr_pkey),
    ins(RET_K, 0, 0, ALLOW),
    ins(LD_W_ABS, 0, 0, 32),               # args[2] (prot), low word
    ins(AND_K, 0, 0, PROT_WRITE | PROT_EXEC),
    ins(JEQ_K, 3, 2, PROT_WRITE | PROT_EXEC),
    ins(LD_W_ABS, 0, 0, 32),
    ins(JSET_K, 1, 0, PROT_EXEC),
    ins(RET_K, 0, 0, ALLOW),
    ins(RET_K, 0, 0, EPERM),
])
n = len(prog) // 8
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(n, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
assert libc.prctl(38, 1, None, 0, 0) == 0                       # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
failed = (None, ctypes.c_void_p(-1).value)
wx = libc.mmap(None, 4096, 1 | PROT_WRITE | PROT_EXEC, 0x22, -1, 0)
print("wx_mmap", "refused" if wx in failed else "allowed", flush=True)
rw = libc.mmap(None, 4096, 1 | PROT_WRITE, 0x22, -1, 0)
assert rw not in failed
print("mprotect_exec", "refused" if libc.mprotect(rw, 4096, 1 | PROT_EXEC) != 0 else "allowed")
print("mprotect_ro", "refused" if libc.mprotect(rw, 4096, 1) != 0 else "allowed", flush=True)
import numpy as np
from edged.runtime import Model
m = Model(model_path, threads=2)
spec = m.inputs[0]
rng = np.random.default_rng(7)
m.set_input(0, rng.uniform(-1, 1, size=spec.shape).astype(np.float32))
m.invoke()
outs = [m.output(i) for i in range(len(m.outputs))]
ok = all(np.isfinite(o).all() for o in outs) and any(np.abs(o).sum() > 0 for o in outs)
print("invoked", m.runtime, ok, flush=True)
# The rest of what the daemon loads: outbox (SQLite), TLS, MQTT client, worker threads.
import sqlite3, ssl, threading
import paho.mqtt.client
db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
ssl.create_default_context()
t = threading.Thread(target=lambda: None)
t.start()
t.join()
print("daemon_libs ok", flush=True)
"""


def test_runtime_works_without_writable_executable_memory():
    arch = _ARCH.get(platform.machine())
    assert arch, f"no seccomp table for {platform.machine()}"
    from edged.models import load_manifest

    model = next(e.path for e in load_manifest().values() if e.task == "vision")
    res = subprocess.run([sys.executable, "-c", _MDWE_CHILD, *map(str, arch), str(model)],
                         capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    # The filter is really in force (W+X and gaining X are refused, dropping W is not) ...
    assert "wx_mmap refused" in lines, res.stdout
    assert "mprotect_exec refused" in lines and "mprotect_ro allowed" in lines, res.stdout
    # ... and the interpreter still loads, delegates and runs the model.
    assert any(line.startswith("invoked ") and line.endswith(" True") for line in lines), res.stdout
    assert "daemon_libs ok" in lines, res.stdout


# ---------------------------------------------------------------------------------------------
# Notify protocol against a real socket
# ---------------------------------------------------------------------------------------------

class Manager:
    """The service manager's end: a bound AF_UNIX datagram socket, path or abstract."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(2.0)

    def recv(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def nothing_pending(self) -> bool:
        # AF_UNIX datagrams are queued at the receiver by the time sendto() returns.
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            Path(self.address).unlink(missing_ok=True)


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path):
    address = (str(tmp_path / "notify") if request.param == "path"
               else f"@edged-test-{os.getpid()}-{time.monotonic_ns()}")
    m = Manager(address)
    yield m
    m.close()


@pytest.fixture(params=["socket", "systemd-python"])
def notifier(request, manager, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(use_systemd_python=request.param == "systemd-python")
    if n.backend != request.param:
        pytest.fail("systemd-python is not importable: pip install systemd-python "
                    "(builds against libsystemd-dev; on the Pi, apt install python3-systemd)")
    yield n
    n.close()


def test_lifecycle_messages(notifier, manager):
    assert notifier.enabled
    assert notifier.ready("vision=face motion=motion broker=connecting")
    assert manager.recv() == {"READY": "1", "STATUS": "vision=face motion=motion broker=connecting"}

    assert notifier.status("broker connected\n3 spooled")
    assert manager.recv() == {"STATUS": "broker connected 3 spooled"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = manager.recv()
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after
    assert notifier.ready("reloaded")
    assert manager.recv() == {"READY": "1", "STATUS": "reloaded"}

    assert notifier.extend_timeout(45)
    assert manager.recv() == {"EXTEND_TIMEOUT_USEC": "45000000"}
    assert notifier.stopping()
    assert manager.recv() == {"STOPPING": "1"}
    assert manager.nothing_pending()


def test_watchdog_pets_only_while_every_part_progresses(notifier, manager):
    now = [1000.0]
    wd = ProgressWatchdog(notifier, clock=lambda: now[0])
    assert wd.deadline_s == 20.0 and wd.tick_interval == 10.0  # from WATCHDOG_USEC
    for part in ("vision", "motion", "outbox"):
        wd.register(part)
    wd.register("slowpart", deadline_s=60.0)

    def step(seconds, *beating):
        now[0] += seconds
        for part in beating:
            wd.beat(part)
        return wd.tick()

    assert step(10, "vision", "motion", "outbox") is True
    assert manager.recv() == {"WATCHDOG": "1"}

    # The camera thread wedges at t=1010 while everything else keeps beating.
    assert step(10, "motion", "outbox") is True        # vision 10 s old: within 20 s
    assert manager.recv() == {"WATCHDOG": "1"}
    assert step(11, "motion", "outbox") is False       # vision 21 s old
    assert wd.stale() == {"vision": pytest.approx(21.0)}
    assert step(10, "motion", "outbox") is False
    assert manager.nothing_pending()

    # It recovers; slowpart (last beat at registration, t=1000) is 41 s old, within its 60 s.
    assert step(0, "vision") is True
    assert manager.recv() == {"WATCHDOG": "1"}
    assert step(20, "vision", "motion", "outbox") is False   # slowpart now 61 s old
    assert set(wd.stale()) == {"slowpart"}
    assert step(0, "slowpart") is True
    assert manager.recv() == {"WATCHDOG": "1"}

    # A part shut down on purpose no longer holds the pet back.
    assert step(25, "motion", "outbox", "slowpart") is False
    wd.unregister("vision")
    assert wd.tick() is True
    assert manager.recv() == {"WATCHDOG": "1"}
    assert manager.nothing_pending()

    # Its thread, still finishing its loop after the stop gave up joining it, may beat once
    # more: ignored (it neither fails that thread nor brings the part back).
    wd.beat("vision")
    now[0] += 100
    assert "vision" not in wd.stale() and "vision" not in wd._registered()
    # A name never registered is a bug.
    with pytest.raises(KeyError):
        wd.beat("visoin")


def test_watchdog_stall_is_logged_once_per_episode(manager, caplog):
    n = Notifier(manager.address, watchdog_usec=4_000_000)
    now = [0.0]
    wd = ProgressWatchdog(n, clock=lambda: now[0])
    wd.register("vision")
    with caplog.at_level(logging.INFO, logger="edged.notify"):
        for _ in range(5):
            now[0] += 3
            assert wd.tick() is (now[0] <= 4)
        wd.beat("vision")
        assert wd.tick() is True
    stalled = [r for r in caplog.records if "no progress" in r.getMessage()]
    recovered = [r for r in caplog.records if "progress again" in r.getMessage()]
    assert len(stalled) == 1 and stalled[0].fields["part"] == "vision"
    assert len(recovered) == 1
    n.close()


def test_watchdog_interval_belongs_to_the_main_pid(tmp_path):
    sock = str(tmp_path / "n")
    env = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval() == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 30.0
    # An inherited environment from another process: not ours to pet.
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier.from_env({}).watchdog_interval() is None


def test_outside_systemd_everything_is_a_quiet_no_op(monkeypatch, caplog):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled and n.backend == "off"
    with caplog.at_level(logging.DEBUG, logger="edged.notify"):
        assert n.ready("x") is False
        assert n.watchdog() is False
        assert n.stopping() is False
    assert caplog.records == []
    wd = ProgressWatchdog(n)
    assert wd.tick_interval is None and wd.deadline_s == 30.0
    wd.register("vision")
    assert wd.tick() is False  # nothing to pet, and nothing stalled
    assert wd.stale() == {}


def test_unusable_address_is_reported_once(caplog):
    with caplog.at_level(logging.WARNING, logger="edged.notify"):
        n = Notifier("relative/path")
        assert not n.enabled
        assert n.ready() is False
    assert len(caplog.records) == 1
    assert "NOTIFY_SOCKET" in caplog.records[0].getMessage()


@pytest.mark.parametrize("backend", ["socket", "systemd-python"])
def test_vanished_socket_never_raises(tmp_path, monkeypatch, caplog, backend):
    address = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    m = Manager(address)
    n = Notifier.from_env(use_systemd_python=backend == "systemd-python")
    assert n.backend == backend
    assert n.ready()
    assert m.recv() == {"READY": "1"}
    m.close()  # the manager went away (socket file removed)

    with caplog.at_level(logging.INFO, logger="edged.notify"):
        for _ in range(3):
            assert n.watchdog() is False
            assert n.status("still here") is False
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert address in str(warnings[0].fields["socket"])

        m = Manager(address)  # and came back
        assert n.watchdog() is True
        assert m.recv() == {"WATCHDOG": "1"}
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    m.close()
    n.close()


def test_notify_from_a_child_process(manager):
    """The daemon runs as its own process with systemd's environment; nothing else is shared."""
    code = ("from edged.service.notify import Notifier\n"
            "n = Notifier.from_env()\n"
            "assert n.watchdog_interval() == 5.0, n.watchdog_interval()\n"
            "n.ready('child up'); n.watchdog(); n.stopping()\n")
    env = dict(os.environ, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="5000000",
               PYTHONPATH=str(REPO))
    env.pop("WATCHDOG_PID", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert manager.recv() == {"READY": "1", "STATUS": "child up"}
    assert manager.recv() == {"WATCHDOG": "1"}
    assert manager.recv() == {"STOPPING": "1"}
