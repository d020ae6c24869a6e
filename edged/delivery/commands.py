"""Remote commands: `<prefix>/<device_id>/cmd/<name>`, answered on `<prefix>/<device_id>/response`.

Commands are off unless `commands.enabled` is true, and `snapshot` (the only one that can send
pixels off the device) additionally needs `commands.snapshot = true`. A command's payload is empty
or a JSON object; its optional `"id"` (a string, number, true/false or null) is echoed in the
reply. With MQTT 5, a request's Response Topic and Correlation Data are honoured instead of the
default response topic — but only a Response Topic that is the device's own
`<prefix>/<device_id>/response` or below it, or `commands.reply_prefix` or below it: any other
is refused (the error reply goes to the default response topic). Nothing a remote party sends can stop the daemon: every failure becomes an error
reply, and the daemon counts them.

`resend` (`{"ranges": [[first, last], ...]}`) is answered even with commands off
(`commands.resend`): `resend_ranges` checks a request, `plan_resend` decides what of it to send
from what the device holds, within a per-request cap; the daemon (from its outbox) and the fleet
simulator (from memory) both use them.
"""

from __future__ import annotations

import io
import json
import time
from collections import deque
from dataclasses import dataclass

NAMES = ("reload", "resend", "snapshot", "stats", "update")
MAX_PAYLOAD = 4096


@dataclass(frozen=True)
class Command:
    name: str
    request_id: object | None
    response_topic: str | None   # MQTT 5 Response Topic, if the requester gave one
    correlation: bytes | None    # MQTT 5 Correlation Data, echoed back
    ranges: tuple[tuple[int, int], ...] = ()  # resend: the seq ranges asked for, sorted and merged


class CommandError(Exception):
    pass


MAX_TOPIC_BYTES = 65535       # an MQTT topic's limit
MAX_CORRELATION = 1024        # Correlation Data echoed back, at most this many bytes
_ID_TYPES = (str, int, float, bool, type(None))


def parse(name: str, payload: bytes, properties: object | None, *, own_prefix: str = "",
          reply_prefix: str = "") -> tuple[Command, str | None]:
    """The command, and the reason it cannot be run (None when it can). Never raises: whatever
    the payload, topic or properties, the answer is a Command that a reply can be made for.

    `own_prefix` (the device's `<prefix>/<device_id>/response`) and `reply_prefix` are where a
    Response Topic may point (each, or a topic below it); a request asking for another is refused, and its reply goes to the default topic."""
    try:
        return _parse(name, payload, properties, own_prefix, reply_prefix)
    except Exception as exc:  # RecursionError, MemoryError, anything: an error reply, not a crash
        return Command(_safe_name(name), None, None, None), f"malformed request ({type(exc).__name__})"


def _safe_name(name: object) -> str:
    return name[:64] if isinstance(name, str) else "?"


def _parse(name, payload, properties, own_prefix, reply_prefix) -> tuple[Command, str | None]:
    name = _safe_name(name)
    payload = bytes(payload) if payload is not None else b""
    response_topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
    correlation = getattr(properties, "CorrelationData", None) if properties is not None else None
    if correlation is not None and (not isinstance(correlation, (bytes, bytearray))
                                    or len(correlation) > MAX_CORRELATION):
        correlation = None
    request_id = None
    error = None
    if response_topic is not None:
        error = response_topic_problem(response_topic, own_prefix, reply_prefix)
        if error:
            response_topic = None
    if error is None and len(payload) > MAX_PAYLOAD:
        error = f"payload too large ({len(payload)} bytes, at most {MAX_PAYLOAD})"
    elif error is None and payload.strip():
        try:
            body = json.loads(payload)
        except RecursionError:
            body, error = None, "payload is not JSON: nested too deeply"
        except (ValueError, UnicodeDecodeError) as exc:
            body, error = None, f"payload is not JSON: {exc}"
        if error is None and not isinstance(body, dict):
            error = "payload must be a JSON object (or empty)"
        elif error is None:
            request_id = body.get("id")
            if not isinstance(request_id, _ID_TYPES) or isinstance(request_id, str) and len(request_id) > 256:
                request_id, error = None, "id must be a string (at most 256 characters), a number, true/false or null"
    ranges: tuple = ()
    if error is None and name not in NAMES:
        error = f"unknown command {name[:64]!r} (known: {', '.join(NAMES)})"
    elif error is None and name == "resend":
        ranges, error = resend_ranges(body if payload.strip() else {})
    return Command(name, request_id, response_topic, bytes(correlation) if correlation else None, ranges), error


# A resend request: at most this many ranges, each of seqs 1 .. SEQ_MAX.
MAX_RANGES = 16
SEQ_MAX = (1 << 63) - 1


def resend_ranges(body: dict) -> tuple[tuple, str | None]:
    """The ranges of a resend request's payload `{"ranges": [[first, last], ...], "id": ...}`,
    sorted and merged, or why not: nothing but `ranges` and `id` may be in it, and every bound
    is an integer seq (not a bool, not a float) with first <= last."""
    extra = sorted(k for k in body if k not in ("id", "ranges"))
    if extra:
        return (), f"resend: unknown key {str(extra[0])[:40]!r} (a request has only ranges and id)"
    raw = body.get("ranges")
    if not isinstance(raw, list) or not raw:
        return (), 'resend: expected "ranges": a non-empty list of [first, last] seq pairs'
    if len(raw) > MAX_RANGES:
        return (), f"resend: at most {MAX_RANGES} ranges per request, got {len(raw)}"
    out = []
    for i, r in enumerate(raw):
        if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)):
            return (), f"resend: ranges[{i}]: expected [first, last], two integers"
        first, last = r
        if not 1 <= first <= last <= SEQ_MAX:
            return (), f"resend: ranges[{i}]: expected 1 <= first <= last <= {SEQ_MAX}"
        out.append((first, last))
    out.sort()
    merged = [out[0]]
    for first, last in out[1:]:
        if first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged), None


def plan_resend(ranges, held, max_rows: int, last_seq: int):
    """Which seqs of `ranges` (sorted, merged) to send again: (seqs, gone, gone_count, later).
    `held(first, last, limit)` lists, ascending, at most `limit` seqs in [first, last] the device
    still holds; `max_rows` caps the seqs one request may send. `gone`: the ranges looked at and
    not held (seqs above `last_seq` were never made: gone too); `later`: the ranges not looked at
    once the cap was reached. At most `max_rows + len(ranges)` SQL-sized steps, whatever the
    ranges span."""
    seqs: list[int] = []
    gone: list[tuple[int, int]] = []
    later: list[tuple[int, int]] = []
    gone_count = 0
    for i, (first, last) in enumerate(ranges):
        room = max_rows - len(seqs)
        if room <= 0:
            later.extend(ranges[i:])
            break
        top = min(last, last_seq)
        got = held(first, top, room + 1) if first <= top else []
        cut = None
        if len(got) > room:
            cut, got = got[room], got[:room]
        upto = cut - 1 if cut is not None else last
        prev = first - 1
        for s in got:
            if s > prev + 1:
                gone.append((prev + 1, s - 1))
                gone_count += s - 1 - prev
            prev = s
        if upto > prev:
            gone.append((prev + 1, upto))
            gone_count += upto - prev
        seqs.extend(got)
        if cut is not None:
            later.append((cut, last))
            later.extend(ranges[i + 1:])
            break
    return seqs, gone, gone_count, later


def response_topic_problem(topic: object, own_prefix: str, reply_prefix: str = "") -> str | None:
    """Why a requested Response Topic may not be published to, or None when it may."""
    if not isinstance(topic, str):
        return "response topic refused: not a string"
    if not topic or len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return "response topic refused: empty or too long"
    if any(c in topic for c in "+#\x00") or topic.startswith("$"):
        return "response topic refused: wildcards, NUL and '$' topics are not allowed"
    allowed = [p.rstrip("/") for p in (own_prefix, reply_prefix) if p]
    if not any(topic == p or topic.startswith(p + "/") for p in allowed):
        return (f"response topic refused: replies go only to {' or '.join(a + '[/…]' for a in allowed)}"
                " (see commands.reply_prefix)")
    return None


class Budget:
    """At most `count` events and `nbytes` bytes (or other `unit`s) in any `window_s` seconds
    (a sliding window)."""

    def __init__(self, count: int, nbytes: int, window_s: float = 60.0, clock=time.monotonic,
                 unit: str = "bytes") -> None:
        self.count, self.nbytes, self.window_s, self.clock = count, nbytes, window_s, clock
        self.unit = unit
        self._events: deque[tuple[float, int]] = deque()
        self._bytes = 0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._bytes -= self._events.popleft()[1]

    def allows(self) -> str | None:
        """None when another event fits now, else why not."""
        now = self.clock()
        self._expire(now)
        if len(self._events) >= self.count:
            return f"at most {self.count} per minute"
        if self._bytes >= self.nbytes:
            return f"at most {self.nbytes} {self.unit} per minute"
        return None

    def room(self) -> int:
        """How many more bytes (units) fit now."""
        self._expire(self.clock())
        return max(0, self.nbytes - self._bytes)

    def retry_after(self) -> float:
        """Seconds until the oldest event leaves the window."""
        now = self.clock()
        self._expire(now)
        return max(0.0, self._events[0][0] + self.window_s - now) if self._events else 0.0

    def spend(self, nbytes: int) -> None:
        self._events.append((self.clock(), nbytes))
        self._bytes += nbytes


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


def draw_objects(image: np.ndarray, objects, *, quality: int = 90) -> bytes:
    """A JPEG of an RGB frame with each object's box, label and score drawn (`edged snapshot`).
    Boxes are normalised [x0, y0, x1, y1] on this image, as the vision stage returns them."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    w, h = im.size
    line = max(1, round(min(w, h) / 200))
    for o in objects:
        x0, y0, x1, y1 = (o.box[0] * w, o.box[1] * h, o.box[2] * w, o.box[3] * h)
        draw.rectangle((x0, y0, x1, y1), outline=BOX_COLOUR, width=line)
        text = f"{o.label} {o.score:.2f}"
        tx, ty = x0, max(0.0, y0 - 12 * line)
        draw.rectangle(draw.textbbox((tx, ty), text), fill=BOX_COLOUR)
        draw.text((tx, ty), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


BOX_COLOUR = (255, 40, 40)
