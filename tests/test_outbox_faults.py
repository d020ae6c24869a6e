"""The outbox when the disk or its file lets it down: a real full filesystem, a file it may not
read, a corrupt file, a database that was lost. The real daemon and mosquitto."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys

from conftest import (FAST, REPO, Broker, last_seq, outbox_meta, wait_for_fresh_results, wait_until,
                      without_dac_override, write_config)
from edged.cloud.subscriber import Collector
from edged.delivery.outbox import Outbox
from harness import TcpProxy

FLOOD = "[camera]\nfps = 30\n[imu]\nspeed = 200\n[stats]\ninterval_s = 1\n"


def rows_in(state) -> tuple[int, int, int]:
    """(count, min seq, max seq) of the rows stored, read-only."""
    db = sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True)
    try:
        n, lo, hi = db.execute("SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox").fetchone()
        return n, lo or 0, hi or 0
    finally:
        db.close()


# -- a real full filesystem -----------------------------------------------------------------------

def _fill(ob: Outbox, n: int, size: int = 200) -> None:
    pay = os.urandom(size // 2).hex().encode()
    for _ in range(n):
        ob.append([("t", lambda seq: pay)])


def test_outbox_on_a_real_full_filesystem_drops_oldest_and_recovers(small_fs):
    ob = Outbox(small_fs / "outbox.db")
    _fill(ob, 12000)
    assert ob.dropped > 0 and ob.write_errors > 0
    kept = ob.pending(0, 1 << 30)
    seqs = [r.seq for r in kept]
    # Drop-oldest: what is kept is exactly the newest, with no hole; and it is not a handful.
    assert seqs == list(range(ob.dropped + 1, 12001)), (seqs[:5], ob.dropped)
    assert len(seqs) > 1500, len(seqs)  # ~2 700 rows of 200 bytes in 1 MiB (measured)
    assert outbox_meta(small_fs, "dropped") == ob.dropped
    # Deleting works on the full disk; once drained, new rows are stored again.
    for i in range(0, len(seqs), 32):
        ob.delete(seqs[i:i + 32])
    assert ob.depth == 0
    _fill(ob, 300)
    assert [r.seq for r in ob.pending(0, 1000)] == list(range(12001, 12301))
    ob.close()


def test_daemon_on_a_full_filesystem_keeps_newest_and_drains_without_restart(tmp_path, broker, small_fs,
                                                                              daemon_factory):
    state = small_fs
    # The rest of the card is taken by other files: about 260 KiB are left for the outbox.
    st = os.statvfs(state)
    (state / "other-files").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (260 << 10)))
    proxy = TcpProxy(broker.host, broker.port)
    proxy.refuse(True)  # the broker is down
    col = Collector(broker.host, broker.port).start()
    d = daemon_factory(write_config(tmp_path / "edged.toml", proxy, extra=FLOOD)).start()
    try:
        assert wait_until(lambda: outbox_meta(state, "dropped") > 300, 240), d.output()[-3000:]
        assert d.proc.poll() is None
        n, lo, hi = rows_in(state)
        dropped = outbox_meta(state, "dropped")
        assert lo > dropped - 300, (n, lo, hi, dropped)  # the oldest went (more may go meanwhile)
        assert n > 50, (n, lo, hi)
        proxy.refuse(False)  # the broker is back
        # The drain survived the full disk: everything stored arrives, no restart needed.
        assert wait_until(lambda: last_seq(state) - max(col.seqs("test-dev"), default=0) < 10, 120), \
            d.output()[-3000:]
        assert wait_for_fresh_results(state, lambda: max(col.seqs("test-dev"), default=0))
        assert d.stop() == 0
        out = d.output()
        assert "outbox storage full" in out and "Traceback" not in out and "thread failed" not in out
        produced = last_seq(state)
        assert wait_until(lambda: len(set(range(1, produced + 1)) - col.seqs("test-dev"))
                          <= outbox_meta(state, "dropped"), 30)
        missing = sorted(set(range(1, produced + 1)) - col.seqs("test-dev"))
        # Every gap is counted, and the gaps are the oldest results: none after the first delivered.
        first = min(col.seqs("test-dev"))
        assert len(missing) <= outbox_meta(state, "dropped") and all(m < first for m in missing), \
            (len(missing), first, missing[-5:])
    finally:
        col.stop()
        proxy.close()


# -- a file it may not read ------------------------------------------------------------------------

def _run_once(cfg, timeout=120) -> subprocess.CompletedProcess:
    argv = without_dac_override([sys.executable, "-m", "edged", "run", "--config", str(cfg)])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_unreadable_outbox_is_left_alone_exit_69(tmp_path, broker, daemon_factory):
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    d = daemon_factory(cfg).start()
    assert wait_until(lambda: last_seq(state) > 3, 60), d.output()
    d.signal(signal.SIGKILL)  # rows, a WAL and all, as a crash leaves them
    d.wait(10)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()}
    os.chmod(state / "outbox.db", 0o000)
    try:
        r = _run_once(cfg)
    finally:
        os.chmod(state / "outbox.db", 0o600)
    out = r.stdout + r.stderr
    assert r.returncode == 69, out[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("edged:")]
    assert len(lines) == 1 and "outbox.db: permission denied" in lines[0] and "mode ----------" in lines[0], out
    assert "moved aside" not in out and "Traceback" not in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in state.iterdir()} == files


def test_unwritable_empty_state_dir_exit_69_nothing_moved(tmp_path, broker):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o555)
    try:
        r = _run_once(write_config(tmp_path / "edged.toml", broker, extra=FAST))
    finally:
        os.chmod(state, 0o755)
    assert r.returncode == 69, (r.stdout + r.stderr)[-3000:]
    assert f"{state}: the outbox directory is not writable by" in r.stderr and "mode dr-xr-xr-x" in r.stderr
    assert "moved aside" not in r.stdout + r.stderr and list(state.iterdir()) == []


# -- corrupt: moved aside, its readable rows salvaged ---------------------------------------------

def test_corrupt_outbox_rows_are_salvaged(tmp_path, daemon_factory):
    broker = Broker(tmp_path / "broker")
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST.replace("speed = 10", "speed = 100"))
    d = daemon_factory(cfg).start()  # the broker is down: everything stays in the outbox
    assert wait_until(lambda: last_seq(state) > 150, 120), d.output()
    assert d.stop() == 0
    stored = rows_in(state)
    db = state / "outbox.db"
    raw = bytearray(db.read_bytes())
    at = raw.find(b'"seq":75,')
    assert at > 0
    page = at // 4096
    raw[page * 4096:(page + 1) * 4096] = os.urandom(4096)  # one leaf page torn
    db.write_bytes(bytes(raw))
    broker.start()
    col = Collector(broker.host, broker.port).start()
    try:
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: "moved aside" in d.output(), 60), d.output()
        out = d.output()
        assert "outbox file corrupt; moved aside" in out and "Traceback" not in out
        salvaged = int(out.split("salvaged=")[1].split()[0])
        assert stored[0] * 0.5 < salvaged < stored[0], (salvaged, stored)
        got = wait_until(lambda: len([s for s in col.seqs("test-dev") if s <= stored[2]]) >= salvaged, 60)
        assert got, (len(col.seqs("test-dev")), salvaged)
        old = sorted(s for s in col.seqs("test-dev") if s <= stored[2])
        assert old[0] == 1 and old[-1] == stored[2] and 75 not in old  # both sides of the torn page
        # The new run's own results may come after the salvaged ones: waited for, then checked.
        assert wait_until(lambda: any(s > stored[2] for s in col.seqs("test-dev")), 60), d.output()
        assert min(s for s in col.seqs("test-dev") if s > stored[2]) == stored[2] + 1  # seq goes on
        assert d.stop() == 0
    finally:
        col.stop()
        broker.stop()


# -- lost database: seq never goes back ------------------------------------------------------------

def test_seq_never_goes_back_when_the_database_is_lost(tmp_path, broker, daemon_factory):
    col = Collector(broker.host, broker.port).start()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "edged.toml", broker, extra=FAST)
    try:
        # 1. Clean stop, then the file emptied (its WAL gone). (A file cut to less than a
        # page is not a database to SQLite: moved aside as corrupt, seq continuing the same way.)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: len(col.seqs("test-dev")) >= 5, 60), d.output()
        assert d.stop() == 0
        top = last_seq(state)
        assert wait_until(lambda: max(col.seqs("test-dev")) == top, 30)
        with open(state / "outbox.db", "r+b") as fh:
            fh.truncate(0)
        for suffix in ("-wal", "-shm"):
            (state / f"outbox.db{suffix}").unlink(missing_ok=True)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: max(col.seqs("test-dev")) > top + 3, 60), d.output()
        out = d.output()
        assert "outbox reset" in out and "Traceback" not in out
        assert min(s for s in col.seqs("test-dev") if s > top) == top + 1  # exact after a clean stop
        # 2. A crash, then the database and its WAL deleted.
        d.signal(signal.SIGKILL)
        d.wait(10)
        top = max(col.seqs("test-dev"))
        for suffix in ("", "-wal", "-shm"):
            (state / f"outbox.db{suffix}").unlink(missing_ok=True)
        d = daemon_factory(cfg).start()
        assert wait_until(lambda: max(col.seqs("test-dev")) > top + 3, 60), d.output()
        assert "outbox reset" in d.output()
        new = [s for s in col.seqs("test-dev") if s > top]
        assert new and min(new) > top  # above anything delivered, so never a reused seq
        assert d.stop() == 0
    finally:
        col.stop()
