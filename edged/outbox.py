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
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

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
    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, synchronous: str = "full") -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives a power cut, so a published seq is never reused.
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
            self._seq = self._meta("seq")
            self.dropped = self._meta("dropped")
            self._bytes, self._depth = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"{self.path}: cannot open outbox: {exc}") from None

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
        returns the payload for the sequence number assigned to it. Returns the seqs."""
        if not items:
            return []
        now = time.time()
        with self._lock:
            first = self._seq + 1
            rows = [(first + i, topic, encode(first + i), now) for i, (topic, encode) in enumerate(items)]
            added = sum(len(r[2]) for r in rows)
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO outbox (seq, topic, payload, created) VALUES (?, ?, ?, ?)", rows)
                last = first + len(rows) - 1
                db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (last,))
                dropped = self._enforce_bound(self._bytes + added)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._seq = last
            self._bytes += added - dropped[1]
            self._depth += len(rows) - dropped[0]
            self.dropped += dropped[0]
        if dropped[0]:
            log.warning("outbox full: dropped oldest results", extra={"fields": {
                "dropped": dropped[0], "dropped_total": self.dropped, "max_bytes": self.max_bytes}})
        return [r[0] for r in rows]

    def _enforce_bound(self, total: int) -> tuple[int, int]:
        """Delete the oldest rows until the outbox fits; runs inside the caller's transaction."""
        if total <= self.max_bytes:
            return 0, 0
        excess = total - self.max_bytes
        # Walk oldest-first, summing sizes, and cut where the excess is covered.
        cut_seq, n, freed = None, 0, 0
        for seq, size in self._db.execute("SELECT seq, LENGTH(payload) FROM outbox ORDER BY seq"):
            cut_seq, n, freed = seq, n + 1, freed + size
            if freed >= excess:
                break
        if cut_seq is None:
            return 0, 0
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (cut_seq,))
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (n,))
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
            self._bytes -= freed
            self._depth -= n

    def close(self) -> None:
        with self._lock:
            self._db.close()
