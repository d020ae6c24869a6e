"""`edged doctor` against a fake /dev, /sys and /etc tree, the fake I2C chips and camera, and a real
mosquitto (plain and TLS)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SAMPLES, Broker, free_port

MODELS = REPO / "models"
from edged import config
from edged.service import doctor
from edged.service.doctor import FAIL, INFO, OK, WARN, Env
from edged.fakes.camera import FakePicamera2Factory
from edged.fakes.tpu import FakeEdgeTpu
from edged.fakes.imu import make_factory


def fake_root(tmp_path, *, video=True, i2c=True, usb_tpu=None, apex=False,
              groups="video:x:44:pi\ni2c:x:998:pi\nplugdev:x:46:"):
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "etc").mkdir()
    if video:
        (root / "dev/video0").write_text("")
        (root / "sys/class/video4linux/video0").mkdir(parents=True)
        (root / "sys/class/video4linux/video0/name").write_text("HD Pro Webcam C920\n")
    if i2c:
        (root / "dev/i2c-1").write_text("")
    usb = root / "sys/bus/usb/devices"
    usb.mkdir(parents=True, exist_ok=True)
    if usb_tpu:
        (usb / "2-1").mkdir()
        (usb / "2-1/idVendor").write_text(usb_tpu[0] + "\n")
        (usb / "2-1/idProduct").write_text(usb_tpu[1] + "\n")
    if apex:
        (root / "dev/apex_0").write_text("")
    (root / "etc/group").write_text(f"root:x:0:\npi:x:1000:\n{groups}\n")
    (root / "etc/passwd").write_text("pi:x:1000:1000::/home/pi:/bin/bash\n")
    return root


def cfg_for(tmp_path, broker_port: int, body: str = "", models_dir: str = "") -> config.Config:
    top = f'state_dir = "{tmp_path / "state"}"\nmodels_dir = "{models_dir}"\n'
    return config.parse(f'{top}{body}\n[mqtt]\nport = {broker_port}\n')


@pytest.fixture
def tpu_models(tmp_path) -> str:
    """The shipped models, with an Edge TPU twin of the face detector in the manifest."""
    d = tmp_path / "models"
    d.mkdir()
    for f in ("manifest.toml", "face_detection_short_range.tflite", "motion.tflite"):
        shutil.copy(MODELS / f, d / f)
    for f in MODELS.glob("*.labels"):
        shutil.copy(f, d / f.name)
    twin = FakeEdgeTpu().compile(MODELS / "face_detection_short_range.tflite", d / "face_edgetpu.tflite")
    digest = hashlib.sha256(twin.read_bytes()).hexdigest()
    text = (d / "manifest.toml").read_text().replace(
        "[models.face]\n", f'[models.face]\nedgetpu_file = "{twin.name}"\nedgetpu_sha256 = "{digest}"\n'
                          f"edgetpu_size = {twin.stat().st_size}\n", 1)
    (d / "manifest.toml").write_text(text)
    return str(d)


def by_name(checks) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


HW = """
[camera]
source = "v4l2"
[vision]
model = "face"                  # the one model with an Edge TPU twin here (tpu_models)
[imu]
source = "mpu6050"
[accelerator]
device = "usb"
"""


def test_a_ready_pi_passes(tmp_path, broker, tpu_models):
    root = fake_root(tmp_path, usb_tpu=("18d1", "9302"), groups="video:x:44:pi\ni2c:x:998:pi\nplugdev:x:46:pi")
    env = Env(root=root, smbus_factory=make_factory("mpu6050"), user="pi", uid=1000,
              load_library=lambda lib: (True, f"/usr/lib/aarch64-linux-gnu/{lib}"))
    checks = doctor.run(cfg_for(tmp_path, broker.port, HW, tpu_models), config_path="edged.toml", env=env)
    c = by_name(checks)
    assert c["camera"].status == OK and "/dev/video0" in c["camera"].detail
    assert c["video nodes"].detail == "/dev/video0 (HD Pro Webcam C920)"
    assert c["imu"].status == OK
    assert c["imu"].detail == "mpu6050 at 0x68 on I2C bus 1 (ID register 0x75 = 0x68)"
    assert c["i2c buses"].detail == "/dev/i2c-1"
    assert c["edgetpu"].status == OK and "Coral USB Accelerator 18d1:9302" in c["edgetpu"].detail
    assert "face_edgetpu.tflite" in c["models"].detail
    assert c["groups"].status == OK and c["groups"].detail == "user pi is in video, i2c, plugdev"
    assert c["broker"].status == OK and "an MQTT broker accepted CONNECT" in c["broker"].detail
    assert c["outbox"].status == OK
    assert doctor.exit_status(checks) == 0, doctor.render(checks, "edged.toml")


@pytest.mark.parametrize("chip, variant, address, reg, value", [
    ("mpu6500", "mpu6500", 0x68, 0x75, 0x70),
    ("lsm6dsox", "lsm6dsox", 0x6A, 0x0F, 0x6C),
    ("bmi160", "bmi160", 0x69, 0x00, 0xD1),
])
def test_auto_identifies_each_chip_by_its_id_register(tmp_path, chip, variant, address, reg, value):
    cfg = cfg_for(tmp_path, 1, '[imu]\nsource = "auto"')
    found = doctor.identify_imu(cfg, make_factory(chip))
    assert found == f"{variant} at 0x{address:02x} on I2C bus 1 (ID register 0x{reg:02x} = 0x{value:02x})"


def test_imu_problems_say_how_to_fix(tmp_path):
    cfg = cfg_for(tmp_path, 1, '[imu]\nsource = "mpu6050"')
    wrong = doctor.identify_imu(cfg, make_factory("bmi160"))
    assert wrong.status == FAIL and "found bmi160 at 0x69" in wrong.detail
    assert wrong.fix == 'set imu.source = "bmi160" (or "auto")'
    nothing = doctor.identify_imu(cfg, make_factory("mpu6050", bus_number=3))  # chip on another bus
    assert nothing.status == FAIL and "no supported IMU on I2C bus 1" in nothing.detail
    assert "i2cdetect -y 1" in nothing.fix
    liar = doctor.identify_imu(cfg, make_factory("mpu6050", who_am_i=0x12))
    assert liar.status == FAIL and "reg 0x75=0x12" in liar.detail
    checks = by_name(doctor.check_imu(cfg, Env(root=fake_root(tmp_path, i2c=False))))
    assert checks["imu"].status == FAIL and "/dev/i2c-1 does not exist" in checks["imu"].detail
    assert "raspi-config nonint do_i2c 0" in checks["imu"].fix
    assert checks["i2c buses"].detail == "no /dev/i2c-* (I2C not enabled)"


def test_fake_hardware_in_the_config_is_a_warning(tmp_path):
    cfg = cfg_for(tmp_path, 1, '[camera]\nsource = "picamera2"\nfake = true\n[imu]\nsource = "mpu6050"\nfake = true')
    env = Env(root=fake_root(tmp_path, i2c=False))
    c = by_name(doctor.check_camera(cfg, env) + doctor.check_imu(cfg, env))
    assert c["camera"].status == WARN and "camera.fake = true" in c["camera"].detail
    assert c["imu"].status == WARN and c["imu"].detail.startswith("mpu6050 at 0x68") and "FAKE bus" in c["imu"].detail


def test_picamera2_cameras_listed_missing_or_not_installed(tmp_path):
    cfg = cfg_for(tmp_path, 1, '[camera]\nsource = "picamera2"')
    f = FakePicamera2Factory(SAMPLES / "images")
    env = Env(root=fake_root(tmp_path, video=False), picamera2=lambda: f)
    (cam, nodes) = doctor.check_camera(cfg, env)
    assert cam.status == OK and "imx708" in cam.detail and nodes.detail == "no /dev/video* nodes"
    f.unplug()
    (cam, _) = doctor.check_camera(cfg, env)
    assert cam.status == FAIL and "libcamera finds 0 camera(s)" in cam.detail
    assert "rpicam-hello --list-cameras" in cam.fix

    def missing():
        raise ImportError("No module named 'picamera2'")

    (cam, _) = doctor.check_camera(cfg, Env(root=env.root, picamera2=missing))
    assert cam.status == FAIL and "sudo apt install python3-picamera2" in cam.fix
    assert "--system-site-packages" in cam.fix


def test_v4l2_device_missing(tmp_path):
    cfg = cfg_for(tmp_path, 1, '[camera]\nsource = "v4l2"\ndevice = "/dev/video2"')
    (cam, nodes) = doctor.check_camera(cfg, Env(root=fake_root(tmp_path)))
    assert cam.status == FAIL and cam.detail == "/dev/video2 does not exist"
    assert "v4l2-ctl --list-devices" in cam.fix and "/dev/video0" in nodes.detail


@pytest.mark.parametrize("device, fallback, usb, lib, status, words", [
    ("cpu", True, None, False, INFO, ['not used (accelerator.device = "cpu")']),
    ("usb", True, ("1a6e", "089a"), True, OK, ["firmware not loaded yet"]),
    ("usb", True, None, True, WARN, ["no USB Edge TPU found", "until it appears"]),
    ("usb", False, None, True, FAIL, ["no USB Edge TPU found", "will not start"]),
    ("usb", False, ("18d1", "9302"), False, FAIL, ["libedgetpu.so.1 does not load"]),
    ("auto", True, None, False, INFO, ["no Edge TPU found", "models run on the CPU"]),
    ("pci", True, ("18d1", "9302"), True, WARN, ["no PCI Edge TPU found"]),
])
def test_edgetpu_presence_library_and_requirement(tmp_path, tpu_models, device, fallback, usb, lib, status, words):
    cfg = cfg_for(tmp_path, 1, f'[accelerator]\ndevice = "{device}"\nfallback = {str(fallback).lower()}', tpu_models)
    env = Env(root=fake_root(tmp_path, usb_tpu=usb),
              load_library=lambda name: (True, name) if lib else (False, f"{name}: cannot open shared object file"))
    (check,) = doctor.check_tpu(cfg, env)
    assert check.status == status, check
    for w in words:
        assert w in check.detail, check.detail
    if status in (WARN, FAIL) and "no " in check.detail:
        assert "1a6e:089a" in check.fix or "apex" in check.fix
    if not lib and status == FAIL:
        assert "sudo apt install libedgetpu1-std" in check.fix


def test_pcie_tpu_found_by_its_device_node(tmp_path, tpu_models):
    cfg = cfg_for(tmp_path, 1, '[accelerator]\ndevice = "pci:0"', tpu_models)
    (check,) = doctor.check_tpu(cfg, Env(root=fake_root(tmp_path, apex=True), load_library=lambda n: (True, n)))
    assert check.status == OK and "PCIe /dev/apex_0" in check.detail


def test_a_tpu_with_no_compiled_model_to_run_is_a_warning(tmp_path):
    cfg = cfg_for(tmp_path, 1, '[accelerator]\ndevice = "usb"')  # the shipped models: none compiled
    env = Env(root=fake_root(tmp_path, usb_tpu=("18d1", "9302")), load_library=lambda n: (True, n))
    (check,) = doctor.check_tpu(cfg, env)
    assert check.status == WARN and "no model in use has an edgetpu_file (person, face_full_range, face, motion)" in check.detail
    assert "edgetpu_compiler" in check.fix


def test_groups_missing_are_named_with_the_usermod_line(tmp_path):
    root = fake_root(tmp_path, groups="video:x:44:\ni2c:x:998:pi\nplugdev:x:46:")
    env = Env(root=root, user="pi", uid=1000)
    check = doctor.check_groups(cfg_for(tmp_path, 1, HW), env)
    assert check.status == FAIL  # the camera needs video
    assert check.detail == "user pi is not in video (for the camera), plugdev (for the USB Edge TPU)"
    assert check.fix.startswith("sudo usermod -aG video,plugdev pi")
    # only the TPU's group missing, with a CPU fallback: a warning
    root = fake_root(tmp_path / "b")
    check = doctor.check_groups(cfg_for(tmp_path, 1, HW), Env(root=root, user="pi", uid=1000))
    assert check.status == WARN and "plugdev" in check.detail
    # the primary group counts; a missing group is explained
    root = fake_root(tmp_path / "c", groups="video:x:44:")
    (root / "etc/passwd").write_text("pi:x:1000:44::/home/pi:/bin/bash\n")  # video as primary group
    cfg = cfg_for(tmp_path, 1, '[camera]\nsource = "v4l2"\n[imu]\nsource = "auto"')
    check = doctor.check_groups(cfg, Env(root=root, user="pi", uid=1000))
    assert check.status == FAIL and check.detail == "user pi is not in i2c (for the IMU)"
    assert "raspi-config" in check.fix  # the i2c group does not exist yet
    assert doctor.check_groups(cfg_for(tmp_path, 1, ""), Env(root=root, user="pi", uid=1000)).status == INFO


def test_broker_down_plain_and_tls(tmp_path, broker):
    down = doctor.check_broker(cfg_for(tmp_path, free_port()), Env())
    # Unreachable is a warning: the daemon spools until the broker is back.
    assert down.status == WARN and "Connection refused" in down.detail and "mosquitto" in down.fix

    from test_mqtt import Pki

    pki = Pki(tmp_path)
    (tmp_path / "tls").mkdir()
    tls_broker = Broker(tmp_path / "tls", listener_conf=pki.listener()).start()
    try:
        base = f'state_dir = "{tmp_path}"\n[mqtt]\nhost = "127.0.0.1"\nport = {tls_broker.port}\ntls = true\n'
        ok = doctor.check_broker(config.parse(base + f'ca_file = "{pki.files["ca"][0]}"\n'), Env())
        assert ok.status == OK and "TLSv1." in ok.detail and "certificate for 127.0.0.1 verified" in ok.detail
        bad = doctor.check_broker(config.parse(base + f'ca_file = "{pki.files["other_ca"][0]}"\n'), Env())
        assert bad.status == FAIL and "TLS certificate not trusted" in bad.detail and "mqtt.ca_file" in bad.fix
        plain = doctor.check_broker(config.parse(base.replace(f"port = {tls_broker.port}",
                                                             f"port = {broker.port}")), Env(timeout_s=1))
        assert plain.status == FAIL and "TLS handshake failed" in plain.detail
    finally:
        tls_broker.stop()


def test_outbox_space(tmp_path):
    assert doctor.check_outbox(cfg_for(tmp_path, 1)).status == OK
    huge = doctor.check_outbox(cfg_for(tmp_path, 1, "[outbox]\nmax_bytes = 1099511627776"))
    assert huge.status == WARN and "disk fills before the outbox bound" in huge.detail


def test_invalid_config_still_checks_the_rest(tmp_path):
    checks = doctor.run(None, config_path="bad.toml", problems=["bad.toml:3: mqtt.port: expected 1 to 65535, got 0"],
                        env=Env(root=fake_root(tmp_path)))
    c = by_name(checks)
    assert c["config"].status == FAIL and "mqtt.port" in c["config"].detail
    assert "edged check-config bad.toml" in c["config"].fix
    assert {"python", "runtime", "models", "camera", "imu", "edgetpu", "groups", "broker", "outbox"} <= set(c)
    assert doctor.exit_status(checks) == 1


def test_cli_on_this_machine_reports_missing_hardware_and_exits_nonzero(tmp_path):
    """The build machine has no camera, I2C or TPU: a config that needs them must say so."""
    cfg = tmp_path / "edged.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[camera]\nsource = "v4l2"\ndevice = "/dev/video9"\n'
                   '[imu]\nsource = "mpu6050"\nbus = 7\n[accelerator]\ndevice = "usb"\nfallback = false\n'
                   f"[mqtt]\nport = {free_port()}\n")
    run = subprocess.run([sys.executable, "-m", "edged", "doctor", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    assert "FAIL  camera       /dev/video9 does not exist" in out
    assert "FAIL  imu          /dev/i2c-7 does not exist" in out
    assert "FAIL  edgetpu" in out and "fallback = false" in out
    assert out.count("fix: ") >= 4 and "Traceback" not in run.stderr
    js = subprocess.run([sys.executable, "-m", "edged", "doctor", "--json", "--config", str(cfg)], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
    doc = json.loads(js.stdout)
    assert js.returncode == 1 and doc["ok"] is False
    assert {c["name"]: c["status"] for c in doc["checks"]}["camera"] == "fail"
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doc["checks"])


def test_render_puts_the_fix_under_each_problem():
    text = doctor.render([doctor.Check("a", OK, "fine"), doctor.Check("bb", FAIL, "broken", "do this"),
                          doctor.Check("c", WARN, "meh", "maybe that")], "x.toml")
    assert text.splitlines()[2:7] == ["ok    a   fine", "FAIL  bb  broken", "          fix: do this",
                                      "WARN  c   meh", "          fix: maybe that"]
    assert text.endswith("1 failed, 1 warning(s): not ready")


@pytest.mark.parametrize("version, fallback, status", [("16.0", True, WARN), ("16.0", False, FAIL),
                                                       ("16.0tf2.14.1-1", True, OK)])
def test_the_libedgetpu_build_is_checked_against_the_interpreter(tmp_path, tpu_models, monkeypatch, version,
                                                                   fallback, status):
    # A libedgetpu built against another TF Lite version segfaults at the first inference
    # (google-coral/edgetpu#731): the doctor names the pair.
    from edged import runtime as rt_mod

    root = fake_root(tmp_path, usb_tpu=("18d1", "9302"))
    dpkg = root / "var/lib/dpkg/status"
    dpkg.parent.mkdir(parents=True, exist_ok=True)
    dpkg.write_text(f"Package: libedgetpu1-std\nStatus: install ok installed\nVersion: {version}\n")
    real = rt_mod.runtime()
    monkeypatch.setattr(rt_mod, "_runtime", rt_mod.Runtime("tflite_runtime", "2.14.0", real.interpreter_cls,
                                                           real.load_delegate))
    cfg = cfg_for(tmp_path, 1, f'[accelerator]\ndevice = "usb"\nfallback = {str(fallback).lower()}', tpu_models)
    (check,) = doctor.check_tpu_runtime(cfg, Env(root=root, load_library=lambda n: (True, n)))
    assert check.name == "edgetpu abi" and check.status == status, check
    assert f"libedgetpu1-std {version}" in check.detail and "tflite_runtime 2.14.0" in check.detail
    if status != OK:  # the build made for tflite_runtime 2.14, named for this machine's architecture
        assert "sudo apt install ./libedgetpu1-std_16.0tf2.13.1-*_" in check.fix


def test_the_runtime_pair_is_not_checked_without_a_tpu_in_the_config(tmp_path):
    assert doctor.check_tpu_runtime(cfg_for(tmp_path, 1), Env(root=fake_root(tmp_path))) == []

def test_a_port_held_by_something_else_is_not_a_broker(tmp_path, broker):
    """An open port is not a broker: only a CONNACK is. Named in words, with what to do."""
    from test_first_run import NotMqtt

    with NotMqtt(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        http = doctor.check_broker(cfg_for(tmp_path, port), Env())
    assert http.status == FAIL and "not an MQTT broker" in http.detail and "HTTP/1.1" in http.detail
    assert "mqtt.port" in http.fix
    with NotMqtt(None) as port:
        silent = doctor.check_broker(cfg_for(tmp_path, port), Env(timeout_s=0.5))
    assert silent.status == FAIL and "sent no MQTT CONNACK within 0.5 s" in silent.detail

    (tmp_path / "auth").mkdir()
    passwords = tmp_path / "auth" / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "edge", "secret"], check=True)
    strict = Broker(tmp_path / "auth", listener_conf=f"password_file {passwords}\n").start()
    try:
        wrong = cfg_for(tmp_path, strict.port).mqtt.__class__
        cfg = cfg_for(tmp_path, strict.port)
        cfg.mqtt = wrong(**{**cfg.mqtt.__dict__, "username": "edge", "password": "not-it"})
        refused = doctor.check_broker(cfg, Env())
        cfg.mqtt = wrong(**{**cfg.mqtt.__dict__, "password": "secret"})
        accepted = doctor.check_broker(cfg, Env())
    finally:
        strict.stop()
    assert refused.status == FAIL and "refused:" in refused.detail, refused.detail
    assert "mqtt.username" in refused.fix
    assert accepted.status == OK, accepted.detail


def test_a_video_replay_without_opencv_fails_as_edged_run_would(tmp_path, monkeypatch):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)
    cfg = cfg_for(tmp_path, 1, f'[camera]\nsource = "replay"\npath = "{video}"\n')
    assert doctor.check_camera(cfg, Env(root=fake_root(tmp_path)))[0].status == OK
    monkeypatch.setitem(sys.modules, "cv2", None)
    check = doctor.check_camera(cfg, Env(root=fake_root(tmp_path / "again")))[0]
    assert check.status == FAIL and "OpenCV is not importable" in check.detail
    assert "opencv-python-headless" in check.fix
