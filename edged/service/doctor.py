"""`edged doctor`: can this machine run the configured pipeline? One line per check, with the fix.

Checks: Python and the TFLite runtime; which resampler the vision stages use (compiled, or the
numpy fallback); the config and the models it names; camera(s) (video
nodes, libcamera cameras through picamera2 when it is importable, the configured V4L2 device);
I2C buses and the IMU chip, identified by its WHO_AM_I / CHIP_ID register through edged's own
drivers; the Edge TPU (USB ids 1a6e:089a / 18d1:9302 in sysfs, /dev/apex_N, libedgetpu
loadable); the groups the device nodes need (video, i2c, plugdev, apex); the broker (an MQTT
CONNECT answered by a CONNACK, after the TLS handshake when configured); free space for the
outbox. With the systemd unit installed, its directories ($STATE_DIRECTORY, ...) are applied
before the config is read, so the outbox checked is the one the service writes, and running as
another user than the unit's User= is a warning (permissions would differ).

Each check ends in one status: `ok`, `info` (nothing needed), `warn` (optional and missing or
degraded: the daemon runs anyway) or `fail` (the config needs it and it is missing). The exit
status is 1 when anything failed, else 0.

System paths (/dev, /sys, /etc/passwd, /etc/group) are read under `Env.root`, and the hardware
libraries (SMBus, picamera2, libedgetpu, the network) come through `Env`, so tests run the real
checks against a fake tree and the fakes `edged.hardware` hands out.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import ssl
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edged.config import Config

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
TPU_GROUPS = {"usb": "plugdev", "pci": "apex"}
MIN_FREE = 16 << 20  # below this the outbox cannot even take a burst of results


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _default_picamera2():
    from picamera2 import Picamera2

    return Picamera2


@dataclass
class Env:
    """Where the doctor looks; every default is the real machine."""

    root: Path = Path("/")
    smbus_factory: Callable | None = None       # bus number -> SMBus-like; default smbus2 via edged.sources.imu
    picamera2: Callable[[], object] = _default_picamera2   # returns the Picamera2 class (ImportError if none)
    load_library: Callable[[str], tuple[bool, str]] | None = None   # default edged.tpu.library_loadable
    user: str | None = None                      # default: the user running the doctor
    uid: int | None = None
    timeout_s: float = 3.0
    extra_groups: set[str] = field(default_factory=set)  # groups of this process not in /etc/group

    def path(self, p: str) -> Path:
        return Path(self.root) / p.lstrip("/")

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(str(self.path(pattern))))


def _rel(env: Env, p: str) -> str:
    """A path under env.root as the device would name it."""
    root = str(env.root).rstrip("/")
    return p[len(root):] if root and p.startswith(root) else p


# --------------------------------------------------------------------------- the checks

def check_python() -> Check:
    v = sys.version_info
    text = f"Python {v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v < (3, 11):
        return Check("python", FAIL, text, "edged needs Python 3.11 or newer (Raspberry Pi OS bookworm has it)")
    return Check("python", OK, text)


def check_config(path: str, problems: list[str] | None) -> Check:
    if problems:
        return Check("config", FAIL, f"{path}: {len(problems)} problem(s): " + "; ".join(problems),
                     f"fix the lines named above, then check with: edged check-config {path}")
    return Check("config", OK, f"{path}: valid")


def check_runtime() -> Check:
    from edged.runtime import RuntimeUnavailable, runtime

    try:
        rt = runtime()
    except RuntimeUnavailable as exc:
        return Check("runtime", FAIL, "no TFLite runtime", str(exc))
    return Check("runtime", OK, f"{rt.name} {rt.version}")


def check_resampler(cfg: Config) -> Check:
    """Which resampler the vision stages use: the compiled one, or the numpy code (same results,
    slower) when the install could not build it."""
    from edged.stages.vision import native

    if not cfg.camera.enabled:
        return Check("resampler", INFO, f"camera disabled: not used ({native.STATUS})")
    if native.LIB is not None:
        return Check("resampler", OK, native.STATUS)
    if not native.fell_back():  # EDGED_RESAMPLER=numpy asked for it
        return Check("resampler", INFO, native.STATUS)
    return Check("resampler", WARN, native.STATUS + " (the same results, slower)", native.INSTALL_HINT)


def check_models(cfg: Config) -> Check:
    from edged.models import ModelError, default_models_dir, load_manifest, verify

    wanted = list(dict.fromkeys((name, task) for name, task, _ in cfg.model_uses()))
    if not wanted:
        return Check("models", INFO, "camera and IMU disabled: no model needed")
    try:
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
        done = []
        for name, task in wanted:
            entry = manifest.get(name)
            if entry is None:
                raise ModelError(f"{task}.model: no model named {name!r} in the manifest "
                                 f"(have: {', '.join(sorted(manifest))})")
            verify(entry)
            tpu = f" + {entry.edgetpu_path.name}" if entry.edgetpu_path else ""
            done.append(f"{name} ({entry.path.name}{tpu})")
    except ModelError as exc:
        return Check("models", FAIL, str(exc), "restore the models from the release, or fix vision.model / vision.stages / motion.model")
    return Check("models", OK, "verified sha256: " + ", ".join(done))


def _video_nodes(env: Env) -> list[str]:
    out = []
    for node in env.glob("dev/video*"):
        name = os.path.basename(node)
        try:
            card = env.path(f"sys/class/video4linux/{name}/name").read_text().strip()
        except OSError:
            card = "?"
        out.append(f"{_rel(env, node)} ({card})")
    return out


def check_camera(cfg: Config, env: Env) -> list[Check]:
    cam = cfg.camera
    nodes = _video_nodes(env)
    inventory = Check("video nodes", INFO, ", ".join(nodes) if nodes else "no /dev/video* nodes")
    if not cam.enabled:
        return [Check("camera", INFO, "disabled (camera.enabled = false)"), inventory]
    if cam.source == "replay":
        from edged.sources.camera import OPENCV_HINT, VIDEO_SUFFIXES

        replay = Path(cam.path)
        if replay.suffix.lower() in VIDEO_SUFFIXES:
            if not replay.is_file():
                return [Check("camera", FAIL, f"replay video {cam.path} does not exist",
                              "set camera.path to a video file or a folder of images"), inventory]
            try:
                import cv2  # noqa: F401
            except ImportError:  # as `edged run` would refuse it
                return [Check("camera", FAIL, f"replay of the video {cam.path}: OpenCV is not importable",
                              OPENCV_HINT), inventory]
        return [Check("camera", OK, f"replay of {cam.path}"), inventory]
    if cam.fake:
        return [Check("camera", WARN, f"fake {cam.source} camera showing {cam.path} (camera.fake = true)",
                      "set camera.fake = false to use the real camera"), inventory]
    if cam.source == "picamera2":
        from edged.sources.camera import PICAMERA2_HINT

        try:
            cls = env.picamera2()
        except ImportError:
            return [Check("camera", FAIL, "picamera2 is not installed", PICAMERA2_HINT.split(": ", 1)[1]),
                    inventory]
        try:
            cams = list(cls.global_camera_info())
        except Exception as exc:  # libcamera may fail in many ways; say what it said
            cams, why = [], f" ({exc})"
        else:
            why = ""
        num = int(cam.device) if str(cam.device).isdigit() else 0
        listing = ", ".join(f"{i}: {c.get('Model', '?')} {c.get('Id', '')}".strip() for i, c in enumerate(cams))
        if num >= len(cams):
            return [Check("camera", FAIL, f"libcamera finds {len(cams)} camera(s){why}, camera.device asks for "
                          f"camera {num}" + (f" ({listing})" if listing else ""),
                          "power off, seat the ribbon cable (contacts the right way round), boot, then run "
                          "'rpicam-hello --list-cameras'; on Pi OS bookworm keep camera_auto_detect=1 in "
                          "/boot/firmware/config.txt"), inventory]
        return [Check("camera", OK, f"picamera2 camera {num}: {listing}"), inventory]
    # v4l2
    from edged.sources.camera import v4l2_device

    dev = v4l2_device(cam.device or "/dev/video0")
    node = env.path(dev)
    if not node.exists():
        return [Check("camera", FAIL, f"{dev} does not exist",
                      "plug the webcam in (or set camera.device to one of the video nodes listed); "
                      "'v4l2-ctl --list-devices' shows which node is the capture device"), inventory]
    try:
        import cv2  # noqa: F401
    except ImportError:
        from edged.sources.camera import OPENCV_HINT

        return [Check("camera", FAIL, f"{dev} exists but OpenCV is not importable", OPENCV_HINT), inventory]
    if env.root == Path("/") and not os.access(node, os.R_OK | os.W_OK):
        return [Check("camera", FAIL, f"{dev}: no read/write access for this user",
                      "add the user to the video group: sudo usermod -aG video $USER (then log in again)"),
                inventory]
    return [Check("camera", OK, f"v4l2 {dev}"), inventory]


def check_imu(cfg: Config, env: Env) -> list[Check]:
    imu = cfg.imu
    buses = [_rel(env, b) for b in env.glob("dev/i2c-*")]
    inventory = Check("i2c buses", INFO, ", ".join(buses) if buses else "no /dev/i2c-* (I2C not enabled)")
    if not imu.enabled:
        return [Check("imu", INFO, "disabled (imu.enabled = false)"), inventory]
    if imu.source == "replay":
        return [Check("imu", OK, f"replay of {imu.path}"), inventory]
    dev = f"/dev/i2c-{imu.bus}"
    factory = env.smbus_factory
    fake = ""
    if imu.fake:
        from edged.hardware import for_config

        factory = for_config(cfg).smbus_factory(imu)
        fake = " on the FAKE bus (imu.fake = true)"
    elif not env.path(dev).exists():
        return [Check("imu", FAIL, f"{dev} does not exist (imu.bus = {imu.bus})",
                      "enable I2C: sudo raspi-config nonint do_i2c 0 (or dtparam=i2c_arm=on in "
                      "/boot/firmware/config.txt), then reboot"), inventory]
    found = identify_imu(cfg, factory)
    if isinstance(found, Check):
        return [found, inventory]
    status = WARN if imu.fake else OK
    return [Check("imu", status, found + fake, "set imu.fake = false to use the real chip" if fake else ""),
            inventory]


def identify_imu(cfg: Config, factory) -> str | Check:
    """Read the ID register of the configured (or any known) chip; a description, or a failed Check."""
    from edged.sources.imu import ImuError
    from edged.sources.imu.source import CHIP_ALIASES, SCAN_ADDRESSES, open_smbus, scan

    imu = cfg.imu
    label = f"I2C bus {imu.bus}"
    try:
        bus = (factory or open_smbus)(imu.bus)
    except ImuError as exc:
        return Check("imu", FAIL, str(exc), "see the fix in the message")
    try:
        addresses = (imu.address,) if imu.address else SCAN_ADDRESSES
        try:
            cls, address = scan(bus, label, addresses)
        except ImuError as exc:
            return Check("imu", FAIL, str(exc),
                         "check the wiring (SDA to pin 3, SCL to pin 5, 3.3 V, GND) and the address pin; "
                         "'i2cdetect -y %d' lists what answers" % imu.bus)
        variant, value = cls.probe(bus, address)
        what = (f"{variant} at 0x{address:02x} on {label} "
                f"(ID register 0x{cls.ID_REGISTER:02x} = 0x{value:02x})")
        want = CHIP_ALIASES.get(imu.source)
        if want and cls.name != want:
            return Check("imu", FAIL, f"found {what}, but imu.source = {imu.source!r}",
                         f"set imu.source = \"{variant}\" (or \"auto\")")
        return what
    finally:
        try:
            bus.close()
        except Exception:
            pass


def check_tpu(cfg: Config, env: Env) -> list[Check]:
    from edged.tpu import EDGETPU_LIBRARY, FIX_PCI, FIX_USB, INSTALL_LIBEDGETPU, find_pci_tpus, find_usb_tpus, \
        library_loadable, list_edge_tpus

    acc = cfg.accelerator
    usb = find_usb_tpus(env.root)
    pci = [_rel(env, p) for p in find_pci_tpus(env.root)]
    ok_lib, lib_where = (env.load_library or library_loadable)(EDGETPU_LIBRARY)
    seen = [f"USB {d}: {desc}" for d, desc in usb] + [f"PCIe {p}" for p in pci]
    listed = list_edge_tpus() if env.root == Path("/") else None
    if listed:
        seen.append("pycoral lists " + ", ".join(f"{t.get('type')}:{t.get('path')}" for t in listed))
    devices = "; ".join(seen) if seen else "no Edge TPU found"
    lib = f"{EDGETPU_LIBRARY} {'loads' if ok_lib else 'missing'}"
    if acc.device == "cpu":
        return [Check("edgetpu", INFO, f"not used (accelerator.device = \"cpu\"); {devices}; {lib}")]
    kind = acc.device.split(":")[0] or "auto"  # ":N": the Nth Edge TPU of any kind
    have = {"usb": bool(usb), "pci": bool(pci), "auto": bool(usb or pci)}[kind]
    problems, fixes = [], []
    if not have:
        problems.append(f"no {'Edge TPU' if kind == 'auto' else kind.upper() + ' Edge TPU'} found")
        fixes.append({"usb": FIX_USB, "pci": FIX_PCI}.get(kind, f"{FIX_USB}; or {FIX_PCI}"))
    if not ok_lib:
        problems.append(f"{EDGETPU_LIBRARY} does not load ({lib_where})")
        fixes.append(INSTALL_LIBEDGETPU)
    if not problems:
        idle = _models_without_edgetpu(cfg)
        if idle:
            return [Check("edgetpu", WARN, f"{devices}; {lib}; but no model in use has an edgetpu_file "
                          f"({', '.join(idle)}), so the TPU stays idle",
                          "compile the vision model with edgetpu_compiler and add edgetpu_file, "
                          "edgetpu_sha256 and edgetpu_size to its manifest table (docs/hardware.md)")]
        return [Check("edgetpu", OK, f"{devices}; {lib}")]
    detail = f"accelerator.device = \"{acc.device}\": " + "; ".join(problems) + (f" ({devices})" if seen else "")
    if not acc.fallback:
        return [Check("edgetpu", FAIL, detail + "; accelerator.fallback = false, so edged will not start",
                      "; ".join(fixes))]
    if kind == "auto":
        return [Check("edgetpu", INFO, detail + "; models run on the CPU")]
    return [Check("edgetpu", WARN, detail + "; models will run on the CPU until it appears", "; ".join(fixes))]


def check_tpu_runtime(cfg: Config, env: Env) -> list[Check]:
    """Whether the installed libedgetpu was built for the interpreter edged runs (a mismatch
    segfaults, which no fallback can catch); only when the config uses a TPU and the library loads."""
    from edged.tpu import EDGETPU_LIBRARY, library_loadable

    if cfg.accelerator.device == "cpu" or not (env.load_library or library_loadable)(EDGETPU_LIBRARY)[0]:
        return []
    return [_tpu_runtime_pair(env, required=not cfg.accelerator.fallback)]


def _tpu_runtime_pair(env: Env, required: bool) -> Check:
    from edged.runtime import RuntimeUnavailable, runtime
    from edged.tpu import abi_fix, abi_pair, installed_libedgetpu

    try:
        rt = runtime()
    except RuntimeUnavailable as exc:
        return Check("edgetpu abi", WARN, f"no interpreter to check libedgetpu against ({exc})")
    status, text = abi_pair(rt.name, rt.version, installed_libedgetpu(env.root))
    fix = abi_fix(rt.name, rt.version)
    if status == "match":
        return Check("edgetpu abi", OK, text)
    if status == "mismatch":
        if required:
            return Check("edgetpu abi", FAIL, text + "; accelerator.fallback = false, so edged will not start",
                         fix)
        return Check("edgetpu abi", WARN, text + "; edged does not load the delegate and runs on the CPU", fix)
    return Check("edgetpu abi", WARN, text, fix)


def _models_without_edgetpu(cfg: Config) -> list[str]:
    """The models in use when none of them has an edgetpu_file (else [])."""
    from edged.models import ModelError, default_models_dir, load_manifest

    try:
        manifest = load_manifest(Path(cfg.models_dir) if cfg.models_dir else default_models_dir())
    except ModelError:
        return []  # the models check reports it
    names = list(dict.fromkeys(name for name, _, _ in cfg.model_uses()))
    entries = [manifest[n] for n in names if n in manifest]
    return [] if any(e.edgetpu_path for e in entries) else names


def _groups_of(env: Env, user: str) -> tuple[set[str], set[str]]:
    """(groups the user is in, groups that exist), from passwd and group files under root."""
    gid_names, members, existing = {}, set(), set()
    try:
        for line in env.path("etc/group").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4:
                existing.add(parts[0])
                gid_names[parts[2]] = parts[0]
                if user in parts[3].split(","):
                    members.add(parts[0])
    except OSError:
        pass
    try:
        for line in env.path("etc/passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 4 and parts[0] == user and parts[3] in gid_names:
                members.add(gid_names[parts[3]])
    except OSError:
        pass
    return members | env.extra_groups, existing


def check_groups(cfg: Config, env: Env) -> Check:
    need: dict[str, str] = {}
    if cfg.camera.enabled and cfg.camera.source != "replay" and not cfg.camera.fake:
        need["video"] = "camera"
    if cfg.imu.enabled and cfg.imu.source != "replay" and not cfg.imu.fake:
        need["i2c"] = "IMU"
    from edged.tpu import find_pci_tpus, find_usb_tpus

    kind = cfg.accelerator.device.split(":")[0]
    if kind == "usb" or (kind == "auto" and find_usb_tpus(env.root)):
        need["plugdev"] = "USB Edge TPU"
    if kind == "pci" or (kind == "auto" and find_pci_tpus(env.root)):
        need["apex"] = "PCIe Edge TPU"
    uid = os.getuid() if env.uid is None else env.uid
    user = env.user or _user_name(uid)
    if uid == 0:
        return Check("groups", OK if need else INFO, "running as root: device access needs no groups "
                     "(the edged service runs as user edged with SupplementaryGroups=video i2c plugdev apex)")
    if not need:
        return Check("groups", INFO, f"user {user}: no device groups needed by this config")
    have, existing = _groups_of(env, user)
    missing = [g for g in need if g not in have]
    if not missing:
        return Check("groups", OK, f"user {user} is in " + ", ".join(need))
    # without the TPU's group edged still runs, on the CPU, unless the config forbids that
    required = [g for g in missing if g not in TPU_GROUPS.values() or not cfg.accelerator.fallback]
    hints = []
    for g in missing:
        if g not in existing:
            hints.append({"i2c": "the i2c group appears when I2C is enabled (sudo raspi-config nonint do_i2c 0)",
                          "apex": "the apex group comes with the Edge TPU PCIe driver (gasket-dkms) and its udev rule",
                          "plugdev": "sudo groupadd plugdev", "video": "sudo groupadd video"}[g])
    detail = f"user {user} is not in " + ", ".join(f"{g} (for the {need[g]})" for g in missing)
    fix = f"sudo usermod -aG {','.join(missing)} {user}, then log out and in again"
    if hints:
        fix += "; " + "; ".join(hints)
    return Check("groups", FAIL if required else WARN, detail, fix)


def _user_name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def check_broker(cfg: Config, env: Env) -> Check:
    """An MQTT CONNECT answered by a CONNACK, not merely an open port: any service may hold 1883."""
    from edged.delivery.probe import TlsRefused, ask

    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    ctx = None
    if m.tls:
        try:
            ctx = ssl.create_default_context(cafile=m.ca_file or None)
            if m.cert_file:
                ctx.load_cert_chain(m.cert_file, m.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            return Check("broker", FAIL, f"{where}: cannot load the TLS files: {exc}",
                         "check mqtt.ca_file, mqtt.cert_file and mqtt.key_file")
    try:
        answer = ask(m.host, m.port, timeout=env.timeout_s, username=m.username, password=m.password,
                     tls=ctx, client_id=f"edged-doctor-{cfg.device_id}")
    except TlsRefused as exc:
        if exc.untrusted:
            return Check("broker", FAIL, str(exc),
                         "set mqtt.ca_file to the CA that signed the broker's certificate, and make "
                         "mqtt.host match a name in that certificate")
        return Check("broker", FAIL, str(exc),
                     "check that this port speaks TLS (often 8883) and the client certificate/key")
    if not answer.reachable:
        # A warning, not a failure: edged spools results until the broker is reachable, so a
        # device provisioned before its network or broker is up is still a working device.
        return Check("broker", WARN, f"{answer.detail} (results will be spooled)",
                     "start the broker (sudo systemctl start mosquitto) or fix mqtt.host / mqtt.port; "
                     "check the network and any firewall between")
    if not answer.ok:
        if "user name or password" in answer.detail or "not authorised" in answer.detail:
            fix = "set mqtt.username / mqtt.password to an account the broker accepts (and its ACL allows)"
        else:
            fix = ("point mqtt.host / mqtt.port at the MQTT broker; find what holds the port with "
                   f"'sudo ss -ltnp sport = :{m.port}'")
        return Check("broker", FAIL, answer.detail, fix)
    if not m.tls:
        return Check("broker", OK, f"{answer.detail} (no TLS: mqtt.tls = false)")
    return Check("broker", OK, f"{answer.detail} over {answer.tls}, certificate for {answer.peer_cn} verified")


def check_unit(unit, env: Env) -> Check:
    """The installed unit (an `edged.service.unitfile.UnitEnv`) and whether we run as its user."""
    if unit is None:
        return Check("unit", INFO, "no edged.service installed: directories are this user's own")
    service_user = unit.user or "root"
    uid = os.getuid() if env.uid is None else env.uid
    user = env.user or _user_name(uid)
    edged = sys.argv[0] if os.path.basename(sys.argv[0]) == "edged" else "edged"
    where = f"{unit.path}: User={service_user}, state in {unit.state_dir or '(no StateDirectory=)'}"
    if user != service_user:
        return Check("unit", WARN, f"{where}; this doctor runs as {user}, so file and device "
                     "permissions are not the service's",
                     f"run it as the service user: sudo runuser -u {service_user} -- {edged} doctor")
    return Check("unit", OK, where)


def check_outbox(cfg: Config) -> Check:
    path = cfg.outbox_path
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return Check("outbox", FAIL, f"{path}: {probe} is not writable by this user",
                     "run as the service user, or set state_dir / outbox.path to a writable place "
                     "(the service's StateDirectory is /var/lib/edged)")
    free = shutil.disk_usage(probe).free
    bound = cfg.outbox.max_bytes
    text = f"{path}: {_mib(free)} free on {probe}; outbox bound {_mib(bound)}"
    if free < MIN_FREE:
        return Check("outbox", FAIL, text, "free disk space (journal: sudo journalctl --vacuum-size=50M)")
    if free < bound:
        return Check("outbox", WARN, text + ": the disk fills before the outbox bound",
                     f"lower outbox.max_bytes below {_mib(free)} or free disk space")
    return Check("outbox", OK, text)


def check_updates(cfg: Config, env: Env) -> Check:
    """[updates]: python-tuf present, the repository answering, what the device runs."""
    import urllib.request

    from edged.service.updater import INSTALL_HINT, State, STATE_FILE

    u = cfg.updates
    if not u.url:
        return Check("updates", INFO, "off (no [updates] url)")
    try:
        import tuf.ngclient  # noqa: F401
    except ImportError:
        return Check("updates", FAIL, "updates configured but python-tuf is not installed", INSTALL_HINT)
    state = State.load(Path(cfg.state_dir) / "updates" / STATE_FILE)
    running = ", ".join(f"{n} {m.running or 'shipped'}" for n, m in sorted(state.models.items())) or "shipped models"
    last = state.last or {}
    summary = f"running {running}" + (f"; last: {last.get('outcome')} {last.get('model')} {last.get('version')}"
                                      if last else "")
    where = f"{u.url.rstrip('/')}/metadata/timestamp.json"
    try:
        with urllib.request.urlopen(where, timeout=env.timeout_s) as r:
            r.read(16384)
    except (OSError, ValueError) as exc:
        return Check("updates", WARN, f"{where}: cannot fetch: {getattr(exc, 'reason', exc)}; {summary}",
                     "check updates.url and the network; the device keeps its models meanwhile")
    return Check("updates", OK, f"{u.url} answers (channel {u.channel}); {summary}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


# --------------------------------------------------------------------------- running and printing

def run(cfg: Config | None, *, config_path: str = "<defaults>", problems: list[str] | None = None,
        env: Env | None = None, unit=None) -> list[Check]:
    """Every check, in the order the table shows them. With an invalid config the hardware checks
    still run, against the defaults. `unit`: the installed unit (edged.service.unitfile), whose
    directories the caller has already applied."""
    env = env or Env()
    checks = [check_python(), check_config(config_path, problems), check_runtime()]
    cfg = cfg or Config()
    checks.append(check_resampler(cfg))
    checks.append(check_models(cfg))
    checks += check_camera(cfg, env)
    checks += check_imu(cfg, env)
    checks += check_tpu(cfg, env)
    checks += check_tpu_runtime(cfg, env)
    checks.append(check_groups(cfg, env))
    checks.append(check_broker(cfg, env))
    checks.append(check_outbox(cfg))
    checks.append(check_updates(cfg, env))
    if unit is not None:
        checks.append(check_unit(unit, env))
    return checks


def exit_status(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check], config_path: str) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"edged doctor: config {config_path}", ""]
    for c in checks:
        mark = c.status.upper() if c.status in (FAIL, WARN) else c.status
        lines.append(f"{mark:<4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines += ["", f"{fails} failed, {warns} warning(s): " + ("not ready" if fails else "ready")]
    return "\n".join(lines)


def to_json(checks: list[Check], config_path: str) -> str:
    return json.dumps({"config": config_path, "ok": exit_status(checks) == 0,
                       "checks": [asdict(c) for c in checks]}, indent=2)
