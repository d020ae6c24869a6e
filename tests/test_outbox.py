"""The outbox on real SQLite: seq assignment, persistence across reopen, drop-oldest bound."""

import sqlite3

from edged.outbox import Outbox


def enc(tag: bytes):
    return lambda seq: tag + b":" + str(seq).encode()


def test_seq_strictly_increasing_and_survives_reopen(tmp_path):
    path = tmp_path / "o.db"
    ob = Outbox(path)
    assert ob.append([("a", enc(b"x")), ("b", enc(b"y"))]) == [1, 2]
    ob.delete([1, 2])
    ob.close()
    ob = Outbox(path)
    assert ob.depth == 0
    assert ob.append([("a", enc(b"z"))]) == [3]  # not reused after the rows were deleted
    rows = ob.pending(0, 10)
    assert [(r.seq, r.topic, r.payload) for r in rows] == [(3, "a", b"z:3")]
    ob.close()


def test_rows_are_in_wal_mode_and_kept_until_deleted(tmp_path):
    path = tmp_path / "o.db"
    ob = Outbox(path)
    ob.append([("t", enc(b"p")) for _ in range(5)])
    ob.delete([2, 4])
    # A second connection (another process after a crash) sees exactly the unacknowledged rows.
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in db.execute("SELECT seq FROM outbox ORDER BY seq")] == [1, 3, 5]
    db.close()
    assert [r.seq for r in ob.pending(1, 10)] == [3, 5]
    assert ob.depth == 3


def test_size_bound_drops_oldest_and_counts(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=1000)
    payload = b"x" * 100
    for _ in range(25):
        ob.append([("t", lambda seq: payload)])
    assert ob.size_bytes <= 1000
    assert ob.dropped == 15
    kept = [r.seq for r in ob.pending(0, 100)]
    assert kept == list(range(16, 26))  # the newest ten survive, in order
    ob.close()
    ob = Outbox(tmp_path / "o.db", max_bytes=1000)
    assert ob.dropped == 15  # the counter is persisted
    assert ob.size_bytes == 1000 and ob.depth == 10
