"""Home Assistant MQTT discovery: the device and its entities appear in Home Assistant by themselves,
and disappear when the device no longer offers them.

On every connect (and after a reload) the daemon publishes, retained, one discovery message per
entity under `<ha prefix>/<component>/<device_id>/<object_id>/config`:
- per presence label (`face`, `person`, …) a presence binary sensor and a count sensor,
- with `vision.publish = "events"` or `"both"` and the JSON codec, an event entity (`track`)
  fed by the events topic: `new`, `update`, `end` with the track's label, id and dwell time
  (and a person's posture, `fallen` after a fall, when a pose stage runs),
- "Detected objects" (the labels in view) and "Motion" (an enum of the motion model's labels),
- diagnostic sensors fed by the retained stats topic: fps, inference time, uptime, backend,
  skipped frames, published / rejected results, outbox depth, drops, bandwidth saved,
- with `[updates]`, a diagnostic "Model update" sensor fed by the retained models report,
- with `[commands]` enabled, buttons for stats / reload (and snapshot with an image entity for it),
all tied to one device (with `origin`, and the Pi's model as `hw_version`) and to the status
topic for availability.

What was announced is remembered in `<state_dir>/homeassistant.json`; a topic announced before
but not now (another vision model, a label dropped, a new device_id, discovery turned off) gets
an empty retained config, which is how Home Assistant is told to remove the entity.

Entity ids: `default_entity_id` (`sensor.edged_<device>_<object>`), which replaced the
deprecated `object_id` in Home Assistant 2025.10; older releases drop the unknown key and derive
the id from the names. Discovery stays one message per entity (rather than the device-based form
of 2024.11) so that releases before that keep working.

The entities read a small retained JSON state topic, `<prefix>/<device_id>/state`, that the
daemon republishes when what is in view or the motion label changes. It is separate from the
result topics so that it stays JSON (Home Assistant templates need JSON) whatever codec the
results use, and so that a dashboard reading it gets the current state at once. Presence in it
is held for `homeassistant.hold_s` after a label was last seen, so one missed frame does not
flip the sensor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from edged import __version__
from edged.config import Config

log = logging.getLogger("edged.homeassistant")

ANNOUNCED_FILE = "homeassistant.json"

# object id, name, value template (from the stats payload), extra keys
DIAGNOSTICS = (
    ("fps", "Frames per second", "{{ value_json.fps }}",
     {"unit_of_measurement": "fps", "state_class": "measurement", "suggested_display_precision": 1}),
    ("inference_ms", "Inference time", "{{ value_json.inference_ms if value_json.inference_ms is not none else 'None' }}",
     {"unit_of_measurement": "ms", "device_class": "duration", "state_class": "measurement",
      "suggested_display_precision": 1}),
    ("uptime", "Uptime", "{{ value_json.uptime_s | int }}",
     {"unit_of_measurement": "s", "device_class": "duration", "state_class": "measurement",
      "suggested_display_precision": 0}),
    ("backend", "Inference backend", "{{ 'Edge TPU' if value_json.backend == 'edgetpu' else 'CPU' }}",
     {"icon": "mdi:chip"}),
    ("skipped_frames", "Skipped frames", "{{ value_json.skipped_frames }}", {"state_class": "total_increasing"}),
    ("published", "Published results", "{{ value_json.published }}", {"state_class": "total_increasing"}),
    ("rejected", "Rejected results", "{{ value_json.rejected }}", {"state_class": "total_increasing"}),
    ("outbox_depth", "Outbox depth", "{{ value_json.outbox_depth }}", {"state_class": "measurement"}),
    ("dropped", "Dropped results", "{{ value_json.dropped }}", {"state_class": "total_increasing"}),
    ("bandwidth_saved", "Bandwidth saved",
     # Samples ([sampling]) are bytes sent too.
     "{{ ((1 - (value_json.bytes_sent + (value_json.samples_bytes_sent | default(0))) / value_json.raw_bytes) * 100)"
     " | round(2) if value_json.raw_bytes else 'None' }}",
     {"unit_of_measurement": "%", "state_class": "measurement", "suggested_display_precision": 2}),
)


def pi_model(root: str = "/") -> str:
    """The board's model from the device tree ('Raspberry Pi 4 Model B Rev 1.4'), else ''."""
    for p in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        try:
            return (Path(root) / p).read_bytes().rstrip(b"\0\n").decode(errors="replace")
        except OSError:
            continue
    return ""


def _device(cfg: Config, hw_version: str) -> dict:
    dev = {
        "identifiers": [f"edged_{cfg.device_id}"],
        "name": f"edged {cfg.device_id}",
        "manufacturer": "edged",
        "model": "edged edge-ML daemon",
        "sw_version": __version__,
    }
    if hw_version:
        dev["hw_version"] = hw_version
    return dev


def discovery(cfg: Config, labels: list[str], motion_labels: list[str] | None = None, *,
              hw_version: str = "") -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery message, to publish retained."""
    ha = cfg.homeassistant
    node = cfg.device_id
    common = {
        "availability_topic": cfg.topic("status"),
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": _device(cfg, hw_version),
        "origin": {"name": "edged", "sw_version": __version__},
    }
    state = cfg.topic("state")
    out = []

    def add(component: str, object_id: str, body: dict) -> None:
        base = dict(common)
        if "availability" in body:  # its own list (with the status topic): not both forms
            base.pop("availability_topic"), base.pop("payload_available"), base.pop("payload_not_available")
        body = {**body, **base, "unique_id": f"edged_{node}_{object_id}",
                "default_entity_id": f"{component}.edged_{node}_{object_id}"}
        out.append((f"{ha.prefix}/{component}/{node}/{object_id}/config",
                    json.dumps(body, separators=(",", ":")).encode()))

    for label in labels:
        slug = _slug(label)
        add("binary_sensor", f"{slug}_present", {
            "name": f"{label.capitalize()} present",
            "state_topic": state,
            "value_template": f"{{{{ 'ON' if {label!r} in value_json.present else 'OFF' }}}}",
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
            # The event's attributes: its label, id and dwell time, and a person's posture
            # ("fallen" after a fall) when a pose stage gave the track one.
            "value_template": "{% set e = {'event_type': value_json.type, 'label': value_json.label, "
                              "'id': value_json.id, 'dwell_s': value_json.dwell_s} %}"
                              "{{ (dict(e, posture=value_json.posture) if value_json.posture is defined "
                              "else e) | tojson }}",
            "icon": "mdi:account-arrow-right",
        })
    add("sensor", "objects", {
        "name": "Detected objects",
        "state_topic": state,
        "value_template": "{{ value_json.labels | join(', ') if value_json.labels else 'none' }}",
        "icon": "mdi:eye",
    })
    if motion_labels is not None:
        add("sensor", "motion", {
            "name": "Motion",
            "state_topic": state,
            "device_class": "enum",
            "options": list(motion_labels),
            # An enum sensor's state must be one of its options: while no motion window is known
            # (start-up, after a stop) the entity is unavailable rather than a made-up state.
            "availability": [
                {"topic": cfg.topic("status"), "payload_available": "online", "payload_not_available": "offline"},
                {"topic": state, "value_template": "{{ 'online' if value_json.motion else 'offline' }}",
                 "payload_available": "online", "payload_not_available": "offline"},
            ],
            "availability_mode": "all",
            "value_template": "{{ value_json.motion }}",
            "json_attributes_topic": state,
            "json_attributes_template": "{{ {'score': value_json.motion_score} | tojson }}",
            "icon": "mdi:run",
        })
    for object_id, name, template, extra in DIAGNOSTICS:
        add("sensor", object_id, {"name": name, "state_topic": cfg.topic("stats"),
                                  "value_template": template, "entity_category": "diagnostic", **extra})
    if cfg.commands.enabled:
        names = ["stats", "reload"] + (["snapshot"] if cfg.commands.snapshot else [])
        for name in names:
            add("button", name, {
                "name": {"stats": "Publish stats", "reload": "Reload config", "snapshot": "Take snapshot"}[name],
                "command_topic": cfg.topic(f"cmd/{name}"),
                "payload_press": '{"id":"homeassistant"}',
                "entity_category": "config" if name == "reload" else None,
            })
        if cfg.commands.snapshot:
            add("image", "snapshot", {"name": "Snapshot", "image_topic": cfg.topic("snapshot"),
                                      "content_type": "image/jpeg"})
    if cfg.updates.url:
        add("sensor", "model_update", {
            "name": "Model update",
            "state_topic": cfg.topic("models"),
            "value_template": "{{ value_json.last.outcome if value_json.last else 'none' }}",
            "json_attributes_topic": cfg.topic("models"),
            "json_attributes_template": "{{ {'models': value_json.models, 'last': value_json.last} | tojson }}",
            "entity_category": "diagnostic",
            "icon": "mdi:package-up",
        })
    return [(t, _drop_none(p)) for t, p in out]


def _drop_none(payload: bytes) -> bytes:
    body = {k: v for k, v in json.loads(payload).items() if v is not None}
    return json.dumps(body, separators=(",", ":")).encode()


def presence_labels(cfg: Config, model_labels: list[str]) -> list[str]:
    """The labels that get a presence sensor: the configured ones, else the model's (at most 20:
    a COCO model's 80 labels would bury the device page)."""
    if cfg.homeassistant.labels:
        return list(cfg.homeassistant.labels)
    return [lb for lb in model_labels if lb and lb not in ("background", "???")][:20]


# -- what was announced, remembered across restarts ------------------------------------------------

def announced_path(cfg: Config) -> Path:
    return Path(cfg.state_dir) / ANNOUNCED_FILE


def load_announced(path: Path) -> list[str]:
    try:
        doc = json.loads(path.read_text())
        topics = doc.get("topics", [])
        return [t for t in topics if isinstance(t, str)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cannot read what was announced to Home Assistant; stale entities may stay",
                    extra={"fields": {"path": str(path), "error": str(exc)}})
        return []


def save_announced(path: Path, topics: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"topics": sorted(set(topics))}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record what was announced to Home Assistant",
                    extra={"fields": {"path": str(path), "error": str(exc)}})


def stale(previous: list[str], current: list[str]) -> list[str]:
    """Discovery topics announced before and not now: each gets an empty retained config."""
    now = set(current)
    return sorted({t for t in previous if t not in now})


# -- the state topic -----------------------------------------------------------------------------

class Presence:
    """Labels held present for `hold_s` after they were last seen."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._seen: dict[str, float] = {}

    def update(self, labels: list[str], now: float) -> list[str]:
        for lb in labels:
            self._seen[lb] = now
        self._seen = {lb: t for lb, t in self._seen.items() if now - t <= self.hold_s or lb in labels}
        return sorted(self._seen)


def state_payload(labels: list[str], motion: str | None, motion_score: float | None,
                  present: list[str] | None = None) -> bytes:
    return json.dumps({
        "labels": sorted(set(labels)),
        "present": sorted(set(labels)) if present is None else list(present),
        "counts": {lb: labels.count(lb) for lb in sorted(set(labels))},
        "motion": motion,
        "motion_score": None if motion_score is None else round(motion_score, 3),
        "ts": round(time.time(), 3),
    }, separators=(",", ":")).encode()


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower())
