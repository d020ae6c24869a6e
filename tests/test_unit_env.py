"""edged.service.unitfile: the user and directories the installed unit hands the daemon, which
`edged doctor` applies so that it checks what the service uses."""

from __future__ import annotations

from pathlib import Path

from edged.service import unitfile

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edged.service"


def test_the_shipped_unit():
    unit = unitfile.read_unit(UNIT)
    assert unit.user == "edged"
    assert unit.state_dir == "/var/lib/edged"
    assert unit.environ() == {"STATE_DIRECTORY": "/var/lib/edged", "RUNTIME_DIRECTORY": "/run/edged",
                              "CONFIGURATION_DIRECTORY": "/etc/edged"}


def test_dropins_override_in_name_order(tmp_path):
    unit = tmp_path / "edged.service"
    unit.write_text(UNIT.read_text())
    d = tmp_path / "edged.service.d"
    d.mkdir()
    # `systemctl edit edged` writes override.conf; a later file wins, an empty value clears.
    (d / "override.conf").write_text("[Service]\nStateDirectory=\nStateDirectory=edged-b edged-c:alias\n")
    (d / "zz-user.conf").write_text("# a comment\n[Service]\nUser=camera\n[Install]\nUser=ignored\n")
    (d / "not-a-dropin.txt").write_text("[Service]\nUser=nobody\n")
    got = unitfile.read_unit(unit)
    assert got.user == "camera"
    assert got.directories["StateDirectory"] == ["/var/lib/edged-b", "/var/lib/edged-c"]
    assert got.environ()["STATE_DIRECTORY"] == "/var/lib/edged-b:/var/lib/edged-c"
    assert got.state_dir == "/var/lib/edged-b"


def test_apply_keeps_what_systemd_already_set(tmp_path):
    unit = unitfile.read_unit(UNIT)
    env = {"STATE_DIRECTORY": "/srv/edged"}
    added = unitfile.apply(unit, env)
    assert env["STATE_DIRECTORY"] == "/srv/edged"
    assert added == {"RUNTIME_DIRECTORY": "/run/edged", "CONFIGURATION_DIRECTORY": "/etc/edged"}


def test_no_unit_installed(tmp_path):
    assert unitfile.installed(tmp_path / "edged.service") is None


# --------------------------------------------------------------------------- edged doctor

def doctor(tmp_path, *args, **env_extra):
    import json
    import os
    import subprocess
    import sys

    from harness import free_port

    cfg = tmp_path / "edged.toml"
    cfg.write_text(f'device_id = "doc-1"\n[mqtt]\nport = {free_port()}\n')
    env = {k: v for k, v in os.environ.items() if not k.endswith("_DIRECTORY")}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME="", **env_extra)
    res = subprocess.run([sys.executable, "-m", "edged", "doctor", "--json", "--config", str(cfg), *args],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    doc = json.loads(res.stdout) if res.stdout.startswith("{") else None
    checks = {c["name"]: c for c in doc["checks"]} if doc else {}
    return res, checks


def test_doctor_checks_the_outbox_where_the_unit_puts_it(tmp_path):
    # As provisioning runs it: the service user's environment has no $STATE_DIRECTORY (only the
    # service gets that), yet the outbox checked is the unit's, not ~/.local/state/edged.
    res, checks = doctor(tmp_path, "--unit", str(UNIT))
    assert checks, res.stderr
    assert checks["outbox"]["detail"].startswith("/var/lib/edged/outbox.db"), checks["outbox"]
    unit = checks["unit"]
    assert f"{UNIT}: User=edged, state in /var/lib/edged" in unit["detail"]
    import getpass

    if getpass.getuser() != "edged":  # another user than the service's: said, with the command
        assert unit["status"] == "warn" and "sudo runuser -u edged -- " in unit["fix"]


def test_doctor_under_systemd_keeps_the_services_directories(tmp_path):
    state = tmp_path / "state-from-systemd"
    state.mkdir()
    _, checks = doctor(tmp_path, "--unit", str(UNIT), STATE_DIRECTORY=str(state))
    assert checks["outbox"]["detail"].startswith(f"{state}/outbox.db"), checks["outbox"]


def test_doctor_without_a_unit_uses_this_users_directories(tmp_path):
    _, checks = doctor(tmp_path, "--unit", "none")
    assert checks["outbox"]["detail"].startswith(f"{tmp_path}/home/.local/state/edged/outbox.db")
    assert "unit" not in checks
    res, _ = doctor(tmp_path, "--unit", str(tmp_path / "nosuch.service"))
    assert res.returncode == 2
    assert res.stderr.strip() == f"edged: --unit {tmp_path / 'nosuch.service'}: cannot read it"
