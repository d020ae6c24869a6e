"""Postures of the pose objects in JSON lines (`edged signatures posture`): pose objects,
detections payloads or `edged detect` lines. The rules themselves are in edged/posture.py, shared
with the device."""

from __future__ import annotations

from edged.posture import (  # noqa: F401  (re-exported: the cloud side's one import)
    POSTURES, Posture, PostureError, aspect_from_box, classify, confusion, keypoints)


def postures_of(record: dict, frame_aspect: float) -> list[dict]:
    """The postures of the pose objects in one JSON record: a pose object itself ({"signature",
    "box"}), or anything with "objects" (a detections payload, an `edged detect` line)."""
    objs = record.get("objects") if isinstance(record.get("objects"), list) else [record]
    out = []
    for o in objs:
        if not isinstance(o, dict) or "signature" not in o or o.get("label", "pose") != "pose":
            continue
        sig = o["signature"]
        aspect = None
        box = o.get("box")
        if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
            aspect = aspect_from_box(sig, box, frame_aspect)
        p = classify(sig, aspect or 1.0)
        out.append({"posture": p.label, "torso_deg": p.torso_deg, "thigh_deg": p.thigh_deg,
                    "knee_deg": p.knee_deg})
    return out


def classify_file(path, frame_aspect: float = 0.75):
    """(line number, the record, its postures) for each JSON line of `path` holding a pose."""
    import json
    from pathlib import Path

    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise PostureError(f"{path}:{n}: not JSON") from None
            if not isinstance(record, dict):
                raise PostureError(f"{path}:{n}: expected a JSON object")
            try:
                found = postures_of(record, frame_aspect)
            except PostureError as exc:
                raise PostureError(f"{path}:{n}: {exc}") from None
            if found:
                yield n, record, found
