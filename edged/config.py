"""edged's configuration: one TOML file, typed sections, strict validation with one line per problem.

Every key has a default, so an empty or missing file runs the demo pipeline (replay camera on the
shipped sample images, replay IMU on the shipped recording, local broker). Validation reports
every problem at once as `FILE:LINE: KEY: expected …, got …` so an operator can fix a config in
one pass; the CLI turns a `ConfigError` into exit status 2.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DEFAULT_PATH = Path("/etc/edged/edged.toml")
_REPO = Path(__file__).resolve().parent.parent
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConfigError(Exception):
    """One or more configuration problems; `problems` holds one user-facing line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _samples_dir() -> Path:
    import sys

    for c in (_REPO / "samples", Path(sys.prefix) / "share" / "edged" / "samples"):
        if c.is_dir():
            return c
    return _REPO / "samples"


def _state_dir() -> Path:
    # systemd's StateDirectory= sets STATE_DIRECTORY; elsewhere follow XDG.
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "edged"


def _check(**meta: Any) -> Any:
    return meta


@dataclass
class MqttConfig:
    host: str = field(default="127.0.0.1", metadata=_check(
        pattern=r"^[^\s/]+$", expect="a host name or IP address (no mqtt://, no path)"))
    port: int = field(default=1883, metadata=_check(min=1, max=65535))
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    client_id: str = ""
    topic_prefix: str = field(default="edged", metadata=_check(pattern=r"^[^#+\s]+$",
                                                               expect="a topic prefix without +, # or spaces"))
    keepalive_s: int = field(default=30, metadata=_check(min=5, max=3600))
    max_inflight: int = field(default=32, metadata=_check(min=1, max=1000))
    reconnect_min_s: float = field(default=1.0, metadata=_check(min=0.1, max=60))
    reconnect_max_s: float = field(default=60.0, metadata=_check(min=1, max=3600))
    protocol: str = field(default="5", metadata=_check(choices=("5", "3.1.1")))
    codec: str = field(default="json", metadata=_check(choices=("json", "cbor")))
    message_expiry_s: int = field(default=86400, metadata=_check(min=0, max=1 << 31))  # 0 = never (MQTT 5)
    session_expiry_s: int = field(default=3600, metadata=_check(min=0, max=1 << 31))  # MQTT 5


@dataclass
class CameraConfig:
    enabled: bool = True
    source: str = field(default="replay", metadata=_check(choices=("replay", "picamera2", "v4l2")))
    path: str = field(default_factory=lambda: str(_samples_dir() / "images"))  # replay; what a fake camera shows
    fps: float = field(default=2.0, metadata=_check(min=0.01, max=120))
    loop: bool = True
    device: str = ""  # v4l2: /dev/videoN (default /dev/video0); picamera2: camera number (default 0)
    width: int = field(default=640, metadata=_check(min=16, max=8192))   # capture / main stream size
    height: int = field(default=480, metadata=_check(min=16, max=8192))
    fourcc: str = field(default="", metadata=_check(pattern=r"^([A-Za-z0-9 ]{4})?$"))  # v4l2 pixel format
    fake: bool = False  # a fake camera of `source`'s kind showing the images at `path`


STAGE_INPUT_FRAME = "frame"
STAGE_REGIONS = ("box", "top")


def check_stages(specs) -> list[str]:
    """Problems with a list of vision stages (config tables or StageSpecs), one line each, each
    starting with the config key it is about."""
    problems, seen = [], {}
    for i, s in enumerate(specs):
        key = f"vision.stages[{i}]"
        if not s.name:
            problems.append(f"{key}.name: missing")
        elif s.name in seen:
            problems.append(f"{key}.name: {s.name!r} is already the name of vision.stages[{seen[s.name]}]")
        if s.input != STAGE_INPUT_FRAME:
            label, at, stage = s.input.partition("@")
            if not at or not label or not stage:
                problems.append(f"{key}.input: expected \"frame\" or \"<label>@<stage>\", got {s.input!r}")
            elif stage not in seen:
                problems.append(f"{key}.input: {s.input!r} names no earlier stage "
                                f"(earlier: {', '.join(seen) or 'none'})")
            if s.tiles != 1:
                problems.append(f"{key}.tiles: only a stage on the frame can tile it")
        if s.region not in STAGE_REGIONS:
            problems.append(f"{key}.region: expected one of {', '.join(map(repr, STAGE_REGIONS))}, got {s.region!r}")
        seen.setdefault(s.name, i)
    return problems


@dataclass
class VisionStageConfig:
    """One `[[vision.stages]]` table: a model and what it runs on (edged.stages.vision.graph)."""

    name: str = field(default="", metadata=_check(pattern=r"^[A-Za-z0-9_-]{1,32}$",
                                                  expect="1-32 letters, digits, _ or -"))
    model: str = ""
    input: str = "frame"  # or "<label>@<stage name>": that stage's boxes of that label, cropped
    score_threshold: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))  # 0 = model's own
    tiles: int = field(default=1, metadata=_check(min=1, max=4))  # on the frame: n×n tiles + the frame
    margin: float = field(default=0.2, metadata=_check(min=0.0, max=2.0))  # crops grow by this per side
    region: str = field(default="box", metadata=_check(choices=("box", "top")))
    max_crops: int = field(default=8, metadata=_check(min=1, max=64))


@dataclass
class VisionConfig:
    model: str = "face"
    score_threshold: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))  # 0 = model's own
    heartbeat_s: float = field(default=30.0, metadata=_check(min=1, max=86400))
    threads: int = field(default=0, metadata=_check(min=0, max=16))  # 0 = one per core, up to 4
    # What the `detections`/`events` topics carry: "labels" = a frame's objects when the set of
    # labels changes (and every heartbeat_s); "events" = track events new/update/end; "both".
    publish: str = field(default="labels", metadata=_check(choices=("labels", "events", "both")))
    hold_s: float = field(default=2.0, metadata=_check(min=0.0, max=3600))  # a track ends unseen this long
    min_hits: int = field(default=2, metadata=_check(min=1, max=100))       # frames before a track is `new`
    # Several models per frame, in order; empty: `model` alone on the whole frame.
    stages: list[VisionStageConfig] = field(default_factory=list)


IMU_CHIPS = ("mpu6050", "mpu6000", "mpu6500", "mpu9250", "lsm6ds3", "lsm6dsl", "lsm6ds3tr-c",
             "lsm6dsox", "lsm6dso", "bmi160")  # edged.sources.imu.source.CHIP_ALIASES


@dataclass
class ImuConfig:
    enabled: bool = True
    source: str = field(default="replay", metadata=_check(choices=("replay", "auto") + IMU_CHIPS))
    path: str = field(default_factory=lambda: str(_samples_dir() / "imu" / "basicmotions_demo.csv"))
    speed: float = field(default=1.0, metadata=_check(min=0.01, max=1000))
    loop: bool = True
    bus: int = field(default=1, metadata=_check(min=0, max=255))          # /dev/i2c-N
    address: int = field(default=0, metadata=_check(min=0, max=0x77))     # 0 = scan / the chip's usual ones
    rate_hz: float = field(default=100.0, metadata=_check(min=1, max=2000))
    accel_range_g: float = field(default=4.0, metadata=_check(min=2, max=16))
    gyro_range_dps: float = field(default=500.0, metadata=_check(min=125, max=2000))
    lpf_hz: float = field(default=0.0, metadata=_check(min=0, max=1000))  # 0 = the chip's default
    fake: bool = False  # an emulated chip on a fake I2C bus, moving as the recording at `path`


@dataclass
class MotionConfig:
    model: str = "motion"
    threads: int = field(default=1, metadata=_check(min=0, max=16))


@dataclass
class OutboxConfig:
    path: str = ""  # default: <state_dir>/outbox.db
    max_bytes: int = field(default=64 * 1024 * 1024, metadata=_check(min=64 * 1024, max=1 << 40))
    synchronous: str = field(default="full", metadata=_check(choices=("full", "normal")))
    max_file_bytes: int = field(default=0, metadata=_check(min=0, max=1 << 40))  # 0 = only the disk limits it


@dataclass
class StatsConfig:
    interval_s: float = field(default=60.0, metadata=_check(min=1, max=86400))


@dataclass
class HomeAssistantConfig:
    enabled: bool = True
    prefix: str = field(default="homeassistant", metadata=_check(pattern=r"^[^#+\s]+$"))
    labels: list[str] = field(default_factory=list)  # presence sensors; default: the model's labels


@dataclass
class CommandsConfig:
    enabled: bool = False
    snapshot: bool = False  # allow `cmd/snapshot` (publishes a JPEG of the current frame)
    snapshot_max_bytes: int = field(default=256 * 1024, metadata=_check(min=4096, max=16 << 20))


@dataclass
class AcceleratorConfig:
    device: str = field(default="cpu", metadata=_check(choices=(
        "cpu", "auto", "usb", "pci", "usb:0", "usb:1", "usb:2", "usb:3", "pci:0", "pci:1", "pci:2", "pci:3",
        ":0", ":1", ":2", ":3")))  # as pycoral spells them; ":N" is the Nth Edge TPU of any kind
    fallback: bool = True   # run on the CPU while the Edge TPU is missing or failing
    retry_s: float = field(default=60.0, metadata=_check(min=1, max=86400))
    # An inference on the Edge TPU that takes longer than this is hung (libedgetpu blocks in
    # invoke() on some USB faults): the daemon records the fault and exits for a restart.
    invoke_timeout_s: float = field(default=10.0, metadata=_check(min=1, max=600))
    # A fake Edge TPU instead of libedgetpu (tests, demos): "tpu" works, "abort" aborts the
    # process and "hang" blocks in invoke() after `fake_fault_after` inferences, as libedgetpu
    # does on a USB fault.
    fake: str = field(default="", metadata=_check(choices=("", "tpu", "abort", "hang")))
    fake_fault_after: int = field(default=0, metadata=_check(min=0, max=10**9))


@dataclass
class Config:
    device_id: str = field(default_factory=lambda: _sanitize_id(socket.gethostname()),
                           metadata=_check(pattern=_ID_RE.pattern,
                                           expect="1 to 64 letters, digits, '-' or '_'"))
    log_level: str = field(default="info", metadata=_check(choices=("debug", "info", "warning", "error")))
    state_dir: str = field(default_factory=lambda: str(_state_dir()))
    models_dir: str = ""  # default: the shipped models
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    imu: ImuConfig = field(default_factory=ImuConfig)
    motion: MotionConfig = field(default_factory=MotionConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    accelerator: AcceleratorConfig = field(default_factory=AcceleratorConfig)
    source_path: str = field(default="<defaults>", metadata=_check(internal=True))

    @property
    def outbox_path(self) -> Path:
        return Path(self.outbox.path) if self.outbox.path else Path(self.state_dir) / "outbox.db"

    def topic(self, leaf: str) -> str:
        return f"{self.mqtt.topic_prefix}/{self.device_id}/{leaf}"


def _sanitize_id(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64].strip("-")
    return cleaned or "edged"


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; `None` gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read config: {getattr(exc, 'strerror', None) or exc}"]) from None
    return parse(text, str(path))


def parse(text: str, name: str = "<config>") -> Config:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = f":{m.group(1)}" if m else ""
        raise ConfigError([f"{name}{line}: TOML syntax error: {re.sub(r' [(]at line.*', '', msg)}"]) from None
    lines = _key_lines(text)
    problems: list[str] = []
    cfg = _build(Config, doc, "", name, lines, problems)
    cfg.source_path = name
    _cross_checks(cfg, name, lines, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def _build(cls: type, table: dict, prefix: str, name: str, lines: dict[str, int], problems: list[str]):
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        where = f"{name}:{lines[dotted]}" if dotted in lines else name
        f = known.get(key)
        if f is None:
            hint = ", ".join(sorted(known))
            problems.append(f"{where}: {dotted}: unknown key (known here: {hint})")
            continue
        typ = hints[f.name]
        if get_origin(typ) is list and is_dataclass(get_args(typ)[0]):  # an array of tables
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(f"{where}: {dotted}: expected an array of tables [[{dotted}]], got {_tname(value)}")
                continue
            kwargs[key] = [_build(get_args(typ)[0], v, f"{dotted}[{i}].", name, lines, problems)
                           for i, v in enumerate(value)]
            continue
        if is_dataclass(typ):
            if not isinstance(value, dict):
                problems.append(f"{where}: {dotted}: expected a table [{dotted}], got {_tname(value)}")
                continue
            kwargs[key] = _build(typ, value, dotted + ".", name, lines, problems)
            continue
        err = _validate(value, typ, f.metadata)
        if err:
            problems.append(f"{where}: {dotted}: {err}")
            continue
        kwargs[key] = float(value) if typ is float else value
    return cls(**kwargs)


def _validate(value: Any, typ: Any, meta: dict) -> str | None:
    want = typ
    if get_origin(typ) is not None:  # e.g. list[str]
        want = get_origin(typ)
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif want is str:
        ok = isinstance(value, str)
    elif want is list:
        ok = isinstance(value, list) and all(isinstance(v, get_args(typ)[0]) for v in value)
    else:
        ok = isinstance(value, want)
    if not ok:
        return f"expected {_tname_of(typ)}, got {_tname(value)} {value!r}"
    if "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]:
        return f"expected {meta.get('min')} to {meta.get('max')}, got {value!r}"
    if "choices" in meta and value not in meta["choices"]:
        return f"expected one of {', '.join(map(repr, meta['choices']))}, got {value!r}"
    if "pattern" in meta and not re.match(meta["pattern"], value):
        return f"expected {meta.get('expect') or 'text matching ' + meta['pattern']}, got {value!r}"
    return None


def _cross_checks(cfg: Config, name: str, lines: dict[str, int], problems: list[str]) -> None:
    def where(key: str) -> str:
        return f"{name}:{lines[key]}" if key in lines else name

    m = cfg.mqtt
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(m, key)
        if value and not Path(value).is_file():
            problems.append(f"{where('mqtt.' + key)}: mqtt.{key}: file not found: {value}")
    if bool(m.cert_file) != bool(m.key_file):
        problems.append(f"{where('mqtt.cert_file')}: mqtt.cert_file/key_file: give both or neither")
    if m.reconnect_min_s > m.reconnect_max_s:
        problems.append(f"{where('mqtt.reconnect_min_s')}: mqtt.reconnect_min_s: must not exceed reconnect_max_s")
    if cfg.vision.stages:
        for problem in check_stages(cfg.vision.stages):
            key = problem.split(":", 1)[0]
            problems.append(f"{where(key)}: {problem}")
        for i, st in enumerate(cfg.vision.stages):
            if not st.model:
                problems.append(f"{where(f'vision.stages[{i}]')}: vision.stages[{i}].model: missing")
    for section in ("camera", "imu"):
        sec = getattr(cfg, section)
        if sec.enabled and sec.source == "replay" and not Path(sec.path).exists():
            problems.append(f"{where(section + '.path')}: {section}.path: not found: {sec.path}")


_KEY = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_TABLE_RE = re.compile(rf"^\s*\[\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]")
_ARRAY_RE = re.compile(rf"^\s*\[\[\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*\]\]")
_ASSIGN_RE = re.compile(rf"^\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to the line that sets them (for error messages; best effort)."""
    out: dict[str, int] = {}
    table = ""
    arrays: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        m = _ARRAY_RE.match(line)
        if m:  # [[a.b]]: the i-th table of the array is a.b[i]
            key = _dotted(m.group(1))
            table = f"{key}[{arrays.get(key, 0)}]"
            arrays[key] = arrays.get(key, 0) + 1
            out.setdefault(table, n)
            continue
        m = _TABLE_RE.match(line)
        if m:
            table = _dotted(m.group(1))
            out.setdefault(table, n)
            continue
        m = _ASSIGN_RE.match(line)
        if m:
            key = _dotted(m.group(1))
            out.setdefault(f"{table}.{key}" if table else key, n)
    return out


def _dotted(raw: str) -> str:
    return ".".join(p.strip().strip("\"'") for p in re.split(r"\s*\.\s*(?=(?:[^\"']|[\"'][^\"']*[\"'])*$)", raw))


def _tname(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _tname_of(typ: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        typ, f"an array of {_PLURAL.get(get_args(typ)[0], 'values')}" if get_origin(typ) is list
        else getattr(typ, "__name__", str(typ)))


_PLURAL = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
