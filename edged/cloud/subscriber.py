"""The reference subscriber: what a cloud service runs to receive edged results.

It subscribes to every device's results under a prefix, decodes either codec (JSON or CBOR),
stores each result once in SQLite (keyed by device and seq, so redeliveries are counted, not
stored twice), records device status, and tells which seqs never arrived. `edged subscribe` is
its command line; the end-to-end tests use it to check delivery.
"""

from __future__ import annotations

import json
import sqlite3
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from edged.delivery import codec

RESULT_LEAVES = ("detections", "motion", "events")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    device_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    leaf      TEXT    NOT NULL,
    ts        REAL,
    received  REAL    NOT NULL,
    body      TEXT    NOT NULL,     -- the decoded payload, as JSON
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS status (
    device_id TEXT PRIMARY KEY,
    status    TEXT NOT NULL,
    changed   REAL NOT NULL
);
"""


# A seq is a positive integer that fits SQLite's INTEGER; anything else is forged or broken.
MAX_SEQ = (1 << 63) - 1


@dataclass
class DeviceTally:
    received: int = 0
    duplicates: int = 0
    undecodable: int = 0
    rejected: int = 0            # decodable, but with an impossible seq or field (forged?)
    seqs: set[int] = field(default_factory=set)

    def gaps(self) -> list[tuple[int, int]]:
        """Runs of seqs between the lowest and highest seen that never arrived, as
        (first, last) ranges: the work is in the seqs received, not the span they cover."""
        out = []
        prev = None
        for s in sorted(self.seqs):
            if prev is not None and s > prev + 1:
                out.append((prev + 1, s - 1))
            prev = s
        return out

    def missing(self) -> int:
        return sum(b - a + 1 for a, b in self.gaps())


def result_seq(body: object) -> int | None:
    """The seq of a decoded result, or None when the result cannot be genuine: not an object,
    a seq that is not an integer in 1…2⁶³−1, a ts that is not a finite number."""
    import math

    if not isinstance(body, dict):
        return None
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
        return None
    ts = body.get("ts")
    if ts is not None and (not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts)):
        return None
    return seq


class Collector:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883, db_path: str | Path = ":memory:", *,
                 prefix: str = "edged", client_id: str | None = None, persistent: bool = False,
                 username: str = "", password: str = "", ca_file: str = "", cert_file: str = "",
                 key_file: str = "", on_result=None) -> None:
        self.prefix = prefix
        self.tally: dict[str, DeviceTally] = {}
        self.statuses: dict[str, list[str]] = {}
        self.on_result = on_result
        self.paused = False  # set (e.g. from on_result) to ignore everything that arrives after
        self.errors = 0             # messages whose handling failed (the network thread goes on)
        self.failure: str | None = None   # the first such failure, in words
        self._lock = threading.Lock()
        self.db_path = str(db_path)
        self._db: sqlite3.Connection | None = None  # opened once the broker has accepted us
        self._subscribed = threading.Event()
        self._refused: str | None = None
        # persistent: the broker keeps our session and queues QoS 1 results while we are away.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id or f"edged-subscriber-{time.monotonic_ns()}",
                        protocol=mqtt.MQTTv5)
        self._connect_kw = {"clean_start": not persistent}
        if persistent:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 86400
            self._connect_kw["properties"] = props
        if username:
            c.username_pw_set(username, password or None)
        if ca_file or cert_file:
            c.tls_set(ca_certs=ca_file or None, certfile=cert_file or None, keyfile=key_file or None,
                      cert_reqs=ssl.CERT_REQUIRED)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(0.1, 1)
        self.client = c
        self.host, self.port = host, port

    def start(self, timeout: float = 10.0) -> "Collector":
        """Connect and subscribe; the database is created only once the broker has accepted us
        (a refused or unreachable broker leaves no empty file behind)."""
        self.client.connect(self.host, self.port, **self._connect_kw)
        self.client.loop_start()
        if not self._subscribed.wait(timeout) or self._refused:
            self.client.loop_stop()
            self.client.disconnect()
            why = self._refused or f"no answer to CONNECT/SUBSCRIBE within {timeout:g} s (is it an MQTT broker?)"
            raise ConnectionError(why)
        return self

    def stop_receiving(self) -> None:
        """Stop the network thread: after this returns nothing more arrives or is counted."""
        self.client.loop_stop()
        self.client.disconnect()

    def stop(self) -> None:
        self.stop_receiving()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = f"the broker refused the connection: {reason_code}"
            self._subscribed.set()
            client.disconnect()
            return
        self.open_store()
        client.subscribe([(f"{self.prefix}/+/{leaf}", 1) for leaf in (*RESULT_LEAVES, "status")])

    def open_store(self) -> None:
        """Open the SQLite store (done on the first successful connect)."""
        with self._lock:
            if self._db is None:
                self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)

    def _on_message(self, client, userdata, msg) -> None:
        # On paho's network thread: an exception would end it, and every later result with it.
        try:
            self._take(msg)
        except Exception as exc:
            self.errors += 1
            if self.failure is None:
                self.failure = f"{type(exc).__name__}: {exc}"

    def _take(self, msg) -> None:
        if self.paused:
            return
        parts = msg.topic.split("/")
        if len(parts) < 3:
            return
        device, leaf = parts[-2], parts[-1]
        now = time.time()
        if leaf == "status":
            with self._lock:
                self.statuses.setdefault(device, []).append(msg.payload.decode(errors="replace"))
                self._db.execute("INSERT OR REPLACE INTO status VALUES (?, ?, ?)",
                                 (device, msg.payload.decode(errors="replace"), now))
            return
        content_type = getattr(msg.properties, "ContentType", None) if msg.properties else None
        with self._lock:
            t = self.tally.setdefault(device, DeviceTally())
            try:
                body = codec.decode(msg.payload, content_type)
            except Exception:
                t.undecodable += 1
                return
            seq = result_seq(body)
            if seq is None:
                t.rejected += 1
                return
            try:
                text = json.dumps(body, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                t.rejected += 1
                return
            t.received += 1
            if seq in t.seqs:
                t.duplicates += 1
                return
            t.seqs.add(seq)
            self._db.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                             (device, seq, leaf, body.get("ts"), now, text))
        if self.on_result:
            self.on_result(device, leaf, body)

    def alive(self) -> bool:
        """Whether paho's network thread is still running (after start())."""
        thread = getattr(self.client, "_thread", None)
        return thread is not None and thread.is_alive()

    # -- queries ---------------------------------------------------------------------------------

    def seqs(self, device: str) -> set[int]:
        with self._lock:
            return set(self.tally.get(device, DeviceTally()).seqs)

    def results(self, device: str, leaf: str | None = None) -> list[dict]:
        with self._lock:
            q = "SELECT body FROM results WHERE device_id = ?" + (" AND leaf = ?" if leaf else "") + " ORDER BY received"
            rows = self._db.execute(q, (device, leaf) if leaf else (device,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def summary(self) -> dict:
        with self._lock:
            return {d: {"received": t.received, "unique": len(t.seqs), "duplicates": t.duplicates,
                        "undecodable": t.undecodable, "rejected": t.rejected,
                        "missing": t.missing(), "first_seq": min(t.seqs) if t.seqs else None,
                        "last_seq": max(t.seqs) if t.seqs else None, "gaps": t.gaps()}
                    for d, t in self.tally.items()}


def run_cli(args) -> int:
    """`edged subscribe`: print each result as a JSON line; a delivery summary at the end."""
    import sys

    stop = threading.Event()
    count = [0]

    def show(device: str, leaf: str, body: dict) -> None:
        if not args.quiet:
            print(json.dumps({"device": device, "topic": leaf, **body}), flush=True)
        count[0] += 1
        if args.count and count[0] >= args.count:
            col.paused = True  # paho delivers in one thread: nothing after the Nth is taken in
            stop.set()

    col = Collector(args.host, args.port, args.db, prefix=args.prefix, username=args.username or "",
                    password=args.password or "", ca_file=args.ca_file or "", cert_file=args.cert_file or "",
                    key_file=args.key_file or "", client_id=args.client_id,
                    persistent=bool(args.client_id), on_result=show)
    try:
        col.start()
    except (OSError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"edged: cannot subscribe at {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 69
    end = time.monotonic() + args.seconds if args.seconds else None
    status = 0
    try:
        while not stop.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))):
            if end is not None and time.monotonic() >= end:
                break
            if not col.alive():
                print(f"edged: the MQTT network thread stopped ({col.failure or 'no reason given'}); "
                      "results after this point were not received", file=sys.stderr)
                status = 1
                break
    except KeyboardInterrupt:
        pass
    # Stop receiving before counting, so the summary covers exactly what was printed and stored.
    col.paused = True
    col.stop_receiving()
    summary = col.summary()
    col.stop()
    for device, s in sorted(summary.items()):
        gaps = s["gaps"]
        shown = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in gaps[:10]) + ("…" if len(gaps) > 10 else "")
        extra = f", {s['rejected']} rejected" if s["rejected"] else ""
        extra += f", {s['undecodable']} undecodable" if s["undecodable"] else ""
        print(f"edged: {device}: {s['unique']} results (seq {s['first_seq']}–{s['last_seq']}), "
              f"{s['duplicates']} duplicates, {s['missing']} missing{': ' + shown if gaps else ''}{extra}",
              file=sys.stderr)
    if col.errors and not status:
        print(f"edged: {col.errors} messages could not be handled (first: {col.failure})", file=sys.stderr)
        status = 1
    return status
