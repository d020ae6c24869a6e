"""Config validation: every kind of bad input gives one line naming file, line and key; exit 2."""

import subprocess
import sys

import pytest

from edged import config

GOOD = 'device_id = "pi-kitchen"\n[mqtt]\nhost = "127.0.0.1"\nport = 1883\n'


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, timeout=60)


def test_minimal_config_from_the_issue(tmp_path):
    p = tmp_path / "edged.toml"
    p.write_text(GOOD)
    cfg = config.load(p)
    assert cfg.device_id == "pi-kitchen" and cfg.mqtt.port == 1883
    assert cfg.topic("status") == "edged/pi-kitchen/status"
    r = run_cli("check-config", str(p))
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout


def test_defaults_need_no_file():
    cfg = config.load(None)
    assert cfg.mqtt.host == "127.0.0.1" and cfg.camera.enabled and cfg.imu.enabled


@pytest.mark.parametrize("text, expected", [
    ('device_id = "a"\n[mqtt]\nport = 0\n', "bad.toml:3: mqtt.port: expected 1 to 65535, got 0"),
    ('[mqtt]\nhost = "h"\nprot = 1883\n', "bad.toml:3: mqtt.prot: unknown key"),
    ('[mqtt]\nport = "1883"\n', "bad.toml:2: mqtt.port: expected an integer, got string '1883'"),
    ('device_id = "a b"\n', "bad.toml:1: device_id: expected 1 to 64 letters, digits, '-' or '_', got 'a b'"),
    ('[mqtt]\nhost = "mqtt://broker"\n', "bad.toml:2: mqtt.host: expected a host name or IP address"),
    ('[camera]\nfps = -1\n', "bad.toml:2: camera.fps: expected 0.01 to 120, got -1"),
    ('[mqtt\nport = 1\n', "bad.toml:1: TOML syntax error"),
    ('mqtt = 1\n', "bad.toml:1: mqtt: expected a table [mqtt], got integer"),
    ('[imu]\npath = "/nonexistent.csv"\n', "bad.toml:2: imu.path: not found: /nonexistent.csv"),
    ('[outbox]\nsynchronous = "off"\n', "bad.toml:2: outbox.synchronous: expected one of 'full', 'normal'"),
])
def test_bad_config_one_line_exit_2(tmp_path, text, expected):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    for cmd in (("check-config", str(p)), ("run", "--config", str(p))):
        r = run_cli(*cmd)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("edged: " + str(tmp_path)), lines
        assert expected in lines[0], lines
        assert "Traceback" not in r.stderr


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('log_level = "loud"\n[mqtt]\nport = 70000\nkeepalive_s = 1\n')
    r = run_cli("check-config", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert [ln.split(": ")[2] for ln in lines] == ["log_level", "mqtt.port", "mqtt.keepalive_s"]
    assert [ln.split(": ")[1].rsplit(":", 1)[1] for ln in lines] == ["1", "3", "4"]


def test_missing_file(tmp_path):
    r = run_cli("check-config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"edged: {tmp_path / 'nope.toml'}: config file not found"


def test_check_config_names_each_model_the_manifest_lacks_as_edged_run_would(tmp_path):
    # `edged run` refuses to start on a model name the manifest lacks, or of the wrong kind; so does
    # check-config, one line each with its file, line and key, before anything is started.
    p = tmp_path / "edged.toml"
    p.write_text('[vision]\nmodel = "nobody"\n[motion]\nmodel = "person"\n')
    r = run_cli("check-config", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"edged: {p}:2: vision.model: no model named 'nobody' in the manifest "
        "(have: face, face_full_range, motion, openpose, person, pose)",
        f"edged: {p}:4: motion.model: model 'person' is a vision model, not a motion model"]
    run = run_cli("run", "--config", str(p))
    assert run.returncode == 2 and "vision.model: no model named 'nobody'" in run.stderr
    p.write_text('[[vision.stages]]\nname = "people"\nmodel = "person"\n'
                 '[[vision.stages]]\nname = "steps"\nmodel = "motion"\n')
    r = run_cli("check-config", str(p))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"edged: {p}:6: vision.stages[1].model: model 'motion' is a motion model, not a vision model")
    # A source that is off needs no model: its names are not looked up.
    p.write_text('[camera]\nenabled = false\n[vision]\nmodel = "nobody"\n')
    assert run_cli("check-config", str(p)).returncode == 0
    # A models_dir without the default chain's models: each name missing, once.
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.toml").write_text("")
    p.write_text(f'models_dir = "{tmp_path / "m"}"\n[imu]\nenabled = false\n')
    r = run_cli("check-config", str(p))
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert [ln.split("no model named ")[1].split(" ")[0] for ln in lines] == ["'person'", "'face_full_range'", "'face'"]
    assert all(ln.startswith(f"edged: {p}: vision (the default chain): ") for ln in lines), lines
