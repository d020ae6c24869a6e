"""Shared test fixtures: a real mosquitto broker on a free loopback port, a real MQTT subscriber,
and the real daemon as a subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from harness import Broker, free_port, mosquitto_bin  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

# The modules whose tests take longest (daemons run through outages, restarts and faults), run
# first: `make test` runs the suite in parallel processes (pytest-xdist), which hand out tests in
# this order, so that the long ones do not start last and keep one process busy at the end.
LONG_FIRST = ("test_benchmarks", "test_faults", "test_tpu_faults", "test_outbox_faults", "test_order",
              "test_ingest", "test_updates", "test_mqtt", "test_hostile", "test_first_run", "test_daemon")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Long modules first (LONG_FIRST), in one process and in parallel ones alike."""
    rank = {name: n for n, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__ if item.module else "", len(rank)))


_MODULE_FIXTURE = re.compile(r"""@pytest\.fixture\([^)]*scope\s*=\s*["'](module|class)["']""")


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` (what `make test` uses): every test is handed out on its own, except
    that the tests of a module defining a module- or class-scoped fixture (a model loaded once, the
    benchmarks' one run, a release built once) go to one process together, so that the fixture is
    built once, not once per process. The module is read for its fixtures here, in the process
    that hands out the tests, which collects none. (xdist's own loadgroup reads `xdist_group`
    marks from a suffix it adds to test ids, which pytest 9's test ids no longer take.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    grouped: dict[str, bool] = {}

    def shares_a_module_fixture(path: str) -> bool:
        if path not in grouped:
            try:
                grouped[path] = bool(_MODULE_FIXTURE.search((config.rootpath / path).read_text()))
            except OSError:
                grouped[path] = False
        return grouped[path]

    class ModuleFixtureGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if "@" in nodeid:  # an xdist_group mark, should xdist's suffix work again
                return nodeid.rsplit("@", 1)[-1]
            path = nodeid.split("::", 1)[0]
            return path if shares_a_module_fixture(path) else nodeid

    config.option.loadscopereorder = False  # keep LONG_FIRST's order
    return ModuleFixtureGroups(config, log)


def outbox_meta(state_dir: Path, key: str) -> int:
    """A counter the daemon's outbox keeps ('seq', 'dropped'), as last committed (0 before the
    outbox exists)."""
    import sqlite3

    try:
        db = sqlite3.connect(f"file:{state_dir / 'outbox.db'}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else 0  # the daemon has created the file but not yet its counters
    except sqlite3.OperationalError:  # created, schema not yet committed
        return 0
    finally:
        db.close()


def last_seq(state_dir: Path) -> int:
    return outbox_meta(state_dir, "seq")


def wait_until(pred, timeout: float, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def wait_for_fresh_results(state_dir: Path, newest_received, timeout: float = 60.0) -> bool:
    """Wait until a subscriber has a result made after this call (`newest_received()`: the
    highest seq it has, 0 for none). After a broker restart only the daemon's new connection can
    bring one, whereas older results may have been queued in the broker for the subscriber: so
    this proves the daemon is connected again."""
    mark = last_seq(state_dir)
    return wait_until(lambda: newest_received() > mark + 5, timeout)


class Subscriber:
    """A real MQTT client that records every message under a topic filter."""

    def __init__(self, broker: Broker, topic: str = "edged/#", *, persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.topic = topic
        # persistent: a fixed session that the broker keeps (and queues for) while we are away.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{time.monotonic_ns()}",
                        clean_session=not persistent)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 0.5)
        c.connect(broker.host, broker.port)
        c.loop_start()
        self.client = c
        if not self._subscribed.wait(10):
            raise RuntimeError("test subscriber could not subscribe")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def on(self, leaf: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith("/" + leaf)]

    def json(self, leaf: str) -> list[dict]:
        return [json.loads(p) for p in self.on(leaf)]

    def wait(self, pred, timeout: float = 30.0):
        return wait_until(pred, timeout, 0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Arrivals:
    """Every message on some of a device's topics, decoded, in the order the broker delivers them,
    from an MQTT 5 client connected straight to the broker (QoS 1; stats, which go out at QoS 0,
    at 0). `items` holds (leaf, body, raw payload)."""

    RESULTS = ("events", "detections", "motion")  # the leaves sharing the one seq counter

    def __init__(self, broker: Broker, leaves=RESULTS, *, device: str = "test-dev") -> None:
        from edged.delivery import codec

        self._decode = codec.decode
        self.items: list[tuple[str, dict, bytes]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.subscribe([(f"edged/{device}/{leaf}", 0 if leaf == "stats" else 1) for leaf in leaves])
        c.loop_start()
        assert ready.wait(10)
        self.c = c

    def _on_message(self, client, userdata, m) -> None:
        leaf = m.topic.rsplit("/", 1)[-1]
        body = json.loads(m.payload) if leaf == "stats" else self._decode(m.payload)
        with self._lock:
            self.items.append((leaf, body, m.payload))

    def of(self, leaf: str) -> list[dict]:
        with self._lock:
            return [b for lf, b, _ in self.items if lf == leaf]

    def order(self) -> list[tuple[str, dict]]:
        with self._lock:
            return [(lf, b) for lf, b, _ in self.items if lf != "stats"]

    @property
    def seqs(self) -> list[int]:
        """The results' seqs, in arrival order (re-sends included)."""
        return [int(b["seq"]) for lf, b in self.order() if lf in self.RESULTS]

    def newest(self) -> int:
        return max(self.seqs, default=0)

    def late_firsts(self) -> list[tuple[int, int]]:
        """(seq, newest before it) for every seq that arrived for the first time after a higher one."""
        seen: set[int] = set()
        top, late = 0, []
        for s in self.seqs:
            if s not in seen and s < top:
                late.append((s, top))
            seen.add(s)
            top = max(top, s)
        return late

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def subscriber(broker):
    s = Subscriber(broker)
    yield s
    s.close()


def unit_seconds(key: str) -> float:
    """A time setting of the shipped unit (systemd/edged.service), e.g. TimeoutStopSec=20s."""
    m = re.search(rf"^{key}=(\d+)s$", (REPO / "systemd" / "edged.service").read_text(), re.M)
    return float(m.group(1))


# What a clean stop is promised: exit before systemd gives up on it and kills it (TimeoutStopSec=).
STOP_TIMEOUT_S = unit_seconds("TimeoutStopSec")


class DaemonProc:
    """The real daemon, `python -m edged run`, as systemd would run it."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DaemonProc":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(self.config)],
                                     stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Where it is stuck: SIGUSR2 makes the daemon print every thread's stack.
            self.proc.send_signal(signal.SIGUSR2)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            raise AssertionError(f"the daemon had not exited {timeout:.0f} s after SIGTERM; the end of its "
                                 f"output, with its threads' stacks:\n{self.output()[-6000:]}") from None

    def stop_sequence_s(self) -> float:
        """How long the daemon's last stop took by its own clock: from its "stopping" line to
        its "stopped" line (what it waits on and does; not the interpreter's exit after it)."""
        from datetime import datetime

        out = self.output()
        stamps = [datetime.fromisoformat(re.findall(rf"^ts=(\S+) .*msg={m}\b", out, re.M)[-1])
                  for m in ("stopping", "stopped")]
        return (stamps[1] - stamps[0]).total_seconds()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes: the tests' own, not edged's."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def inside(a, b) -> float:
    """How much of box a lies inside box b (0..1)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]))


def score_labelled(found, label, root):
    """(true positives, false positives, misses) of `label` at IoU 0.5 over {image path relative
    to root: (its labels entry, the objects found)}. Detections are matched best score first; one
    inside a "<label>?" box (a person too hidden to require) is neither right nor wrong; an image
    whose entry lists the label under "skip" is not scored for it."""
    import numpy as np
    from PIL import Image

    tp = fp = fn = 0
    for rel, (e, objects) in found.items():
        if label in e.get("skip", ()):
            continue
        w, h = Image.open(root / rel).size
        s = np.array([w, h, w, h], float)
        truth = [np.array(o["box"]) / s for o in e["objects"] if o["label"] == label]
        ignore = [np.array(o["box"]) / s for o in e["objects"] if o["label"] == label + "?"]
        for d in sorted((d for d in objects if d.label == label), key=lambda d: -d.score):
            best = max(range(len(truth)), key=lambda i: iou(d.box, truth[i]), default=None)
            if best is not None and iou(d.box, truth[best]) >= 0.5:
                truth.pop(best)
                tp += 1
            elif not any(inside(d.box, g) >= 0.5 for g in ignore):
                fp += 1
        fn += len(truth)
    return tp, fp, fn


def daemon_for(cfg):
    """The real Daemon (its counters, results queue, watchdog, threads) in this process, built off
    the main thread so that it leaves the test process's signal handlers alone; it is not run."""
    from edged.service.daemon import Daemon

    out = []
    t = threading.Thread(target=lambda: out.append(Daemon(cfg)))
    t.start()
    t.join()
    return out[0]


# The pace most daemon tests run at: 5 frames a second, the IMU recording at 10x speed, stats
# every second.
FAST = "[camera]\nfps = 5\n[imu]\nspeed = 10\n[stats]\ninterval_s = 1\n"

# The vision a daemon test runs unless it says otherwise: the face model alone with the label-set
# policy, about a millisecond a frame against the default chain's hundred or more, so a test of
# delivery, faults or reloads does not spend a core on vision. Tests of the embedded defaults (the
# chain, track events) pass vision=""; an `extra` with a [vision] table of its own gets nothing added.
ONE_MODEL = '[vision]\nmodel = "face"\npublish = "labels"\n'


def write_config(path: Path, broker: Broker, *, device_id: str = "test-dev", extra: str = "",
                 mqtt: str = "", vision: str = ONE_MODEL) -> Path:
    import re

    if re.search(r"^\s*\[\[?\s*vision\s*[\].]", extra, re.M):
        vision = ""
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'state_dir = "{path.parent / "state"}"\n'
        f"{extra}\n{vision}"
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nreconnect_max_s = 2\n{mqtt}')
    return path


@pytest.fixture
def daemon_factory(tmp_path):
    procs: list[DaemonProc] = []

    def make(config: Path) -> DaemonProc:
        d = DaemonProc(config, tmp_path / f"daemon{len(procs)}.log")
        procs.append(d)
        return d

    yield make
    for d in procs:
        d.kill()


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB filesystem (tmpfs) at tmp_path/"state": ENOSPC as a full SD card gives it.
    Mounting needs root (CI and `make test` run as root); it is unmounted afterwards."""
    import shutil

    mnt = tmp_path / "state"
    mnt.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    r = subprocess.run([mount or "mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True) if mount else None
    if r is None or r.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {r.stderr.strip() if r else 'no mount'}")
    try:
        yield mnt
    finally:
        subprocess.run([umount or "umount", "-l", str(mnt)], capture_output=True)


def without_dac_override(argv: list[str]) -> list[str]:
    """argv run so that file permissions apply even to root (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH dropped, with util-linux's setpriv), as they do for the service user."""
    if os.geteuid() != 0:
        return argv
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *argv]
