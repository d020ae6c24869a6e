"""The outbox on real SQLite: seq assignment, persistence across reopen, drop-oldest bound."""

import sqlite3

from edged.delivery.outbox import Outbox


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


def test_storage_full_drops_oldest_keeps_going(tmp_path):
    # A 64 KiB file cap stands in for a full SD card: SQLite reports SQLITE_FULL the same way.
    ob = Outbox(tmp_path / "o.db", max_bytes=10 << 20, max_file_bytes=64 << 10)
    payload = b"y" * 1000
    stored = []
    for _ in range(300):
        stored += ob.append([("t", lambda seq: payload)])
    assert ob.write_errors > 0 and ob.dropped > 0
    kept = [r.seq for r in ob.pending(0, 1000)]
    # What is kept is the newest, contiguous; what is gone is counted, and seqs kept rising.
    assert kept == list(range(kept[0], 301))
    assert ob.dropped + len(kept) == 300
    assert ob.last_seq == 300 and ob.depth == len(kept)


def test_corrupt_file_is_moved_aside_and_seq_continues(tmp_path):
    path = tmp_path / "o.db"
    ob = Outbox(path)
    ob.append([("t", enc(b"a")) for _ in range(7)])
    ob.close()
    # Overwrite the database header and first page, and scramble the WAL.
    with open(path, "r+b") as fh:
        fh.write(b"garbage" * 200)
    for extra in ("-wal", "-shm"):
        p = tmp_path / ("o.db" + extra)
        if p.exists():
            p.write_bytes(b"\0garbage" * 100)
    ob = Outbox(path)
    assert ob.depth == 0
    aside = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert any(n.startswith("o.db.corrupt-") and not n.endswith(("-wal", "-shm")) for n in aside)
    seqs = ob.append([("t", enc(b"b"))])
    assert seqs[0] > 7  # never reuses a seq a subscriber may already have seen
    ob.close()


def test_a_row_dropped_while_in_flight_and_then_acknowledged_is_not_counted_as_dropped(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=64 * 1024)
    ob.append([("t", enc(b"x" * 1000)) for _ in range(100)])  # the bound drops the oldest
    assert ob.dropped > 0
    first = ob.pending(0, 1)[0].seq
    before = ob.dropped
    ob.delete([first - 1, first])  # acks for a dropped row (it was in flight) and a stored one
    assert ob.dropped == before - 1 and ob.depth == 100 - before - 1
    ob.close()
    assert Outbox(tmp_path / "o.db").dropped == before - 1
