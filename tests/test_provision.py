"""scripts/provision and scripts/uninstall on a scratch root (--root): the files they write, the
commands they would run on a live Pi, idempotence, --dry-run, and a clean reversal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from edged import config as edged_config

REPO = Path(__file__).resolve().parent.parent
PROVISION = REPO / "scripts" / "provision"
UNINSTALL = REPO / "scripts" / "uninstall"

# A bookworm image as it boots the first time, reduced to what provisioning reads.
BOOT_CONFIG = """\
# For more options and information see
# http://rptl.io/configtxt
#dtparam=i2c_arm=on
#dtparam=spi=on
dtparam=audio=on
camera_auto_detect=1
display_auto_detect=1

[cm4]
otg_mode=1

[pi4]
arm_boost=1
"""
PASSWD = "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n"
GROUP = "root:x:0:\nvideo:x:44:pi\nplugdev:x:46:pi\ni2c:x:994:pi\npi:x:1000:\n"
DPKG_STATUS = ("Package: python3-venv\nStatus: install ok installed\nVersion: 3.11.2-1+b1\n\n"
               "Package: mosquitto-clients\nStatus: install ok installed\nVersion: 2.0.11-1.2\n\n"
               "Package: i2c-tools\nStatus: deinstall ok config-files\nVersion: 4.3-2+b3\n")
SEED_DIRS = ("etc/systemd/system", "etc/udev/rules.d", "etc/modules-load.d",
             "etc/apt/sources.list.d", "etc/apt/keyrings", "opt", "var/lib/dpkg", "boot/firmware",
             "var/lib/apt/lists")
# apt's package lists as `apt-get update` leaves them: Raspberry Pi OS has its own archive
# beside Debian's, and only that one carries python3-picamera2.
DEBIAN_LIST = ("deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages",
               "Package: python3-venv\nVersion: 3.11.2-1+b1\n\nPackage: python3-systemd\nVersion: 235-1+b2\n")
PIOS_LIST = ("archive.raspberrypi.com_debian_dists_bookworm_main_binary-arm64_Packages",
             "Package: python3-libcamera\nVersion: 0.3.2\n\nPackage: python3-picamera2\nVersion: 0.3.22-2\n")
PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIBtest\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    for d in SEED_DIRS:
        (r / d).mkdir(parents=True)
    (r / "etc/passwd").write_text(PASSWD)
    (r / "etc/group").write_text(GROUP)
    (r / "var/lib/dpkg/status").write_text(DPKG_STATUS)
    (r / "boot/firmware/config.txt").write_text(BOOT_CONFIG)
    for name, text in (DEBIAN_LIST, PIOS_LIST):
        (r / "var/lib/apt/lists" / name).write_text(text)
    return r


@pytest.fixture
def debian_root(root) -> Path:
    """Plain Debian: no Raspberry Pi OS archive, and no firmware boot config."""
    (root / "var/lib/apt/lists" / PIOS_LIST[0]).unlink()
    shutil.rmtree(root / "boot")
    return root


@pytest.fixture
def source(tmp_path) -> Path:
    """A frozen copy of the checkout's installable parts (others may edit the live one)."""
    s = tmp_path / "src"
    for name in ("setup.cfg", "pyproject.toml", "systemd/edged.service", "docs/deploy.md"):
        (s / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, s / name)
    shutil.copytree(REPO / "edged", s / "edged", ignore=shutil.ignore_patterns("__pycache__"))
    return s


@pytest.fixture
def certs(tmp_path) -> dict[str, Path]:
    d = tmp_path / "certs"
    d.mkdir()
    out = {"ca": d / "ca.pem", "cert": d / "device.pem", "key": d / "device.key"}
    out["ca"].write_text(PEM_CERT)
    out["cert"].write_text(PEM_CERT.replace("test", "device"))
    out["key"].write_text(PEM_KEY)
    return out


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=60)


def full_args(root: Path, source: Path, certs: dict[str, Path], broker: str) -> list[str]:
    return ["--root", str(root), "--source", str(source), "--device-id", "pi-cam-7",
            "--broker", broker, "--ca-file", str(certs["ca"]), "--cert-file", str(certs["cert"]),
            "--key-file", str(certs["key"]), "--with-tpu"]


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode and content digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def commands(root: Path) -> list[str]:
    log = root / ".edged-provision" / "commands.log"
    return log.read_text().splitlines() if log.exists() else []


BROKER = "mqtts://edge:s%40cret@broker.example.net:8884"


def test_provision_writes_everything(root, source, certs):
    res = run(PROVISION, *full_args(root, source, certs, BROKER))
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    # Under --root a command is recorded, not run, and the output says so.
    assert "would run: apt-get update (recorded in" in res.stdout
    # --with-tpu: Coral's package does not match the interpreter, and provisioning says so
    assert "note: Coral's libedgetpu1-std 16.0 is built against TF 2.5, which matches neither" in res.stdout
    assert not any(line.lstrip().startswith("run:") for line in res.stdout.splitlines())

    # Config: the lead's schema, values from the flags, secrets not world-readable.
    conf = root / "etc/edged/edged.toml"
    doc = tomllib.loads(conf.read_text())
    assert doc["device_id"] == "pi-cam-7"
    assert doc["mqtt"] == {
        "host": "broker.example.net", "port": 8884, "tls": True, "username": "edge",
        "password": "s@cret", "ca_file": "/etc/edged/tls/ca.crt",
        "cert_file": "/etc/edged/tls/client.crt", "key_file": "/etc/edged/tls/client.key"}
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/edged/tls/client.key").stat().st_mode) == 0o640
    assert (root / "etc/edged/tls/ca.crt").read_text() == PEM_CERT
    assert (root / "etc/edged/tls/client.key").read_text() == PEM_KEY
    # A new config reads the device's own hardware: the Pi camera, and an IMU found on I2C.
    assert doc["camera"] == {"enabled": True, "source": "picamera2"}
    assert doc["imu"] == {"enabled": True, "source": "auto"}
    # edged itself accepts it (paths moved under the scratch root).
    text = conf.read_text().replace('"/etc/edged/', f'"{root}/etc/edged/')
    cfg = edged_config.parse(text, str(conf))
    assert (cfg.device_id, cfg.mqtt.port, cfg.mqtt.tls) == ("pi-cam-7", 8884, True)
    assert (cfg.camera.source, cfg.imu.source) == ("picamera2", "auto")
    assert set(doc["mqtt"]) <= {f.name for f in fields(edged_config.MqttConfig)}

    # The unit, byte for byte, and the docs it points at.
    unit = root / "etc/systemd/system/edged.service"
    assert unit.read_bytes() == (source / "systemd/edged.service").read_bytes()
    assert (root / "opt/edged/doc/deploy.md").read_bytes() == (source / "docs/deploy.md").read_bytes()

    rules = (root / "etc/udev/rules.d/60-edged.rules").read_text()
    for needle in ('ATTR{idVendor}=="1a6e", ATTR{idProduct}=="089a"',
                   'ATTR{idVendor}=="18d1", ATTR{idProduct}=="9302"',
                   'SUBSYSTEM=="apex", GROUP="apex"', 'SUBSYSTEM=="i2c-dev", GROUP="i2c"'):
        assert needle in rules
    assert (root / "etc/modules-load.d/edged.conf").read_text().splitlines()[-1] == "i2c-dev"
    assert (root / "etc/apt/sources.list.d/coral-edgetpu.list").read_text() == (
        "deb [signed-by=/etc/apt/keyrings/coral-edgetpu.asc] "
        "https://packages.cloud.google.com/apt coral-edgetpu-stable main\n")

    # Boot config: the original untouched, I2C switched on for every board, the camera line
    # (already there) not duplicated.
    boot = (root / "boot/firmware/config.txt").read_text()
    assert boot.startswith(BOOT_CONFIG)
    added = boot[len(BOOT_CONFIG):].splitlines()
    assert "[all]" in added and "dtparam=i2c_arm=on" in added
    assert added.index("[all]") < added.index("dtparam=i2c_arm=on")
    assert "camera_auto_detect=1" not in added
    assert "reboot needed" in res.stdout

    cmds = commands(root)
    assert cmds == [
        "curl -fsSL -o /etc/apt/keyrings/coral-edgetpu.asc https://packages.cloud.google.com/apt/doc/apt-key.gpg",
        "apt-get update",
        # python3-venv and mosquitto-clients are installed; i2c-tools was removed (config-files)
        "env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
        "python3-systemd i2c-tools gcc libc6-dev libedgetpu1-std python3-picamera2",
        "modprobe i2c-dev",
        "groupadd --system apex",  # video, i2c, plugdev exist on Raspberry Pi OS
        "useradd --system --user-group --home-dir /var/lib/edged --no-create-home "
        "--shell /usr/sbin/nologin --comment 'edged daemon' edged",
        "usermod --append --groups video,i2c,plugdev,apex edged",
        "udevadm control --reload-rules",
        "udevadm trigger --action=change --subsystem-match=usb --subsystem-match=i2c-dev "
        "--subsystem-match=apex",
        "python3 -m venv --system-site-packages /opt/edged/venv",
        f"/opt/edged/venv/bin/pip install --disable-pip-version-check --no-cache-dir '{source}[pi]'",
        "chown root:edged /etc/edged/edged.toml",
        "chown root:edged /etc/edged/tls/client.key",
        "systemctl daemon-reload",
        "systemctl enable --now edged.service",
    ]
    assert "skip: edged doctor" in res.stdout

    record = json.loads((root / "opt/edged/provision.json").read_text())
    assert record["created_groups"] == ["apex"] and record["created_user"] is True
    assert record["installed_packages"] == sorted(
        ["python3-picamera2", "python3-systemd", "i2c-tools", "gcc", "libc6-dev", "libedgetpu1-std"])


def test_second_run_changes_nothing(root, source, certs):
    args = full_args(root, source, certs, BROKER)
    assert run(PROVISION, *args).returncode == 0
    before, cmds = tree(root), commands(root)
    res = run(PROVISION, *args)
    assert res.returncode == 0, res.stderr
    assert tree(root) == before  # byte-identical, same modes, log included
    assert commands(root) == cmds
    assert "nothing to do" in res.stdout
    assert "write:" not in res.stdout and "run:" not in res.stdout


def test_existing_system_state_is_respected(root, source):
    """What is already on the host is detected, not redone (the checks read the root's files)."""
    (root / "etc/passwd").write_text(PASSWD + "edged:x:999:995:edged daemon:/var/lib/edged:/usr/sbin/nologin\n")
    (root / "etc/group").write_text(GROUP.replace("video:x:44:pi", "video:x:44:pi,edged")
                                    + "edged:x:995:\napex:x:993:edged\n")
    status = DPKG_STATUS.replace("deinstall ok config-files", "install ok installed")
    for pkg in ("python3-picamera2", "python3-systemd", "gcc", "libc6-dev"):
        status += f"\nPackage: {pkg}\nStatus: install ok installed\nVersion: 1\n"
    (root / "var/lib/dpkg/status").write_text(status)
    (root / "boot/firmware/config.txt").write_text(BOOT_CONFIG + "[all]\ndtparam=i2c_arm=on\n")
    res = run(PROVISION, "--root", str(root), "--source", str(source))
    assert res.returncode == 0, res.stderr
    cmds = commands(root)
    assert not any(c.startswith(("apt-get", "env DEBIAN", "groupadd", "useradd")) for c in cmds)
    assert "usermod --append --groups i2c,plugdev edged" in cmds
    assert (root / "boot/firmware/config.txt").read_text() == BOOT_CONFIG + "[all]\ndtparam=i2c_arm=on\n"
    assert "reboot needed" not in res.stdout
    assert json.loads((root / "opt/edged/provision.json").read_text())["created_user"] is False


def test_i2c_enabled_only_for_one_board_is_not_enough(root, source):
    (root / "boot/firmware/config.txt").write_text(BOOT_CONFIG + "dtparam=i2c_arm=on\n")  # under [pi4]
    assert run(PROVISION, "--root", str(root), "--source", str(source)).returncode == 0
    boot = (root / "boot/firmware/config.txt").read_text()
    assert boot.splitlines().count("dtparam=i2c_arm=on") == 2  # the [pi4] one and ours
    assert boot.startswith(BOOT_CONFIG) and boot.rstrip().endswith("# <<< edged")


def test_flags_update_config_in_place(root, source, certs):
    assert run(PROVISION, *full_args(root, source, certs, BROKER)).returncode == 0
    conf = root / "etc/edged/edged.toml"
    # The operator tunes something provisioning does not manage.
    conf.write_text(conf.read_text() + "\n[vision]\nscore_threshold = 0.6  # fewer false faces\n")
    n_cmds = len(commands(root))

    res = run(PROVISION, "--root", str(root), "--source", str(source), "--broker",
              "mqtt://10.0.0.5")
    assert res.returncode == 0, res.stderr
    doc = tomllib.loads(conf.read_text())
    assert doc["mqtt"]["host"] == "10.0.0.5" and doc["mqtt"]["port"] == 1883
    assert doc["mqtt"]["tls"] is False
    # The new URL has no user and no TLS: the old credentials and certificates are cleared.
    assert all(doc["mqtt"][k] == "" for k in ("username", "password", "ca_file", "cert_file", "key_file"))
    assert doc["device_id"] == "pi-cam-7"
    assert doc["vision"]["score_threshold"] == 0.6
    assert "# fewer false faces" in conf.read_text()
    assert commands(root)[n_cmds:] == ["systemctl restart edged.service"]
    assert "s@cret" not in res.stdout  # the config is secret: no diff printed


def test_dry_run_writes_nothing(root, source, certs):
    before = tree(root)
    res = run(PROVISION, *full_args(root, source, certs, BROKER), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert tree(root) == before
    out = res.stdout
    for change in ("would run: apt-get update", "would run: useradd --system",
                   "would write: /etc/edged/edged.toml (new", "would write: /boot/firmware/config.txt",
                   "would write: /etc/systemd/system/edged.service", "would run: systemctl enable --now",
                   "would write: /etc/udev/rules.d/60-edged.rules", "would create: /opt/edged/"):
        assert change in out, change
    assert "s@cret" not in out


def test_uninstall_purge_restores_the_image(root, source, certs):
    seed = tree(root)
    assert run(PROVISION, *full_args(root, source, certs, BROKER)).returncode == 0
    (root / "var/lib/edged").mkdir(parents=True)  # systemd's StateDirectory= with an outbox
    (root / "var/lib/edged/outbox.db").write_bytes(b"SQLite format 3\0")
    n_cmds = len(commands(root))

    dry = run(UNINSTALL, "--root", str(root), "--purge", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove: /opt/edged" in dry.stdout

    res = run(UNINSTALL, "--root", str(root), "--purge")
    assert res.returncode == 0, res.stderr
    after = {k: v for k, v in tree(root).items() if not k.startswith(".edged-provision")}
    assert after == seed
    assert commands(root)[n_cmds:] == [
        "systemctl disable --now edged.service",
        "systemctl daemon-reload",
        "udevadm control --reload-rules",
        "userdel edged",
        "groupdel apex",
        "env DEBIAN_FRONTEND=noninteractive apt-get remove -y "
        "gcc i2c-tools libc6-dev libedgetpu1-std python3-picamera2 python3-systemd",
    ]
    again = run(UNINSTALL, "--root", str(root), "--purge")
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # And provisioning again starts from scratch.
    assert run(PROVISION, *full_args(root, source, certs, BROKER)).returncode == 0
    again_cmds = commands(root)[n_cmds + 6:]
    assert "groupadd --system apex" in again_cmds
    assert any(c.startswith("useradd --system") for c in again_cmds)
    assert "systemctl enable --now edged.service" in again_cmds


def test_uninstall_keeps_config_and_data_without_purge(root, source):
    assert run(PROVISION, "--root", str(root), "--source", str(source),
               "--broker", "mqtt://broker.lan").returncode == 0
    res = run(UNINSTALL, "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert (root / "etc/edged/edged.toml").is_file()
    assert not (root / "opt/edged").exists()
    assert not (root / "etc/systemd/system/edged.service").exists()
    assert "kept: /etc/edged" in res.stdout
    assert not any(c.startswith(("userdel", "groupdel")) for c in commands(root))


@pytest.mark.parametrize("args, message", [
    (["--broker", "http://broker"], "--broker: expected mqtt://host[:port] or mqtts://host[:port], got 'http://broker'"),
    (["--broker", "mqtt://broker:0"], "--broker: expected"),
    (["--device-id", "my pi"], "--device-id: expected 1-64 of A-Z a-z 0-9 _ -, got 'my pi'"),
    (["--broker", "mqtt://b", "--ca-file", "/etc/hostname"], "need an mqtts:// --broker"),
    (["--broker", "mqtts://b", "--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem: No such file or directory"),
    (["--broker", "mqtts://b", "--ca-file", "/etc/passwd"], "--ca-file /etc/passwd: not a PEM file"),
    (["--broker", "mqtts://b", "--cert-file", "/etc/passwd"], "--cert-file and --key-file: give both or neither"),
    (["--libedgetpu-deb", "/etc/passwd"], "--libedgetpu-deb needs --with-tpu"),
    (["--with-tpu", "--libedgetpu-deb", "/nonexistent/x.deb"], "--libedgetpu-deb /nonexistent/x.deb: no such file"),
    (["--with-tpu", "--libedgetpu-deb", "/etc/passwd"], "--libedgetpu-deb /etc/passwd: not a Debian package"),
])
def test_bad_input_is_one_clear_line(root, source, args, message):
    before = tree(root)
    res = run(PROVISION, "--root", str(root), "--source", str(source), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("provision: ") and message in lines[0], res.stderr
    assert tree(root) == before


def test_live_dry_run_reads_the_host_and_touches_nothing(source):
    watched = [Path(p) for p in ("/opt/edged", "/etc/edged", "/etc/systemd/system/edged.service",
                                 "/etc/udev/rules.d/60-edged.rules")]
    before = [p.exists() for p in watched]
    res = run(PROVISION, "--source", str(source), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would " in res.stdout or "nothing to do" in res.stdout
    assert [p.exists() for p in watched] == before


def test_live_mode_needs_root():
    cmd = [sys.executable, str(PROVISION), "--source", str(REPO)]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == "provision: run as root (sudo scripts/provision ...), or try --dry-run"


def test_camera_and_imu_flags_change_only_what_they_name(root, source):
    res = run(PROVISION, "--root", str(root), "--source", str(source), "--camera", "v4l2", "--imu", "none")
    assert res.returncode == 0, res.stderr
    conf = root / "etc/edged/edged.toml"
    doc = tomllib.loads(conf.read_text())
    assert doc["camera"] == {"enabled": True, "source": "v4l2"} and doc["imu"] == {"enabled": False}
    conf.write_text(conf.read_text() + "# my note\n")
    # A later run without the flags keeps the operator's choices (and comments).
    res = run(PROVISION, "--root", str(root), "--source", str(source))
    assert res.returncode == 0, res.stderr
    after = tomllib.loads(conf.read_text())
    assert after["camera"] == doc["camera"] and after["imu"] == doc["imu"]
    assert "# my note" in conf.read_text()
    bad = run(PROVISION, "--root", str(root), "--source", str(source), "--camera", "gopro")
    assert bad.returncode == 2 and "--camera: invalid choice" in bad.stderr


def test_plain_debian_has_no_picamera2_and_says_so(debian_root, source):
    res = run(PROVISION, "--root", str(debian_root), "--source", str(source))
    assert res.returncode == 0, res.stderr
    installs = [c for c in commands(debian_root) if "apt-get install" in c]
    assert installs == ["env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                        "python3-systemd i2c-tools gcc libc6-dev"]
    assert "skip: python3-picamera2 (not in this system's apt sources" in res.stdout
    # A new config does not name a camera this system cannot drive.
    doc = tomllib.loads((debian_root / "etc/edged/edged.toml").read_text())
    assert doc["camera"] == {"enabled": False}
    assert "the new config has the camera off" in res.stdout
    assert "python3-picamera2" not in json.loads(
        (debian_root / "opt/edged/provision.json").read_text())["installed_packages"]

    # The demo sources work anywhere; asking for the Pi camera here is refused in one line.
    res = run(PROVISION, "--root", str(debian_root), "--source", str(source), "--camera", "replay")
    assert res.returncode == 0, res.stderr
    assert tomllib.loads((debian_root / "etc/edged/edged.toml").read_text())["camera"] == {
        "enabled": True, "source": "replay"}
    res = run(PROVISION, "--root", str(debian_root), "--source", str(source), "--camera", "picamera2")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "provision: --camera picamera2: python3-picamera2 is not in this system's apt sources (only "
        "Raspberry Pi OS's archive has it); add that archive, or choose --camera v4l2|replay|none"]
    assert not any("picamera2" in c for c in commands(debian_root) if "apt-get install" in c)


def test_picamera2_is_installed_where_the_archive_has_it(root, source):
    res = run(PROVISION, "--root", str(root), "--source", str(source), "--camera", "v4l2")
    assert res.returncode == 0, res.stderr
    # Installed even though this config uses a webcam: switching to the Pi camera later needs it.
    assert any(c.endswith(" python3-picamera2") for c in commands(root) if "apt-get install" in c)
    assert "skip: python3-picamera2" not in res.stdout


def test_updates_install_the_pinned_root_and_the_updates_section(root, source, tmp_path):
    pinned = tmp_path / "root.json"
    pinned.write_text(json.dumps({"signed": {"_type": "root", "version": 1}, "signatures": []}))
    r = run(PROVISION, "--root", str(root), "--source", str(source),
            "--updates", "https://releases.example/edged", "--root-json", str(pinned))
    assert r.returncode == 0, r.stderr
    assert (root / "etc/edged/root.json").read_bytes() == pinned.read_bytes()
    conf = tomllib.loads((root / "etc/edged/edged.toml").read_text())
    assert conf["updates"] == {"url": "https://releases.example/edged", "root_json": "/etc/edged/root.json"}
    assert any("pip install" in c and f"{source}[pi,updates]" in c for c in commands(root)), commands(root)
    # A second run without the flags keeps the updates extra and changes nothing.
    before = tree(root)
    r = run(PROVISION, "--root", str(root), "--source", str(source))
    assert r.returncode == 0, r.stderr
    assert tree(root) == before


@pytest.mark.parametrize("args, message", [
    (["--updates", "https://releases.example/edged"], "--updates and --root-json: give both or neither"),
    (["--updates", "ftp://releases.example/", "--root-json", "ROOT"], "--updates: expected an http:// or https:// URL"),
    (["--updates", "https://releases.example/", "--root-json", "NOTROOT"], "not TUF root metadata"),
])
def test_bad_updates_flags_are_one_clear_line(root, source, tmp_path, args, message):
    (tmp_path / "ROOT").write_text(json.dumps({"signed": {"_type": "root"}}))
    (tmp_path / "NOTROOT").write_text(json.dumps({"signed": {"_type": "targets"}}))
    args = [str(tmp_path / a) if a in ("ROOT", "NOTROOT") else a for a in args]
    r = run(PROVISION, "--root", str(root), "--source", str(source), *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def make_deb(tmp_path: Path, package: str, version: str, arch: str = "arm64") -> Path:
    """A real (empty) Debian package, built with dpkg-deb, standing in for a libedgetpu build."""
    d = tmp_path / f"{package}-{version}"
    (d / "DEBIAN").mkdir(parents=True)
    (d / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\n"
                                          "Maintainer: test <test@example.net>\nDescription: test\n")
    out = tmp_path / f"{package}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(d), str(out)], check=True,
                   capture_output=True)
    return out


def test_a_libedgetpu_build_is_installed_with_the_interpreter_it_matches(root, source, tmp_path):
    deb = make_deb(tmp_path, "libedgetpu1-std", "16.0tf2.13.1-2")
    args = ["--root", str(root), "--source", str(source), "--with-tpu", "--libedgetpu-deb", str(deb)]
    res = run(PROVISION, *args)
    assert res.returncode == 0, res.stderr
    cmds = commands(root)
    assert f"env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {deb}" in cmds
    # not Coral's TF 2.5 package, nor its repository
    assert not (root / "etc/apt/sources.list.d/coral-edgetpu.list").exists()
    assert not any(c.endswith(" libedgetpu1-std") for c in cmds)
    # LiteRT out, the interpreter the build matches in, after edged itself is installed
    pip = [c for c in cmds if c.startswith("/opt/edged/venv/bin/pip ")]
    assert pip[-2:] == ["/opt/edged/venv/bin/pip uninstall -y --disable-pip-version-check ai-edge-litert",
                        "/opt/edged/venv/bin/pip install --disable-pip-version-check --no-cache-dir "
                        "tflite-runtime==2.14.0"]
    assert "with tflite-runtime==2.14.0 (a pair reported to work" in res.stdout
    assert "note: Coral's libedgetpu1-std 16.0" not in res.stdout
    record = json.loads((root / "opt/edged/provision.json").read_text())
    assert "libedgetpu1-std" in record["installed_packages"] and record["interpreter"] == "tflite-runtime==2.14.0"
    # a second run changes nothing
    before = commands(root)
    res = run(PROVISION, *args)
    assert res.returncode == 0 and commands(root) == before, res.stdout


@pytest.mark.parametrize("package, version, message", [
    ("libedgetpu1-std", "16.0tf2.17.1-1", "libedgetpu1-std 16.0tf2.17.1-1 is built against TF 2.17; PyPI has no "
                                          "tflite-runtime for it on Python 3.11 (only 2.14.0, which the "
                                          "16.0tf2.13.1 build matches): use that build"),
    ("libedgetpu1-max", "16.0", "libedgetpu1-max 16.0 is built against TF 2.5; PyPI has no tflite-runtime"),
    ("libedgetpu1-std", "16.0+git5", "libedgetpu1-std 16.0+git5 does not say which TF it was built against"),
    ("libusb-1.0-0", "2:1.0.26-1", "package libusb-1.0-0, expected libedgetpu1-std or libedgetpu1-max"),
])
def test_a_libedgetpu_build_without_a_matching_interpreter_is_refused(root, source, tmp_path, package, version,
                                                                      message):
    deb = make_deb(tmp_path, package, version)
    res = run(PROVISION, "--root", str(root), "--source", str(source), "--with-tpu", "--libedgetpu-deb", str(deb))
    assert res.returncode == 2 and res.stdout == "", res.stdout
    assert res.stderr.strip().startswith(f"provision: --libedgetpu-deb {deb}: {message}"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and commands(root) == []
