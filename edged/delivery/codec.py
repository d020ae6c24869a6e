"""Turns results into compact MQTT payloads, and back (for subscribers).

Two codecs carry the same fields (the contract in docs/mqtt.md, schemas in docs/schemas/):
- `json`: readable anywhere, the default.
- `cbor` (RFC 8949): about half the bytes; the signature travels as a packed int8 byte string
  instead of a list of numbers.
`stats` and the Home Assistant state are always JSON: they are for people and dashboards.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Callable

from edged.records import SCHEMA_VERSION, Detections, MotionSignature, Sample, TrackEvent

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _half(x: float) -> float:
    """The nearest IEEE half-precision value: a binary codec then stores it in 2 bytes, not 8.
    Good to ±0.0005 on [0, 1] (boxes, scores) and 3 significant digits on timings."""
    return struct.unpack("<e", struct.pack("<e", x))[0]


def _rounder(packed: bool, digits: int):
    return _half if packed else (lambda x: round(x, digits))


def detections_fields(d: Detections, device_id: str, seq: int, *, packed: bool = False) -> dict:
    r3, r4, r2 = _rounder(packed, 3), _rounder(packed, 4), _rounder(packed, 2)
    return {
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "seq": seq,
        "ts": round(d.ts, 3),
        "objects": [_object(o, r3, r4) for o in d.objects],
        "inference_ms": r2(d.inference_ms),
    }


def _object(o, r3, r4) -> dict:
    out = {"label": o.label, "score": r3(o.score), "box": [r4(x) for x in o.box]}
    # Only a chain of stages says which stage found an object and inside which other one.
    if o.stage:
        out["stage"] = o.stage
    if o.parent >= 0:
        out["parent"] = o.parent
    if o.signature:  # int8 two's complement, one byte per value, where the codec has byte strings
        out["signature"] = bytes(v & 0xFF for v in o.signature) if r3 is _half else list(o.signature)
    return out


def motion_fields(m: MotionSignature, device_id: str, seq: int, *, packed: bool = False) -> dict:
    sig = m.signature
    r3, r2 = _rounder(packed, 3), _rounder(packed, 2)
    return {
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "seq": seq,
        "ts": round(m.ts, 3),
        "label": m.label,
        "score": r3(m.score),
        # int8 two's complement, one byte per value, when the codec has byte strings.
        "signature": bytes(v & 0xFF for v in sig) if packed else list(sig),
        "sig_v": m.signature_v,
        "window_s": r3(m.window_s),
        "inference_ms": r2(m.inference_ms),
    }


def event_fields(e: TrackEvent, device_id: str, seq: int, *, packed: bool = False) -> dict:
    r3, r4 = _rounder(packed, 3), _rounder(packed, 4)
    out = {
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "seq": seq,
        "ts": round(e.ts, 3),
        "type": e.type,
        "id": e.track_id,
        "label": e.label,
        "score": r3(e.score),
        "box": [r4(x) for x in e.box],
        "start_ts": round(e.first_ts, 3),
        "dwell_s": round(e.dwell_s, 2),
        "inside": list(e.inside),
    }
    if e.stage:
        out["stage"] = e.stage
    if e.parent >= 0:
        out["parent"] = e.parent
    if e.posture:
        out["posture"] = e.posture
    return out


def sample_fields(s: Sample, device_id: str, sample_id: int, *, packed: bool = False) -> dict:
    """A sample payload (`<prefix>/<device_id>/sample`). `data` is a byte string in CBOR and
    base64 in JSON; times stay full doubles (t0 must place every sample exactly)."""
    import base64

    out = {
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "id": sample_id,
        "ts": round(s.ts, 3),
        "kind": s.kind,
        "trigger": s.trigger,
        "model": s.model,
        "label": s.label,
        "score": round(s.score, 3),
    }
    if s.kind == "imu":
        out.update(t0=s.t0, n=s.n, signature=bytes(v & 0xFF for v in s.signature) if packed else list(s.signature),
                   sig_v=s.signature_v)
    else:
        out.update(box=[round(x, 4) for x in s.box], region=[round(x, 4) for x in s.region],
                   width=s.width, height=s.height)
    out["data"] = s.data if packed else base64.b64encode(s.data).decode("ascii")
    return out


@dataclass(frozen=True)
class Codec:
    name: str
    content_type: str
    dumps: Callable[[dict], bytes]
    packed: bool  # signatures as byte strings

    def detections(self, d: Detections, device_id: str, seq: int) -> bytes:
        return self.dumps(detections_fields(d, device_id, seq, packed=self.packed))

    def motion(self, m: MotionSignature, device_id: str, seq: int) -> bytes:
        return self.dumps(motion_fields(m, device_id, seq, packed=self.packed))

    def events(self, e: TrackEvent, device_id: str, seq: int) -> bytes:
        return self.dumps(event_fields(e, device_id, seq, packed=self.packed))

    def sample(self, s: Sample, device_id: str, sample_id: int) -> bytes:
        return self.dumps(sample_fields(s, device_id, sample_id, packed=self.packed))


def _cbor_dumps(obj: dict) -> bytes:
    import cbor2

    return cbor2.dumps(obj, canonical=True)  # canonical: floats in their shortest exact form


JSON = Codec("json", "application/json", lambda obj: _dumps(obj).encode(), packed=False)
CBOR = Codec("cbor", "application/cbor", _cbor_dumps, packed=True)
CODECS = {c.name: c for c in (JSON, CBOR)}


def get(name: str) -> Codec:
    if name == "cbor":
        try:
            import cbor2  # noqa: F401
        except ImportError:
            raise ImportError("codec 'cbor' needs the cbor2 package: pip install cbor2") from None
    return CODECS[name]


def decode(payload: bytes, content_type: str | None = None) -> dict:
    """A result payload of either codec as a dict; CBOR signatures become lists of ints.
    Anything that is not one (malformed, nested too deeply, not a map) raises ValueError."""
    try:
        obj = _decode(bytes(payload), content_type)
    except ValueError:
        raise
    except Exception as exc:  # RecursionError, cbor2's own errors, …: all mean "not a result"
        raise ValueError(f"undecodable payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("payload is not a map")
    return obj


def _decode(payload: bytes, content_type: str | None) -> object:
    if content_type == JSON.content_type or (content_type is None and payload[:1] == b"{"):
        return json.loads(payload)
    import cbor2

    obj = cbor2.loads(payload)
    if isinstance(obj, dict):
        sig = obj.get("signature")
        if isinstance(sig, (bytes, bytearray)):
            obj["signature"] = [b - 256 if b > 127 else b for b in sig]
        objects = obj.get("objects")
        for o in objects if isinstance(objects, list) else ():
            sig = o.get("signature") if isinstance(o, dict) else None
            if isinstance(sig, (bytes, bytearray)):
                o["signature"] = [b - 256 if b > 127 else b for b in sig]
    return obj


def sample_data(body: dict) -> bytes:
    """The raw bytes of a decoded sample payload's `data` (a CBOR byte string, or base64 in
    JSON); ValueError if it is neither."""
    import base64
    import binascii

    data = body.get("data")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise ValueError("data: not base64") from None
    raise ValueError("data: expected a byte string or base64 text")


def imu_window(body: dict):
    """A decoded `imu` sample's window as (t float64 (n,), data float32 (n, 6)), exactly the
    samples the device's motion stage received. ValueError if `data` does not hold n rows."""
    import numpy as np

    raw = sample_data(body)
    n, t0 = body.get("n"), body.get("t0")
    if type(n) is not int or n < 2 or len(raw) != n * 7 * 4 or isinstance(t0, bool) \
            or not isinstance(t0, (int, float)):
        raise ValueError(f"data: expected n × 7 float32 values, got {len(raw)} bytes for n = {n!r}")
    rows = np.frombuffer(raw, "<f4").reshape(n, 7)
    return float(t0) + rows[:, 0].astype(np.float64), np.ascontiguousarray(rows[:, 1:], dtype=np.float32)


def stats(values: dict, device_id: str) -> bytes:
    return _dumps({"v": SCHEMA_VERSION, "device_id": device_id, **values}).encode()


def json_bytes(obj: dict) -> bytes:
    return _dumps(obj).encode()
