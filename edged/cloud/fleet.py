"""`edged fleet-sim`: many simulated devices in one process, to load and fault-test a receiver.

Each simulated device has its own MQTT 5 connection, device id and seq, and publishes what a
real one does: a retained `online` status (and `offline` as its last will), `motion` and
`detections` results made from typed records by the project's codec (JSON or CBOR, per device),
and `stats`. Like the daemon's outbox, a device keeps every result until the broker acknowledged
it and publishes it again after a reconnect or a restart, so the only way a seq goes missing is
a receiver losing it. Like the daemon too, it keeps the last `keep` acknowledged results and
answers `cmd/resend` (docs/mqtt.md, "Resend") with the daemon's own request parsing, plan and
budgets: the asked results go out again with their seq and payload, the reply says the rest.

All devices run on one thread: one selector over every connection, driving paho's
`loop_read`/`loop_write`/`loop_misc` directly instead of a thread per client.
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.delivery import codec as _codec
from edged.delivery import commands as _commands
from edged.records import DetectedObject, Detections, MotionSignature

MOTION_LABELS = ("standing", "walking", "running", "badminton")


@dataclass
class SimDevice:
    device_id: str
    codec: _codec.Codec
    seq: int = 0                                   # last seq made (continues across restarts)
    made: int = 0                                  # results made by this process
    unacked: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # seq -> (topic, payload)
    mids: dict[int, int] = field(default_factory=dict)                   # mid -> seq, this client
    acked: int = 0
    client: mqtt.Client | None = None
    connected: bool = False
    fresh: bool = True   # a new client (a restart): on connect, publish everything unacknowledged
    reconnect_at: float = 0.0
    kept: dict[int, tuple[str, bytes]] = field(default_factory=dict)     # acknowledged, oldest first
    budget: _commands.Budget | None = None                               # resend requests per minute
    resent: int = 0
    resend_requests: int = 0


class Fleet:
    """N simulated devices publishing to one broker.

    motion_hz / detection_every_s: each device's rates; `per_device`: stop making results after
    this many per device (0: until stopped). codec: json, cbor or mixed (alternating devices).
    """

    def __init__(self, host: str, port: int, n: int, *, prefix: str = "edged", id_prefix: str = "sim",
                 motion_hz: float = 1.0, detection_every_s: float = 5.0, per_device: int = 0,
                 codec: str = "mixed", stats_every_s: float = 60.0, seed: int = 0,
                 keepalive_s: int = 30, max_inflight: int = 64, first_seq: dict[str, int] | None = None,
                 keep: int = 10_000, resend_max_rows: int = 1000, resend_per_minute: int = 10,
                 resend_rows_per_minute: int = 5000) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.motion_dt = 1.0 / motion_hz if motion_hz > 0 else 0.0
        self.detection_dt = detection_every_s
        self.per_device = per_device
        self.stats_dt = stats_every_s
        self.keepalive_s = keepalive_s
        self.max_inflight = max_inflight
        self.keep = keep
        self.resend_max_rows = resend_max_rows
        self.resend_budget = (resend_per_minute, resend_rows_per_minute)
        self.rng = random.Random(seed)
        codecs = {"json": [_codec.JSON], "cbor": [_codec.get("cbor")],
                  "mixed": [_codec.JSON, _codec.get("cbor")]}[codec]
        self.devices = [SimDevice(f"{id_prefix}-{i:04d}", codecs[i % len(codecs)],
                                  seq=(first_seq or {}).get(f"{id_prefix}-{i:04d}", 0))
                        for i in range(n)]
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, int, str]] = []  # (when, tiebreak, device index, what)
        self._tick = 0
        self._lock = threading.Lock()
        self._commands: list = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    # -- public ------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "Fleet":
        now = time.monotonic()
        for i, d in enumerate(self.devices):
            self._connect(i)
            # Spread the devices over one period so they do not all publish in the same instant.
            if self.motion_dt:
                self._at(now + self.rng.random() * self.motion_dt, i, "motion")
            if self.detection_dt:
                self._at(now + self.rng.random() * self.detection_dt, i, "detections")
            if self.stats_dt:
                self._at(now + self.rng.random() * self.stats_dt, i, "stats")
        self._thread = threading.Thread(target=self._loop, name="fleet", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while time.monotonic() < end and not all(d.connected for d in self.devices):
            time.sleep(0.02)
        if not all(d.connected for d in self.devices):
            raise ConnectionError(f"only {sum(d.connected for d in self.devices)} of "
                                  f"{len(self.devices)} simulated devices connected to {self.host}:{self.port}")
        return self

    def restart(self, i: int) -> None:
        """Device i restarts: its connection ends without a goodbye and a new one starts; its seq
        continues and everything unacknowledged is published again (as from the outbox)."""
        self._command(lambda: self._restart(i))

    def drop(self, i: int) -> None:
        """Device i's network drops: the connection ends, paho notices at once, reconnects and re-sends."""
        self._command(lambda: self._drop(i))

    def pause(self) -> None:
        """Stop making new results (what was made is still delivered)."""
        if self.per_device >= 0:
            self._paused_at = self.per_device
        self.per_device = -1

    def resume(self) -> None:
        """Make results again after `pause`, up to the same `per_device` as before."""
        self.per_device = getattr(self, "_paused_at", 0)

    def resent(self) -> int:
        """Results sent again on request (`cmd/resend`), over all devices."""
        return sum(d.resent for d in self.devices)

    def made(self) -> int:
        return sum(d.made for d in self.devices)

    def done(self) -> bool:
        """Every device made its `per_device` results and the broker acknowledged all of them."""
        with self._lock:
            return all(d.made >= self.per_device and not d.unacked for d in self.devices)

    def acked_all(self) -> bool:
        """The broker acknowledged every result made so far."""
        with self._lock:
            return not any(d.unacked for d in self.devices)

    def last_seqs(self) -> dict[str, int]:
        with self._lock:
            return {d.device_id: d.seq for d in self.devices}

    def stop(self) -> None:
        """Disconnect every device cleanly (each publishes `offline` first)."""
        self._command(self._goodbye)
        if self._thread:
            self._thread.join(10)
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    # -- the loop thread ---------------------------------------------------------------------------

    def _command(self, fn) -> None:
        with self._lock:
            self._commands.append(fn)

    def _at(self, when: float, i: int, what: str) -> None:
        self._tick += 1
        heapq.heappush(self._timers, (when, self._tick, i, what))

    def _new_client(self, i: int) -> mqtt.Client:
        d = self.devices[i]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-{d.device_id}",
                        protocol=mqtt.MQTTv5, userdata=i)
        c.max_inflight_messages_set(self.max_inflight)
        c.max_queued_messages_set(0)
        c.will_set(f"{self.prefix}/{d.device_id}/status", b"offline", qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _connect(self, i: int) -> None:
        d = self.devices[i]
        d.client = self._new_client(i)
        d.mids = {}
        d.fresh = True
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            d.client.connect(self.host, self.port, keepalive=self.keepalive_s, clean_start=True,
                             properties=props)
        except OSError as exc:
            self.errors.append(f"{d.device_id}: connect: {exc}")
            d.reconnect_at = time.monotonic() + 0.5
            return
        self._register(i)

    def _register(self, i: int) -> None:
        """Watch device i's current socket (dropping any stale entry: a socket paho closed
        behind our back may have left its number to this one)."""
        self._unregister(i)
        sock = self.devices[i].client.socket()
        if sock is None:
            return
        stale = self._sel.get_map().get(sock.fileno())
        if stale is not None:
            self._sel.unregister(stale.fileobj)
        self._sel.register(sock, selectors.EVENT_READ, i)

    def _unregister(self, i: int) -> None:
        for key in [k for k in self._sel.get_map().values() if k.data == i]:
            self._sel.unregister(key.fileobj)

    def _on_connect(self, client, i, flags, reason_code, properties) -> None:
        d = self.devices[i]
        if reason_code.is_failure:
            return
        d.connected = True
        client.publish(f"{self.prefix}/{d.device_id}/status", b"online", qos=1, retain=True)
        if self.keep:
            client.subscribe(f"{self.prefix}/{d.device_id}/cmd/resend", qos=1)
        if d.fresh:
            # As the daemon's outbox does after a restart: everything not acknowledged goes
            # again, oldest first. (On a reconnect of the same client paho re-sends its own.)
            d.fresh = False
            for seq in sorted(d.unacked):
                self._send(i, seq)

    def _on_publish(self, client, i, mid, reason_code, properties) -> None:
        d = self.devices[i]
        seq = d.mids.pop(mid, None)
        if seq is not None and not reason_code.is_failure:
            with self._lock:
                row = d.unacked.pop(seq, None)
                if row is not None:
                    d.acked += 1
                    if self.keep:
                        d.kept.pop(seq, None)
                        d.kept[seq] = row
                        while len(d.kept) > self.keep:
                            del d.kept[next(iter(d.kept))]

    def _on_message(self, client, i, msg) -> None:
        """A resend request, answered as the daemon answers it (never raises: paho's loop)."""
        d = self.devices[i]
        try:
            own = f"{self.prefix}/{d.device_id}/response"
            cmd, error = _commands.parse(msg.topic.rsplit("/", 1)[-1], msg.payload, msg.properties, own_prefix=own)
            if error is None and cmd.name != "resend":
                error = "only resend is answered here"
            if error is None:
                d.resend_requests += 1
                count, rows = self.resend_budget
                if d.budget is None:
                    d.budget = _commands.Budget(count, rows, unit="rows")
                over = d.budget.allows()
                if over:
                    answer = _commands.reply(cmd, False, error=f"resend refused: {over}",
                                             retry_after_s=round(d.budget.retry_after(), 1))
                else:
                    answer = self._resend(i, cmd, min(self.resend_max_rows, d.budget.room()))
            else:
                answer = _commands.reply(cmd, False, error=error)
            props = None
            if cmd.correlation is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = cmd.correlation
            client.publish(cmd.response_topic or own, answer, qos=1, properties=props)
        except Exception as exc:  # noqa: BLE001 — nothing from the broker may stop the fleet
            self.errors.append(f"{d.device_id}: resend: {type(exc).__name__}: {exc}")

    def _resend(self, i: int, cmd, cap: int) -> bytes:
        d = self.devices[i]
        with self._lock:
            held = sorted((*d.kept, *d.unacked))

        def within(first: int, last: int, limit: int) -> list[int]:
            import bisect

            lo = bisect.bisect_left(held, first)
            return [s for s in held[lo:lo + limit] if s <= last]

        seqs, gone, gone_count, later = _commands.plan_resend(cmd.ranges, within, cap, d.seq)
        d.budget.spend(len(seqs))
        again = []
        with self._lock:
            for seq in seqs:
                row = d.kept.pop(seq, None)
                if row is not None:
                    d.unacked[seq] = row
                    again.append(seq)
        for seq in again:
            self._send(i, seq)
        d.resent += len(seqs)
        return _commands.reply(cmd, True, resent=len(seqs),
                               gone=[list(r) for r in gone[:32]], gone_count=gone_count,
                               later=[list(r) for r in later[:32]])

    def _on_disconnect(self, client, i, flags, reason_code, properties) -> None:
        d = self.devices[i]
        d.connected = False

    def _send(self, i: int, seq: int) -> None:
        d = self.devices[i]
        topic, payload = d.unacked[seq]
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = d.codec.content_type
        # Whatever the return code, paho keeps a QoS 1 message until its PUBACK and sends it
        # again after a reconnect.
        d.mids[d.client.publish(topic, payload, qos=1, properties=props).mid] = seq

    def _make(self, i: int, what: str, now_wall: float) -> None:
        d = self.devices[i]
        if self.per_device < 0 or self.per_device and d.made >= self.per_device:
            return
        rng = self.rng
        with self._lock:
            d.seq += 1
            d.made += 1
            seq = d.seq
        if what == "motion":
            sig = MotionSignature(ts=now_wall, label=rng.choice(MOTION_LABELS), score=rng.uniform(0.4, 1.0),
                                  signature=tuple(rng.randint(-128, 127) for _ in range(16)),
                                  window_s=3.0, inference_ms=rng.uniform(0.2, 0.5))
            payload = d.codec.motion(sig, d.device_id, seq)
        else:
            objs = tuple(DetectedObject("face", rng.uniform(0.5, 1.0), _box(rng))
                         for _ in range(rng.choice((0, 1, 1, 2))))
            payload = d.codec.detections(Detections(ts=now_wall, objects=objs, inference_ms=rng.uniform(2, 5)),
                                         d.device_id, seq)
        with self._lock:
            d.unacked[seq] = (f"{self.prefix}/{d.device_id}/{what}", payload)
        if not d.fresh:  # paho queues it while disconnected; a fresh client sends it on connect
            self._send(i, seq)

    def _stats(self, i: int, now_wall: float) -> None:
        d = self.devices[i]
        if d.connected:
            body = {"ts": round(now_wall, 3), "uptime_s": 1.0, "fps": 0.0, "inference_ms": None, "frames": 0,
                    "skipped_frames": 0, "failed_frames": 0, "motion_windows": d.made, "motion_inference_ms": 0.3,
                    "imu_samples": 0, "outbox_depth": len(d.unacked), "outbox_bytes": 0, "dropped": 0,
                    "published": d.acked, "bytes_sent": 0, "raw_bytes": 0, "backend": "cpu"}
            d.client.publish(f"{self.prefix}/{d.device_id}/stats", _codec.stats(body, d.device_id), qos=0)

    def _restart(self, i: int) -> None:
        d = self.devices[i]
        self._close(i)
        self._connect(i)

    def _drop(self, i: int) -> None:
        # The connection ends under paho as a network fault ends it: shut down, not closed, and
        # still watched, so paho's next read sees the end at once and the loop reconnects. (A
        # socket closed behind paho's back went unnoticed until paho next wrote: a device with
        # nothing more to send, its last results unacknowledged, waited out the keepalive.)
        d = self.devices[i]
        sock = d.client.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone: paho sees that too
        d.connected = False
        d.reconnect_at = time.monotonic() + 0.2

    def _close(self, i: int) -> None:
        d = self.devices[i]
        if d.client is not None:
            sock = d.client.socket()
            self._unregister(i)
            if sock is not None:
                sock.close()
        d.connected = False

    def _goodbye(self) -> None:
        for i, d in enumerate(self.devices):
            if d.connected:
                d.client.publish(f"{self.prefix}/{d.device_id}/status", b"offline", qos=1, retain=True)
                d.client.disconnect()
                d.client.loop_write()
        self._stop.set()

    def _loop(self) -> None:
        next_misc = [time.monotonic() + 1.0]
        while not self._stop.is_set():
            try:
                self._turn(next_misc)
            except Exception as exc:  # noqa: BLE001 — one device's fault must not stop the fleet
                self.errors.append(f"{type(exc).__name__}: {exc}")
        for i in range(len(self.devices)):
            self._close(i)

    def _turn(self, next_misc: list[float]) -> None:
        with self._lock:
            cmds, self._commands = self._commands, []
        for fn in cmds:
            fn()
        now = time.monotonic()
        wall = time.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, i, what = heapq.heappop(self._timers)
            if what == "stats":
                self._stats(i, wall)
                self._at(now + self.stats_dt, i, what)
            else:
                self._make(i, what, wall)
                self._at(now + (self.motion_dt if what == "motion" else self.detection_dt), i, what)
        for i, d in enumerate(self.devices):
            if d.client is not None and d.client.socket() is not None and d.client.want_write():
                self._io(i, d.client.loop_write)
        timeout = min(0.05, max(0.0, (self._timers[0][0] - time.monotonic()) if self._timers else 0.05))
        if not self._sel.get_map():
            time.sleep(timeout)
        for key, _ in self._sel.select(timeout) if self._sel.get_map() else ():
            self._io(key.data, self.devices[key.data].client.loop_read)
        if time.monotonic() >= next_misc[0]:
            next_misc[0] = time.monotonic() + 1.0
            for i, d in enumerate(self.devices):
                if d.client is None:
                    continue
                if d.client.socket() is None:
                    if time.monotonic() >= d.reconnect_at:
                        self._reconnect(i)
                else:
                    self._io(i, d.client.loop_misc)

    def _io(self, i: int, fn) -> None:
        d = self.devices[i]
        fn()
        if d.client.socket() is None:  # paho closed the connection: reconnect later
            if d.connected or any(k.data == i for k in self._sel.get_map().values()):
                d.reconnect_at = time.monotonic() + 0.2
            d.connected = False
            self._unregister(i)

    def _reconnect(self, i: int) -> None:
        d = self.devices[i]
        try:
            d.client.reconnect()
        except OSError:
            d.reconnect_at = time.monotonic() + 0.5
            return
        self._register(i)


def _box(rng: random.Random) -> tuple[float, float, float, float]:
    x0, y0 = rng.uniform(0, 0.6), rng.uniform(0, 0.6)
    return (x0, y0, x0 + rng.uniform(0.05, 0.4), y0 + rng.uniform(0.05, 0.4))


def run_cli(args) -> int:
    """`edged fleet-sim`: run N simulated devices for a while; one summary line at the end."""
    import sys

    bad = [f"--{k.replace('_', '-')}: expected {what}, got {getattr(args, k)}" for k, what, ok in (
        ("devices", "1 to 10000", 1 <= args.devices <= 10000), ("seconds", "0 or more", args.seconds >= 0),
        ("motion_hz", "0 or more", args.motion_hz >= 0), ("detection_every", "0 or more", args.detection_every >= 0),
        ("stats_every", "0 or more", args.stats_every >= 0), ("restart_every", "0 or more", args.restart_every >= 0),
        ("drop_every", "0 or more", args.drop_every >= 0), ("port", "1 to 65535", 1 <= args.port <= 65535))
        if not ok]
    if bad:
        for line in bad:
            print(f"edged: {line}", file=sys.stderr)
        return 2
    fleet = Fleet(args.host, args.port, args.devices, prefix=args.prefix, id_prefix=args.id_prefix,
                  motion_hz=args.motion_hz, detection_every_s=args.detection_every, codec=args.codec,
                  stats_every_s=args.stats_every, seed=args.seed)
    try:
        fleet.start()
    except ConnectionError as exc:
        print(f"edged: {exc}", file=sys.stderr)
        return 69
    rng = random.Random(args.seed)
    end = time.monotonic() + args.seconds if args.seconds else float("inf")
    next_restart = time.monotonic() + args.restart_every if args.restart_every else float("inf")
    next_drop = time.monotonic() + args.drop_every if args.drop_every else float("inf")
    restarts = drops = 0
    try:
        while time.monotonic() < end:
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
            now = time.monotonic()
            if now >= next_restart:
                fleet.restart(rng.randrange(len(fleet.devices)))
                restarts += 1
                next_restart = now + args.restart_every
            if now >= next_drop:
                fleet.drop(rng.randrange(len(fleet.devices)))
                drops += 1
                next_drop = now + args.drop_every
    except KeyboardInterrupt:
        pass
    fleet.pause()
    drained = _wait(fleet.acked_all, 30)
    made = fleet.made()
    fleet.stop()
    print(f"edged: {len(fleet.devices)} devices made {made} results"
          f" ({'all' if drained else 'not all'} acknowledged by the broker), {restarts} restarts, {drops} drops",
          file=sys.stderr)
    return 0 if drained else 1


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()
