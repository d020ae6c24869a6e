"""Remote commands: `<prefix>/<device_id>/cmd/<name>`, answered on `<prefix>/<device_id>/response`.

Commands are off unless `commands.enabled` is true, and `snapshot` (the only one that can send
pixels off the device) additionally needs `commands.snapshot = true`. A command's payload is empty
or a JSON object; its optional `"id"` is echoed in the reply. With MQTT 5, a request's Response
Topic and Correlation Data are honoured instead of the default response topic. Nothing a remote
party sends can stop the daemon: every failure becomes an error reply.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

NAMES = ("reload", "snapshot", "stats")
MAX_PAYLOAD = 4096


@dataclass(frozen=True)
class Command:
    name: str
    request_id: object | None
    response_topic: str | None   # MQTT 5 Response Topic, if the requester gave one
    correlation: bytes | None    # MQTT 5 Correlation Data, echoed back


class CommandError(Exception):
    pass


def parse(name: str, payload: bytes, properties: object | None) -> tuple[Command | None, str | None]:
    """The command, or (None, error) when it cannot be run. Never raises."""
    response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
    correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
    request_id = None
    error = None
    if len(payload) > MAX_PAYLOAD:
        error = f"payload too large ({len(payload)} bytes, at most {MAX_PAYLOAD})"
    elif payload.strip():
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            body, error = None, f"payload is not JSON: {exc}"
        if error is None and not isinstance(body, dict):
            error = "payload must be a JSON object (or empty)"
        elif error is None:
            request_id = body.get("id")
    if error is None and name not in NAMES:
        error = f"unknown command {name!r} (known: {', '.join(NAMES)})"
    cmd = Command(name, request_id, response_topic, correlation)
    return cmd, error


def reply(cmd: Command, ok: bool, *, error: str | None = None, **result) -> bytes:
    body: dict = {"cmd": cmd.name, "ok": ok}
    if cmd.request_id is not None:
        body["id"] = cmd.request_id
    if error:
        body["error"] = error
    body.update(result)
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def jpeg_snapshot(image: np.ndarray, max_bytes: int) -> bytes:
    """Encode an RGB frame as JPEG within `max_bytes`: lower quality first, then halve the size."""
    from PIL import Image

    im = Image.fromarray(image)
    while True:
        for quality in (85, 70, 55, 40):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            if buf.tell() <= max_bytes:
                return buf.getvalue()
        if min(im.size) <= 16:
            raise CommandError(f"frame does not fit in {max_bytes} bytes as JPEG")
        im = im.resize((max(1, im.width // 2), max(1, im.height // 2)))
