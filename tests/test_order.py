"""Order across dropped connections: results reach a subscriber in seq order — the only step
back is a re-send of what was unacknowledged when the link dropped (docs/mqtt.md, Delivery).
The real daemon and mosquitto, with a loopback TCP proxy between them that goes quiet and then
drops the connection, so what was in flight is lost and must be re-sent."""

from __future__ import annotations


import pytest

from conftest import Arrivals, last_seq, wait_until, write_config
from harness import TcpProxy

FAST = "[camera]\nfps = 5\n[imu]\nspeed = 40\n[stats]\ninterval_s = 1\n"


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
