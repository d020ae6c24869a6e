"""CPU when nothing happens (issue 8, figure 7): the daemon's CPU share while the camera sees a
static scene and the IMU lies still, so that a device idling on a shelf does not burn a core.

`edged run` runs with the camera at 1 fps on a folder holding one photo (the same frame every
second: the publish policy sends nothing new) and the replay IMU playing a still recording (the
first 10 s of the demo recording, the "standing" class, looped). After a warm-up, the process's
CPU time (user + system, all threads) over the wall time is the figure; voluntary context
switches per second (summed over the daemon's threads) show how often it wakes up.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import (SAMPLES, Broker, Figure, at_most, daemon_cmd, daemon_env, proc_cpu_s, split_cpus,
                               toml_config)

STILL_S = 10.0  # the demo recording starts with 10 s of standing


def still_recording(out: Path) -> Path:
    lines = (SAMPLES / "imu" / "basicmotions_demo.csv").read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if float(ln.split(",", 1)[0]) < STILL_S]
    out.write_text("\n".join(keep) + "\n")
    return out


def wakeups(pid: int) -> int:
    """Voluntary context switches so far, summed over the process's threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def idle(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    warm, seconds = (1.5, 3.0) if quick else (3.0, 20.0)
    _, helpers = split_cpus()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        scene = work / "scene"
        scene.mkdir()
        shutil.copy(SAMPLES / "images" / "astronaut.jpg", scene / "astronaut.jpg")
        imu = still_recording(work / "still.csv")
        with Broker(work / "broker", cores=helpers) as broker:
            cfg = toml_config(work / "idle.toml", broker, work / "state",
                              f'[camera]\npath = "{scene}"\nfps = 1\n[imu]\npath = "{imu}"\nspeed = 1\n')
            log = (work / "idle.log").open("wb")
            proc = subprocess.Popen(daemon_cmd(cfg), env=daemon_env(), cwd=work, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                time.sleep(warm)
                if proc.poll() is not None:
                    raise RuntimeError(f"edged run exited early: {(work / 'idle.log').read_text()[-500:]}")
                c0, w0, t0 = proc_cpu_s(proc.pid), wakeups(proc.pid), time.monotonic()
                time.sleep(seconds)
                c1, w1, t1 = proc_cpu_s(proc.pid), wakeups(proc.pid), time.monotonic()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
                log.close()
    share = (c1 - c0) / (t1 - t0) * 100
    rate = (w1 - w0) / (t1 - t0)
    note = (f"{c1 - c0:.2f} s CPU in {t1 - t0:.0f} s; camera 1 fps on one photo, still IMU at 10 Hz; "
            f"CPU time has the kernel's 10 ms tick resolution")
    return [
        Figure("idle", "CPU share, static scene and still IMU", round(share, 2), "% of a core", "≤ 1",
               at_most(share, 1.0), note),
        Figure("idle", "wake-ups (voluntary context switches)", round(rate), "/s"),
    ]
