"""edged's configuration: one TOML file, typed sections, strict validation with one line per problem.

Every key has a default, so an empty or missing file runs the demo pipeline (replay camera on the
shipped sample images, replay IMU on the shipped recording, local broker). Validation reports
every problem at once as `FILE:LINE: KEY: expected …, got …` so an operator can fix a config in
one pass; the CLI turns a `ConfigError` into exit status 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DEFAULT_PATH = Path("/etc/edged/edged.toml")
_REPO = Path(__file__).resolve().parent.parent
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# An MQTT topic is at most 65535 bytes of UTF-8; a prefix leaves room for /<device_id>/<leaf>.
TOPIC_PREFIX_MAX_BYTES = 65535 - 1 - 64 - 1 - 64
# A topic prefix: no wildcards, no whitespace or control characters (NUL included), and not
# starting with '$' (the broker's own topics, $SYS/…, which a client may not publish to).
_PREFIX_PATTERN = r"[^#+$\s\x00-\x1f\x7f][^#+\s\x00-\x1f\x7f]*"
_PREFIX_EXPECT = "a topic prefix without +, #, spaces or control characters, not starting with '$'"
# Config files are small; a bigger one is a mistake (or a device file), not a config.
MAX_CONFIG_BYTES = 1 << 20


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
class BrokerConnection:
    """Which broker and how to log in to it: the [mqtt] keys a device and `edged ingest` share."""

    host: str = field(default="127.0.0.1", metadata=_check(
        pattern=r"^[^\s/]+$", expect="a host name or IP address (no mqtt://, no path)"))
    port: int = field(default=1883, metadata=_check(min=1, max=65535))
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


def check_broker(m, where, problems: list[str]) -> None:
    """The checks across keys of an [mqtt] section (a BrokerConnection with reconnect_min_s and
    reconnect_max_s); `where(key)` says where a key was set, for the line."""
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(m, key)
        if value and _kind(value) != "file":
            problems.append(f"{where('mqtt.' + key)}: mqtt.{key}: file not found: {_plain(value)}")
    if bool(m.cert_file) != bool(m.key_file):
        problems.append(f"{where('mqtt.cert_file')}: mqtt.cert_file/key_file: give both or neither")
    if m.reconnect_min_s > m.reconnect_max_s:
        problems.append(f"{where('mqtt.reconnect_min_s')}: mqtt.reconnect_min_s: must not exceed reconnect_max_s")


@dataclass
class MqttConfig(BrokerConnection):
    client_id: str = ""
    topic_prefix: str = field(default="edged", metadata=_check(pattern=_PREFIX_PATTERN, expect=_PREFIX_EXPECT,
                                                               max_bytes=TOPIC_PREFIX_MAX_BYTES))
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
    # Replay: an image with more pixels than this is refused (JPEGs are first decoded reduced).
    max_pixels: int = field(default=1 << 24, metadata=_check(min=1 << 12, max=1 << 28))


STAGE_INPUT_FRAME = "frame"
STAGE_REGIONS = ("box", "top", "square")


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
            if getattr(s, "turned", False):
                problems.append(f"{key}.turned: only a stage on the frame can turn it")
        else:
            for k, off in (("replace", False), ("from_score", 0.0), ("max_box", 1.0), ("confirm", False)):
                if getattr(s, k, off) != off:
                    problems.append(f"{key}.{k}: only a stage that crops an earlier stage's boxes has it")
        if bool(getattr(s, "within", "")) != bool(getattr(s, "alone_score", 0.0)):
            k = "alone_score" if getattr(s, "within", "") else "within"
            problems.append(f"{key}.{k}: `within` and `alone_score` go together (the label whose boxes "
                            f"vouch for this stage's objects, and the score an object needs outside them)")
        if getattr(s, "confirm", False) and s.replace:
            problems.append(f"{key}.confirm: a confirming stage reports the boxes it looks at; it cannot replace them")
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
    # "box"; "top" = a square at the box's top (a person's head); "square" = a square around the
    # box, its side the box's longer side grown by `margin` on each side (a closer look at it)
    region: str = field(default="box", metadata=_check(choices=STAGE_REGIONS))
    max_crops: int = field(default=8, metadata=_check(min=1, max=64))
    # Crops: only boxes whose width and height are both under this share of the frame's.
    max_box: float = field(default=1.0, metadata=_check(min=0.01, max=1.0))
    # Crops: the objects of the source's label this stage finds in a box (lying mostly inside it,
    # not cut by the crop's edge) replace that box in the result: a closer look at a small box
    # tells one loose box over two people apart, and places a box better.
    replace: bool = False
    # Crops: also the source stage's boxes scored from this up to its own threshold (which are not
    # reported themselves): a second look at what the source was unsure of. 0 = none.
    from_score: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))
    # Crops: look at the source stage's boxes that the result so far left out (scored from
    # `from_score`, or dropped by the merge), and report each one the stage's model finds a
    # skeleton in that no reported box claims (edged.stages.vision.confirm). Needs a model with
    # the "paf" decoder.
    confirm: bool = False
    # On the frame: also on the frame turned a quarter either way (two more invokes), boxes turned
    # back: a detector of upright people (the `person` model) then finds people lying across the view.
    turned: bool = False
    # The stage's objects lying in no reported box of the label `within` (at least half inside
    # one) are reported only from `alone_score`: a face with no person around it needs more of
    # its model's confidence than one inside a person (a drawn or painted face, a pattern that
    # looks like one). "" = every object as its model scores it.
    within: str = field(default="", metadata=_check(pattern=r"^([A-Za-z0-9_-]{1,32})?$",
                                                    expect="a label: 1-32 letters, digits, _ or -"))
    alone_score: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))


# The default chain, chosen by measurement on the labelled scene set (docs/models.md): people on
# the frame and on 2×2 tiles (small people), faces with the full-range model on the frame, and
# faces with the short-range model in the top of each person's box, where they are large enough.
# People from 0.3 (0.4 until the held-out set showed dim people scored 0.22-0.35; 0.3 found more
# on all three labelled sets and no false person on any).
# Then a closer look, with the same person model, at each small person box (under a quarter of the
# frame) and at each place the people stage scored 0.15-0.3: a square twice the box's size, so a
# person 20 px wide is seen 2-4 times larger. What it finds there replaces the loose box (one box
# over two small people becomes two); where it finds nothing, a reported box stays and an unsure
# one is dropped. It costs one person invoke per such box, none on a frame without any (docs/models.md).
# A face the full-range model finds where no reported person holds it counts from 0.75 rather
# than the model's 0.6: on the labelled sets the one real face no person held scored 0.89 and a
# drawn face on a people-free picture 0.64, and every real face the model scored under 0.75 lay
# in a reported person (docs/models.md, "Faces outside every person").
# The daemon runs it when the config names neither `vision.model` nor `[[vision.stages]]`;
# `edged detect` runs it without --model. edged.stages.vision.graph.DEFAULT_CHAIN is this.
DEFAULT_STAGES: tuple[VisionStageConfig, ...] = (
    VisionStageConfig(name="people", model="person", tiles=2, score_threshold=0.3),
    VisionStageConfig(name="faces", model="face_full_range", within="person", alone_score=0.75),
    VisionStageConfig(name="faces_in_people", model="face", input="person@people", region="top"),
    VisionStageConfig(name="people_closer", model="person", input="person@people", region="square",
                      margin=0.5, max_box=0.25, replace=True, from_score=0.15),
)

# Not in the default chain (it costs about 17 MB of memory and 17-33 % more time per frame over
# the labelled sets with people; docs/models.md, "People confirmed by their skeletons"): a fifth
# stage that looks at the people stage's boxes the chain left out (scored 0.15-0.3, or dropped by
# the merge because they overlap another person's) with the `openpose` model, and reports each one
# that holds a skeleton no reported box claims. Declare the default chain's stages and this one in
# [[vision.stages]].
PEOPLE_CONFIRMED = VisionStageConfig(name="people_confirmed", model="openpose", input="person@people",
                                     region="square", margin=0.5, confirm=True, from_score=0.15)


@dataclass
class VisionConfig:
    model: str = ""  # one model alone on the whole frame; "" = the stages (default: DEFAULT_STAGES)
    score_threshold: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))  # 0 = model's own
    heartbeat_s: float = field(default=30.0, metadata=_check(min=1, max=86400))
    threads: int = field(default=0, metadata=_check(min=0, max=16))  # 0 = one per core, up to 4
    # With several stages: invoke on a thread of its own while the vision thread prepares the next
    # input and decodes the last (edged.stages.vision.overlap). Costs a second input buffer and an
    # output copy per stage (about 3 MB for the default chain); false = one thing at a time.
    overlap: bool = True
    # What the `detections`/`events` topics carry: "labels" = a frame's objects when the set of
    # labels changes (and every heartbeat_s); "events" = track events new/update/end; "both".
    publish: str = field(default="events", metadata=_check(choices=("labels", "events", "both")))
    hold_s: float = field(default=2.0, metadata=_check(min=0.0, max=3600))  # a track ends unseen this long
    min_hits: int = field(default=2, metadata=_check(min=1, max=100))       # frames before a track is `new`
    # Several models per frame, in order; empty: `model` alone, or without it the default chain.
    stages: list[VisionStageConfig] = field(default_factory=list)

    def chain(self) -> list[VisionStageConfig]:
        """The stages the daemon runs: the declared ones; none ([]) when `model` runs alone;
        else (neither set) the default chain."""
        if self.stages:
            return list(self.stages)
        return [] if self.model else [replace(s) for s in DEFAULT_STAGES]


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
    # "fixed": the IMU's tilt is part of the motion (a strapped wearable, a bolted board);
    # "free": it is not (a sensor that may sit at any angle) — the model gets no tilt channels.
    mounting: str = field(default="fixed", metadata=_check(choices=("fixed", "free")))
    centroids: str = ""  # a centroid file for the model (edged signatures build / enroll): labels by it


@dataclass
class OutboxConfig:
    path: str = ""  # default: <state_dir>/outbox.db
    max_bytes: int = field(default=64 * 1024 * 1024, metadata=_check(min=64 * 1024, max=1 << 40))
    synchronous: str = field(default="full", metadata=_check(choices=("full", "normal")))
    max_file_bytes: int = field(default=0, metadata=_check(min=0, max=1 << 40))  # 0 = only the disk limits it
    # Acknowledged results kept for a resend request (`cmd/resend`): the oldest leave once any
    # bound is reached; any of them 0 keeps none (docs/mqtt.md, "Resend").
    keep_acked_rows: int = field(default=100_000, metadata=_check(min=0, max=100_000_000))
    keep_acked_bytes: int = field(default=16 << 20, metadata=_check(min=0, max=1 << 40))
    keep_acked_s: float = field(default=86400.0, metadata=_check(min=0, max=30 * 86400))


@dataclass
class StatsConfig:
    interval_s: float = field(default=60.0, metadata=_check(min=1, max=86400))


@dataclass
class HomeAssistantConfig:
    enabled: bool = True
    prefix: str = field(default="homeassistant", metadata=_check(pattern=_PREFIX_PATTERN, expect=_PREFIX_EXPECT,
                                                                 max_bytes=TOPIC_PREFIX_MAX_BYTES))
    labels: list[str] = field(default_factory=list)  # presence sensors; default: the model's labels
    hold_s: float = field(default=5.0, metadata=_check(min=0, max=3600))  # presence held after last seen


@dataclass
class CommandsConfig:
    enabled: bool = False
    snapshot: bool = False  # allow `cmd/snapshot` (publishes a JPEG of the current frame)
    snapshot_max_bytes: int = field(default=256 * 1024, metadata=_check(min=4096, max=16 << 20))
    # Snapshot budget, over any 60 s: at most this many, and at most this many bytes sent.
    snapshots_per_minute: int = field(default=6, metadata=_check(min=1, max=600))
    snapshot_bytes_per_minute: int = field(default=4 << 20, metadata=_check(min=4096, max=1 << 30))
    # `cmd/resend` (results the cloud lost, sent again from the kept ones): answered even while
    # `enabled` is false; per request at most resend_max_rows, per minute at most
    # resend_per_minute requests and resend_rows_per_minute rows.
    resend: bool = True
    resend_max_rows: int = field(default=1000, metadata=_check(min=1, max=100_000))
    resend_per_minute: int = field(default=10, metadata=_check(min=1, max=600))
    resend_rows_per_minute: int = field(default=5000, metadata=_check(min=1, max=10_000_000))
    # Where MQTT 5 Response Topics may point besides <prefix>/<device_id>/ ("" = nowhere else).
    reply_prefix: str = field(default="", metadata=_check(pattern=f"({_PREFIX_PATTERN})?", expect=_PREFIX_EXPECT,
                                                          max_bytes=TOPIC_PREFIX_MAX_BYTES))


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
class UpdatesConfig:
    """Signed model releases (docs/updates.md); off while `url` is empty."""
    url: str = field(default="", metadata=_check(
        pattern=r"^(https?://[^\s/]+(/\S*)?)?$", expect="an http:// or https:// URL of the repository's public/ directory"))
    root_json: str = ""  # the pinned root metadata (edged release init writes REPO/root.json)
    channel: str = field(default="stable", metadata=_check(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", expect="lower-case letters, digits, '-' or '_'"))
    poll_interval_s: float = field(default=3600.0, metadata=_check(min=1, max=7 * 86400))
    bandwidth_kbps: int = field(default=0, metadata=_check(min=0, max=10_000_000))  # 0 = no cap
    health_window_s: float = field(default=600.0, metadata=_check(min=1, max=7 * 86400))
    max_download_bytes: int = field(default=64 * 1024 * 1024, metadata=_check(min=1024, max=1 << 34))
    # A message on <prefix>/fleet/release (retained, any payload: it is not trusted) makes the
    # device check the repository at once; however many arrive, at most one check per interval.
    announce: bool = True
    announce_interval_s: float = field(default=60.0, metadata=_check(min=1, max=86400))


@dataclass
class SamplingConfig:
    """Raw data the models could not place, kept for labelling in the cloud (docs/mqtt.md, `sample`).
    Off by default; the budget (count and bytes per hour and per day) holds across restarts."""
    enabled: bool = False
    motion_unknown: bool = True      # trigger: an IMU window labelled "unknown" (needs motion.centroids)
    vision_min_score: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))  # trigger: a detection
    vision_max_score: float = field(default=0.0, metadata=_check(min=0.0, max=1.0))  # scoring in [min, max)
    vision_labels: list[str] = field(default_factory=list)  # only these labels (default: any)
    crop_margin: float = field(default=0.25, metadata=_check(min=0.0, max=2.0))  # per side, of the box
    full_frame: bool = False         # the whole frame instead of a crop of the box
    min_interval_s: float = field(default=30.0, metadata=_check(min=0.0, max=86400))  # per trigger
    per_hour: int = field(default=12, metadata=_check(min=0, max=100000))
    bytes_per_hour: int = field(default=1 << 20, metadata=_check(min=0, max=1 << 40))
    per_day: int = field(default=100, metadata=_check(min=0, max=1000000))
    bytes_per_day: int = field(default=8 << 20, metadata=_check(min=0, max=1 << 40))
    max_sample_bytes: int = field(default=64 << 10, metadata=_check(min=4096, max=16 << 20))
    queue_max_bytes: int = field(default=16 << 20, metadata=_check(min=64 << 10, max=1 << 40))


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
    updates: UpdatesConfig = field(default_factory=UpdatesConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    source_path: str = field(default="<defaults>", metadata=_check(internal=True))

    @property
    def outbox_path(self) -> Path:
        return Path(self.outbox.path) if self.outbox.path else Path(self.state_dir) / "outbox.db"

    @property
    def samples_path(self) -> Path:
        return Path(self.state_dir) / "samples.db"

    def topic(self, leaf: str) -> str:
        return f"{self.mqtt.topic_prefix}/{self.device_id}/{leaf}"

    def model_uses(self) -> list[tuple[str, str, str]]:
        """(model name, task, the key naming it) of each model the daemon opens with this config,
        in order: the vision stages' (or `vision.model`, or the default chain's) while the camera
        is on, then `motion.model` while the IMU is on. A model several stages name is listed once
        per stage."""
        uses = []
        if self.camera.enabled:
            if self.vision.stages:
                uses += [(s.model, "vision", f"vision.stages[{i}].model") for i, s in enumerate(self.vision.stages)]
            elif self.vision.model:
                uses.append((self.vision.model, "vision", "vision.model"))
            else:
                uses += [(s.model, "vision", "vision (the default chain)") for s in self.vision.chain()]
        if self.imu.enabled:
            uses.append((self.motion.model, "motion", "motion.model"))
        return uses

    def fleet_topic(self, leaf: str) -> str:
        """A topic every device under the prefix reads (never writes): `<prefix>/fleet/<leaf>`."""
        return f"{self.mqtt.topic_prefix}/fleet/{leaf}"


def _sanitize_id(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64].strip("-")
    return cleaned or "edged"


def load(path: str | Path | None) -> Config:
    """Read and validate a config file; `None` gives the embedded defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = _read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: cannot read config: not UTF-8 text (byte "
                           f"0x{exc.object[exc.start]:02x})"]) from None
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read config: {getattr(exc, 'strerror', None) or exc}"]) from None
    return parse(text, str(path))


def key_lines(path: str | Path) -> dict[str, int]:
    """{dotted key: its line} of a config file that `load` accepted (for later checks' lines)."""
    return _key_lines(_read_regular(Path(path), MAX_CONFIG_BYTES).decode("utf-8"))


def _read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes. Anything else (a FIFO, a device, a directory) is refused before a
    byte is read, so nothing blocks; so is a file over `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise OSError(0, f"file too large ({st.st_size} bytes, at most {limit})")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise OSError(0, f"file too large (over {limit} bytes)")
        return data
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def parse(text: str, name: str = "<config>") -> Config:
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise ConfigError([f"{name}: TOML nested too deeply (arrays or tables inside each other)"]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = f":{m.group(1)}" if m else ""
        raise ConfigError([f"{name}{line}: TOML syntax error: {re.sub(r' [(]at line.*', '', msg)}"]) from None
    lines = _key_lines(text)
    problems: list[str] = []
    try:
        cfg = _build(Config, doc, "", name, lines, problems)
        cfg.source_path = name
        _cross_checks(cfg, name, lines, problems)
    except RecursionError:
        raise ConfigError([f"{name}: TOML nested too deeply (arrays or tables inside each other)"]) from None
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
            shown = dotted if re.fullmatch(r"[\w.-]{1,200}", dotted) else _show(dotted)
            problems.append(f"{where}: {shown}: unknown key (known here: {hint})")
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
        return f"expected {_tname_of(typ)}, got {_tname(value)} {_show(value)}"
    if want is float and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if want is str and ("\x00" in value):
        return f"must not contain NUL characters, got {_show(value)}"
    if want is list and any(isinstance(v, str) and "\x00" in v for v in value):
        return f"must not contain NUL characters, got {_show(value)}"
    if "max_bytes" in meta and len(value.encode("utf-8", "surrogatepass")) > meta["max_bytes"]:
        return f"expected at most {meta['max_bytes']} bytes, got {len(value.encode('utf-8', 'surrogatepass'))}"
    if "min" in meta and value < meta["min"] or "max" in meta and value > meta["max"]:
        return f"expected {meta.get('min')} to {meta.get('max')}, got {_show(value)}"
    if "choices" in meta and value not in meta["choices"]:
        return f"expected one of {', '.join(map(repr, meta['choices']))}, got {_show(value)}"
    # fullmatch: `$` in a pattern would also match before a trailing newline.
    if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        return f"expected {meta.get('expect') or 'text matching ' + meta['pattern']}, got {_show(value)}"
    return None


def _plain(text: str, limit: int = 200) -> str:
    """A path or name for an error line: as is when short and printable, else cut short."""
    return text if len(text) <= limit and text.isprintable() else _show(text)


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error line: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _cross_checks(cfg: Config, name: str, lines: dict[str, int], problems: list[str]) -> None:
    def where(key: str) -> str:
        return f"{name}:{lines[key]}" if key in lines else name

    check_broker(cfg.mqtt, where, problems)
    if cfg.vision.stages:
        for problem in check_stages(cfg.vision.stages):
            key = problem.split(":", 1)[0]
            problems.append(f"{where(key)}: {problem}")
        for i, st in enumerate(cfg.vision.stages):
            if not st.model:
                problems.append(f"{where(f'vision.stages[{i}]')}: vision.stages[{i}].model: missing")
    u = cfg.updates
    if any(": updates." in p for p in problems):
        pass  # a bad value was replaced by its default: pairing it up would only add noise
    elif u.url and not u.root_json:
        problems.append(f"{where('updates.url')}: updates.root_json: required with updates.url "
                        "(the root.json from `edged release init`, pinned on the device)")
    elif u.root_json and not u.url:
        problems.append(f"{where('updates.root_json')}: updates.url: required with updates.root_json")
    elif u.root_json:
        err = _root_json_problem(u.root_json)
        if err:
            problems.append(f"{where('updates.root_json')}: updates.root_json: {err}")
    for section in ("camera", "imu"):
        sec = getattr(cfg, section)
        if sec.enabled and sec.source == "replay" and _kind(sec.path) is None:
            problems.append(f"{where(section + '.path')}: {section}.path: not found: {_plain(sec.path)}")
    if cfg.imu.enabled and cfg.motion.centroids and _kind(cfg.motion.centroids) != "file":
        problems.append(f"{where('motion.centroids')}: motion.centroids: file not found: "
                        f"{_plain(cfg.motion.centroids)}")
    sm = cfg.sampling
    if sm.vision_max_score and sm.vision_min_score >= sm.vision_max_score:
        problems.append(f"{where('sampling.vision_min_score')}: sampling.vision_min_score: must be below "
                        f"sampling.vision_max_score (the uncertainty band is [min, max))")
    for i, label in enumerate(sm.vision_labels):
        if not re.fullmatch(r"[a-z0-9 _-]{1,64}", label):
            problems.append(f"{where('sampling.vision_labels')}: sampling.vision_labels[{i}]: expected a "
                            f"lowercase label, got {_show(label)}")
    for key, value in (("state_dir", cfg.state_dir), ("outbox.path", cfg.outbox.path)):
        if not value:
            continue
        target = Path(value) if key == "state_dir" else Path(value).parent
        problem = _dir_problem(target)
        if problem:
            problems.append(f"{where(key)}: {key}: {problem}")


def _kind(path: str) -> str | None:
    """"file", "dir", "other", or None when nothing is there (or the path cannot be looked up)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"


def _dir_problem(path: Path) -> str | None:
    """Why a directory cannot be (created) at `path`, or None: the path itself or its nearest
    existing ancestor must be a directory."""
    p = path
    while True:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            if p.parent == p:
                return None
            p = p.parent
            continue
        except NotADirectoryError:
            p = p.parent
            continue
        except (OSError, ValueError) as exc:
            return f"cannot use {_show(str(path))}: {getattr(exc, 'strerror', None) or exc}"
        if stat.S_ISDIR(st.st_mode):
            return None
        if p == path:
            return f"{str(path)!r} exists and is {_file_kind(st.st_mode)}, not a directory"
        return f"cannot create {str(path)!r}: {str(p)!r} is {_file_kind(st.st_mode)}, not a directory"


def _root_json_problem(path: str) -> str | None:
    """Why `path` is not TUF root metadata, or None. Only the shape: ngclient verifies it."""
    import json

    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    except ValueError:
        return f"{path} is not JSON"
    signed = doc.get("signed") if isinstance(doc, dict) else None
    if not isinstance(signed, dict) or signed.get("_type") != "root":
        return f"{path} is not TUF root metadata (no signed._type = \"root\")"
    return None


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


def to_toml(cfg: Config) -> str:
    """Every key of `cfg` as a TOML config file that `load` reads back to an equal Config
    (`edged config`). Top-level keys first, then one table per section, in the schema's order."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a TOML basic string

    top, tables = [], []
    for f in fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        if not is_dataclass(v):
            top.append(f"{f.name} = {value(v)}")
            continue
        tables.append(f"\n[{f.name}]")
        arrays = []
        for g in fields(v):
            item = getattr(v, g.name)
            if isinstance(item, list) and item and is_dataclass(item[0]):  # [[section.key]] tables
                for element in item:
                    arrays.append(f"\n[[{f.name}.{g.name}]]")
                    arrays += [f"{h.name} = {value(getattr(element, h.name))}" for h in fields(element)]
            elif not (isinstance(item, list) and not item and g.name in _TABLE_ARRAYS):
                tables.append(f"{g.name} = {value(item)}")
        tables += arrays
    return "\n".join(top + tables) + "\n"


_TABLE_ARRAYS = {"stages"}  # list fields whose elements are tables: left out when empty
