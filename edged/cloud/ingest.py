"""`edged ingest`: a worker that lands every device's results in PostgreSQL exactly once.

Any number of workers, on any number of machines, share the load through one MQTT 5 shared
subscription (`$share/<group>/<prefix>/+/detections|motion|events|stats`); the broker hands each
message to one member of the group. Each worker:

- connects with a stable client id and a persistent session, and acknowledges (PUBACK) a result
  only after the transaction holding it committed (paho's manual acknowledgement): a worker that
  dies at any moment leaves its unacknowledged messages with the broker, which delivers them
  again;
- stores each result once, keyed by (device_id, seq): a redelivery is counted as a duplicate;
- stores a payload it cannot use in `rejected` (topic, bytes, reason), acknowledges it, counts it
  and logs the first of each kind;
- writes in batches (`ingest.batch_size` messages or `ingest.batch_delay_s`, whichever first);
- when PostgreSQL is down, stops acknowledging and retries with backoff: the broker holds back
  once `ingest.max_inflight` messages are unacknowledged (MQTT 5 Receive Maximum), so nothing
  piles up in the worker and nothing is lost.

The retained `status` topic is subscribed without sharing (a shared subscription gets no
retained messages), so every worker keeps `devices.status` current; the writes are idempotent.

Resend (docs/cloud.md, "Resend"): what a broker acknowledged to a device and then lost (mosquitto
drops what arrives before a restarted broker has the workers' shared subscriptions again) shows
as a gap in `gaps`. Once a gap is `ingest.resend_after_s` old, a worker publishes
`<prefix>/<device>/cmd/resend` with its ranges; the device sends what it still keeps, as any
result, and its reply (`$share/<group>/<prefix>/+/response`) says what it no longer holds.
Which worker asks is settled in the database (`resend_asks`): each gap is claimed by one, with
a back-off per gap and a cap on attempts. A worker looks after each (re)subscription and every
`ingest.resend_interval_s` (jittered), on a thread with its own database connection.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import re
import signal
import socket
import ssl
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged import config as _config
from edged.cloud import payloads, store
from edged.cloud.payloads import Reject, Result
from edged.delivery.commands import MAX_RANGES

log = logging.getLogger("edged.ingest")

DEFAULT_PATH = Path("/etc/edged/ingest.toml")
RESULT_LEAVES = payloads.RESULT_KINDS
SAMPLE_LEAF = "sample"
_check = _config._check  # the daemon's config machinery: same validation, same messages


@dataclass
class IngestSection:
    group: str = field(default="edged-ingest", metadata=_check(
        pattern=r"^[A-Za-z0-9_-]{1,64}$", expect="1 to 64 letters, digits, '-' or '_'"))
    client_id: str = field(default="", metadata=_check(
        pattern=r"^[A-Za-z0-9_.-]{0,64}$", expect="up to 64 letters, digits, '.', '-' or '_'"))
    batch_size: int = field(default=500, metadata=_check(min=1, max=10000))
    batch_delay_s: float = field(default=0.1, metadata=_check(min=0.0, max=60))
    max_inflight: int = field(default=2000, metadata=_check(min=1, max=65535))
    max_payload_bytes: int = field(default=65536, metadata=_check(min=256, max=16 << 20))
    # Samples (raw IMU windows, frame crops; docs/mqtt.md) are bigger than results.
    max_sample_bytes: int = field(default=1 << 20, metadata=_check(min=1024, max=64 << 20))
    log_level: str = field(default="info", metadata=_check(choices=("debug", "info", "warning", "error")))
    stats_interval_s: float = field(default=60.0, metadata=_check(min=1, max=86400))
    # Asking devices to send again what `gaps` lists (docs/cloud.md, "Resend").
    resend: bool = True
    resend_after_s: float = field(default=60.0, metadata=_check(min=1, max=86400))       # a gap this old is asked for
    resend_interval_s: float = field(default=300.0, metadata=_check(min=5, max=86400))   # how often a worker looks
    resend_window_s: float = field(default=86400.0, metadata=_check(min=60, max=30 * 86400))  # how far back (ts)
    resend_attempts: int = field(default=8, metadata=_check(min=1, max=100))            # per gap, backing off


@dataclass
class DatabaseSection:
    url: str = field(default="postgresql:///edged", metadata=_check(
        pattern=r"(postgresql|postgres)://\S*|sqlite:///\S+", expect="a postgresql:// URL or sqlite:///FILE"))
    retention_days: int = field(default=30, metadata=_check(min=0, max=36500))  # 0 = keep everything
    reconnect_min_s: float = field(default=0.5, metadata=_check(min=0.05, max=60))
    reconnect_max_s: float = field(default=30.0, metadata=_check(min=0.1, max=3600))


@dataclass
class BrokerSection(_config.BrokerConnection):
    topic_prefix: str = field(default="edged", metadata=_check(  # as the devices' mqtt.topic_prefix
        pattern=_config._PREFIX_PATTERN, expect=_config._PREFIX_EXPECT, max_bytes=_config.TOPIC_PREFIX_MAX_BYTES))
    keepalive_s: int = field(default=30, metadata=_check(min=5, max=3600))
    session_expiry_s: int = field(default=86400, metadata=_check(min=60, max=(1 << 32) - 1))
    reconnect_min_s: float = field(default=0.5, metadata=_check(min=0.1, max=60))
    reconnect_max_s: float = field(default=30.0, metadata=_check(min=1, max=3600))


@dataclass
class IngestConfig:
    ingest: IngestSection = field(default_factory=IngestSection)
    database: DatabaseSection = field(default_factory=DatabaseSection)
    mqtt: BrokerSection = field(default_factory=BrokerSection)

    @property
    def client_id(self) -> str:
        return self.ingest.client_id or f"edged-ingest-{_config._sanitize_id(socket.gethostname())}"


# Command-line flags and the config keys they set (a flag wins over the file).
FLAGS = {
    "host": "mqtt.host", "port": "mqtt.port", "prefix": "mqtt.topic_prefix",
    "username": "mqtt.username", "password": "mqtt.password", "ca_file": "mqtt.ca_file",
    "cert_file": "mqtt.cert_file", "key_file": "mqtt.key_file",
    "db": "database.url", "retention_days": "database.retention_days",
    "group": "ingest.group", "client_id": "ingest.client_id", "batch_size": "ingest.batch_size",
    "batch_delay": "ingest.batch_delay_s", "max_inflight": "ingest.max_inflight",
    "log_level": "ingest.log_level",
}


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> IngestConfig:
    """The config file (None: defaults only) with `overrides` ({dotted key: value}, from flags)
    on top; every problem reported at once as a ConfigError."""
    doc: dict = {}
    lines: dict[str, int] = {}
    name = "<defaults>"
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        name = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise _config.ConfigError([f"{path}: config file not found"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _config.ConfigError([f"{path}: cannot read config: {getattr(exc, 'strerror', None) or exc}"]) from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            m = re.search(r"\(at line (\d+), column \d+\)", msg)
            raise _config.ConfigError([f"{name}{':' + m.group(1) if m else ''}: TOML syntax error: "
                                       f"{re.sub(r' [(]at line.*', '', msg)}"]) from None
        lines = _config._key_lines(text)
    cfg = _config._build(IngestConfig, doc, "", name, lines, problems)
    if overrides:
        flagdoc: dict = {}
        for dotted, value in overrides.items():
            section, key = dotted.split(".")
            flagdoc.setdefault(section, {})[key] = value
        flags = _config._build(IngestConfig, flagdoc, "", "command line", {}, problems)
        for dotted in overrides:
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, getattr(getattr(flags, section), key))
    def where(key: str) -> str:
        if key in (overrides or {}):
            return "command line"
        return f"{name}:{lines[key]}" if key in lines else name

    _config.check_broker(cfg.mqtt, where, problems)
    if cfg.database.reconnect_min_s > cfg.database.reconnect_max_s:
        problems.append(f"{where('database.reconnect_min_s')}: database.reconnect_min_s: "
                        "must not exceed reconnect_max_s")
    if problems:
        raise _config.ConfigError(problems)
    return cfg


def _db_target(url: str) -> str:
    """The URL without its password, for log lines."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


@dataclass
class Counters:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    commit_s: float = 0.0
    db_failures: int = 0
    stats_dropped: int = 0
    samples: int = 0
    resend_requests: int = 0   # cmd/resend published to devices
    resend_ranges: int = 0     # gap ranges in them
    resend_replies: int = 0    # devices' resend replies recorded
    resend_gone: int = 0       # seqs devices said they no longer hold

    def line(self) -> dict:
        return {"received": self.received, "stored": self.stored, "samples": self.samples,
                "duplicates": self.duplicates,
                "rejected": self.rejected, "batches": self.batches, "db_failures": self.db_failures,
                "commit_ms_mean": round(1000 * self.commit_s / self.batches, 2) if self.batches else 0,
                "resend_requests": self.resend_requests, "resend_ranges": self.resend_ranges,
                "resend_replies": self.resend_replies, "resend_gone": self.resend_gone}


@dataclass(slots=True)
class _Msg:
    epoch: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    content_type: str | None
    received: float


class Worker:
    """One ingest worker: an MQTT connection feeding a writer that commits batches.

    `shared=False` subscribes without a shared-subscription group and `persistent=False` starts
    a clean session the broker forgets at disconnect: what `edged subscribe`, the single-machine
    front end of this worker, does unless it is given a client id. `on_commit(stored, rejected,
    outcome)` is called after each batch committed, with the results it stored (in the order
    they arrived, duplicates left out) and the rejected payloads."""

    def __init__(self, cfg: IngestConfig, *, shared: bool = True, persistent: bool = True,
                 on_commit=None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.cfg = cfg
        self.counters = Counters()
        self.stopping = threading.Event()
        self._q: queue.Queue[_Msg] = queue.Queue()
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._answered = threading.Event()  # subscribed, or refused (refusal says why)
        self.refusal: str | None = None
        self.on_commit = on_commit
        self.persistent = persistent
        self._origin: dict[tuple[str, int], _Msg] = {}
        self._once: set[str] = set()
        self.store = open_store(cfg.database.url, cfg.client_id)
        self._next_retention = 0.0
        self._next_stats = time.monotonic() + cfg.ingest.stats_interval_s
        m = cfg.mqtt
        prefix = m.topic_prefix
        self._prefix = prefix + "/"
        share = f"$share/{cfg.ingest.group}/" if shared else ""
        # Resend needs a database the group shares to agree on who asks: not for `edged subscribe`.
        self.resend = cfg.ingest.resend and shared
        self._resend_soon = True             # look for gaps soon (set on each subscription)
        self._next_resend = float("inf")
        self._answers: list[store.ResendAnswer] = []
        self.sent: list = []                 # the last pass's publishes (paho's MQTTMessageInfo)
        leaves = (*RESULT_LEAVES, "stats", SAMPLE_LEAF, *(("response",) if self.resend else ()))
        self.topics = [(f"{share}{prefix}/+/{leaf}", 1) for leaf in leaves]
        self.topics.append((f"{prefix}/+/status", 1))
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=True)
        props = Properties(PacketTypes.CONNECT)
        if persistent:
            props.SessionExpiryInterval = m.session_expiry_s
        props.ReceiveMaximum = cfg.ingest.max_inflight
        self._connect_props = props
        if m.username:
            c.username_pw_set(m.username, m.password or None)
        if m.tls or m.ca_file or m.cert_file:
            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None,
                      keyfile=m.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(m.reconnect_min_s, m.reconnect_max_s)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.client = c

    # -- MQTT (paho's network thread) -------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log_once("mqtt_refused", "the broker refused the connection", reason=str(reason_code))
            self.refusal = f"the broker refused the connection: {reason_code}"
            self._answered.set()
            return
        with self._epoch_lock:
            self._epoch += 1
        self._connected.set()
        self._clear_once("mqtt_down")
        log.info("connected to the broker", extra=_fields(
            broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}", client_id=self.cfg.client_id,
            session_present=bool(flags.session_present), group=self.cfg.ingest.group))
        # Subscribing again on a resumed session is harmless and covers a broker that lost it.
        if self.topics:
            client.subscribe(self.topics)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            self._log_once("subscribe", "the broker refused a subscription (does it support MQTT 5 "
                           "shared subscriptions, and does the ACL allow them?)", reasons=",".join(bad))
            self.refusal = f"the broker refused a subscription: {', '.join(bad)}"
            self._answered.set()
            return
        log.info("subscribed", extra=_fields(topics=",".join(t for t, _ in self.topics)))  # once per connection
        self._resend_soon = True  # a broker restart may have lost what arrived before this
        self._subscribed.set()
        self._answered.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._epoch_lock:
            self._epoch += 1
        self._connected.clear()
        if not self.stopping.is_set():
            self._log_once("mqtt_down", "lost the broker; reconnecting (unacknowledged messages stay "
                           "with the broker)", reason=str(reason_code))

    def _on_message(self, client, userdata, msg) -> None:
        ct = getattr(msg.properties, "ContentType", None) if msg.properties else None
        if msg.qos == 0 and self._q.qsize() > 4 * self.cfg.ingest.max_inflight:
            self.counters.stats_dropped += 1  # stats (QoS 0) while the database is behind: perishable
            return
        self._q.put(_Msg(self._epoch, msg.mid, msg.qos, msg.topic, msg.payload, ct, time.time()))

    # -- logging -----------------------------------------------------------------------------------

    def _log_once(self, kind: str, msg: str, level: int = logging.WARNING, **kw) -> None:
        if kind in self._once:
            return
        self._once.add(kind)
        log.log(level, msg, extra=_fields(kind=kind, **kw))

    def _clear_once(self, kind: str) -> bool:
        if kind in self._once:
            self._once.discard(kind)
            return True
        return False

    # -- database ----------------------------------------------------------------------------------

    def _open_store(self) -> bool:
        """Connect, trying again with jittered backoff until it works (True) or we stop."""
        delay = self.cfg.database.reconnect_min_s
        while not self.stopping.is_set():
            try:
                self.store.open()
                if self._clear_once("db_down"):
                    log.info("the database is back", extra=_fields(database=_db_target(self.cfg.database.url)))
                return True
            except store.StoreDown as exc:
                self._log_once("db_down", "cannot reach the database; not acknowledging until it is back",
                               database=_db_target(self.cfg.database.url), error=str(exc))
            self.stopping.wait(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.cfg.database.reconnect_max_s)
        return False

    def _commit(self, results, rejected, news, dups) -> store.Outcome | None:
        """Write one batch, retrying on database faults until it commits (or we stop: None)."""
        delay = self.cfg.database.reconnect_min_s
        while True:
            if not self.store.is_open and not self._open_store():
                return None
            try:
                t0 = time.perf_counter()
                # Samples first, in their own transaction: written again on a retry they are
                # skipped as already stored, whereas results written twice would count duplicates.
                self.counters.samples += self._write_samples(rejected)
                self._samples = []
                if self._answers:
                    self.store.resend_answered(self._answers)
                    self.counters.resend_replies += len(self._answers)
                    self.counters.resend_gone += sum(b - a + 1 for x in self._answers for a, b in x.gone)
                    if any(x.later for x in self._answers):  # the device capped a request: ask again soon
                        self._next_resend = min(self._next_resend, time.monotonic() + 5 + 5 * random.random())
                    self._answers = []
                try:
                    out = self.store.write(results, rejected, news, dups)
                except store.StoreRefused:
                    out = self._write_apart(results, rejected, news, dups)
                self.counters.commit_s += time.perf_counter() - t0
                return out
            except store.StoreDown as exc:
                self.counters.db_failures += 1
                self._log_once("db_down", "lost the database; not acknowledging until it is back",
                               database=_db_target(self.cfg.database.url), error=str(exc))
                self.store.close()
                if self.stopping.wait(delay * (0.5 + random.random() / 2)):
                    return None
                delay = min(delay * 2, self.cfg.database.reconnect_max_s)

    def _write_samples(self, rejected: list) -> int:
        """The batch's samples; one the database refuses becomes a rejected row (in `rejected`)."""
        samples = getattr(self, "_samples", [])
        try:
            return self.store.write_samples(samples)
        except store.StoreRefused:
            pass
        new = 0
        for s in samples:
            try:
                new += self.store.write_samples([s])
            except store.StoreRefused as exc:
                m = self._sample_origin[(s.device_id, s.sample_id)]
                rejected.append(self._reject(m, s.device_id, Reject("refused", f"the database refused it: {exc}")))
        return new

    def _write_apart(self, results, rejected, news, dups) -> store.Outcome:
        """The database refused something in the batch: write its results one at a time, turn
        the refused ones into rejected rows, then the rest of the batch. Slow, and rare."""
        out = store.Outcome()
        rejected = list(rejected)
        for r in results:
            try:
                one = self.store.write([r], [], {}, {})
            except store.StoreRefused as exc:
                m = self._origin[(r.device_id, r.seq)]
                rejected.append(self._reject(m, r.device_id, Reject("refused", f"the database refused it: {exc}")))
                continue
            out.stored += one.stored
            out.keys |= one.keys
            for d, n in one.duplicates.items():
                out.duplicates[d] = out.duplicates.get(d, 0) + n
        try:
            rest = self.store.write([], rejected, news, dups)
        except store.StoreRefused as exc:  # not a result's fault: the schema is not ours
            raise store.StoreError(f"the database refused a batch without results: {exc}") from None
        out.rejected = rest.rejected
        for d, n in rest.duplicates.items():
            out.duplicates[d] = out.duplicates.get(d, 0) + n
        return out

    def _maintain(self) -> None:
        if not self.store.is_open or time.monotonic() < self._next_retention:
            return
        try:
            dropped = self.store.maintain(self.cfg.database.retention_days, time.time())
            for name in dropped:
                log.info("dropped results past the retention", extra=_fields(
                    what=name, retention_days=self.cfg.database.retention_days))
            self._next_retention = time.monotonic() + 3600
        except store.StoreDown:
            self._next_retention = time.monotonic() + 10  # the next batch reconnects

    # -- the writer loop (main thread) -------------------------------------------------------------

    def _batch(self, limit: int | None = None) -> list[_Msg]:
        try:
            first = self._q.get(timeout=0.5)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.cfg.ingest.batch_delay_s
        most = self.cfg.ingest.batch_size if limit is None else min(limit, self.cfg.ingest.batch_size)
        while len(batch) < most:
            left = deadline - time.monotonic()
            try:
                batch.append(self._q.get(timeout=left) if left > 0 else self._q.get_nowait())
            except queue.Empty:
                break
        return batch

    def _split(self, batch: list[_Msg]):
        results: list[Result] = []
        self._origin = {}
        rejected: list[store.Rejected] = []
        news: dict[str, store.DeviceNews] = {}
        seen: set[tuple[str, int]] = set()
        self._samples: list[payloads.SampleRecord] = []
        self._sample_origin: dict[tuple[str, int], _Msg] = {}
        dup_in_batch: dict[str, int] = {}
        now = time.time()
        limit = self.cfg.ingest.max_payload_bytes
        for m in batch:
            rest = m.topic[len(self._prefix):] if m.topic.startswith(self._prefix) else ""
            device, _, leaf = rest.partition("/")
            if leaf == "response" and self.resend and payloads._ID_RE.match(device):
                # Devices' replies to commands (anyone's): only resend replies are read; nothing
                # here is a result, so nothing goes to `rejected`.
                got = payloads.resend_answer(m.payload, self.cfg.ingest.max_payload_bytes)
                if got is not None and (got[0] or got[1]):
                    self._answers.append(store.ResendAnswer(device, *got))
                continue
            if not payloads._ID_RE.match(device) or leaf not in (*RESULT_LEAVES, "stats", "status", SAMPLE_LEAF):
                rejected.append(self._reject(m, None, Reject("bad_topic", f"not a result topic: {m.topic[:200]}")))
                continue
            if leaf == "status":
                text = m.payload.decode("utf-8", "replace")
                if text in ("online", "offline"):
                    news.setdefault(device, store.DeviceNews()).status = text
                else:
                    rejected.append(self._reject(m, device, Reject("invalid", f"status: expected online or offline, got {text[:40]!r}")))
                continue
            if leaf == SAMPLE_LEAF:
                got = payloads.parse_sample(device, m.payload, m.content_type, now=now,
                                            max_bytes=self.cfg.ingest.max_sample_bytes)
                if isinstance(got, Reject):
                    rejected.append(self._reject(m, device, got))
                elif (got.device_id, got.sample_id) not in self._sample_origin:
                    self._samples.append(got)
                    self._sample_origin[(got.device_id, got.sample_id)] = m
                continue
            if leaf == "stats":
                got = _stats(m.payload, limit)
                if isinstance(got, Reject):
                    rejected.append(self._reject(m, device, got))
                else:
                    n = news.setdefault(device, store.DeviceNews())
                    if n.stats_ts is None or got[1] >= n.stats_ts:
                        n.stats, n.stats_ts = got
                continue
            r = payloads.parse(device, leaf, m.payload, m.content_type, now=now, max_bytes=limit)
            if isinstance(r, Reject):
                rejected.append(self._reject(m, device, r))
                continue
            key = (r.device_id, r.seq)
            if key in seen:  # delivered twice before the first copy was committed
                dup_in_batch[r.device_id] = dup_in_batch.get(r.device_id, 0) + 1
                continue
            seen.add(key)
            results.append(r)
            self._origin[key] = m
        return results, rejected, news, dup_in_batch

    def _reject(self, m: _Msg, device: str | None, r: Reject) -> store.Rejected:
        self._log_once(f"reject_{r.kind}", "rejected a payload (stored in the rejected table; "
                       "further ones of this kind are only counted)", topic=m.topic[:200], reason=r.reason)
        return store.Rejected(m.topic, device, r.kind, r.reason, m.payload[: self.cfg.ingest.max_payload_bytes],
                              len(m.payload))

    def _ack(self, batch: list[_Msg]) -> None:
        # A message from an earlier connection cannot be acknowledged on this one (its packet id
        # belongs to that connection): the broker delivers it again and it counts as a duplicate.
        # The lock keeps a disconnect (which starts a new epoch) from falling inside the loop.
        with self._epoch_lock:
            for m in batch:
                if m.qos and m.epoch == self._epoch:
                    self.client.ack(m.mid, m.qos)

    def step(self, limit: int | None = None) -> None:
        """Take one batch (at most `limit` messages, so at most that many results stored),
        commit it, acknowledge it."""
        batch = self._batch(limit)
        if batch:
            results, rejected, news, dup_in_batch = self._split(batch)
            out = self._commit(results, rejected, news, dup_in_batch)
            if out is None:
                return  # stopping with the batch uncommitted: the broker still has it
            if self.on_commit is not None:
                self.on_commit([r for r in results if (r.device_id, r.seq) in out.keys], rejected, out)
            self._ack(batch)
            c = self.counters
            c.received += len(batch)
            c.batches += 1
            c.stored += out.stored
            c.duplicates += sum(out.duplicates.values())
            c.rejected += out.rejected
        self._maintain()
        if time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + self.cfg.ingest.stats_interval_s
            log.info("ingest stats", extra=_fields(**self.counters.line()))

    # -- resend ------------------------------------------------------------------------------------

    def _resend_loop(self) -> None:
        """The resend passes, on a thread with a database connection of its own: a pass reads a
        day of results, and the batches must not wait for it."""
        st = open_store(self.cfg.database.url, f"{self.cfg.client_id}-resend")
        try:
            while not self.stopping.wait(0.5):
                try:
                    self._resend_tick(st)
                except Exception as exc:  # noqa: BLE001 — a pass that fails is tried again later
                    self._log_once("resend_failed", "a resend pass failed; trying again later",
                                   level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
                    st.close()
                    self._next_resend = time.monotonic() + self.cfg.ingest.resend_interval_s
        finally:
            st.close()

    def _resend_tick(self, st) -> None:
        now = time.monotonic()
        ic = self.cfg.ingest
        if self._resend_soon:
            # After a (re)subscription: once the gaps of a broker restart are old enough; each
            # worker at its own moment within one more resend_after_s.
            self._resend_soon = False
            self._next_resend = min(self._next_resend, now + ic.resend_after_s * (1 + random.random()))
        if now < self._next_resend or not self._connected.is_set():
            return
        self._next_resend = now + ic.resend_interval_s * (0.5 + random.random())
        try:
            if not st.is_open:
                st.open()
            self.ask_resends(st)
            self._clear_once("resend_failed")
        except store.StoreDown:
            st.close()  # the writer says the database is down; try again soon
            self._next_resend = now + ic.resend_after_s

    def ask_resends(self, st=None, *, device: str | None = None, force: bool = False) -> list[tuple[str, list]]:
        """One pass: the gaps old enough to ask for, less what devices said they no longer hold,
        claimed in the database (by this worker alone) and asked for, at most 16 ranges per
        request (a device's limit). `force` (the operator's `--resend`) ignores the back-off,
        the attempt cap and the age. `st`: the store to use (default the writer's). Returns
        [(device, ranges)] asked."""
        st = st or self.store
        ic = self.cfg.ingest
        wall = time.time()
        gaps = st.resend_gaps(since=wall - ic.resend_window_s,
                                      settled=wall - (0 if force else ic.resend_after_s), device=device,
                                      limit=MAX_RESEND_GAPS)
        if not gaps:
            return []
        gone = st.gone_ranges(sorted({g[0] for g in gaps}))
        pieces = [(d, a, b) for d, f, l in gaps for a, b in store.subtract_ranges(f, l, gone.get(d, []))]
        claimed = st.claim_resends(pieces, base_s=ic.resend_after_s, cap_s=max(3600.0, ic.resend_after_s),
                                           attempts=ic.resend_attempts, force=force)
        per: dict[str, list] = {}
        self.sent = []
        for d, f, l, _asked in claimed:
            per.setdefault(d, []).append([f, l])
        asked = []
        for d in sorted(per):
            ranges = per[d]
            for i in range(0, len(ranges), MAX_RANGES):
                part = ranges[i:i + MAX_RANGES]
                body = json.dumps({"id": self.cfg.client_id, "ranges": part}, separators=(",", ":"))
                self.sent.append(self.client.publish(f"{self._prefix}{d}/cmd/resend", body.encode(), qos=1))
                self.counters.resend_requests += 1
                self.counters.resend_ranges += len(part)
                asked.append((d, part))
        if asked:
            log.info("asked devices to resend lost results", extra=_fields(
                devices=len(per), ranges=sum(len(r) for r in per.values()),
                seqs=sum(b - a + 1 for r in per.values() for a, b in r)))
        return asked

    def start(self) -> None:
        if not self._open_store():
            return
        self._maintain()
        m = self.cfg.mqtt
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=not self.persistent,
                                  properties=self._connect_props)
        self.client.loop_start()
        if self.resend:
            self._resend_thread = threading.Thread(target=self._resend_loop, name="resend", daemon=True)
            self._resend_thread.start()
        log.info("ingest worker started", extra=_fields(
            client_id=self.cfg.client_id, group=self.cfg.ingest.group,
            database=_db_target(self.cfg.database.url), batch_size=self.cfg.ingest.batch_size,
            batch_delay_s=self.cfg.ingest.batch_delay_s, max_inflight=self.cfg.ingest.max_inflight))

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe now, before the store is opened (so nothing is made when the
        broker cannot be reached), or raise ConnectionError saying why not. `step()` opens the
        store with the first batch; the broker's messages wait in the worker until then."""
        m = self.cfg.mqtt
        try:
            self.client.connect(m.host, m.port, keepalive=m.keepalive_s, clean_start=not self.persistent,
                                properties=self._connect_props)
        except OSError as exc:  # refused, unreachable, a TLS failure
            raise ConnectionError(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
        self.client.loop_start()
        if not self._answered.wait(timeout) or not self._subscribed.is_set():
            self.client.loop_stop()
            self.client.disconnect()
            raise ConnectionError(self.refusal or f"no answer to CONNECT/SUBSCRIBE within {timeout:g} s "
                                                  "(is it an MQTT broker?)")

    def alive(self) -> bool:
        """Whether paho's network thread is running (after start() or connect())."""
        thread = getattr(self.client, "_thread", None)
        return thread is not None and thread.is_alive()

    def run(self) -> None:
        self.start()
        while not self.stopping.is_set():
            self.step()
        self.close()

    def close(self) -> None:
        try:
            self.client.disconnect()  # with the network loop still running, so the last PUBACKs go out first
        except Exception:  # noqa: BLE001 — not connected
            pass
        self.client.loop_stop()
        self.stopping.set()
        thread = getattr(self, "_resend_thread", None)
        if thread is not None:
            thread.join(10)  # a pass in a long query is left to end with the process
        self.store.close()
        log.info("ingest worker stopped", extra=_fields(**self.counters.line()))


# At most this many gaps looked at per pass (the oldest devices first, by id), and so at most
# this many ranges asked for per pass.
MAX_RESEND_GAPS = 5000


def resend_now(cfg: IngestConfig, device: str | None, timeout: float = 10.0) -> int:
    """`edged ingest --resend`: one pass of asking, as a worker does it, but now and regardless
    of the back-off. Its own client id (the worker's with `-resend`), a clean session and no
    subscription: it never takes a running worker's place or share."""
    import sys
    from dataclasses import replace

    if device is not None and not payloads._ID_RE.match(device):
        raise _config.ConfigError([f"command line: --device: expected a device id (1 to 64 letters, digits, '-' "
                                   f"or '_'), got {device[:80]!r}"])
    own = replace(cfg, ingest=replace(cfg.ingest, client_id=f"{cfg.client_id[:57]}-resend", resend=True))
    w = Worker(own, persistent=False)
    w.topics = []  # asks only
    try:
        w.store.open()
    except store.StoreDown as exc:
        print(f"edged: cannot reach the database {_db_target(cfg.database.url)}: {exc}", file=sys.stderr)
        return 69
    try:
        m = cfg.mqtt
        try:
            w.client.connect(m.host, m.port, keepalive=m.keepalive_s, clean_start=True,
                             properties=w._connect_props)
        except OSError as exc:
            print(f"edged: cannot connect to the broker {m.host}:{m.port}: "
                  f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 69
        w.client.loop_start()
        if not w._connected.wait(timeout):
            print(f"edged: no answer from the broker {m.host}:{m.port} within {timeout:g} s"
                  + (f" ({w.refusal})" if w.refusal else ""), file=sys.stderr)
            return 69
        try:
            asked = w.ask_resends(device=device, force=True)
        except store.StoreDown as exc:
            print(f"edged: lost the database: {exc}", file=sys.stderr)
            return 69
        for info in w.sent:
            info.wait_for_publish(timeout)
        for d, ranges in asked:
            shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)
            print(f"{d}: asked for {sum(b - a + 1 for a, b in ranges)} results ({shown})")
        print(f"edged: {len(asked)} resend request(s) to {len({d for d, _ in asked})} device(s)", file=sys.stderr)
        return 0
    finally:
        w.stopping.set()
        w.client.disconnect()
        w.client.loop_stop()
        w.store.close()


def _stats(payload: bytes, limit: int):
    if len(payload) > limit:
        return Reject("too_large", f"stats payload of {len(payload)} bytes exceeds {limit}")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        return Reject("undecodable", f"stats: not valid JSON: {str(exc)[:120]}")
    if "\\u0000" in json.dumps(body):  # PostgreSQL's jsonb cannot hold a NUL character
        return Reject("invalid", "stats: a string holds a NUL character")
    ts = body.get("ts") if isinstance(body, dict) else None
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not payloads.TS_MIN <= ts < 1 << 33:
        return Reject("invalid", "stats: expected a JSON object with a ts")
    return body, float(ts)


def open_store(url: str, application_name: str):
    """The store a database URL names: PostgreSQL, or a SQLite file for one machine."""
    if url.startswith("sqlite:///"):
        from edged.cloud.sqlite_store import SqliteStore

        return SqliteStore(url)
    return store.PostgresStore(url, application_name)


def _fields(**kw) -> dict:
    return {"fields": kw}


def run_cli(args) -> int:
    """`edged ingest`: migrate, or run one worker until SIGTERM/Ctrl-C."""
    import sys

    try:
        return _run(args)
    except _config.ConfigError as exc:
        for line in exc.problems:
            print(f"edged: {line}", file=sys.stderr)
        return 2
    except store.StoreError as exc:  # not migrated, not a database: restarting will not help
        print(f"edged: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import sys

    from edged.service import log as edlog

    overrides = {dotted: getattr(args, flag) for flag, dotted in FLAGS.items()
                 if getattr(args, flag, None) is not None}
    path = args.config
    if path is None and DEFAULT_PATH.is_file():
        path = DEFAULT_PATH
    cfg = load(path, overrides)
    # --resend prints what it asked on stdout: its log lines go to stderr.
    edlog.setup(cfg.ingest.log_level, stream=sys.stderr if args.resend else None)
    if getattr(args, "device", None) is not None and not args.resend:
        raise _config.ConfigError(["command line: --device: only with --resend"])
    if args.migrate:
        st = open_store(cfg.database.url, cfg.client_id)
        try:
            applied = st.migrate(cfg.database.retention_days, time.time())
        except store.StoreDown as exc:
            print(f"edged: cannot reach the database {_db_target(cfg.database.url)}: {exc}", file=sys.stderr)
            return 69
        finally:
            st.close()
        print(f"edged: database {_db_target(cfg.database.url)}: schema up to date"
              + (f" (applied {', '.join(applied)})" if applied else ""))
        return 0
    if args.resend:
        return resend_now(cfg, args.device)
    worker = Worker(cfg)

    def stop(signum, frame) -> None:
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    except store.StoreError as exc:
        worker.stopping.set()
        worker.close()
        print(f"edged: {exc}", file=sys.stderr)
        return 2
    return 0

