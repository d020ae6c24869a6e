"""The durable outbox: every result is committed to SQLite (WAL) before it is published.

Rows leave the outbox only when the broker has acknowledged them (QoS 1 PUBACK) or when the
size bound forces the oldest out (drop-oldest, counted in `dropped`). The per-device sequence
number is assigned here, in the same transaction that stores the row, so it is strictly
increasing across restarts and a subscriber can tell a gap from a duplicate.

One connection, guarded by a lock: the writer thread appends in batches and the MQTT link reads
and deletes; every statement is short, so the lock is never held long.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from edged.service.log import Once, fields

log = logging.getLogger("edged.outbox")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    created REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('seq', 0), ('dropped', 0);
"""


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    topic: str
    payload: bytes


class OutboxError(Exception):
    pass


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, synchronous: str = "full",
                 max_file_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes  # a hard cap on the database file (SQLITE_FULL beyond)
        self.synchronous = synchronous.upper()
        self.write_errors = 0
        self._writable_dir(self.path.parent)
        self._lock = threading.Lock()
        self._once = Once(log)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            # A corrupted or truncated file must not keep a device offline: keep it for
            # inspection, start a fresh outbox, and continue the seq above anything it held.
            floor = self._salvage_seq()
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            log.error("outbox file unreadable; moved aside, starting a fresh outbox", extra=fields(
                path=str(self.path), moved_to=str(aside), error=str(exc), seq_from=floor))
            try:
                self._open(seq_floor=floor)
            except sqlite3.DatabaseError as exc2:
                raise OutboxError(f"{self.path}: cannot open outbox: {exc2}") from None

    @staticmethod
    def _writable_dir(directory: Path) -> None:
        """Create the outbox's directory; a directory this user cannot create or write is one
        line saying which and what to set, not a traceback (and not a 'corrupt' file)."""
        fix = ("set state_dir (or outbox.path) in the config to a directory this user can write; "
               "the systemd service gets /var/lib/edged from StateDirectory=")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutboxError(f"{directory}: cannot create the outbox directory "
                              f"({exc.strerror or exc}): {fix}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OutboxError(f"{directory}: the outbox directory is not writable by this user: {fix}")

    def _open(self, seq_floor: int = 0) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives a power cut, so a published seq is never reused.
            self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            if self.max_file_bytes:
                page = self._db.execute("PRAGMA page_size").fetchone()[0]
                self._db.execute(f"PRAGMA max_page_count={max(8, self.max_file_bytes // page)}")
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            self._db.executescript(_SCHEMA)
            if seq_floor:
                self._db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'seq'", (seq_floor,))
            self._seq = self._meta("seq")
            self.dropped = self._meta("dropped")
            self._bytes, self._depth = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def _salvage_seq(self) -> int:
        """The highest seq the damaged file still shows; else a floor above any seq it could hold."""
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT MAX(value) FROM meta WHERE key = 'seq'").fetchone()[0])
            finally:
                db.close()
        except (sqlite3.DatabaseError, TypeError, ValueError):
            # Milliseconds since the epoch: larger than any seq a device produces at its rates.
            return int(time.time() * 1000)

    def _meta(self, key: str) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, items: Sequence[tuple[str, Callable[[int], bytes]]]) -> list[int]:
        """Store a batch in one transaction. Each item is (topic, encode) where `encode(seq)`
        returns the payload for the sequence number assigned to it. Returns the seqs.

        When the disk (or the file's size cap) is full, the oldest rows are dropped to make
        room, as the size bound would; if even that does not help, the batch itself is dropped.
        Either way it is counted in `dropped`, and the daemon carries on.
        """
        if not items:
            return []
        now = time.time()
        with self._lock:
            first = self._seq + 1
            rows = [(first + i, topic, encode(first + i), now) for i, (topic, encode) in enumerate(items)]
            added = sum(len(r[2]) for r in rows)
            for attempt in range(3):
                try:
                    room, bound = self._insert(rows, self._bytes + added, make_room=attempt)
                    dropped = (room[0] + bound[0], room[1] + bound[1])
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_full(exc):
                        raise
                    self.write_errors += 1
                    self._once("full", "outbox storage full; dropping oldest results to make room",
                               level=logging.ERROR, path=str(self.path), error=str(exc))
            else:
                # Nothing could be written: these results are lost, and counted as such.
                self._seq = rows[-1][0]
                self.dropped += len(rows)
                return []
            self._seq = rows[-1][0]
            self._bytes += added - dropped[1]
            self._depth += len(rows) - dropped[0]
            self.dropped += dropped[0]
        if bound[0]:
            self._once("bound", "outbox reached outbox.max_bytes: dropping the oldest results "
                       "(see stats.dropped)", max_bytes=self.max_bytes)
        return [r[0] for r in rows]

    def _insert(self, rows: list, total: int, make_room: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Insert a batch; returns (rows, bytes) dropped to make room and (rows, bytes) dropped
        by the size bound."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            freed = (0, 0)
            if make_room:
                # Storage is full below our own bound: free a tenth of the outbox (at least the
                # batch's size), oldest first, per attempt.
                want = max(self._bytes // 10, sum(len(r[2]) for r in rows)) * make_room
                freed = self._drop_oldest(want)
            db.executemany("INSERT INTO outbox (seq, topic, payload, created) VALUES (?, ?, ?, ?)", rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (rows[-1][0],))
            more = self._drop_oldest(total - freed[1] - self.max_bytes)
            db.execute(f"UPDATE meta SET value = {self.dropped + freed[0] + more[0]} WHERE key = 'dropped'")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return freed, more

    def _drop_oldest(self, excess: int) -> tuple[int, int]:
        """Delete the oldest rows covering `excess` bytes, inside the caller's transaction.
        Returns (rows, bytes) deleted."""
        if excess <= 0:
            return 0, 0
        cut_seq, n, freed = None, 0, 0
        for seq, size in self._db.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq"):
            cut_seq, n, freed = seq, n + 1, freed + size
            if freed >= excess:
                break
        if cut_seq is not None:
            self._db.execute("DELETE FROM outbox WHERE seq <= ?", (cut_seq,))
        return n, freed

    def pending(self, after_seq: int, limit: int) -> list[Row]:
        """Oldest rows with seq > after_seq, in order."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit))
            return [Row(s, t, bytes(p)) for s, t, p in cur]

    def delete(self, seqs: Iterable[int]) -> None:
        """Forget rows the broker has acknowledged."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            db = self._db
            # No fsync for deletes: one lost to a power cut only brings back an acknowledged row,
            # sent again after the restart (a duplicate, which at-least-once allows). The next
            # synced commit makes it durable anyway, since the WAL is written in order.
            relax = self.synchronous == "FULL"
            if relax:
                db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            try:
                freed, n = db.execute(
                    f"SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox WHERE seq IN "
                    f"({','.join('?' * len(seqs))})", seqs).fetchone()
                db.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in seqs))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                if relax:
                    db.execute("PRAGMA synchronous=FULL")
            self._bytes -= freed
            self._depth -= n
            if self._depth == 0:
                # Drained: a later full disk or full bound is a new episode, worth a new line.
                self._once.clear("full")
                self._once.clear("bound")

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _is_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
