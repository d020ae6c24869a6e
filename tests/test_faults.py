"""Fault tests: the real daemon process and a real mosquitto on loopback, each bounded in time.

For each fault: results produced (the outbox's seq counter) against results received by the
receiving end (`Collector`: the ingest worker on SQLite), duplicates, gaps, and the drop
counter — all asserted.
"""

from __future__ import annotations

import os
import random
import signal
import time

from conftest import FAST, Broker, last_seq, outbox_meta, wait_for_fresh_results, wait_until, write_config
from edged.cloud.subscriber import Collector



def dropped(state) -> int:
    return outbox_meta(state, "dropped")


def account(col: Collector, state, *, device: str = "test-dev") -> dict:
    """Produced vs received for one device, after the daemon has stopped."""
    last = last_seq(state)
    got = col.seqs(device)
    s = col.summary().get(device, {"duplicates": 0})
    return {"produced": last, "received": len(got), "missing": sorted(set(range(1, last + 1)) - got),
            "duplicates": s["duplicates"], "dropped": dropped(state)}


# Each outage lasts this long at least: several reconnect attempts (backoff at most 2 s here),
# so "once per outage, not per retry" is tested; and until the daemon has spooled 20 results.
OUTAGE_S = 10.0


def test_broker_down_three_times_while_results_flow(tmp_path, daemon_factory):
    broker = Broker(tmp_path, persistent=True).start()
    col = Collector(broker.host, broker.port, client_id="cloud", persistent=True).start()
    state = tmp_path / "state"
    d = daemon_factory(write_config(tmp_path / "edged.toml", broker, extra=FAST)).start()
    try:
        for outage in range(3):
            assert wait_for_fresh_results(state, lambda: max(col.seqs("test-dev"), default=0)), d.output()
            broker.stop()
            before, down = last_seq(state), time.monotonic()
            assert wait_until(lambda: last_seq(state) > before + 20 and time.monotonic() - down >= OUTAGE_S,
                              120), "the daemon kept producing during the outage"
            assert d.proc.poll() is None
            broker.start()
        assert wait_until(lambda: last_seq(state) - max(col.seqs("test-dev"), default=0) < 5, 60), d.output()
        assert d.stop() == 0, d.output()[-3000:]
        acc = account(col, state)
        assert wait_until(lambda: not account(col, state)["missing"], 30), acc
        acc = account(col, state)
        assert acc["missing"] == [] and acc["dropped"] == 0, acc
        assert d.output().count("connection lost") == 3
        assert d.output().count("cannot connect to the broker") <= 3  # once per outage, not per retry
    finally:
        col.stop()
        broker.stop()


def test_sigkill_at_random_points_twenty_times(tmp_path, broker, daemon_factory):
    rng = random.Random(20261124)
    col = Collector(broker.host, broker.port).start()
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    state = tmp_path / "state"
    try:
        for _ in range(20):
            d = daemon_factory(cfg).start()
            assert wait_until(lambda: "msg=ready" in d.output(), 30), d.output()
            time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-batch, mid-publish, mid-ack
            d.signal(signal.SIGKILL)
            d.wait(10)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: "msg=ready" in d.output(), 30), d.output()
        assert wait_until(lambda: set(range(1, last_seq(state) + 1)) <= col.seqs("test-dev"), 60), d.output()
        assert d.stop() == 0, d.output()[-3000:]
        assert wait_until(lambda: not account(col, state)["missing"], 30)
        acc = account(col, state)
        assert acc["missing"] == [] and acc["dropped"] == 0 and acc["produced"] > 20, acc
        # Redelivery after a kill is allowed (at-least-once) and bounded by the in-flight window.
        assert acc["duplicates"] <= 20 * 32
        assert max(col.seqs("test-dev")) == acc["produced"]
    finally:
        col.stop()


def test_outbox_on_a_full_disk_drops_by_policy_and_counts(tmp_path, daemon_factory):
    # A 96 KiB cap on the database file stands in for a nearly full SD card: SQLite reports
    # SQLITE_FULL exactly as it does when the filesystem has no room left.
    broker = Broker(tmp_path, persistent=True).start()
    col = Collector(broker.host, broker.port, client_id="cloud", persistent=True).start()
    broker.stop()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", broker,
                       extra=FAST.replace("fps = 5", "fps = 60") + "[outbox]\nmax_file_bytes = 98304\n")
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: dropped(state) > 0, 120), d.output()
        time.sleep(1)
        assert d.proc.poll() is None, "the daemon keeps running on a full disk"
        assert "outbox storage full" in d.output()
        assert d.output().count("outbox storage full") == 1
        assert (state / "outbox.db").stat().st_size <= 98304
        # Until the broker is back nothing is delivered, so what was dropped by then is a run
        # of the oldest. After it, the file stays at its cap for a moment while 60 results a
        # second still arrive, and the oldest rows not yet sent may go too: counted the same.
        before = dropped(state)
        broker.start()
        assert wait_until(lambda: last_seq(state) - max(col.seqs("test-dev"), default=0) < 5, 60), d.output()
        assert d.stop() == 0, d.output()[-3000:]
        assert wait_until(lambda: len(account(col, state)["missing"]) == account(col, state)["dropped"], 30), \
            {k: v if k != "missing" else (len(v), v[:3], v[-3:]) for k, v in account(col, state).items()}
        acc = account(col, state)
        # Every result is either received or counted as dropped, and those dropped while the
        # broker was down are the oldest.
        assert before > 0 and acc["missing"][:before] == list(range(1, before + 1)), acc
        assert len(acc["missing"]) == acc["dropped"] >= before, acc
    finally:
        col.stop()
        broker.stop()


def test_corrupt_outbox_at_start_is_moved_aside(tmp_path, broker, daemon_factory):
    col = Collector(broker.host, broker.port).start()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    d = daemon_factory(cfg).start()
    try:
        assert wait_until(lambda: len(col.seqs("test-dev")) >= 5, 60), d.output()
        assert d.stop() == 0, d.output()[-3000:]
        before = max(col.seqs("test-dev"))
        size = (state / "outbox.db").stat().st_size
        with open(state / "outbox.db", "r+b") as fh:  # a torn write over the header
            fh.write(os.urandom(min(size, 4096)))
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: max(col.seqs("test-dev")) > before + 3, 60), d.output()
        out = d.output()
        assert "outbox file corrupt; moved aside, starting a fresh outbox" in out
        assert "Traceback" not in out
        assert [p for p in state.iterdir() if ".corrupt-" in p.name]
        assert min(s for s in col.seqs("test-dev") if s > before) > before  # seq never goes back
        assert d.stop() == 0, d.output()[-3000:]
    finally:
        col.stop()
