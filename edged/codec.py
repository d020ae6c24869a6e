"""Turns results into compact MQTT payloads (JSON; the field names are the contract in docs/mqtt.md)."""

from __future__ import annotations

import json

from edged.records import SCHEMA_VERSION, Detections, MotionSignature

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def detections(d: Detections, device_id: str, seq: int) -> bytes:
    return _dumps({
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "seq": seq,
        "ts": round(d.ts, 3),
        "objects": [
            {"label": o.label, "score": round(o.score, 3), "box": [round(x, 4) for x in o.box]}
            for o in d.objects
        ],
        "inference_ms": round(d.inference_ms, 2),
    }).encode()


def motion(m: MotionSignature, device_id: str, seq: int) -> bytes:
    return _dumps({
        "v": SCHEMA_VERSION,
        "device_id": device_id,
        "seq": seq,
        "ts": round(m.ts, 3),
        "label": m.label,
        "score": round(m.score, 3),
        "signature": list(m.signature),
        "window_s": round(m.window_s, 3),
        "inference_ms": round(m.inference_ms, 2),
    }).encode()


def stats(values: dict, device_id: str) -> bytes:
    return _dumps({"v": SCHEMA_VERSION, "device_id": device_id, **values}).encode()
