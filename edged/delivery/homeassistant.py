"""Home Assistant MQTT discovery: the device and its entities appear in Home Assistant by themselves.

On every connect the daemon publishes, retained, one discovery message per entity under
`<ha prefix>/<component>/<device_id>/<object_id>/config`:
- a presence binary sensor per label (`face_present`, `person_present`, …) and a count sensor
  per label (`person_count`: how many are in view),
- with `vision.publish = "events"` or `"both"` and the JSON codec, an event entity (`track`)
  fed by the events topic: `new`, `update`, `end` with the track's label, id and dwell time,
- "Detected objects" (the labels in view) and "Motion" (the current motion label),
- diagnostic health sensors fed by the stats topic (fps, inference time, outbox depth, drops),
all tied to one device and to the status topic for availability.

The entities read a small retained JSON state topic, `<prefix>/<device_id>/state`, that the
daemon republishes when what is in view or the motion label changes. It is separate from the
result topics so that it stays JSON (Home Assistant templates need JSON) whatever codec the
results use, and so that a dashboard reading it gets the current state at once.
"""

from __future__ import annotations

import json
import time

from edged import __version__
from edged.config import Config

HEALTH = (
    # object id, name, stats field, unit, state class
    ("fps", "Frames per second", "fps", "fps", "measurement"),
    ("inference_ms", "Inference time", "inference_ms", "ms", "measurement"),
    ("outbox_depth", "Outbox depth", "outbox_depth", None, "measurement"),
    ("dropped", "Dropped results", "dropped", None, "total_increasing"),
)


def _device(cfg: Config) -> dict:
    return {
        "identifiers": [f"edged_{cfg.device_id}"],
        "name": f"edged {cfg.device_id}",
        "manufacturer": "edged",
        "model": "edged edge-ML daemon",
        "sw_version": __version__,
    }


def discovery(cfg: Config, labels: list[str]) -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery message, to publish retained."""
    ha = cfg.homeassistant
    node = cfg.device_id
    common = {
        "availability_topic": cfg.topic("status"),
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": _device(cfg),
    }
    state = cfg.topic("state")
    out = []

    def add(component: str, object_id: str, body: dict) -> None:
        body = {**body, **common, "unique_id": f"edged_{node}_{object_id}",
                "object_id": f"edged_{node}_{object_id}"}
        out.append((f"{ha.prefix}/{component}/{node}/{object_id}/config",
                    json.dumps(body, separators=(",", ":")).encode()))

    for label in labels:
        add("binary_sensor", f"{_slug(label)}_present", {
            "name": f"{label.capitalize()} present",
            "state_topic": state,
            "value_template": f"{{{{ 'ON' if {label!r} in value_json.labels else 'OFF' }}}}",
            "device_class": "occupancy",
        })
    for label in labels:
        add("sensor", f"{_slug(label)}_count", {
            "name": f"{label.capitalize()} count",
            "state_topic": state,
            "value_template": f"{{{{ value_json.counts[{label!r}] | default(0) }}}}",
            "state_class": "measurement",
            "icon": "mdi:counter",
        })
    if cfg.vision.publish in ("events", "both") and cfg.mqtt.codec == "json":
        # Track events as a Home Assistant event entity (its templates read JSON, not CBOR).
        add("event", "track", {
            "name": "Track",
            "state_topic": cfg.topic("events"),
            "event_types": ["new", "update", "end"],
            "value_template": "{{ {'event_type': value_json.type, 'label': value_json.label, "
                              "'id': value_json.id, 'dwell_s': value_json.dwell_s} | tojson }}",
            "icon": "mdi:account-arrow-right",
        })
    add("sensor", "objects", {
        "name": "Detected objects",
        "state_topic": state,
        "value_template": "{{ value_json.labels | join(', ') if value_json.labels else 'none' }}",
        "icon": "mdi:eye",
    })
    add("sensor", "motion", {
        "name": "Motion",
        "state_topic": state,
        "value_template": "{{ value_json.motion or 'unknown' }}",
        "json_attributes_topic": state,
        "json_attributes_template": "{{ {'score': value_json.motion_score} | tojson }}",
        "icon": "mdi:run",
    })
    for object_id, name, key, unit, state_class in HEALTH:
        body = {
            "name": name,
            "state_topic": cfg.topic("stats"),
            "value_template": f"{{{{ value_json.{key} }}}}",
            "state_class": state_class,
            "entity_category": "diagnostic",
        }
        if unit:
            body["unit_of_measurement"] = unit
        add("sensor", object_id, body)
    return out


def removal(cfg: Config, labels: list[str]) -> list[str]:
    """Discovery topics to clear (empty retained payload) for labels no longer announced."""
    return [f"{cfg.homeassistant.prefix}/{component}/{cfg.device_id}/{_slug(label)}_{suffix}/config"
            for label in labels for component, suffix in (("binary_sensor", "present"), ("sensor", "count"))]


def presence_labels(cfg: Config, model_labels: list[str]) -> list[str]:
    """The labels that get a presence sensor: the configured ones, else the model's (at most 20:
    a COCO model's 80 labels would bury the device page)."""
    if cfg.homeassistant.labels:
        return list(cfg.homeassistant.labels)
    return [lb for lb in model_labels if lb and lb not in ("background", "???")][:20]


def state_payload(labels: list[str], motion: str | None, motion_score: float | None) -> bytes:
    return json.dumps({
        "labels": sorted(set(labels)),
        "counts": {lb: labels.count(lb) for lb in sorted(set(labels))},
        "motion": motion,
        "motion_score": None if motion_score is None else round(motion_score, 3),
        "ts": round(time.time(), 3),
    }, separators=(",", ":")).encode()


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower())
