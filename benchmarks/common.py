"""What the benchmarks share: the `Figure` record, a mosquitto on a free loopback port, a
subscriber that stamps each message's arrival, CPU pinning and niced background load, CPU-time
readings from /proc, worker subprocesses, and daemon configs built directly in code.

Configs are built as `edged.config.Config` objects rather than parsed from TOML so a benchmark
can ask a replay source for rates the file validation caps (camera fps ≤ 120): the source must
never be what limits a throughput figure.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The broker and notify-socket helpers are the tests' own (tests/harness.py).
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from harness import Broker, NotifySocket  # noqa: E402,F401 (re-exported)
SAMPLES = REPO / "samples"
RESULT_MARK = "BENCH-RESULT "
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    """One measured figure: `goal` is text such as "≥ 0.95"; `ok` is None when there is no goal."""

    bench: str
    name: str
    value: float
    unit: str = ""
    goal: str = ""
    ok: bool | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def at_least(value: float, target: float) -> bool:
    return value >= target


def at_most(value: float, target: float) -> bool:
    return value <= target


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values) -> float:
    return percentile(values, 50)


# --------------------------------------------------------------------------- CPUs and load

def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def split_cpus() -> tuple[set[int], set[int]]:
    """(daemon core, helper cores): the daemon gets one core, the broker, the subscriber and any
    background load get the rest. On a one-core machine both share it."""
    have = cpus()
    if len(have) == 1:
        return {have[0]}, {have[0]}
    return {have[0]}, set(have[1:])


def pin(cores: set[int], pid: int = 0) -> None:
    os.sched_setaffinity(pid, cores)


class NicedLoad:
    """Busy loops at nice 19 on `cores`: a neighbour that wants every cycle nobody else does."""

    def __init__(self, cores: set[int]) -> None:
        self.cores = cores
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "NicedLoad":
        for core in sorted(self.cores):
            p = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            pin({core}, p.pid)
            self.procs.append(p)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(5)
        self.procs.clear()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid` (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_queue_wait_s(pid: int | str = "self") -> float:
    """Seconds the threads of process `pid` have spent runnable but waiting for a CPU
    (/proc/<pid>/task/*/schedstat, second field): how much a loaded machine held it back."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile, or no schedstats on this kernel
    return total / 1e9


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds per live thread of this process, by Python thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        name = names.get(int(tid), "native")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def rss_kb(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


# --------------------------------------------------------------------------- subscriber

class Subscriber:
    """An MQTT client recording (arrival time, topic, payload) for every message under `topic`."""

    def __init__(self, broker: Broker, topic: str = "edged/#") -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[float, str, bytes]] = []
        self._subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{time.monotonic_ns()}")
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=0)
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.append((time.time(), m.topic, m.payload))
        c.connect(broker.host, broker.port)
        c.loop_start()
        self.client = c
        if not self._subscribed.wait(10):
            raise RuntimeError("benchmark subscriber could not subscribe")

    def on(self, leaf: str) -> list[tuple[float, bytes]]:
        return [(t, p) for t, topic, p in list(self.messages) if topic.endswith("/" + leaf)]

    def json(self, leaf: str) -> list[tuple[float, dict]]:
        return [(t, json.loads(p)) for t, p in self.on(leaf)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- configs

def bench_config(state_dir: Path, host: str, port: int, *, camera: dict | None = None,
                 vision: dict | None = None, imu: dict | None = None, motion: dict | None = None,
                 outbox: dict | None = None, stats_s: float = 3600.0, device_id: str = "bench"):
    """A daemon Config built in code: sections not given are disabled (camera, imu) or default."""
    from edged import config as c

    mqtt = c.MqttConfig(host=host, port=port)
    return c.Config(
        device_id=device_id,
        state_dir=str(state_dir),
        mqtt=mqtt,
        camera=c.CameraConfig(**camera) if camera is not None else c.CameraConfig(enabled=False),
        vision=c.VisionConfig(**(vision or {})),
        imu=c.ImuConfig(**imu) if imu is not None else c.ImuConfig(enabled=False),
        motion=c.MotionConfig(**(motion or {})),
        outbox=c.OutboxConfig(**(outbox or {})),
        stats=c.StatsConfig(interval_s=stats_s),
    )


def toml_config(path: Path, broker: Broker, state_dir: Path, extra: str = "", device_id: str = "bench") -> Path:
    """A config file for `edged run` as a subprocess (within the validated ranges)."""
    path.write_text(f'device_id = "{device_id}"\nstate_dir = "{state_dir}"\n{extra}\n'
                    f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n')
    return path


def daemon_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "edged", "run", "--config", str(config)]


def daemon_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# --------------------------------------------------------------------------- workers

def run_worker(module: str, args: dict, cores: set[int] | None, timeout: float) -> dict:
    """Run `python -m benchmarks.<module> --worker ARGS` on `cores`; return its result dict.

    Measurements that pin threads to a core run in a fresh process, so every thread the daemon
    and the runtime start inherits the pinning and nothing is left behind in the caller."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", json.dumps(args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise RuntimeError(f"benchmarks.{module} worker timed out after {timeout:.0f} s: {err[-500:]}") from None
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"benchmarks.{module} worker failed (exit {proc.returncode}): {err.strip()[-800:]}")


def worker_main(func) -> None:
    """Entry point of a worker module: `--worker JSON` calls `func(**args)` and prints its result."""
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        result = func(**json.loads(sys.argv[2]))
        sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
        sys.stdout.flush()
        # Daemon threads of a stopped pipeline may still sit in native waits: do not join them.
        os._exit(0)
    raise SystemExit(f"usage: python -m {func.__module__} --worker JSON")


# --------------------------------------------------------------------------- the machine

def machine() -> dict:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from edged.runtime import runtime

        rt = runtime()
        rt_name = f"{rt.name} {rt.version}"
    except Exception as exc:  # the table should still say what is missing
        rt_name = f"unavailable ({exc})"
    import numpy

    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "runtime": rt_name,
    }
