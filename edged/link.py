"""The MQTT link: one paho-mqtt v2 client that drains the outbox to the broker at QoS 1.

- Birth and last will: `<prefix>/<device>/status` is retained `online` on every connect, the
  broker publishes the retained will `offline` if the link dies, and a clean stop publishes
  `offline` itself.
- Draining: rows are handed to paho in seq order with at most `max_inflight` unacknowledged;
  a row is deleted from the outbox only after its PUBACK. Across a reconnect paho re-sends what
  was in flight (with DUP set), so the drain only moves forward; after a daemon restart it starts
  again from the oldest row still stored (at-least-once: a subscriber may see a duplicate seq,
  never a gap that the outbox did not count as dropped).
- The broker being down is normal: paho reconnects with exponential backoff between
  `reconnect_min_s` and `reconnect_max_s`, and the outbox spools meanwhile.
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time

import paho.mqtt.client as mqtt

from edged.config import Config
from edged.log import Once, fields
from edged.outbox import Outbox

log = logging.getLogger("edged.mqtt")

ONLINE = b"online"
OFFLINE = b"offline"


class Link:
    def __init__(self, cfg: Config, outbox: Outbox, *, on_turn=None) -> None:
        self.cfg = cfg
        self._on_turn = on_turn or (lambda: None)  # called every drain-loop turn (watchdog)
        self.outbox = outbox
        m = cfg.mqtt
        self.broker = f"{m.host}:{m.port}"
        self.status_topic = cfg.topic("status")
        self.window = m.max_inflight
        self.connected = threading.Event()
        self.published = 0          # rows acknowledged by the broker (this run)
        self.bytes_sent = 0         # payload bytes acknowledged by the broker (this run)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked_mids: collections.deque[int] = collections.deque()
        self._inflight: dict[int, tuple[int, int]] = {}  # mid -> (seq, payload bytes)
        self._last_sent = 0
        self._once = Once(log)
        self._thread: threading.Thread | None = None

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=m.client_id or f"edged-{cfg.device_id}",
                        protocol=mqtt.MQTTv311, clean_session=True)
        if m.username:
            c.username_pw_set(m.username, m.password or None)
        if m.tls or m.ca_file:
            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None,
                      keyfile=m.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        c.reconnect_delay_set(min_delay=max(1, round(m.reconnect_min_s)), max_delay=max(1, round(m.reconnect_max_s)))
        c.max_inflight_messages_set(self.window)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        m = self.cfg.mqtt
        log.info("connecting", extra=fields(broker=self.broker, client_id=self.client._client_id.decode()))
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
            self._thread.join(timeout)
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

    def publish_now(self, leaf: str, payload: bytes) -> bool:
        """Publish something that is not worth spooling (stats): now, or not at all."""
        if not self.connected.is_set():
            return False
        self.client.publish(self.cfg.topic(leaf), payload, qos=0)
        return True

    # -- paho callbacks (run on paho's network thread) ----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._once("connect-refused", "broker refused the connection; retrying",
                       broker=self.broker, reason=str(reason_code))
            return
        self._once.clear("connect-refused")
        self._once.clear("unreachable")
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self.connected.set()
        self._wake.set()
        log.info("connected", extra=fields(broker=self.broker, spooled=self.outbox.depth))

    def _on_connect_fail(self, client, userdata) -> None:
        self._once("unreachable", "broker unreachable; results are spooled in the outbox until it is back",
                   broker=self.broker, outbox=str(self.outbox.path))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stop.is_set():
            log.warning("connection lost; spooling and reconnecting",
                        extra=fields(broker=self.broker, reason=str(reason_code)))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        # Never take our own locks here: paho holds its message lock while calling this.
        self._acked_mids.append(mid)
        self._wake.set()

    # -- drain thread ---------------------------------------------------------------------------

    def _collect_acks(self) -> None:
        done = []
        while self._acked_mids:
            mid = self._acked_mids.popleft()
            hit = self._inflight.pop(mid, None)
            if hit is not None:
                done.append(hit[0])
                self.bytes_sent += hit[1]
        if done:
            self.outbox.delete(done)
            self.published += len(done)

    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            self._on_turn()
            self._collect_acks()
            if not self.connected.is_set():
                continue
            room = self.window - len(self._inflight)
            if room <= 0:
                continue
            for row in self.outbox.pending(self._last_sent, room):
                info = self.client.publish(row.topic, row.payload, qos=1)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    self._once("publish-error", "publish failed; will retry", rc=mqtt.error_string(info.rc))
                    break
                self._inflight[info.mid] = (row.seq, len(row.payload))
                self._last_sent = row.seq
            else:
                continue
            time.sleep(0.1)
