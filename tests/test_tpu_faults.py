"""An Edge TPU that aborts the process or hangs in invoke(), survived by the real daemon.

libedgetpu does not raise on a USB fault: it aborts the whole process or blocks in invoke() for
ever (google-coral/edgetpu#476, #494, #94). The daemon runs as `python -m edged run` with a fake
delegate loader (`[accelerator] fake = "abort" | "hang"`, chosen by edged/hardware.py) on a real
mosquitto; this test plays systemd's part (Restart=on-failure: start it again when it dies) and
a subscriber checks that no result is lost (seq contiguous from 1 to the last one stored) and
measures how long publishing stopped. The daemon reads an emulated IMU chip on a fake I²C bus (in
real time, so motion results come once a second): the restarted daemon counts the samples the
chip produced while no process read it, and starts its motion windows afresh after the gap.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import last_seq, wait_until, write_config
from edged.cloud.subscriber import Collector
from edged.fakes.tpu import FakeEdgeTpu
from edged.tpu import TpuFaultRecord

REPO_MODELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "models"


def tpu_models(tmp_path):
    """The shipped models, with a fake-compiled Edge TPU twin of the motion model."""
    d = tmp_path / "models"
    shutil.copytree(REPO_MODELS, d)
    compiled = FakeEdgeTpu().compile(d / "motion.tflite", d / "motion_edgetpu.tflite")
    import hashlib

    digest = hashlib.sha256(compiled.read_bytes()).hexdigest()
    text = (d / "manifest.toml").read_text()
    head = "[models.motion]\n"
    assert head in text
    text = text.replace(head, head + f'edgetpu_file = "{compiled.name}"\nedgetpu_sha256 = "{digest}"\n'
                                      f"edgetpu_size = {compiled.stat().st_size}\n", 1)
    (d / "manifest.toml").write_text(text)
    return d


def config(tmp_path, broker, fault: str, after: int):
    extra = (f'models_dir = "{tpu_models(tmp_path)}"\n'
             '[camera]\nenabled = false\n[imu]\nsource = "lsm6dsox"\nfake = true\n[stats]\ninterval_s = 1\n'
             f'[accelerator]\ndevice = "usb"\nfake = "{fault}"\nfake_fault_after = {after}\n'
             "retry_s = 3600\ninvoke_timeout_s = 2\n")
    return write_config(tmp_path / "edged.toml", broker, extra=extra)


@pytest.mark.parametrize("fault, status", [("abort", -6), ("hang", 75)])
def test_an_edge_tpu_that_takes_the_process_down_loses_no_result(tmp_path, broker, daemon_factory, fault, status):
    col = Collector(broker.host, broker.port).start()
    state = tmp_path / "state"
    cfg = config(tmp_path, broker, fault, after=4)
    try:
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: d.proc.poll() is not None, 120), d.output()
        died = time.monotonic()
        out = d.output()
        assert d.proc.returncode == status, out
        assert "model on the Edge TPU" in out
        if fault == "hang":
            assert "Edge TPU inference hung; exiting so the service restarts on the CPU" in out
            assert "Traceback" not in out
        record = json.loads((state / "tpu-fault.json").read_text())
        assert record.get("active") or record.get("fault") == "hang", record
        before = last_seq(state)
        assert before > 0

        position = json.loads((state / "imu-position.json").read_text())
        # as the dead process left it; a hang exits through the daemon's own stop
        assert position["state"] == ("running" if fault == "abort" else "restarting"), position

        # systemd's Restart=on-failure
        started = time.time()
        d2 = daemon_factory(cfg).start()
        assert wait_until(lambda: max(col.seqs("test-dev"), default=0) > before, 60), d2.output()
        resumed = time.monotonic() - died
        out2 = d2.output()
        assert "the last run ended in an Edge TPU fault; running on the CPU" in out2
        assert 'msg="motion ready" model=motion' in out2 and "backend=cpu" in out2.split('msg="motion ready"')[1].split("\n")[0]
        assert wait_until(lambda: last_seq(state) > before + 3, 60), out2
        # The samples between the last one the dead process saved and the new process's first
        # FIFO start, at the chip's rate (104 Hz): counted once, in one line.
        line = [x for x in d2.output().splitlines() if "IMU samples lost while the daemon was down" in x]
        assert len(line) == 1, out2
        lost = int(line[0].split(" lost=")[1].split()[0])
        gap = (started - position["last_stamp"], time.time() - position["last_stamp"])
        assert gap[0] * 104 - 2 <= lost <= gap[1] * 104 + 2, (lost, gap)
        # No motion window reaches back across the gap.
        motion = [r for r in col.results("test-dev", "motion") if r["seq"] > before]
        assert motion and min(r["ts"] - r["window_s"] for r in motion) >= started, motion[:2]
        assert d2.stop() == 0
        last = last_seq(state)
        assert wait_until(lambda: set(range(1, last + 1)) <= col.seqs("test-dev"), 30)
        assert set(range(1, last + 1)) <= col.seqs("test-dev")  # results lost: 0
        assert json.loads((state / "tpu-fault.json").read_text())["faults"] == 1
        print(f"\n{fault}: exit status {status}, publishing resumed {resumed:.1f} s after the process died "
              f"(restart delay excluded), results 1..{last} all received")
    finally:
        col.stop()


def test_fault_record_backs_off_and_forgets_after_a_clean_hour(tmp_path):
    now = [1000.0]
    rec = TpuFaultRecord(tmp_path / "tpu-fault.json", clock=lambda: now[0])
    assert rec.start_fault(60) is None
    rec.on_tpu("motion")                       # on the TPU ... and the process dies
    for n, expected in ((1, 60), (2, 120), (3, 240)):
        rec = TpuFaultRecord(tmp_path / "tpu-fault.json", clock=lambda: now[0])
        assert rec.start_fault(60) == expected and rec.start_fault(60) == expected  # counted once
        assert rec.data["faults"] == n
        rec.on_tpu("motion")                   # the retry goes to the TPU, and dies again
    rec = TpuFaultRecord(tmp_path / "tpu-fault.json", clock=lambda: now[0])
    assert rec.start_fault(60) == 480
    rec.on_tpu("motion")
    now[0] += 3600                             # an hour without a fault, then a clean stop
    rec.off_tpu("motion")
    rec = TpuFaultRecord(tmp_path / "tpu-fault.json", clock=lambda: now[0])
    assert rec.start_fault(60) is None and rec.data["faults"] == 0
