"""The outbox on real SQLite: seq assignment, persistence across reopen, drop-oldest bound."""

import sqlite3
import time

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


# -- kept after acknowledgement, for a resend -------------------------------------------------------

def keeping(path, **kw):
    bounds = dict(keep_rows=1000, keep_bytes=1 << 20, keep_s=3600.0)
    bounds.update(kw)
    return Outbox(path, **bounds)


def test_acknowledged_rows_are_kept_and_resent_with_their_seq_and_payload(tmp_path):
    ob = keeping(tmp_path / "o.db")
    seqs = ob.append([("edged/d/motion", enc(b"m")) for _ in range(10)])
    ob.delete(seqs[:8])
    assert (ob.depth, ob.kept) == (2, 8)
    # The outbox table holds only what the broker has not acknowledged.
    db = sqlite3.connect(tmp_path / "o.db")
    assert [r[0] for r in db.execute("SELECT seq FROM outbox ORDER BY seq")] == [9, 10]
    db.close()
    got = ob.resend([(2, 3), (6, 12)], 100, topic_prefix="edged/d/")
    # 9 and 10 were never acknowledged: on their way already, so counted as resent.
    assert got.seqs == [2, 3, 6, 7, 8, 9, 10]
    assert (got.gone, got.gone_count, got.later) == ([(11, 12)], 2, [])  # never made
    assert [(r.seq, r.payload) for r in ob.pending(0, 100)] == [
        (s, b"m:%d" % s) for s in (2, 3, 6, 7, 8, 9, 10)]
    assert (ob.depth, ob.kept, ob.resent, ob.resend_gone) == (7, 3, 7, 2)
    ob.close()
    ob = keeping(tmp_path / "o.db")  # put back durably: a restart sends them too
    assert [r.seq for r in ob.pending(0, 100)] == [2, 3, 6, 7, 8, 9, 10] and ob.kept == 3
    ob.delete([2, 3, 6, 7, 8])  # acknowledged again: kept again
    assert (ob.depth, ob.kept) == (2, 8)
    ob.close()
    ob = keeping(tmp_path / "o.db")  # kept across a restart
    assert (ob.depth, ob.kept) == (2, 8)
    assert ob.resend([(1, 1)], 10, topic_prefix="edged/d/").seqs == [1]
    ob.close()


def test_resend_is_capped_per_request_and_says_what_to_ask_for_later(tmp_path):
    ob = keeping(tmp_path / "o.db")
    ob.delete(ob.append([("edged/d/motion", enc(b"m")) for _ in range(50)]))
    got = ob.resend([(1, 5), (10, 40), (45, 50)], 12, topic_prefix="edged/d/")
    assert got.seqs == [1, 2, 3, 4, 5, *range(10, 17)]
    assert got.later == [(17, 40), (45, 50)] and got.gone == []
    # A range as wide as a seq can be costs what the rows it holds cost, no more.
    huge = ob.resend([(1, (1 << 63) - 1)], 5, topic_prefix="edged/d/")
    assert huge.seqs == [1, 2, 3, 4, 5] and huge.later == [(6, (1 << 63) - 1)]
    ob.close()


def test_kept_rows_are_bounded_by_count_bytes_and_age_and_gone_when_past_them(tmp_path):
    ob = keeping(tmp_path / "o.db", keep_rows=32)
    for _ in range(100):
        ob.delete(ob.append([("edged/d/motion", enc(b"m"))]))
    assert 28 <= ob.kept <= 32  # trimmed in batches, never above the bound
    newest = 100 - ob.kept + 1  # the newest are the ones kept
    got = ob.resend([(1, 100)], 1000, topic_prefix="edged/d/")
    assert got.seqs == list(range(newest, 101))
    assert got.gone == [(1, newest - 1)] and got.gone_count == newest - 1
    ob.close()

    ob = keeping(tmp_path / "b.db", keep_bytes=1000)
    for _ in range(40):
        ob.delete(ob.append([("edged/d/motion", lambda seq: b"x" * 100)]))
    assert ob.kept_bytes <= 1000 and ob.kept >= 8
    ob.close()

    ob = keeping(tmp_path / "c.db", keep_s=60.0)
    ob.delete(ob.append([("edged/d/motion", enc(b"m")) for _ in range(5)]))
    later = time.time() + 120  # two minutes on: past keep_s
    got = ob.resend([(1, 5)], 10, topic_prefix="edged/d/", now=later)
    assert got.seqs == [] and got.gone == [(1, 5)] and got.gone_count == 5
    ob.close()


def test_rows_of_another_topic_prefix_are_not_resent(tmp_path):
    ob = keeping(tmp_path / "o.db")
    ob.delete(ob.append([("edged/old-id/motion", enc(b"m")), ("edged/d/motion", enc(b"m"))]))
    got = ob.resend([(1, 2)], 10, topic_prefix="edged/d/")
    assert got.seqs == [2] and got.gone == [(1, 1)]
    assert [r.topic for r in ob.pending(0, 10)] == ["edged/d/motion"]
    ob.close()


def test_without_keeping_an_acknowledged_row_is_deleted_as_before(tmp_path):
    ob = keeping(tmp_path / "o.db")
    ob.delete(ob.append([("edged/d/motion", enc(b"m")) for _ in range(5)]))
    ob.close()
    ob = Outbox(tmp_path / "o.db")  # keep_* 0: what was kept goes with the next acknowledgement
    assert ob.kept == 5
    ob.delete(ob.append([("edged/d/motion", enc(b"m"))]))
    assert ob.kept == 0 and ob.resend([(1, 6)], 10, topic_prefix="edged/d/").gone == [(1, 6)]
    ob.close()


def test_a_full_disk_evicts_kept_rows_before_any_unacknowledged_one(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10 << 20, max_file_bytes=64 << 10,
                keep_rows=10**6, keep_bytes=1 << 30, keep_s=3600.0)
    payload = b"k" * 1000
    for _ in range(30):
        ob.delete(ob.append([("edged/d/motion", lambda seq: payload)]))
    assert ob.kept == 30
    stored = []
    for _ in range(300):
        stored += ob.append([("edged/d/motion", lambda seq: payload)])
    assert ob.kept < 30  # made room
    # Kept rows went first: nothing unacknowledged was dropped while kept rows remained.
    assert ob.dropped == 0 or ob.kept == 0
    assert [r.seq for r in ob.pending(0, 1000)][-1] == stored[-1]
    ob.close()
