"""Typed records that cross edged's internal boundaries: source → stage → outbox.

Sources produce `Frame` and `ImuBatch` (SI units); stages produce `Detections` and
`MotionSignature`. Nothing here knows about MQTT or SQLite; `codec.py` turns results into
payloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1

# Column order of IMU samples everywhere in edged: accelerometer in m/s², gyroscope in rad/s.
IMU_CHANNELS = ("ax", "ay", "az", "gx", "gy", "gz")


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame: RGB, uint8, shape (H, W, 3); `ts` is the capture time (UNIX seconds).

    `lease`: where the image is a camera's reused buffer (edged.sources.camera.buffers), the hold
    on it. Whoever is handed the frame calls `release()` when done with the pixels, and `hold()`
    first to keep them beyond someone else's release; a frame without a lease owns its image."""

    ts: float
    image: np.ndarray
    lease: object = field(default=None, repr=False, compare=False)

    def hold(self) -> "Frame":
        if self.lease is not None:
            self.lease.hold()
        return self

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


@dataclass(frozen=True, slots=True)
class ImuBatch:
    """Consecutive IMU samples: `t` float64 (N,) UNIX seconds, `data` float32 (N, 6) in IMU_CHANNELS order."""

    t: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True, slots=True)
class DetectedObject:
    label: str
    score: float
    box: tuple[float, float, float, float]  # normalised [x0, y0, x1, y1], origin top-left
    stage: str = ""    # the vision stage that found it, where several run (edged.stages.vision.graph)
    parent: int = -1   # index of the object it was found inside (a face in person N), -1 for none
    signature: tuple[int, ...] = ()  # int8 values: a pose's keypoints (edged.stages.vision.pose)


@dataclass(frozen=True, slots=True)
class Detections:
    """What the vision stage saw in one frame."""

    ts: float
    objects: tuple[DetectedObject, ...]
    inference_ms: float


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """A tracked object started (`new`), goes on (`update`: heartbeat, or what is inside it
    changed) or left (`end`) — edged.stages.vision.tracks."""

    ts: float                 # capture time of the frame that made the event (`end`: last seen)
    type: str                 # "new", "update" or "end"
    track_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    first_ts: float           # when the track was first seen
    dwell_s: float            # last seen − first seen
    inside: tuple[str, ...] = ()   # labels found inside its box (a person's face)
    stage: str = ""
    parent: int = -1          # the enclosing track's id, -1 for none
    posture: str = ""         # a person's posture from its pose (edged/posture.py), "fallen" after a fall; "" = no pose


@dataclass(frozen=True, slots=True)
class MotionSignature:
    """What the motion stage made of one IMU window.

    `signature` is the model's embedding output as int8 values (the quantised tensor as the model
    produced it); `ts` is the capture time of the window's last sample.
    """

    ts: float
    label: str
    score: float
    signature: tuple[int, ...]
    window_s: float
    inference_ms: float
    signature_v: int = 1  # the model's signature version (manifest params.signature_version)
    # The raw samples the window was made from, kept only for a window labelled `unknown` while
    # sampling is on (MotionStage.keep_unknown): what `[sampling]` sends for labelling.
    window: ImuBatch | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Sample:
    """Raw data a model could not place, kept for labelling in the cloud (`[sampling]`).

    kind "imu": `data` is the window's raw samples as the motion stage received them, (n, 7)
    little-endian float32 rows of (t − t0, ax, ay, az, gx, gy, gz); "crop": a JPEG of the part
    of the frame in `region` (normalised [x0, y0, x1, y1]), around the detection's `box`.
    """

    ts: float
    kind: str        # "imu" | "crop"
    trigger: str     # "unknown" (motion window) | "uncertain" (detection score in the band)
    model: str
    label: str
    score: float
    data: bytes
    t0: float = 0.0                       # imu: time of the first sample (UNIX seconds)
    n: int = 0                            # imu: samples
    signature: tuple[int, ...] = ()       # imu: the window's signature, as in its motion result
    signature_v: int = 0
    box: tuple[float, ...] = ()           # crop
    region: tuple[float, ...] = ()        # crop
    width: int = 0                        # crop: the JPEG's size in pixels
    height: int = 0
