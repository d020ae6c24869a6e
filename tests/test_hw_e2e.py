"""End to end through the hardware fakes: the real daemon process, a real mosquitto, an emulated
MPU-6050 on a fake I2C bus and a fake Pi camera, both selected by the config alone."""

from __future__ import annotations

import re

from conftest import wait_until, write_config

HW = """
[vision]
model = "face"          # one model: the camera's ISP scales frames to its input (lores stream)
publish = "labels"
[camera]
source = "picamera2"
fake = true
fps = 5
[imu]
source = "mpu6050"
fake = true
rate_hz = 100
[stats]
interval_s = 1
"""


def test_mpu6050_on_fake_bus_and_fake_picamera2_publish_over_mqtt(tmp_path, broker, subscriber, daemon_factory):
    cfg = write_config(tmp_path / "edged.toml", broker, extra=HW)
    d = daemon_factory(cfg).start()
    ok = subscriber.wait(lambda: len(subscriber.on("motion")) >= 4
                         and any(m["objects"] for m in subscriber.json("detections"))
                         and subscriber.json("stats"), 60)
    out = d.output()
    assert ok, out

    # The chip was found and configured through the driver, on the fake bus, as the config said.
    ready = next(line for line in out.splitlines() if 'msg="IMU ready"' in line)
    assert "chip=mpu6050" in ready and "variant=mpu6050" in ready and "rate_hz=100.0" in ready
    assert re.search(r'msg="motion ready".* imu=mpu6050 .*fake_bus=True', out)
    # The camera gave the ISP the face model's input size, aspect ratio kept (640x480 → 128x96).
    assert re.search(r'msg="camera ready" .*source=picamera2 .*lores=128x96 lores_format=YUV420', out)

    motion = subscriber.json("motion")
    labels = {"standing", "walking", "running", "badminton", "unknown"}
    for m in motion:
        assert m["device_id"] == "test-dev" and m["label"] in labels
        assert len(m["signature"]) == 16 and all(-128 <= v <= 127 for v in m["signature"])
    # The fake chip plays the demo recording from the start: its first 10 s are a person standing.
    # Scale factors, FIFO parsing or time stamps gone wrong would not come out as "standing".
    assert motion[0]["label"] == "standing", motion[:3]
    ts = [m["ts"] for m in motion]
    assert ts == sorted(ts) and all(0.5 < b - a < 1.5 for a, b in zip(ts, ts[1:])), ts  # 1 s hop

    faces = [o for m in subscriber.json("detections") for o in m["objects"] if o["label"] == "face"]
    assert faces and all(0 < o["score"] <= 1 for o in faces)

    stats = subscriber.json("stats")[-1]
    assert stats["imu_samples"] > 200 and stats["frames"] > 3, stats

    assert d.stop() == 0
    assert wait_until(lambda: 'msg=stopped' in d.output(), 5)
