"""The sample queue: raw data the models could not place, kept for the cloud within a budget.

A sample (an IMU window the motion stage called `unknown`, or a JPEG crop of a detection whose
score fell in the uncertainty band, `[sampling]`) is stored here, in its own SQLite file (WAL)
beside the outbox, never in the outbox: results and samples do not share a file, a lock or a
transaction, so taking a sample cannot slow a result down. The link publishes samples on
`<prefix>/<device_id>/sample` only while the outbox has nothing waiting and no result is in
flight, one at a time, and deletes each on its PUBACK.

The budget: at most `per_hour` samples and `bytes_per_hour` payload bytes in any 60 minutes, and
`per_day` / `bytes_per_day` in any 24 hours. Every sample taken is recorded in the `taken` table
in the same transaction that stores it, so the budget survives a restart, a crash and a power
cut (synchronous=FULL), and a sample the queue later drops (its size bound) or the broker never
acknowledges has still been spent. Windows are counted in wall-clock time; a clock set back
keeps counting what it took "in the future" until the clock passes it again, so the caps err on
the side of sending less.

Sample ids are per device, increasing, assigned in the storing transaction; a fresh queue file
starts from the current UNIX time in milliseconds, so ids stay above those of a lost file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from edged.delivery.sqlitedb import drop_oldest, meta, totals, transaction
from edged.service.log import Once, fields

log = logging.getLogger("edged.samples")

HOUR = 3600.0
DAY = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id      INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    created REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS taken (
    id    INTEGER PRIMARY KEY,
    ts    REAL    NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Caps:
    per_hour: int
    bytes_per_hour: int
    per_day: int
    bytes_per_day: int
    max_sample_bytes: int

    @classmethod
    def from_config(cls, s) -> "Caps":
        return cls(s.per_hour, s.bytes_per_hour, s.per_day, s.bytes_per_day, s.max_sample_bytes)


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    topic: str
    payload: bytes


class SampleQueueError(Exception):
    pass


class SampleQueue:
    """The durable sample queue and its budget ledger. Thread-safe: the sampler thread offers,
    the link's drain thread reads and deletes."""

    def __init__(self, path: Path, caps: Caps, *, max_bytes: int = 16 << 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.caps = caps
        self.max_bytes = max_bytes
        self.clock = clock
        self._lock = threading.Lock()         # the database
        self._ledger_lock = threading.Lock()  # the in-memory budget: never held across a commit
        self._once = Once(log)
        self.taken = 0            # this run
        self.taken_bytes = 0
        self.skipped = 0          # over the budget (or larger than max_sample_bytes)
        self.failed = 0           # could not be stored (disk full, I/O error)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # the ledger must outlive a power cut
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('next_id', ?), ('dropped', 0)",
                             (int(self.clock() * 1000),))
            self.dropped = self._meta("dropped")
            self._bytes, self._depth = totals(self._db, "samples")
            self._prune(self.clock())
            self._ledger = [(ts, n) for ts, n in self._db.execute("SELECT ts, bytes FROM taken ORDER BY id")]
        except sqlite3.DatabaseError as exc:
            raise SampleQueueError(f"{self.path}: cannot open the sample queue: {exc}") from None
        except OSError as exc:
            raise SampleQueueError(f"{self.path}: cannot open the sample queue: {exc.strerror or exc}") from None

    def _meta(self, key: str) -> int:
        return meta(self._db, key)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM taken WHERE ts <= ?", (now - DAY,))

    # -- the budget -------------------------------------------------------------------------------

    def spent(self, now: float | None = None) -> dict[str, int]:
        """What the last hour and the last day took: counts and bytes."""
        now = self.clock() if now is None else now
        with self._ledger_lock:
            return self._spent(now)

    def _spent(self, now: float) -> dict[str, int]:
        self._ledger = [(ts, n) for ts, n in self._ledger if ts > now - DAY]
        hour = [n for ts, n in self._ledger if ts > now - HOUR]
        return {"hour": len(hour), "hour_bytes": sum(hour), "day": len(self._ledger),
                "day_bytes": sum(n for _, n in self._ledger)}

    def _over(self, spent: dict[str, int], nbytes: int) -> str | None:
        c = self.caps
        if nbytes > c.max_sample_bytes:
            return f"{nbytes} bytes is over sampling.max_sample_bytes ({c.max_sample_bytes})"
        for key, cap, what in (("hour", c.per_hour, "sampling.per_hour"), ("day", c.per_day, "sampling.per_day")):
            if spent[key] + 1 > cap:
                return f"{what} ({cap}) reached"
        for key, cap, what in (("hour_bytes", c.bytes_per_hour, "sampling.bytes_per_hour"),
                               ("day_bytes", c.bytes_per_day, "sampling.bytes_per_day")):
            if spent[key] + nbytes > cap:
                return f"{what} ({cap}) reached"
        return None

    def room(self, now: float | None = None) -> bool:
        """Whether a sample of the smallest size could still be taken: the pipeline asks before
        it copies a window or a frame. A trigger turned away here counts as skipped."""
        now = self.clock() if now is None else now
        with self._ledger_lock:  # not the database's lock: a pipeline thread never waits on a commit
            why = self._over(self._spent(now), 1)
            if why:
                self._skip(why)
            return why is None

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._once("budget", "sample skipped: over the sampling budget (further ones are counted "
                   "in stats.samples_skipped)", level=logging.INFO, reason=why)

    # -- storing ------------------------------------------------------------------------------------

    def offer(self, topic: str, encode: Callable[[int], bytes]) -> int | None:
        """Store one sample if the budget allows it: `encode(id)` makes its payload for the id
        assigned to it. Returns the id, or None when it was skipped (over the budget: counted in
        `skipped`) or could not be stored (`failed`). The budget entry and the sample are one
        transaction."""
        now = self.clock()
        with self._lock:
            next_id = self._meta("next_id")
            payload = encode(next_id)
            with self._ledger_lock:
                why = self._over(self._spent(now), len(payload))
                if why:
                    self._skip(why)
            if why:
                return None
            try:
                with transaction(self._db) as db:
                    db.execute("INSERT INTO samples (id, topic, payload, created) VALUES (?, ?, ?, ?)",
                               (next_id, topic, payload, now))
                    db.execute("INSERT INTO taken (ts, bytes) VALUES (?, ?)", (now, len(payload)))
                    db.execute("UPDATE meta SET value = ? WHERE key = 'next_id'", (next_id + 1,))
                    n, freed = drop_oldest(db, "samples", "id", self._bytes + len(payload) - self.max_bytes,
                                           below=next_id)
                    if n:
                        db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (n,))
                    self._prune(now)
            except sqlite3.Error as exc:
                self.failed += 1
                self._once("store", "sample could not be stored; skipped", level=logging.WARNING,
                           path=str(self.path), error=str(exc))
                return None
            with self._ledger_lock:
                self._ledger.append((now, len(payload)))
            self._bytes += len(payload) - freed
            self._depth += 1 - n
            self.dropped += n
            self.taken += 1
            self.taken_bytes += len(payload)
            self._once.clear("budget")  # the next time the budget is spent is worth a line again
        if n:
            self._once("bound", "sample queue reached sampling.queue_max_bytes: dropping the oldest samples",
                       level=logging.INFO, max_bytes=self.max_bytes)
        return next_id

    # -- draining -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def pending(self, after_id: int, limit: int, *, wait: bool = True) -> list[Row]:
        """The oldest samples after `after_id`. `wait=False` (the link's drain thread) returns
        nothing rather than wait while the sampler thread is committing: the drain thread also
        carries results, which must not wait on a sample's fsync."""
        if not self._lock.acquire(blocking=wait):
            return []
        try:
            cur = self._db.execute("SELECT id, topic, payload FROM samples WHERE id > ? ORDER BY id LIMIT ?",
                                   (after_id, limit))
            return [Row(i, t, bytes(p)) for i, t, p in cur]
        finally:
            self._lock.release()

    def delete(self, ids: Iterable[int], *, wait: bool = True) -> bool:
        """Forget acknowledged samples; False (nothing done) if `wait=False` and the queue is busy."""
        ids = list(ids)
        if not ids:
            return True
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            db = self._db
            # No fsync for a delete (on the link's drain thread): one lost to a power cut only
            # sends that sample once more; what the budget counts is written with FULL.
            db.execute("PRAGMA synchronous=NORMAL")
            try:
                with transaction(db):
                    freed, n = db.execute(f"SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM samples "
                                          f"WHERE id IN ({','.join('?' * len(ids))})", ids).fetchone()
                    db.executemany("DELETE FROM samples WHERE id = ?", ((i,) for i in ids))
            finally:
                db.execute("PRAGMA synchronous=FULL")
            self._bytes -= freed
            self._depth -= n
        finally:
            self._lock.release()
        return True

    def stats(self) -> dict[str, int]:
        spent = self.spent()
        return {"samples_taken": self.taken, "samples_bytes": self.taken_bytes, "samples_skipped": self.skipped,
                "samples_failed": self.failed, "samples_dropped": self.dropped, "samples_queued": self._depth,
                "samples_last_hour": spent["hour"], "samples_last_day": spent["day"]}

    def close(self) -> None:
        with self._lock:
            self._db.close()
        log.debug("sample queue closed", extra=fields(path=str(self.path), queued=self._depth))
