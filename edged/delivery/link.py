"""The MQTT link: one paho-mqtt v2 client that drains the outbox to the broker at QoS 1.

- Birth and last will: `<prefix>/<device>/status` is retained `online` on every connect, the
  broker publishes the retained will `offline` if the link dies, and a clean stop publishes
  `offline` itself.
- Draining: rows are handed to paho in seq order with at most `max_inflight` unacknowledged;
  a row is deleted from the outbox only after its PUBACK. Across a reconnect paho re-sends what
  was in flight (with DUP set), so the drain only moves forward; after a daemon restart it starts
  again from the oldest row still stored (at-least-once: a subscriber may see a duplicate seq,
  never a gap that the outbox did not count as dropped).
- MQTT 5 by default: a session that outlives reconnects (`session_expiry_s`), results that expire
  on the broker after `message_expiry_s`, a content type on every result. MQTT 3.1.1 on request.
- The broker being down is normal: reconnects back off exponentially with jitter between
  `reconnect_min_s` and `reconnect_max_s`, the outbox spools meanwhile, and each distinct
  failure (refused, unreachable, certificate expired, client certificate rejected, …) is logged
  once, in words, until the link is up again.
"""

from __future__ import annotations

import collections
import logging
import random
import socket
import ssl
import sys
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config import Config
from edged.service.log import Once, fields
from edged.delivery.outbox import Outbox

log = logging.getLogger("edged.mqtt")

ONLINE = b"online"
OFFLINE = b"offline"
# Publishes that are not outbox rows (status, stats, discovery, replies) get this much room in
# paho's own in-flight window on top of the drain window, so they never queue behind it, nor
# results behind them. Home Assistant discovery is the largest burst: with the default vision
# chain 17 entities, with 20 labels and commands up to about 60 (status, then discovery, at once).
_SIDE_WINDOW = 64
# Samples (edged.delivery.samples) unacknowledged at once: one, so that a result written while a
# sample is on its way goes out behind at most that one sample.
SAMPLE_WINDOW = 1
# A TCP connection without a CONNACK this long: something that is not an MQTT broker holds the port.
CONNACK_WAIT_S = 10.0
# How long stop() waits for the drain thread to finish its turn (it ends at the next loop check).
DRAIN_JOIN_S = 5.0


class Link:
    def __init__(self, cfg: Config, outbox: Outbox, *, content_type: str = "application/json",
                 on_turn: Callable[[], None] | None = None,
                 on_connected: Callable[["Link"], None] | None = None,
                 on_command: Callable[[str, bytes, object], None] | None = None,
                 on_announce: Callable[[], None] | None = None,
                 samples=None, command_names: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.samples = samples                         # edged.delivery.samples.SampleQueue, or None
        self._on_turn = on_turn or (lambda: None)      # every drain-loop turn (watchdog)
        self._on_connected = on_connected              # after each connect (discovery, …)
        self._on_command = on_command                  # messages under <prefix>/<device>/cmd/
        self._command_names = command_names            # subscribe to these cmd/ leaves only (None: all)
        self._on_announce = on_announce                # a message on the fleet's announce topic
        m = cfg.mqtt
        self.broker = f"{m.host}:{m.port}"
        self.status_topic = cfg.topic("status")
        self.cmd_prefix = cfg.topic("cmd/")
        # Read, never written: the device publishes only under its own <prefix>/<device_id>/.
        self.announce_topic = cfg.fleet_topic("release")
        self.v5 = m.protocol == "5"
        self.window = m.max_inflight
        self.connected = threading.Event()
        self.published = 0          # rows acknowledged by the broker (this run)
        self.bytes_sent = 0         # payload bytes acknowledged by the broker (this run)
        self.rejected = 0           # rows the broker refused in its PUBACK (MQTT 5 reason ≥ 0x80)
        self.bad_messages = 0       # messages from the broker that could not even be queued
        self.samples_sent = 0       # samples acknowledged by the broker (this run)
        self.sample_bytes_sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked: collections.deque[tuple[int, bool]] = collections.deque()  # (mid, accepted)
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (seq, payload bytes)
        self._last_sent = 0
        self._rewind: int | None = None      # a resend put rows back from this seq on (any thread)
        self._rewind_lock = threading.Lock()
        self._to_delete: list[int] = []      # acknowledged seqs the outbox has yet to forget
        self._sample_inflight: dict[int, tuple[int, int]] = {}  # mid -> (sample id, payload bytes)
        self._last_sample = 0
        self._samples_to_delete: list[int] = []
        self._barrier: set[int] = set()      # mids in flight at a reconnect, not yet re-acked
        self._barrier_until = 0.0
        self._connects = 0                   # incremented by each connect (paho's thread)
        self._connects_seen = 0
        self.drain_errors = 0
        self._once = Once(log)
        self._last_error: str | None = None
        self._attempt = 0
        self._tcp_since: tuple[int, float] | None = None  # (id of paho's socket, when first seen)
        self._thread: threading.Thread | None = None
        self._rng = random.Random()

        if self.v5:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.client_id or f"edged-{cfg.device_id}",
                            protocol=mqtt.MQTTv5)
            self._result_props = Properties(PacketTypes.PUBLISH)
            self._result_props.ContentType = content_type
            if m.message_expiry_s:
                self._result_props.MessageExpiryInterval = m.message_expiry_s
        else:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.client_id or f"edged-{cfg.device_id}",
                            protocol=mqtt.MQTTv311, clean_session=True)
            self._result_props = None
        if m.username:
            c.username_pw_set(m.username, m.password or None)
        if m.tls or m.ca_file:
            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None,
                      keyfile=m.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        c.max_inflight_messages_set(self.window + _SIDE_WINDOW + SAMPLE_WINDOW)
        self.client = c
        self._next_delay()  # sets paho's first reconnect delay
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_log = self._on_log

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        m = self.cfg.mqtt
        log.info("connecting", extra=fields(broker=self.broker, protocol=m.protocol,
                                            tls=bool(m.tls or m.ca_file), client_id=self.client._client_id.decode()))
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = m.session_expiry_s
            self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=False,
                                      properties=props)
        else:
            self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._drain_loop, name="mqtt-drain", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New rows are in the outbox."""
        self._wake.set()

    def stop(self, timeout: float = 1.0, *, say_offline: bool = True) -> None:
        """Say `offline`, stop draining, disconnect. Unacknowledged rows stay in the outbox.
        A reload that keeps the device id passes say_offline=False: it is back in a moment."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            # The drain thread owns the in-flight table and reads the outbox: it must be out of
            # its turn before the acks are collected here and the outbox is closed after. A turn
            # is short local work, which a loaded machine can stretch past `timeout`.
            self._thread.join(max(timeout, DRAIN_JOIN_S))
        self._collect_acks()
        if self.connected.is_set() and say_offline:
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
            self._collect_acks()
        self.client.disconnect()
        self.client.loop_stop()
        log.info("disconnected", extra=fields(broker=self.broker, unsent=self.outbox.depth))

    def rewind(self, seq: int) -> None:
        """Rows from `seq` on were put back into the outbox (a resend): drain them again."""
        with self._rewind_lock:
            self._rewind = seq if self._rewind is None else min(self._rewind, seq)
        self._wake.set()

    def publish_now(self, leaf: str, payload: bytes, *, qos: int = 0, retain: bool = False,
                    topic: str | None = None, properties: Properties | None = None) -> bool:
        """Publish something that is not worth spooling (stats, discovery, replies): now, or not
        at all."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic or self.cfg.topic(leaf), payload, qos=qos, retain=retain,
                                   properties=properties if self.v5 else None)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    # -- reconnect backoff ------------------------------------------------------------------

    def _next_delay(self) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random, capped; many devices
        that lost the same broker do not all come back in the same second."""
        m = self.cfg.mqtt
        base = min(m.reconnect_max_s, m.reconnect_min_s * (2 ** min(self._attempt, 30)))
        delay = base / 2 + self._rng.uniform(0, base / 2)
        delay = max(min(delay, m.reconnect_max_s), min(m.reconnect_min_s, m.reconnect_max_s) / 2)
        self._attempt += 1
        # paho waits min(previous * 2, max) after the first failure; pinning min = max makes it
        # wait exactly our delay.
        self.client.reconnect_delay_set(min_delay=delay, max_delay=delay)
        return delay

    # -- paho callbacks (run on paho's network thread) ----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._fail("refused", f"broker refused the connection: {reason_code}")
            self._next_delay()
            return
        for kind in ("refused", "error", "no-connack"):
            self._once.clear(kind)
        self._attempt = 0
        self._next_delay()
        _no_delay(client.socket())
        # What was in flight when the connection dropped: paho re-sends it after this callback.
        # The drain thread (which owns the in-flight table) holds new rows back until it is
        # acknowledged: see _drain_turn.
        self._connects += 1
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        if self._on_command is not None:
            if self._command_names is None:
                client.subscribe(self.cmd_prefix + "+", qos=1)
            else:
                client.subscribe([(self.cmd_prefix + name, 1) for name in self._command_names])
        if self._on_announce is not None:
            client.subscribe(self.announce_topic, qos=1)
        self.connected.set()
        self._wake.set()
        log.info("connected", extra=fields(broker=self.broker, spooled=self.outbox.depth,
                                           session_present=bool(flags.session_present)))
        if self._on_connected:
            try:
                self._on_connected(self)
            except Exception as exc:  # on paho's thread: an exception here would end it
                self._once("on-connected", "after-connect announcements failed",
                           level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its `except OSError:` block, so the error is at hand.
        exc = sys.exc_info()[1]
        tls = bool(self.cfg.mqtt.tls or self.cfg.mqtt.ca_file)
        self._fail("error", describe_error(exc, tls=tls) if exc else (self._last_error or "connection failed"))
        self._next_delay()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if self._stop.is_set():
            return
        if was:
            why = describe_error_text(self._last_error) if self._last_error else str(reason_code)
            log.warning("connection lost; spooling and reconnecting",
                        extra=fields(broker=self.broker, reason=why))
        elif self._last_error:
            # Dropped before CONNACK, past the TLS handshake: typically the broker rejecting our
            # client certificate, or the lack of one.
            m = self.cfg.mqtt
            self._fail("error", describe_drop_before_connack(self._last_error, tls=bool(m.tls or m.ca_file),
                                                             client_cert=bool(m.cert_file)))
        self._last_error = None
        self._next_delay()

    def _fail(self, kind: str, text: str) -> None:
        self._once(kind, "cannot connect to the broker; results are spooled in the outbox until it "
                   "is back", broker=self.broker, error=text, outbox=str(self.outbox.path))

    def _on_log(self, client, userdata, level, buf) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self._last_error = buf

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Never take our own locks here: paho holds its message lock while calling this.
        self._acked.append((mid, not reason_code.is_failure))
        self._wake.set()

    def _on_message(self, client, userdata, msg) -> None:
        # On paho's network thread, which an exception would end: nothing from the broker may.
        try:
            topic = msg.topic
            if self._on_command is not None and topic.startswith(self.cmd_prefix):
                self._on_command(topic[len(self.cmd_prefix):], msg.payload, msg.properties)
            elif self._on_announce is not None and topic == self.announce_topic:
                self._on_announce()  # what it says is not read: it only prompts a verified check
        except Exception as exc:
            self.bad_messages += 1
            self._once("bad-message", "message from the broker ignored", error=f"{type(exc).__name__}: {exc}")

    # -- drain thread ---------------------------------------------------------------------------

    def _collect_acks(self) -> None:
        done = []
        while self._acked:
            mid, accepted = self._acked.popleft()
            hit = self._inflight.pop(mid, None)
            self._barrier.discard(mid)
            if hit is None:
                sample = self._sample_inflight.pop(mid, None)
                if sample is not None:
                    self._samples_to_delete.append(sample[0])
                    if accepted:
                        self.samples_sent += 1
                        self.sample_bytes_sent += sample[1]
                    else:
                        self._once("sample-rejected", "broker rejected a sample (check its ACL for "
                                   "<prefix>/<device_id>/sample)", id=sample[0])
                continue
            done.append(hit[0])
            if accepted:
                self.bytes_sent += hit[1]
                self.published += 1
            else:
                # The broker said no (e.g. not authorised for the topic): retrying cannot help
                # and would block everything behind it, so it is counted and let go.
                self.rejected += 1
                self._once("rejected", "broker rejected a result (check its ACL for this device)",
                           seq=hit[0])
        self._to_delete.extend(done)
        if self._to_delete:
            # Kept until the outbox takes them: a delete that fails (a full disk) is retried on
            # the next turn instead of being forgotten.
            self.outbox.delete(self._to_delete)
            self._to_delete = []
        if self._samples_to_delete and self.samples.delete(self._samples_to_delete, wait=False):
            self._samples_to_delete = []  # else kept for a later turn: results never wait on it

    def _drain_loop(self) -> None:
        """The drain thread: never ends before stop(). A turn that fails (the outbox cannot be
        written, …) is logged once and tried again with a growing pause, and the link recovers
        by itself when the cause goes away."""
        pause = 0.0
        while not self._stop.is_set():
            self._wake.wait(max(0.5, pause))
            self._wake.clear()
            try:
                self._on_turn()
                self._drain_turn()
            except Exception as exc:
                pause = min(5.0, max(0.5, pause * 2))
                self.drain_errors += 1
                self._once("drain", "outbox drain failed; retrying", level=logging.ERROR,
                           error=f"{type(exc).__name__}: {exc}", retry_s=pause)
                continue
            if pause:
                pause = 0.0
                self._once.clear("drain")
                log.info("outbox drain working again", extra=fields(depth=self.outbox.depth))

    def _drain_turn(self) -> None:
        self._collect_acks()
        if not self.connected.is_set():
            self._check_connack()
            return
        if self._connects != self._connects_seen:
            self._connects_seen = self._connects
            self._barrier = set(self._inflight)
            self._barrier_until = time.monotonic() + 2 * self.cfg.mqtt.keepalive_s
        if self._barrier:
            # Reconnected with results still unacknowledged: paho re-sends them first; new rows
            # wait until they are acknowledged, so no result overtakes an older one.
            if time.monotonic() < self._barrier_until:
                return
            self._once("barrier", "unacknowledged results were not re-sent in time; resuming",
                       level=logging.WARNING, waiting=len(self._barrier))
            self._barrier.clear()
        with self._rewind_lock:
            rewind, self._rewind = self._rewind, None
        if rewind is not None and rewind <= self._last_sent:
            self._last_sent = rewind - 1
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        # After a rewind, rows still in flight come round again: they are not sent twice.
        flying = {seq for seq, _ in self._inflight.values()}
        for row in self.outbox.pending(self._last_sent, room):
            if self._connects != self._connects_seen:
                break  # reconnected meanwhile: the next turn sets the barrier first
            if row.seq in flying:
                self._last_sent = row.seq  # sent already, and not yet acknowledged
                continue
            info = self.client.publish(row.topic, row.payload, qos=1, properties=self._result_props)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._once("publish-error", "publish failed; will retry", rc=mqtt.error_string(info.rc))
                break
            self._inflight[info.mid] = (row.seq, len(row.payload))
            self._last_sent = row.seq
        self._drain_samples()

    def _drain_samples(self) -> None:
        """A sample goes out only when no result is waiting or in flight: the outbox is empty,
        nothing of it is unacknowledged, no re-send barrier holds. Then one at a time."""
        if (self.samples is None or self._sample_inflight or self._inflight or self._barrier
                or self.outbox.depth or not self.samples.depth):
            return
        for row in self.samples.pending(self._last_sample, SAMPLE_WINDOW, wait=False):
            info = self.client.publish(row.topic, row.payload, qos=1, properties=self._result_props)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._once("publish-error", "publish failed; will retry", rc=mqtt.error_string(info.rc))
                return
            self._sample_inflight[info.mid] = (row.id, len(row.payload))
            self._last_sample = row.id


    def _check_connack(self) -> None:
        """Say so when the broker's port takes the connection but never answers CONNECT: paho
        alone would wait for its keepalive to run out and then report only 'not connected'."""
        sock = self.client.socket()
        if sock is None:
            self._tcp_since = None
            return
        now = time.monotonic()
        if self._tcp_since is None or self._tcp_since[0] != id(sock):
            self._tcp_since = (id(sock), now)
        elif now - self._tcp_since[1] >= CONNACK_WAIT_S:
            self._fail("no-connack", f"{self.broker} accepts TCP connections but sent no MQTT CONNACK "
                       f"within {CONNACK_WAIT_S:g} s: is it an MQTT broker (or a TLS port while "
                       f"mqtt.tls = false)? edged doctor checks it")


def _no_delay(sock) -> None:
    """Send each packet as it is written. Under Nagle's algorithm a small packet written while
    an earlier one is unacknowledged waits for the broker's delayed TCP ACK, up to 40 ms."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (unix socket, websocket proxy): nothing to tune


def describe_error(exc: BaseException, *, tls: bool = False) -> str:
    """A connection error in words an operator can act on. `tls`: the link speaks TLS, so a
    peer that hangs up during the handshake is most likely not a TLS listener."""
    if tls and isinstance(exc, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError,
                                ssl.SSLZeroReturnError)) or tls and isinstance(exc, ssl.SSLError) \
            and "record layer failure" in str(exc).lower():
        return f"TLS handshake failed ({type(exc).__name__}: {exc}); is the port a TLS listener?"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        if "expired" in detail:
            return f"the broker's certificate has expired ({detail}); renew it on the broker"
        if "hostname" in detail.lower() or "IP address mismatch" in detail:
            return f"the broker's certificate does not match the host name ({detail}); check mqtt.host"
        return f"the broker's certificate is not trusted ({detail}); check mqtt.ca_file"
    if isinstance(exc, ssl.SSLError):
        return describe_error_text(str(exc))
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is the broker running and listening on this port?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the broker's host name ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out: the broker is unreachable from here (network, firewall?)"
    return f"{type(exc).__name__}: {exc}"


def describe_drop_before_connack(text: str, *, tls: bool, client_cert: bool) -> str:
    """The error of a connection the broker ended after the TLS handshake and before its CONNACK.

    A TLS 1.3 broker that requires a client certificate checks it after the client's side of the
    handshake is done, sends a "certificate required" alert and hangs up: whether the client
    reads the alert or only the hang-up (an EOF, a reset) depends on which comes first, its read
    or the close. With TLS, no client certificate set and such a hang-up, the broker is taken to
    require one; the handshake itself succeeded, so the port is a TLS listener."""
    low = text.lower()
    hung_up = any(k in low for k in ("eof occurred in violation of protocol", "unexpected eof",
                                     "connection reset", "broken pipe"))
    if tls and not client_cert and hung_up:
        return (f"the broker requires a client certificate, it seems: it ended the TLS connection "
                f"before answering ({text}) and none is set: set mqtt.cert_file and mqtt.key_file")
    return describe_error_text(text)


def describe_error_text(text: str) -> str:
    low = text.lower()
    if "certificate required" in low:
        return "the broker requires a client certificate: set mqtt.cert_file and mqtt.key_file"
    if "unknown ca" in low or "bad certificate" in low or "certificate unknown" in low:
        return "the broker rejected the client certificate (not signed by a CA it trusts)"
    if "certificate expired" in low:
        return "the broker rejected the client certificate: it has expired"
    if "wrong version number" in low or "unexpected eof" in low and "ssl" in low:
        return f"TLS handshake failed ({text}); is the port a TLS listener?"
    return text
