"""Bandwidth (issue 8, figure 5): what the demo workload publishes per hour, against the raw
frames and IMU samples it would have had to send instead.

`edged run` runs the demo (the sample photos at 2 fps, the IMU recording at real time, the face
and motion models, as `make run` does) with stats every second. The daemon's own stats give
`raw_bytes` (every frame as RGB bytes, every IMU sample as six float32) and `bytes_sent` (the
payloads of results the broker acknowledged); their rates over the run, times 3600, are the
hourly figures. The MQTT framing of each result (fixed header, topic, packet id, MQTT 5
properties) is added from what a subscriber saw, for the bytes on the wire above TCP.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import Broker, Figure, Subscriber, daemon_cmd, daemon_env, split_cpus, toml_config

DEMO = "[camera]\nfps = 2\n[imu]\nspeed = 1\n[stats]\ninterval_s = 1\n"
# MQTT 5 properties on every result (edged.delivery.link): content type "application/json" and a
# message expiry interval: 1 + 2 + 16 bytes and 1 + 4 bytes, plus the properties length.
V5_PROPERTIES = 1 + (1 + 2 + len("application/json")) + (1 + 4)


def publish_wire_bytes(topic: str, payload: int) -> int:
    """Bytes of one QoS 1 MQTT 5 PUBLISH with edged's properties, and its PUBACK."""
    body = 2 + len(topic.encode()) + 2 + V5_PROPERTIES + payload
    header = 1 + (1 if body < 128 else 2 if body < 16384 else 3)
    return header + body + 4


def bandwidth(quick: bool = False, workdir: Path | None = None) -> list[Figure]:
    seconds = 5.0 if quick else 30.0
    _, helpers = split_cpus()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp:
        work = Path(workdir or tmp)
        with Broker(work / "broker", cores=helpers) as broker, Subscriber(broker, "edged/bench/+") as sub:
            cfg = toml_config(work / "demo.toml", broker, work / "state", DEMO)
            log = (work / "demo.log").open("wb")
            proc = subprocess.Popen(daemon_cmd(cfg), env=daemon_env(), cwd=work, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                time.sleep(seconds)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
                log.close()
            time.sleep(0.2)
            stats = [m for _, m in sub.json("stats")]
            results = sub.on("detections") + sub.on("motion")
    if len(stats) < 2:
        raise RuntimeError(f"bandwidth: the daemon published {len(stats)} stats messages in {seconds:.0f} s")
    first, last = stats[0], stats[-1]
    dt = last["uptime_s"] - first["uptime_s"]
    raw_h = (last["raw_bytes"] - first["raw_bytes"]) / dt * 3600
    sent_h = (last["bytes_sent"] - first["bytes_sent"]) / dt * 3600
    n = len(results)
    payload = sum(len(p) for _, p in results)
    wire = sum(publish_wire_bytes("edged/bench/detections" if b'"objects"' in p else "edged/bench/motion", len(p))
               for _, p in results)
    wire_h = sent_h * wire / payload if payload else 0.0
    note = (f"{dt:.0f} s of the demo: {n} results, {payload / max(n, 1):.0f} B payload and "
            f"{wire / max(n, 1):.0f} B of MQTT per result; raw {raw_h / 1e9:.2f} GB/h")
    return [
        Figure("bandwidth", "raw frames + IMU samples per hour", round(raw_h / 1e6, 1), "MB/h", "", None, note),
        Figure("bandwidth", "result payloads published per hour", round(sent_h / 1e6, 3), "MB/h"),
        Figure("bandwidth", "MQTT bytes per hour (payload + framing)", round(wire_h / 1e6, 3), "MB/h"),
        Figure("bandwidth", "raw / published payload bytes", round(raw_h / sent_h) if sent_h else 0.0, "×"),
    ]
