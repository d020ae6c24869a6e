"""The durable outbox: every result is committed to SQLite (WAL) before it is published.

Rows leave the outbox only when the broker has acknowledged them (QoS 1 PUBACK) or when the
size bound forces the oldest out (drop-oldest, counted in `dropped`). The per-device sequence
number is assigned here, in the same transaction that stores the row, so it is strictly
increasing across restarts and a subscriber can tell a gap from a duplicate.

An acknowledged row moves to the `kept` table for a bounded while (`keep_rows`, `keep_bytes`,
`keep_s`: whichever is reached first evicts the oldest), so that a receiver that lost it after
the broker's acknowledgement (a broker restart drops what matches no subscription) can ask for it
again: `resend` moves the asked rows back into the outbox, with their seq and payload, and the
link publishes them as any other row. Kept rows are never counted as dropped; on a full disk they
are the first to go.

One connection, guarded by a lock: the writer thread appends in batches and the MQTT link reads
and deletes; every statement is short, so the lock is never held long.

A full filesystem keeps the drop-oldest policy: SQLite needs room in its WAL even to delete, so
the outbox keeps a small reserve file beside the database (`outbox.db.reserve`). When a write
fails with "disk full", the reserve is released, the WAL is checkpointed and truncated, the
oldest rows are deleted, and the write is tried again; the reserve is taken back once the
filesystem has room. Beside the database, `outbox.db.seq` records how far seq has gone, so a
database that is lost or emptied never makes seq go back (the reset is logged as an error).

A file that cannot be opened for lack of permission is left alone (OutboxError: the daemon
exits 69 with one line); only a file SQLite finds corrupt (or that fails `PRAGMA quick_check`)
is moved aside, after its readable rows are copied into the fresh outbox.
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

from edged.delivery.commands import plan_resend
from edged.delivery.sqlitedb import drop_oldest, meta, totals, transaction
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
CREATE TABLE IF NOT EXISTS kept (
    seq     INTEGER PRIMARY KEY,
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    acked   REAL    NOT NULL
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


@dataclass
class Resent:
    """What `Outbox.resend` did with a request's ranges: `seqs` are in the outbox to be published
    (moved back from `kept`, or never acknowledged yet); `gone` are the ranges asked for that it
    does not hold (aged out, evicted, dropped, never made), `gone_count` how many seqs they are;
    `later` the ranges not looked at because the request's cap was reached (ask again)."""

    seqs: list[int]
    gone: list[tuple[int, int]]
    gone_count: int
    later: list[tuple[int, int]]


# How far ahead of the last committed seq `outbox.db.seq` reserves (one small file write per
# this many results): after a crash that also lost the database, seq resumes above this.
SEQ_BLOCK = 256
# The reserve file: released when the filesystem is full, so deletes and checkpoints have room.
RESERVE_MAX = 256 << 10
# Keep the WAL small (pages), so that a checkpoint on a full disk fits in the reserve.
WAL_PAGES = 32
# Room the WAL (and its index) needs beside the database: its size limit, twice, and the -shm.
_WAL_ROOM = 2 * (2 * WAL_PAGES * 4096) + (64 << 10)
_CORRUPT_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 64 << 20, synchronous: str = "full",
                 max_file_bytes: int | None = None, keep_rows: int = 0, keep_bytes: int = 0,
                 keep_s: float = 0.0) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        # Acknowledged rows kept for a resend: all three bounds apply; any of them 0 keeps none.
        self.keep_rows, self.keep_bytes, self.keep_s = keep_rows, keep_bytes, keep_s
        self.resent = 0          # rows moved back into the outbox by resend requests (this run)
        self.resend_gone = 0     # seqs asked for that were no longer held (this run)
        self.max_file_bytes = max_file_bytes  # a hard cap on the database file (SQLITE_FULL beyond)
        self.synchronous = synchronous.upper()
        self.write_errors = 0
        self.salvaged = 0
        self.mark_path = Path(f"{self.path}.seq")
        self.reserve_path = Path(f"{self.path}.reserve")
        self._lock = threading.Lock()
        self._once = Once(log)
        self._writable_dir(self.path.parent)
        self._check_access()
        mark = self._read_mark()
        try:
            self._open(seq_floor=0)
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                raise OutboxError(f"{self.path}: cannot open the outbox: {exc}") from None
            # A corrupted or truncated file must not keep a device offline: keep it for
            # inspection, start a fresh outbox with the rows that can still be read, and
            # continue the seq above anything it held.
            rows, old_seq = self._salvage()
            floor = max(old_seq, mark[1] if mark else 0, max((r[0] for r in rows), default=0))
            if not floor:
                floor = int(time.time() * 1000)  # nothing says where seq was: above any it reached
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            log.error("outbox file corrupt; moved aside, starting a fresh outbox", extra=fields(
                path=str(self.path), moved_to=str(aside), error=str(exc), salvaged=len(rows), seq_from=floor))
            try:
                self._open(seq_floor=floor)
                self._restore(rows)
            except sqlite3.DatabaseError as exc2:
                raise OutboxError(f"{self.path}: cannot open outbox: {exc2}") from None
        else:
            if mark and self._seq < mark[0]:
                # The database holds less than it had committed: it was emptied or replaced
                # (deleted, truncated, its WAL lost). Seq must not go back.
                floor = mark[1]
                log.error("outbox reset: the database is behind its seq record; seq continues above "
                          "it (results between may be missing)", extra=fields(
                              path=str(self.path), db_seq=self._seq, recorded_seq=mark[0], seq_from=floor + 1))
                with self._lock:
                    self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (floor,))
                    self._seq = floor
        self._reserved = self._seq
        self._write_mark(self._seq, self._seq + SEQ_BLOCK)
        self._take_reserve()

    # -- opening ----------------------------------------------------------------------------------

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
            raise OutboxError(f"{directory}: the outbox directory is not writable by {_whoami()} "
                              f"({_owner_mode(directory)}): {fix}")

    def _check_access(self) -> None:
        """A permission problem is not corruption: say which file and what is missing."""
        for suffix in ("", "-wal", "-shm", ".seq"):
            f = Path(f"{self.path}{suffix}")
            if f.exists() and not os.access(f, os.R_OK | os.W_OK):
                raise OutboxError(f"{f}: permission denied: the outbox must be readable and writable by "
                                  f"{_whoami()} ({_owner_mode(f)}); the file is left as it is")

    def _open(self, seq_floor: int = 0) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives a power cut, so a published seq is never reused.
            self._db.execute(f"PRAGMA synchronous={self.synchronous}")
            # A small WAL, truncated after each checkpoint: it must fit beside the data on a
            # nearly full card.
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={2 * WAL_PAGES * 4096}")
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
            self._bytes, self._depth = totals(self._db, "outbox")
            self._kept_bytes, self._kept = totals(self._db, "kept")
            self._next_age_trim = 0.0
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    def _salvage(self) -> tuple[list, int]:
        """The rows (and the seq counter) a damaged file still gives up, read-only."""
        rows: list = []
        seq = 0
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        except sqlite3.DatabaseError:
            return rows, seq
        try:
            try:
                seq = int(db.execute("SELECT MAX(value) FROM meta WHERE key = 'seq'").fetchone()[0] or 0)
            except (sqlite3.DatabaseError, TypeError, ValueError):
                pass
            # Walk in seq order; past a damaged page, jump ahead and go on where rows read again.
            after, misses = 0, 0
            while misses < 64:
                try:
                    for r in db.execute("SELECT seq, topic, payload, created FROM outbox WHERE seq > ? "
                                        "ORDER BY seq", (after,)):
                        rows.append((int(r[0]), str(r[1]), bytes(r[2]), float(r[3])))
                        after = rows[-1][0]
                    break
                except (sqlite3.DatabaseError, TypeError, ValueError):
                    misses += 1
                    after += 1 + misses * misses
        finally:
            db.close()
        return rows, seq

    def _restore(self, rows: list) -> None:
        if not rows:
            return
        with transaction(self._db) as db:
            db.executemany("INSERT OR IGNORE INTO outbox (seq, topic, payload, created) VALUES (?, ?, ?, ?)", rows)
        self.salvaged = len(rows)
        self._bytes, self._depth = totals(self._db, "outbox")

    # -- the seq record -----------------------------------------------------------------------------

    def _read_mark(self) -> tuple[int, int] | None:
        """(committed, reserved): seq had reached at least `committed`, and never passed `reserved`."""
        try:
            text = self.mark_path.read_text(encoding="ascii")
            committed, reserved = (int(x) for x in text.split()[:2])
            return (committed, reserved) if 0 <= committed <= reserved else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("outbox seq record unreadable; ignoring it", extra=fields(path=str(self.mark_path)))
            return None

    def _write_mark(self, committed: int, reserved: int) -> None:
        """Replace the record atomically (write, fsync, rename). A failure (a full disk) only
        means a later reset would be detected less precisely: logged once."""
        tmp = Path(f"{self.mark_path}.tmp")
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{committed} {reserved}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.mark_path)
            self._reserved = reserved
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._once("mark", "cannot update the outbox seq record", level=logging.WARNING,
                       path=str(self.mark_path), error=exc.strerror or str(exc))

    # -- the reserve --------------------------------------------------------------------------------

    def _take_reserve(self) -> None:
        """Hold RESERVE_MAX bytes (at most an eighth of the filesystem, a quarter of what is
        free) while there is room: on a full disk it is what lets a checkpoint finish."""
        if self.reserve_path.exists():
            return
        try:
            st = os.statvfs(self.path.parent)
            size = min(RESERVE_MAX, st.f_blocks * st.f_frsize // 8, st.f_bavail * st.f_frsize // 4)
            if size < 16 << 10:
                return
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except FileExistsError:
            return
        except OSError:
            try:
                self.reserve_path.unlink()
            except OSError:
                pass

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
            return True
        except OSError:
            return False

    def _fit_cap(self) -> None:
        """Cap the database at its size plus the free space beyond the WAL's and the reserve's
        room (and at `max_file_bytes`); re-done on every full episode, so space freed on the
        filesystem is used again."""
        db = self._db
        try:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            st = os.statvfs(self.path.parent)
            headroom = RESERVE_MAX + _WAL_ROOM
            grow = max(0, st.f_bavail * st.f_frsize - headroom) // page
            cap = pages + grow
            if self.max_file_bytes:
                cap = min(cap, max(8, self.max_file_bytes // page))
            db.execute(f"PRAGMA max_page_count={cap}")
        except (OSError, sqlite3.OperationalError):
            pass

    def _lift_cap(self) -> None:
        page = self._db.execute("PRAGMA page_size").fetchone()[0]
        cap = max(8, self.max_file_bytes // page) if self.max_file_bytes else 0xFFFFFFFE
        self._db.execute(f"PRAGMA max_page_count={cap}")

    def _checkpoint(self, mode: str) -> None:
        try:
            self._db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.OperationalError:
            pass

    def _meta(self, key: str) -> int:
        return meta(self._db, key)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def keeping(self) -> bool:
        return bool(self.keep_rows and self.keep_bytes and self.keep_s)

    @property
    def kept(self) -> int:
        """Acknowledged rows held for a resend."""
        return self._kept

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def append(self, items: Sequence[tuple[str, Callable[[int], bytes]]]) -> list[int]:
        """Store a batch in one transaction. Each item is (topic, encode) where `encode(seq)`
        returns the payload for the sequence number assigned to it. Returns the seqs.

        When the disk (or the file's size cap) is full, the oldest rows are dropped to make
        room, as the size bound would (releasing the reserve and checkpointing first, so that
        the deletes themselves have room); if even that does not help, the batch itself is
        dropped. Either way it is counted in `dropped`, and the daemon carries on.
        """
        if not items:
            return []
        now = time.time()
        with self._lock:
            first = self._seq + 1
            rows = [(first + i, topic, encode(first + i), now) for i, (topic, encode) in enumerate(items)]
            added = sum(len(r[2]) for r in rows)
            if rows[-1][0] > self._reserved:
                self._write_mark(self._seq, rows[-1][0] + SEQ_BLOCK)
            for attempt in range(6):
                try:
                    bound = self._insert(rows, self._bytes + added)
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_full(exc):
                        raise
                    self.write_errors += 1
                    self._once("full", "outbox storage full; dropping oldest results to make room",
                               level=logging.ERROR, path=str(self.path), error=str(exc))
                    self._make_room(max(self._bytes // 10, added) * attempt, attempt)
            else:
                # Nothing could be written: these results are lost, and counted as such (on disk
                # too, if even that small write fits).
                self._seq = rows[-1][0]
                self.dropped += len(rows)
                try:
                    self._db.execute("UPDATE meta SET value = CASE key WHEN 'seq' THEN ? ELSE ? END "
                                     "WHERE key IN ('seq', 'dropped')", (self._seq, self.dropped))
                except sqlite3.OperationalError:
                    pass
                return []
            self._seq = rows[-1][0]
            self._bytes += added - bound[1]
            self._depth += len(rows) - bound[0]
            self.dropped += bound[0]
        if bound[0]:
            self._once("bound", "outbox reached outbox.max_bytes: dropping the oldest results "
                       "(see stats.dropped)", max_bytes=self.max_bytes)
        return [r[0] for r in rows]

    def _make_room(self, want: int, attempt: int) -> None:
        """Storage is full: delete the oldest rows covering `want` bytes in their own
        transaction, so the insert can reuse their pages. Under the lock.

        What was measured to work on a full 1 MiB tmpfs (tests/test_outbox_faults.py): release
        the reserve, checkpoint the WAL, and cap the database file at what the filesystem
        holds, less room for the WAL and the reserve. From then on a full outbox is SQLite's
        own "full" at the cap, where deleting the oldest rows frees pages the next insert
        reuses; without the cap, the file grows into the room the WAL needs and even a delete
        fails (the outbox then kept the oldest rows and dropped every new one)."""
        if not attempt:
            # First, room without losing anything: the reserve, a checkpointed WAL, a cap.
            self._release_reserve()
            self._checkpoint("RESTART")
            self._checkpoint("TRUNCATE")
            self._fit_cap()
            return
        self._checkpoint("RESTART")
        if self._kept:
            # Rows already delivered go first: evicting them loses nothing the broker lacks.
            try:
                with transaction(self._db):
                    n, freed = self._evict_kept(excess_bytes=max(want, 1))
            except sqlite3.OperationalError as exc:
                if not _is_full(exc):
                    raise
                return
            self._kept -= n
            self._kept_bytes -= freed
            self._checkpoint("RESTART")
            return
        try:
            with transaction(self._db) as db:
                n, freed = self._drop_oldest(want)
                db.execute(f"UPDATE meta SET value = {self.dropped + n} WHERE key = 'dropped'")
        except sqlite3.OperationalError as exc:
            if not _is_full(exc):
                raise
            return  # not even that fits: the next attempt asks for more, after a checkpoint
        self._bytes -= freed
        self._depth -= n
        self.dropped += n
        self._checkpoint("RESTART")  # the deleted pages are free for the insert

    def _insert(self, rows: list, total: int) -> tuple[int, int]:
        """Insert a batch; returns the (rows, bytes) dropped by the size bound."""
        with transaction(self._db) as db:
            db.executemany("INSERT INTO outbox (seq, topic, payload, created) VALUES (?, ?, ?, ?)", rows)
            db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (rows[-1][0],))
            more = self._drop_oldest(total - self.max_bytes)
            if more[0]:
                db.execute(f"UPDATE meta SET value = {self.dropped + more[0]} WHERE key = 'dropped'")
        return more

    def _drop_oldest(self, excess: int) -> tuple[int, int]:
        """Delete the oldest rows covering `excess` bytes, inside the caller's transaction.
        Returns (rows, bytes) deleted."""
        return drop_oldest(self._db, "outbox", "seq", excess)

    def _evict_kept(self, *, excess_rows: int = 0, excess_bytes: int = 0, older_than: float = 0.0) -> tuple[int, int]:
        """Delete the oldest kept rows: enough to cover `excess_rows` and `excess_bytes`, and
        from the oldest on, every one acknowledged before `older_than`. Inside the caller's
        transaction; returns (rows, bytes) deleted."""
        if excess_rows <= 0 and excess_bytes <= 0 and not older_than:
            return 0, 0
        cut_seq, n, freed = None, 0, 0
        for seq, size, acked in self._db.execute("SELECT seq, LENGTH(payload), acked FROM kept ORDER BY seq"):
            if n >= excess_rows and freed >= excess_bytes and not acked < older_than:
                break
            cut_seq, n, freed = seq, n + 1, freed + size
        if cut_seq is not None:
            self._db.execute("DELETE FROM kept WHERE seq <= ?", (cut_seq,))
        return n, freed

    def _trim_kept(self, now: float) -> None:
        """Keep `kept` within its bounds; under the lock, inside the caller's transaction. A bound
        passed is trimmed to 15/16 of it, so that deletes come in batches, not one per ack."""
        over_rows = self._kept - self.keep_rows
        over_bytes = self._kept_bytes - self.keep_bytes
        older = 0.0
        if now >= self._next_age_trim:
            self._next_age_trim = now + min(60.0, max(1.0, self.keep_s / 16))
            older = now - self.keep_s
        if over_rows <= 0 and over_bytes <= 0 and not older:
            return
        n, freed = self._evict_kept(
            excess_rows=over_rows + self.keep_rows // 16 if over_rows > 0 else 0,
            excess_bytes=over_bytes + self.keep_bytes // 16 if over_bytes > 0 else 0,
            older_than=older)
        self._kept -= n
        self._kept_bytes -= freed

    def resend(self, ranges: Sequence[tuple[int, int]], max_rows: int, *, topic_prefix: str = "",
               now: float | None = None) -> Resent:
        """Put the rows of `ranges` (sorted, not overlapping, each first <= last) that are still
        held back into the outbox, at most `max_rows` of them, with their seq, topic and payload;
        a kept row acknowledged more than `keep_s` ago counts as gone, and so does one whose
        topic is not under `topic_prefix` (a row stored under another device id or prefix is not
        this device's to publish now). Rows still in the outbox (not acknowledged yet) count as
        resent: they are on their way."""
        now = time.time() if now is None else now
        cutoff = now - self.keep_s
        prefix = topic_prefix
        plen = len(prefix)
        with self._lock:
            db = self._db

            def held(first: int, last: int, limit: int) -> list[int]:
                got = db.execute(
                    "SELECT seq FROM (SELECT seq, topic FROM outbox WHERE seq BETWEEN ?1 AND ?2 "
                    "UNION ALL SELECT seq, topic FROM kept WHERE seq BETWEEN ?1 AND ?2 AND acked >= ?3) "
                    "WHERE substr(topic, 1, ?4) = ?5 ORDER BY seq LIMIT ?6",
                    (first, last, cutoff, plen, prefix, limit)).fetchall()
                return [r[0] for r in got]

            seqs, gone, gone_count, later = plan_resend(ranges, held, max_rows, self._seq)
            back = 0
            if seqs:
                moved = []
                with transaction(db):
                    for i in range(0, len(seqs), 500):
                        part = seqs[i:i + 500]
                        marks = ",".join("?" * len(part))
                        moved += db.execute(f"SELECT seq, LENGTH(payload) FROM kept WHERE seq IN ({marks})",
                                            part).fetchall()
                        db.execute(f"INSERT OR IGNORE INTO outbox (seq, topic, payload, created) SELECT seq, "
                                   f"topic, payload, ? FROM kept WHERE seq IN ({marks})", (now, *part))
                        db.execute(f"DELETE FROM kept WHERE seq IN ({marks})", part)
                back = len(moved)
                size = sum(m[1] for m in moved)
                self._kept -= back
                self._kept_bytes -= size
                self._depth += back
                self._bytes += size
            self.resent += len(seqs)
            self.resend_gone += gone_count
        return Resent(seqs, gone, gone_count, later)

    def pending(self, after_seq: int, limit: int) -> list[Row]:
        """Oldest rows with seq > after_seq, in order."""
        with self._lock:
            cur = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit))
            return [Row(s, t, bytes(p)) for s, t, p in cur]

    def delete(self, seqs: Iterable[int]) -> None:
        """Rows the broker has acknowledged leave the outbox (into `kept`, when keeping). Raises
        sqlite3.OperationalError when even that cannot be written (the caller keeps the seqs and
        tries again)."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            for attempt in range(3):
                try:
                    # A full disk: the second try keeps nothing (a delete frees pages, a copy
                    # needs them), after room was made as append does.
                    freed, n = self._delete(seqs, keep=self.keeping and attempt == 0)
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_full(exc) or attempt == 2:
                        raise
                    # A delete needs WAL room too: make some, as append does, and try once more.
                    self.write_errors += 1
                    self._release_reserve()
                    self._checkpoint("TRUNCATE")
            self._bytes -= freed
            self._depth -= n
            self.dropped = max(0, self.dropped - (len(set(seqs)) - n))
            if self._depth == 0:
                # Drained: a later full disk or full bound is a new episode, worth a new line.
                self._once.clear("full")
                self._once.clear("bound")
                if self.write_errors and not self.reserve_path.exists():
                    # The episode is over: take the reserve back and let the file grow again
                    # (if there is still no room, the next full episode caps it again).
                    self._checkpoint("TRUNCATE")
                    self._take_reserve()
                    if self.reserve_path.exists():
                        self._lift_cap()

    def _delete(self, seqs: list[int], keep: bool) -> tuple[int, int]:
        db = self._db
        now = time.time()
        # No fsync for deletes: one lost to a power cut only brings back an acknowledged row,
        # sent again after the restart (a duplicate, which at-least-once allows). The next
        # synced commit makes it durable anyway, since the WAL is written in order.
        relax = self.synchronous == "FULL"
        if relax:
            db.execute("PRAGMA synchronous=NORMAL")
        before = (self._kept, self._kept_bytes, self._next_age_trim)
        try:
            with transaction(db):
                marks = ",".join("?" * len(seqs))
                freed, n = db.execute(
                    f"SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM outbox WHERE seq IN "
                    f"({marks})", seqs).fetchone()
                if keep:
                    db.execute(f"INSERT OR REPLACE INTO kept (seq, topic, payload, acked) SELECT seq, topic, "
                               f"payload, ? FROM outbox WHERE seq IN ({marks})", (now, *seqs))
                db.executemany("DELETE FROM outbox WHERE seq = ?", ((s,) for s in seqs))
                # An acknowledged row that is no longer here was dropped to make room while it
                # was in flight: it reached the broker after all, so it is not counted as dropped.
                delivered_anyway = len(set(seqs)) - n
                if delivered_anyway > 0:
                    db.execute("UPDATE meta SET value = MAX(0, value - ?) WHERE key = 'dropped'",
                               (delivered_anyway,))
                if keep:
                    self._kept += n
                    self._kept_bytes += freed
                if self._kept:
                    self._trim_kept(now)
        except BaseException:
            self._kept, self._kept_bytes, self._next_age_trim = before
            raise
        finally:
            if relax:
                db.execute("PRAGMA synchronous=FULL")
        return freed, n

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            finally:
                # A clean stop: the record says exactly where seq is.
                self._write_mark(self._seq, self._seq)


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _CORRUPT_CODES
    text = str(exc).lower()
    return "integrity check failed" in text or "malformed" in text or "not a database" in text


def _whoami() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owner_mode(path: Path) -> str:
    import pwd
    import stat as st_mod

    try:
        st = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    return f"owner {owner}, mode {st_mod.filemode(st.st_mode)}"


def _is_full(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
