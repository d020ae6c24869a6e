"""Order across dropped connections: results reach a subscriber in seq order — the only step
back is a re-send of what was unacknowledged when the link dropped (docs/mqtt.md, Delivery).
The real daemon and mosquitto, with a loopback TCP proxy between them that goes quiet and then
drops the connection, so what was in flight is lost and must be re-sent."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from conftest import last_seq, wait_until, write_config
from edged.delivery.codec import decode
from harness import TcpProxy

FAST = "[camera]\nfps = 5\n[imu]\nspeed = 40\n[stats]\ninterval_s = 1\n"


class Arrivals:
    """Every result's seq in the order it arrives, from a client connected straight to the broker."""

    def __init__(self, broker) -> None:
        self.seqs: list[int] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.subscribe([("edged/test-dev/events", 1), ("edged/test-dev/detections", 1), ("edged/test-dev/motion", 1)])
        c.loop_start()
        assert ready.wait(10)
        self.c = c

    def _on_message(self, client, userdata, m) -> None:
        with self._lock:
            self.seqs.append(int(decode(m.payload)["seq"]))

    def newest(self) -> int:
        with self._lock:
            return max(self.seqs, default=0)

    def late_firsts(self) -> list[tuple[int, int]]:
        """(seq, newest before it) for every seq that arrived for the first time after a higher one."""
        seen: set[int] = set()
        top, late = 0, []
        with self._lock:
            for s in self.seqs:
                if s not in seen and s < top:
                    late.append((s, top))
                seen.add(s)
                top = max(top, s)
        return late

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.parametrize("codec, protocol", [("json", "5"), ("cbor", "3.1.1")])
def test_results_arrive_in_seq_order_across_dropped_connections(tmp_path, broker, daemon_factory, codec, protocol):
    proxy = TcpProxy(broker.host, broker.port)
    got = Arrivals(broker)
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", proxy, extra=FAST,
                       mqtt=f'codec = "{codec}"\nprotocol = "{protocol}"\nreconnect_min_s = 0.2\n')
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: got.newest() > 10, 60), d.output()
        for cut in range(6):
            # The network goes quiet: a few publishes stay in flight (fewer than the window, so
            # the drain has room for new rows at the reconnect), then the connection drops.
            proxy.hold(True)
            mark = last_seq(state)
            assert wait_until(lambda: last_seq(state) > mark + 4, 60), d.output()
            proxy.cut()
            proxy.hold(False)
            newest = last_seq(state)
            assert wait_until(lambda: got.newest() > newest + 5, 60), (cut, d.output()[-2000:])
        assert proxy.connections >= 7
        assert d.stop() == 0
        produced = last_seq(state)
        assert wait_until(lambda: set(range(1, produced + 1)) <= set(got.seqs), 30)
        assert got.late_firsts() == []
    finally:
        d.kill()
        got.close()
        proxy.close()
