"""What the cloud accepts as a result: a payload of either codec, decoded and checked field by
field against the contract (docs/mqtt.md, docs/schemas/detections|motion|events.schema.json).

Everything here is untrusted input from the network. `parse` never raises for a bad payload: it
returns a `Reject` saying which kind of problem it was (for counting and logging once per kind)
and, in words, what was wrong. The checks are written out rather than run through a JSON Schema
library: they run once per result on the ingest's hot path, and the test suite holds them to
the shipped schemas.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from edged.delivery import codec
from edged.posture import FALLEN, POSTURES

RESULT_KINDS = ("detections", "motion", "events")
SCHEMA_VERSION = 1
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_OBJECT_FIELDS = {"label", "score", "box"}
_OBJECT_OPTIONAL = {"stage", "parent", "signature"}  # only from a chain of vision stages
_LABEL_RE = re.compile(r"^[a-z0-9 _-]+$")
# A result's ts must be a plausible capture time: after 2000-01-01 and not far in the future
# (the partition it lands in is made on demand; a wild clock must not make thousands of them).
TS_MIN = 946684800.0
TS_FUTURE_S = 7 * 86400

_FIELDS = {
    "detections": {"v", "device_id", "seq", "ts", "objects", "inference_ms"},
    "motion": {"v", "device_id", "seq", "ts", "label", "score", "signature", "window_s", "inference_ms"},
    "events": {"v", "device_id", "seq", "ts", "type", "id", "label", "score", "box", "start_ts", "dwell_s",
               "inside"},
}
_OPTIONAL = {"detections": set(), "motion": {"sig_v"}, "events": {"stage", "parent", "posture"}}
EVENT_TYPES = ("new", "update", "end")
TRACK_POSTURES = (*POSTURES, FALLEN)  # a person track's `posture` (edged/posture.py)


@dataclass(frozen=True, slots=True)
class Result:
    device_id: str
    seq: int
    kind: str
    ts: float
    body: dict  # the decoded payload (CBOR signatures as lists of ints)

    def json(self) -> str:
        return json.dumps(self.body, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Reject:
    kind: str    # undecodable | invalid | wrong_device | too_large | bad_topic (| refused, by the database)
    reason: str  # one line, for the rejected table and the log


class _Bad(Exception):
    pass


def _num(v, key: str, lo: float | None = None, hi: float | None = None, *,
         above: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _Bad(f"{key}: expected a number, got {_show(v)}")
    if lo is not None and v < lo or hi is not None and v > hi or above is not None and v <= above:
        rng = f"more than {above}" if above is not None else f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        raise _Bad(f"{key}: expected {rng}, got {v!r}")
    return float(v)


def _label(value, where: str) -> None:
    if not isinstance(value, str) or not _LABEL_RE.match(value):
        raise _Bad(f"{where}: expected a lowercase label, got {_show(value)}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _box(box, where: str) -> None:
    if not isinstance(box, list) or len(box) != 4:
        raise _Bad(f"{where}: expected 4 numbers, got {_show(box)}")
    for j in range(4):
        _num(box[j], f"{where}[{j}]", 0.0, 1.0)


def _event(body: dict, now: float) -> None:
    if body["type"] not in EVENT_TYPES:
        raise _Bad(f"type: expected one of {', '.join(EVENT_TYPES)}, got {_show(body['type'])}")
    tid = body["id"]
    if type(tid) is not int or not 1 <= tid < 1 << 63:
        raise _Bad(f"id: expected a positive integer, got {_show(tid)}")
    _label(body["label"], "label")
    _num(body["score"], "score", 0.0, 1.0)
    _box(body["box"], "box")
    _num(body["start_ts"], "start_ts", 0.0, now + TS_FUTURE_S)
    _num(body["dwell_s"], "dwell_s", 0.0)
    inside = body["inside"]
    if not isinstance(inside, list) or len(set(map(str, inside))) != len(inside):
        raise _Bad(f"inside: expected an array of distinct labels, got {_show(inside)}")
    for i, lab in enumerate(inside):
        _label(lab, f"inside[{i}]")
    if "stage" in body and (not isinstance(body["stage"], str) or not _STAGE_RE.match(body["stage"])):
        raise _Bad(f"stage: expected 1 to 32 letters, digits, '-' or '_', got {_show(body['stage'])}")
    if "parent" in body and (type(body["parent"]) is not int or body["parent"] < 1):
        raise _Bad(f"parent: expected a track id, got {_show(body['parent'])}")
    if "posture" in body and body["posture"] not in TRACK_POSTURES:
        raise _Bad(f"posture: expected one of {', '.join(TRACK_POSTURES)}, got {_show(body['posture'])}")


def _envelope(body: dict, required, optional, where: str = "") -> None:
    """The fields every message from a device shares: no unknown or missing field, the schema
    version, a well-formed device id. `where` qualifies an unknown field (e.g. the sample kind)."""
    extra = set(body) - required - optional
    if extra:
        raise _Bad(f"unknown field {sorted(extra)[0]!r}{where}")
    missing = required - set(body)
    if missing:
        raise _Bad(f"missing field {sorted(missing)[0]!r}")
    if body["v"] != SCHEMA_VERSION or isinstance(body["v"], bool):
        raise _Bad(f"v: expected {SCHEMA_VERSION}, got {_show(body['v'])}")
    if not isinstance(body["device_id"], str) or not _ID_RE.match(body["device_id"]):
        raise _Bad(f"device_id: expected 1 to 64 letters, digits, '-' or '_', got {_show(body['device_id'])}")


def check(kind: str, body: dict, *, now: float) -> str | None:
    """None if `body` is a valid `kind` result, else what is wrong with it."""
    try:
        _envelope(body, _FIELDS[kind], _OPTIONAL[kind])
        seq = body["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 1 << 63:
            raise _Bad(f"seq: expected a positive integer, got {_show(seq)}")
        _num(body["ts"], "ts", TS_MIN, now + TS_FUTURE_S)
        if kind != "events":
            _num(body["inference_ms"], "inference_ms", 0.0)
        if kind == "events":
            _event(body, now)
        elif kind == "detections":
            objects = body["objects"]
            if not isinstance(objects, list):
                raise _Bad(f"objects: expected an array, got {_show(objects)}")
            for i, o in enumerate(objects):
                if (not isinstance(o, dict) or not _OBJECT_FIELDS <= set(o)
                        or set(o) - _OBJECT_FIELDS - _OBJECT_OPTIONAL):
                    raise _Bad(f"objects[{i}]: expected {{label, score, box}} and optionally stage, parent, "
                               f"got {_show(o)}")
                if "stage" in o and (not isinstance(o["stage"], str) or not _STAGE_RE.match(o["stage"])):
                    raise _Bad(f"objects[{i}].stage: expected 1 to 32 letters, digits, '-' or '_', got {_show(o['stage'])}")
                if "parent" in o and (type(o["parent"]) is not int or o["parent"] < 0):
                    raise _Bad(f"objects[{i}].parent: expected an index, got {_show(o['parent'])}")
                if "signature" in o:
                    sig = o["signature"]
                    if (not isinstance(sig, list) or not 3 <= len(sig) <= 99
                            or not all(type(x) is int and -128 <= x <= 127 for x in sig)):
                        raise _Bad(f"objects[{i}].signature: expected 3 to 99 int8 values, got {_show(sig)}")
                _label(o["label"], f"objects[{i}].label")
                _num(o["score"], f"objects[{i}].score", 0.0, 1.0)
                box = o["box"]
                if not isinstance(box, list) or len(box) != 4:
                    raise _Bad(f"objects[{i}].box: expected 4 numbers, got {_show(box)}")
                for j in range(4):
                    _num(box[j], f"objects[{i}].box[{j}]", 0.0, 1.0)
        else:
            _label(body["label"], "label")
            _num(body["score"], "score", 0.0, 1.0)
            _num(body["window_s"], "window_s", above=0.0)
            sig = body["signature"]
            if (not isinstance(sig, list) or not 1 <= len(sig) <= 16
                    or not all(type(x) is int and -128 <= x <= 127 for x in sig)):
                raise _Bad(f"signature: expected 1 to 16 int8 values, got {_show(sig)}")
            if "sig_v" in body and (type(body["sig_v"]) is not int or body["sig_v"] < 1):
                raise _Bad(f"sig_v: expected a signature version (an integer >= 1), got {_show(body['sig_v'])}")
    except _Bad as exc:
        return str(exc)
    return None


def parse(device_id: str, kind: str, payload: bytes, content_type: str | None, *, now: float,
          max_bytes: int) -> Result | Reject:
    """A result received on `<prefix>/<device_id>/<kind>`, or why it cannot be stored."""
    if len(payload) > max_bytes:
        return Reject("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        body = codec.decode(payload, content_type)
    except ValueError as exc:
        if "not a map" in str(exc):  # the codec's word for CBOR that decoded to something else
            return Reject("invalid", "expected a map, got another CBOR item")
        what = "JSON" if payload[:1] == b"{" or content_type == "application/json" else "CBOR"
        return Reject("undecodable", f"not valid {what}: {type(exc).__name__}: {str(exc)[:120]}")
    except Exception as exc:  # noqa: BLE001 — anything a decoder raises means "not a payload"
        what = "JSON" if payload[:1] == b"{" or content_type == "application/json" else "CBOR"
        return Reject("undecodable", f"not valid {what}: {type(exc).__name__}: {str(exc)[:120]}")
    if not isinstance(body, dict):
        return Reject("invalid", f"expected a map, got {type(body).__name__}")
    problem = check(kind, body, now=now)
    if problem:
        return Reject("invalid", f"{kind}: {problem}")
    if body["device_id"] != device_id:
        return Reject("wrong_device", f"device_id {body['device_id']!r} does not match the topic's {device_id!r}")
    return Result(device_id, body["seq"], kind, float(body["ts"]), body)


# -- samples (`<prefix>/<device_id>/sample`, docs/schemas/sample.schema.json) -------------------------

SAMPLE_KINDS = {"imu": "unknown", "crop": "uncertain"}  # kind -> the trigger it comes from
_SAMPLE_FIELDS = {"v", "device_id", "id", "ts", "kind", "trigger", "model", "label", "score", "data"}
_SAMPLE_KIND_FIELDS = {"imu": {"t0", "n", "signature", "sig_v"}, "crop": {"box", "region", "width", "height"}}
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_IMU_SAMPLES = 1 << 16    # rows in one window: 65 s at 1 kHz, far beyond any model's window
MAX_CROP_PIXELS = 1 << 26    # a crop's stated width × height


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """A checked sample, ready to store: `data` is the raw window bytes or the JPEG, `meta`
    the payload's other kind-specific fields."""

    device_id: str
    sample_id: int
    kind: str
    ts: float
    trigger: str
    model: str
    label: str
    score: float
    data: bytes
    meta: dict

    def meta_json(self) -> str:
        return json.dumps(self.meta, separators=(",", ":"))


def _sample(body: dict, now: float) -> SampleRecord:
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in SAMPLE_KINDS:
        raise _Bad(f"kind: expected one of {', '.join(SAMPLE_KINDS)}, got {_show(kind)}")
    _envelope(body, _SAMPLE_FIELDS | _SAMPLE_KIND_FIELDS[kind], frozenset(), f" (for kind {kind!r})")
    sid = body["id"]
    if type(sid) is not int or not 1 <= sid < 1 << 63:
        raise _Bad(f"id: expected a positive integer, got {_show(sid)}")
    ts = _num(body["ts"], "ts", TS_MIN, now + TS_FUTURE_S)
    if body["trigger"] != SAMPLE_KINDS[kind]:
        raise _Bad(f"trigger: a {kind} sample comes from {SAMPLE_KINDS[kind]!r}, got {_show(body['trigger'])}")
    if not isinstance(body["model"], str) or not _MODEL_RE.match(body["model"]):
        raise _Bad(f"model: expected a model or stage name, got {_show(body['model'])}")
    _label(body["label"], "label")
    score = _num(body["score"], "score", 0.0, 1.0)
    try:
        data = codec.sample_data(body)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    if kind == "imu":
        n = body["n"]
        if type(n) is not int or not 2 <= n <= MAX_IMU_SAMPLES:
            raise _Bad(f"n: expected 2 to {MAX_IMU_SAMPLES} samples, got {_show(n)}")
        if len(data) != n * 28:
            raise _Bad(f"data: expected {n} rows of 7 float32 ({n * 28} bytes), got {len(data)} bytes")
        t0 = _num(body["t0"], "t0", TS_MIN, now + TS_FUTURE_S)
        sig = body["signature"]
        if (not isinstance(sig, list) or not 1 <= len(sig) <= 16
                or not all(type(x) is int and -128 <= x <= 127 for x in sig)):
            raise _Bad(f"signature: expected 1 to 16 int8 values, got {_show(sig)}")
        if type(body["sig_v"]) is not int or body["sig_v"] < 1:
            raise _Bad(f"sig_v: expected a signature version (an integer >= 1), got {_show(body['sig_v'])}")
        import numpy as np

        if not np.isfinite(np.frombuffer(data, "<f4")).all():
            raise _Bad("data: holds a value that is not a finite number")
        meta = {"t0": t0, "n": n, "signature": sig, "sig_v": body["sig_v"]}
    else:
        _box(body["box"], "box")
        _box(body["region"], "region")
        w, h = body["width"], body["height"]
        if type(w) is not int or type(h) is not int or not (1 <= w and 1 <= h and w * h <= MAX_CROP_PIXELS):
            raise _Bad(f"width, height: expected a size of at most {MAX_CROP_PIXELS} pixels, got {_show(w)} × {_show(h)}")
        if data[:3] != b"\xff\xd8\xff":
            raise _Bad("data: not a JPEG")
        meta = {"box": body["box"], "region": body["region"], "width": w, "height": h}
    return SampleRecord(body["device_id"], sid, kind, ts, body["trigger"], body["model"], body["label"],
                        score, data, meta)


def parse_sample(device_id: str, payload: bytes, content_type: str | None, *, now: float,
                 max_bytes: int) -> SampleRecord | Reject:
    """A sample received on `<prefix>/<device_id>/sample`, or why it cannot be stored."""
    if len(payload) > max_bytes:
        return Reject("too_large", f"sample payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        body = codec.decode(payload, content_type)
    except ValueError as exc:
        what = "JSON" if payload[:1] == b"{" or content_type == "application/json" else "CBOR"
        return Reject("undecodable", f"not valid {what}: {str(exc)[:120]}")
    try:
        rec = _sample(body, now)
    except _Bad as exc:
        return Reject("invalid", f"sample: {exc}")
    except (TypeError, ValueError, OverflowError) as exc:  # a shape no check above foresaw: still a reject
        return Reject("invalid", f"sample: {type(exc).__name__}: {' '.join(str(exc).split())[:120]}")
    if rec.device_id != device_id:
        return Reject("wrong_device", f"device_id {rec.device_id!r} does not match the topic's {device_id!r}")
    return rec


# A device's reply to a resend request (docs/mqtt.md, "Resend"; docs/schemas/response.schema.json).
_RANGES_LISTED = 32
_SEQ_MAX = (1 << 63) - 1


def resend_answer(payload: bytes, max_bytes: int = 65536) -> tuple[list, list] | None:
    """(gone, later) ranges of a successful resend reply, or None for anything else: another
    command's reply, a refusal, or something that is not a well-formed reply (it comes from the
    network: any of it may be forged). Ranges are checked, at most 32 of each kind (what a device lists)."""
    if len(payload) > max_bytes:
        return None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("cmd") != "resend" or body.get("ok") is not True:
        return None
    out = []
    for key in ("gone", "later"):
        ranges = body.get(key, [])
        if not isinstance(ranges, list) or len(ranges) > _RANGES_LISTED:
            return None
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)
                    and 1 <= r[0] <= r[1] <= _SEQ_MAX):
                return None
        out.append([(r[0], r[1]) for r in ranges])
    return out[0], out[1]
