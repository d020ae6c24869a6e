"""Motion sampling (issue 8, figure 6): an IMU at 400 Hz read through its FIFO loses no sample
over 10 minutes while the vision model runs beside it.

The IMU is edged's BMI160 driver (`edged.sources.imu.source.ImuSource`) on the emulated chip of
`edged.fakes.imu`, playing the demo recording, inside the real daemon (camera at 30 fps through
the face model, motion stage, outbox, MQTT), all pinned to one core. The chip runs on a clock
`SPEEDUP` times faster than the wall clock, so 10 simulated minutes pass in 600 / SPEEDUP
seconds. That makes the test harsher, not easier: the FIFO still holds 85 samples (212 ms at
400 Hz) of simulated time, which is 212 / SPEEDUP ms of real time in which the reader must come
back, while the vision thread competes for the same core and the GIL.

A sample is lost when the emulated chip produced it (after the source's first FIFO flush) and it
neither reached the motion stage nor was still in the FIFO when simulated time was stopped at
the end; the chip's own overwrite count and the source's overflow counters are reported beside.
At 10× time (21 ms of real headroom) the source does see an occasional overflow on this shared
machine; at the default 6× (35 ms) none has occurred.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (SAMPLES, Broker, Figure, bench_config, run_worker, split_cpus, thread_cpu_s,
                               worker_main)

RATE_HZ = 400.0
SIM_S = 600.0
SPEEDUP = 6.0
# The quick budget (make test's smoke run) counts samples at real time: on a loaded CI machine
# 35 ms of headroom is a scheduler test, not a count of what the source delivers.
QUICK_SPEEDUP = 1.0


class ScaledClock:
    """Wall time running `speedup` times faster: what the fake chip samples on and the source
    sleeps on (edged.sources.imu's clock interface: time, monotonic, sleep)."""

    def __init__(self, speedup: float, start: float | None = None) -> None:
        self.speedup = speedup
        self._t0 = time.monotonic()
        self._start = time.time() if start is None else start
        self._frozen: float | None = None

    def _elapsed(self) -> float:
        if self._frozen is not None:
            return self._frozen
        return (time.monotonic() - self._t0) * self.speedup

    def freeze(self) -> None:
        """Stop time: the chip produces nothing more, so the counters can be read at rest."""
        self._frozen = self._elapsed()

    def time(self) -> float:
        return self._start + self._elapsed()

    def monotonic(self) -> float:
        return 1000.0 + self._elapsed()

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> bool:
        if seconds <= 0:
            return bool(stop and stop.is_set())
        if stop is None:
            time.sleep(seconds / self.speedup)
            return False
        return stop.wait(seconds / self.speedup)


def fifo_worker(host: str, port: int, workdir: str, sim_s: float, speedup: float) -> dict:
    from edged.service.pipeline import Pipeline
    from edged.fakes.imu import make_factory
    from edged.sources.imu.source import ImuSource

    from benchmarks.pipeline import _start, _stop

    work = Path(workdir)
    demo = SAMPLES / "imu" / "basicmotions_demo.csv"
    cfg = bench_config(work / "state-imu", host, port,
                       camera={"path": str(SAMPLES / "images"), "fps": 30.0},
                       vision={"model": "face", "threads": 1, "publish": "labels"},
                       imu={"path": str(demo)}, motion={"model": "motion", "threads": 1})
    p = Pipeline.open(cfg)
    p.imu.close()
    clock = ScaledClock(speedup)
    factory = make_factory("bmi160", motion_csv=demo, clock=clock, record=True)
    p.imu = ImuSource(chip="bmi160", rate_hz=RATE_HZ, smbus_factory=factory)
    chip = factory.chip
    d, th = _start(cfg, p)
    # Count from the source's first FIFO flush: what the chip overwrote while the daemon was
    # still starting up is not a sample the source was ever meant to read.
    end = time.monotonic() + 10
    while not chip.pushed_at_reset and time.monotonic() < end:
        time.sleep(0.001)
    overwritten0 = chip.overwritten
    sim0, cpu0 = clock.time(), thread_cpu_s()
    t0 = time.perf_counter()
    time.sleep(sim_s / speedup)
    sim1, cpu1 = clock.time(), thread_cpu_s()
    wall = time.perf_counter() - t0
    # Freeze time, let the source take what is due, then read every counter at rest (stopping
    # the daemon takes long enough in simulated time to overflow the FIFO on its own).
    clock.freeze()
    time.sleep(0.3)
    chip.update()
    stats = dict(p.imu.stats)
    staged, windows, frames = d.counters.imu_samples, d.counters.motion_windows, d.counters.frames
    in_fifo = len(chip.fifo) // chip.frame_bytes()
    produced, overwritten, resets = chip.pushed, chip.overwritten, chip.fifo_resets
    first_reset = chip.pushed_at_reset[0] if chip.pushed_at_reset else 0
    gaps = p.motion.gaps
    _stop(d, th)
    stamps = chip.true_times()
    return {
        "sim_s": sim1 - sim0, "wall_s": wall,
        "rate_hz": p.imu.settings.rate_hz, "fifo_frames": p.imu.settings.fifo_frames,
        # Samples produced before the source's first FIFO reset are flushed on purpose at start.
        "produced": int(produced - first_reset), "fifo_resets": int(resets),
        "overwritten": int(overwritten - overwritten0), "overwritten_before_start": int(overwritten0),
        "in_fifo_at_stop": int(in_fifo),
        "delivered": int(stats["samples"]), "staged": int(staged),
        "source_lost": int(stats["lost_samples"]), "overflows": int(stats["overflows"]),
        "read_errors": int(stats["read_errors"]), "stage_gaps": int(gaps),
        "windows": int(windows), "frames": int(frames),
        "recorded": int(len(stamps)),
        "cpu_imu": (cpu1.get("imu", 0) - cpu0.get("imu", 0)) / wall,
        "cpu_vision": (cpu1.get("vision", 0) - cpu0.get("vision", 0)) / wall,
    }


def _worker(kind: str, **kwargs) -> dict:
    return {"fifo": fifo_worker}[kind](**kwargs)


def imu_fifo(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    sim_s = 20.0 if quick else SIM_S
    speedup = QUICK_SPEEDUP if quick else SPEEDUP
    own, helpers = split_cpus()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        with Broker(work / "broker", cores=helpers) as broker:
            r = run_worker("imu_fifo", {"kind": "fifo", "host": broker.host, "port": broker.port,
                                        "workdir": str(work), "sim_s": sim_s, "speedup": speedup},
                           own, timeout=sim_s / speedup + 90)
    # Every sample the chip produced after the source's first flush either reached the motion
    # stage or was still in the FIFO when time stopped; anything else was lost, however.
    lost = r["produced"] - r["in_fifo_at_stop"] - r["staged"]
    note = (f"{r['sim_s']:.0f} s simulated in {r['wall_s']:.0f} s ({speedup:g}× time), {r['rate_hz']:g} Hz, "
            f"FIFO {r['fifo_frames']} samples; produced {r['produced']}, staged {r['staged']}, "
            f"{r['in_fifo_at_stop']} left in the FIFO; the chip overwrote {r['overwritten']}, the source "
            f"saw {r['overflows']} overflows (FIFO resets {r['fifo_resets']}, lost estimate {r['source_lost']}), "
            f"the stage {r['stage_gaps']} gaps; {r['windows']} windows; vision ran {r['frames']} frames "
            f"alongside; CPU: imu thread {r['cpu_imu'] * 100:.1f}%, vision {r['cpu_vision'] * 100:.1f}%")
    return [
        Figure("imu", f"samples lost at {RATE_HZ:g} Hz over {r['sim_s'] / 60:.1f} simulated min",
               lost, "", "0", lost == 0, note),
        Figure("imu", "samples delivered to the motion stage", r["staged"], ""),
    ]


if __name__ == "__main__":
    worker_main(_worker)
