"""Memory and start-up (issue 8, figure 3).

- Peak RSS (VmHWM) of `edged run` as a subprocess running a vision model (or the default chain
  of them) and the motion model on the demo sources, read 8 s after its READY=1 (models loaded),
  just before it is stopped. The chain also with glibc's own malloc settings (a MALLOC_ variable
  in the environment makes edged leave them alone), for what edged's settings save.
- The chain's own memory: each stage's interpreter as it is opened, and the stages' numpy
  buffers after the demo photos (a worker process, as numpy reports them to tracemalloc).
- Where that memory goes: a fresh worker process reads its own VmRSS after importing or
  loading each piece in the order the daemon needs them; the steps add up to the daemon's
  RSS less its threads' stacks and run-time buffers (the "running" row).
- Start-up: wall time from spawning `edged run` to its READY=1 on a NOTIFY_SOCKET we listen
  on, the moment systemd would consider the service started; the median of a few starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import (SAMPLES, Broker, Figure, NotifySocket, at_most, daemon_cmd, daemon_env, median,
                               rss_kb, run_worker, split_cpus, toml_config, worker_main)

DEMO = "[camera]\nfps = 10\n[imu]\nspeed = 1\n[stats]\ninterval_s = 1\n"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready_time(config: Path, work: Path, n: int) -> float:
    """Spawn → READY=1, seconds (a fresh listener per start)."""
    listener = NotifySocket(work / f"notify-{n}.sock")
    log = (work / f"ready-{n}.log").open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(daemon_cmd(config), env=daemon_env(NOTIFY_SOCKET=listener.path), cwd=work,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        while listener.first("READY=1") is None and proc.poll() is None and time.monotonic() - t0 < 30:
            time.sleep(0.002)
        ready_at = listener.first("READY=1")
        if ready_at is None:
            raise RuntimeError(f"edged run did not report READY=1: {(work / f'ready-{n}.log').read_text()[-500:]}")
        return ready_at - t0
    finally:
        _stop(proc)
        listener.close()
        log.close()


def peak_rss(config: Path, work: Path, seconds: float, name: str, **env: str) -> tuple[int, int]:
    """(VmHWM, VmRSS) in kB of `edged run` after `seconds` of running from its READY=1 (its models
    loaded: on a loaded machine the start alone can take longer than `seconds`)."""
    listener = NotifySocket(work / f"notify-rss-{name}.sock")
    log = (work / f"rss-{name}.log").open("wb")
    proc = subprocess.Popen(daemon_cmd(config), env=daemon_env(NOTIFY_SOCKET=listener.path, **env), cwd=work,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while listener.first("READY=1") is None and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        time.sleep(seconds)
        if proc.poll() is not None or listener.first("READY=1") is None:
            raise RuntimeError(f"edged run exited or never got ready: {(work / f'rss-{name}.log').read_text()[-500:]}")
        rss, hwm = rss_kb(proc.pid)
        return hwm, rss
    finally:
        _stop(proc)
        listener.close()
        log.close()


def breakdown_worker(workdir: str, vision_model: str) -> dict:
    """VmRSS after each piece the daemon loads, in the order it loads them."""
    steps: list[tuple[str, int]] = [("interpreter and standard library", rss_kb()[0])]

    def step(name: str) -> None:
        steps.append((name, rss_kb()[0]))

    import numpy  # noqa: F401

    step("numpy")
    import edged.cli  # noqa: F401
    import edged.config
    import edged.service.daemon  # noqa: F401

    step("edged modules")
    from edged.delivery.outbox import Outbox

    ob = Outbox(Path(workdir) / "rss-outbox.db")
    step("SQLite outbox")
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    step("paho-mqtt")
    from edged.runtime import runtime

    runtime()
    step("TFLite runtime (LiteRT)")
    from edged.models import load_manifest, open_model
    from edged.stages.vision import VisionStage

    manifest = load_manifest()
    ventry = manifest[vision_model]
    vision = VisionStage(open_model(ventry, threads=1), ventry)
    step(f"vision model ({vision_model})")
    from edged.stages.motion import MotionStage

    mentry = manifest["motion"]
    motion = MotionStage(open_model(mentry, threads=1), mentry)
    step("motion model")
    from edged.sources.camera import open_replay

    cam = open_replay(SAMPLES / "images", fps=1000.0)
    for _ in range(5):
        vision.detect(cam.read().image)
    step("Pillow, demo frames decoded and detected")
    del client, ob, motion
    return {"steps": steps}


def chain_worker() -> dict:
    """The default chain's own memory: what each model's interpreter adds as it is opened
    (tensor arena, XNNPack's packed weights; stages naming one model share it), then what the
    stages' numpy buffers hold after three
    rounds of the demo photos (work arrays, resampling tables, input slots, output copies), as
    numpy reports its allocations to tracemalloc. Same order and thread settings as the daemon."""
    import tracemalloc

    import numpy as np
    from PIL import Image

    from edged.models import load_manifest, open_model
    from edged.runtime import runtime
    from edged.service.daemon import tune_malloc
    from edged.stages.vision.graph import DEFAULT_CHAIN, open_graph
    from edged.stages.vision.overlap import FrameRunner

    tune_malloc()
    runtime()  # the runtime library itself is the "TFLite runtime" row of the face breakdown
    manifest = load_manifest()
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((SAMPLES / "images").glob("*.jpg"))]
    models: list[tuple[str, float]] = []

    def opened(entry):
        before = rss_kb()[0]
        model = open_model(entry)
        models.append((entry.name, (rss_kb()[0] - before) / 1024))
        return model

    tracemalloc.start()
    graph = open_graph(DEFAULT_CHAIN, manifest, open_entry=opened)
    at_open = tracemalloc.get_traced_memory()[0]
    before = rss_kb()[0]
    runner = FrameRunner(graph, overlap=True)
    for _ in range(3):
        for image in photos:
            runner.push(image)
        runner.flush()
    runner.close()
    return {"models": models, "buffers_mb": (tracemalloc.get_traced_memory()[0] - at_open) / 2**20,
            "frames_rss_mb": (rss_kb()[0] - before) / 1024}


def _worker(kind: str, **kwargs) -> dict:
    return {"breakdown": breakdown_worker, "chain": chain_worker}[kind](**kwargs)


def memory(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    seconds, starts = (2.0, 1) if quick else (8.0, 3)
    _, helpers = split_cpus()
    figures = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        with Broker(work / "broker", cores=helpers) as broker:
            face_cfg = toml_config(work / "face.toml", broker, work / "state-face",
                                   DEMO + '[vision]\nmodel = "face"\n')
            person_cfg = toml_config(work / "person.toml", broker, work / "state-person",
                                     DEMO + '[vision]\nmodel = "person"\n')
            chain_cfg = toml_config(work / "chain.toml", broker, work / "state-chain", DEMO)  # the defaults
            hwm, rss = peak_rss(face_cfg, work, seconds, "face")
            bd = run_worker("memory", {"kind": "breakdown", "workdir": str(work), "vision_model": "face"},
                            None, timeout=120)
            steps = bd["steps"]
            parts = [(steps[0][0], steps[0][1])] + [(n, v - steps[i][1]) for i, (n, v) in enumerate(steps[1:])]
            parts.append(("threads, buffers and the rest of the running daemon", rss - steps[-1][1]))
            note = "; ".join(f"{n} {v / 1024:.1f}" for n, v in parts) + " (MB, VmRSS increments)"
            figures.append(Figure("memory", "peak RSS, edged run with face + motion", round(hwm / 1024, 1), "MB",
                                  "≤ 100", at_most(hwm / 1024, 100), note))
            for n, v in parts:
                figures.append(Figure("memory", f"  of which {n}", round(v / 1024, 1), "MB"))
            if not quick:
                phwm, _ = peak_rss(person_cfg, work, seconds, "person")
                figures.append(Figure("memory", "peak RSS, edged run with person + motion", round(phwm / 1024, 1),
                                      "MB", "≤ 100", at_most(phwm / 1024, 100)))
                chwm, _ = peak_rss(chain_cfg, work, seconds, "chain")
                figures.append(Figure("memory", "peak RSS, edged run with the default chain + motion",
                                      round(chwm / 1024, 1), "MB", "≤ 100", at_most(chwm / 1024, 100),
                                      "the embedded defaults: person (frame + 2×2 tiles), full-range and "
                                      "short-range face, person again on small people (the same interpreter), "
                                      "on the sample photos at their own size"))
                # glibc's defaults on this machine (8 arenas per core, a moving mmap threshold):
                # any MALLOC_ variable in the environment makes edged leave malloc alone.
                uhwm, _ = peak_rss(chain_cfg, work, seconds, "chain-untuned",
                                   MALLOC_ARENA_MAX=str(8 * (os.cpu_count() or 1)))
                figures.append(Figure("memory", "  chain, with glibc malloc's defaults", round(uhwm / 1024, 1),
                                      "MB", note="edged's malloc settings (edged/service/daemon.py, tune_malloc) "
                                      f"save {(uhwm - chwm) / 1024:.1f} MB"))
                ch = run_worker("memory", {"kind": "chain"}, None, timeout=300)
                for name, mb in ch["models"]:
                    figures.append(Figure("memory", f"  chain: the {name} interpreter (arena, XNNPack weights)",
                                          round(mb, 1), "MB"))
                figures.append(Figure("memory", "  chain: the stages' numpy buffers after the demo photos",
                                      round(ch["buffers_mb"], 1), "MB",
                                      note=f"VmRSS grew {ch['frames_rss_mb']:.1f} MB over those frames"))
            times = [ready_time(face_cfg, work, i) for i in range(starts)]
            figures.append(Figure("memory", "edged run: spawn → READY=1", round(median(times), 2), "s", "≤ 1.5",
                                  at_most(median(times), 1.5),
                                  f"starts: {', '.join(f'{t:.2f}' for t in times)} s"))
    return figures


if __name__ == "__main__":
    worker_main(_worker)
