"""Bandwidth (issue 8, figure 5): what the demo workload publishes per hour, against the raw
frames and IMU samples it would have had to send instead.

`edged run` runs the demo (the sample photos at 2 fps, the IMU recording at real time, the
default vision chain publishing track events and the motion model, as `make run` does) with
stats every second. The daemon's own stats give
`raw_bytes` (every frame as RGB bytes, every IMU sample as six float32) and `bytes_sent` (the
payloads of results the broker acknowledged); their rates over the run, times 3600, are the
hourly figures. The MQTT framing of each result (fixed header, topic, packet id, MQTT 5
properties) is added from what a subscriber saw, for the bytes on the wire above TCP.

With sampling (issue 17): the same demo again with `[sampling]` on, the IMU replaying a stair
climb the shipped centroids call `unknown` (HAPT, tests/data/hapt_heldout.npz) and the face
detections between 0.5 and 1.0 counted as uncertain, every trigger sampled (no minimum interval,
no budget): the most sampling can add. From the sizes of the samples sent, the same ratio at the
default budget (at most `per_hour` samples and `bytes_per_hour` bytes an hour) follows.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Broker, Figure, Subscriber, daemon_cmd, daemon_env, split_cpus, toml_config

DEMO = "[camera]\nfps = 2\n[imu]\nspeed = 1\n[stats]\ninterval_s = 1\n"
# MQTT 5 properties on every result (edged.delivery.link): content type "application/json" and a
# message expiry interval: 1 + 2 + 16 bytes and 1 + 4 bytes, plus the properties length.
V5_PROPERTIES = 1 + (1 + 2 + len("application/json")) + (1 + 4)


def publish_wire_bytes(topic: str, payload: int) -> int:
    """Bytes of one QoS 1 MQTT 5 PUBLISH with edged's properties, and its PUBACK."""
    body = 2 + len(topic.encode()) + 2 + V5_PROPERTIES + payload
    header = 1 + (1 if body < 128 else 2 if body < 16384 else 3)
    return header + body + 4


def _stairs_csv(path: Path) -> Path:
    """A HAPT stair climb (a person and an activity the shipped model never trained on)."""
    import numpy as np

    from edged.sources.imu.imucsv import write_imu_csv

    d = np.load(REPO / "tests" / "data" / "hapt_heldout.npz")
    ends = np.append(d["start"][1:], len(d["x"]))
    i = next(k for k in range(len(d["start"])) if d["label"][k] == "walking_upstairs")
    a, b = d["start"][i], ends[i]
    write_imu_csv(path, np.arange(b - a) / float(d["rate_hz"]), d["x"][a:b].astype(np.float32))
    return path


def _run_demo(work: Path, name: str, extra: str, seconds: float, helpers) -> tuple[list[dict], list[tuple[str, bytes]], list[bytes]]:
    """(stats, (topic, payload) of each result, sample payloads) of `seconds` of the demo with `extra` config."""
    with Broker(work / f"broker-{name}", cores=helpers) as broker, Subscriber(broker, "edged/bench/+") as sub:
        cfg = toml_config(work / f"{name}.toml", broker, work / f"state-{name}", extra)
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen(daemon_cmd(cfg), env=daemon_env(), cwd=work, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            # Measured from the first stats on: start-up (model loading) is not the workload.
            end = time.monotonic() + 60
            while not sub.json("stats") and time.monotonic() < end and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
            log.close()
        time.sleep(0.2)
        stats = [m for _, m in sub.json("stats")]
        results = [(f"edged/bench/{leaf}", p) for leaf in ("events", "detections", "motion") for _, p in sub.on(leaf)]
        return stats, results, [p for _, p in sub.on("sample")]


def bandwidth(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    seconds = 5.0 if quick else 30.0
    _, helpers = split_cpus()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        stats, results, _ = _run_demo(work, "demo", DEMO, seconds, helpers)
        stairs = _stairs_csv(work / "stairs.csv")
        sampling = (f'[camera]\nfps = 2\n[imu]\nspeed = 1\npath = "{stairs}"\n[stats]\ninterval_s = 1\n'
                    f'[motion]\ncentroids = "{REPO / "models" / "motion.centroids.json"}"\n'
                    f'[sampling]\nenabled = true\nmin_interval_s = 0.0\nvision_min_score = 0.5\n'
                    f'vision_max_score = 1.0\nper_hour = 100000\nbytes_per_hour = 1099511627776\n'
                    f'per_day = 1000000\nbytes_per_day = 1099511627776\n')
        s_stats, _, s_samples = _run_demo(work, "sampling", sampling, seconds, helpers)
    if len(stats) < 2 or len(s_stats) < 2:
        raise RuntimeError(f"bandwidth: the daemon published {len(stats)} and {len(s_stats)} stats messages "
                           f"in {seconds:.0f} s")
    first, last = stats[0], stats[-1]
    dt = last["uptime_s"] - first["uptime_s"]
    raw_h = (last["raw_bytes"] - first["raw_bytes"]) / dt * 3600
    sent_h = (last["bytes_sent"] - first["bytes_sent"]) / dt * 3600
    n = len(results)
    payload = sum(len(p) for _, p in results)
    wire = sum(publish_wire_bytes(topic, len(p)) for topic, p in results)
    wire_h = sent_h * wire / payload if payload else 0.0
    note = (f"{dt:.0f} s of the demo: {n} results, {payload / max(n, 1):.0f} B payload and "
            f"{wire / max(n, 1):.0f} B of MQTT per result; raw {raw_h / 1e9:.2f} GB/h")
    # With sampling: every trigger, then the default budget's worst case from the same sizes.
    sf, sl = s_stats[0], s_stats[-1]
    sdt = sl["uptime_s"] - sf["uptime_s"]
    s_raw_h = (sl["raw_bytes"] - sf["raw_bytes"]) / sdt * 3600
    s_results_h = (sl["bytes_sent"] - sf["bytes_sent"]) / sdt * 3600
    s_samples_h = (sl.get("samples_bytes_sent", 0) - sf.get("samples_bytes_sent", 0)) / sdt * 3600
    sizes = [len(p) for p in s_samples]
    imu = [len(p) for p in s_samples if b'"kind":"imu"' in p]
    crops = [len(p) for p in s_samples if b'"kind":"crop"' in p]
    from edged.config import SamplingConfig

    budget = SamplingConfig()
    mean = sum(sizes) / len(sizes) if sizes else 0.0
    budget_h = min(budget.per_hour * max(sizes, default=0), budget.bytes_per_hour)
    s_note = (f"{sdt:.0f} s, IMU replaying a stair climb (all windows unknown), faces scoring 0.5–1 uncertain: "
              f"{len(sizes)} samples sent ({len(imu)} IMU windows, mean {sum(imu) / max(len(imu), 1):.0f} B; "
              f"{len(crops)} crops, mean {sum(crops) / max(len(crops), 1):.0f} B); default budget "
              f"{budget.per_hour}/h, {budget.bytes_per_hour} B/h")
    return [
        Figure("bandwidth", "raw frames + IMU samples per hour", round(raw_h / 1e6, 1), "MB/h", "", None, note),
        Figure("bandwidth", "result payloads published per hour", round(sent_h / 1e6, 3), "MB/h"),
        Figure("bandwidth", "MQTT bytes per hour (payload + framing)", round(wire_h / 1e6, 3), "MB/h"),
        Figure("bandwidth", "raw / published payload bytes", round(raw_h / sent_h) if sent_h else 0.0, "×"),
        Figure("bandwidth", "with sampling, every trigger: sample payloads per hour", round(s_samples_h / 1e6, 3),
               "MB/h", "", None, s_note),
        Figure("bandwidth", "with sampling, every trigger: raw / (results + samples)",
               round(s_raw_h / (s_results_h + s_samples_h)) if s_results_h + s_samples_h else 0.0, "×"),
        Figure("bandwidth", "with sampling at the default budget, worst case: raw / (results + samples)",
               round(raw_h / (sent_h + budget_h)) if sent_h + budget_h else 0.0, "×", "", None,
               f"results {sent_h / 1e6:.3f} MB/h + at most {budget_h / 1e6:.3f} MB/h of samples "
               f"(the largest sample seen, {max(sizes, default=0)} B, × {budget.per_hour}, within "
               f"{budget.bytes_per_hour} B; mean sample {mean:.0f} B)"),
    ]
