"""`edged ingest --db sqlite:///FILE`: the same worker on one machine, with no database server.

The tables and views are PostgreSQL's under the same names (migrations/sqlite/), times in UNIX
seconds and JSON as text; one transaction per batch, keyed by (device_id, seq), so a batch is
committed before its messages are acknowledged exactly as with PostgreSQL. The schema is made
on first open: a single machine needs no `--migrate` step (it works too).
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from edged.cloud.store import (DeviceNews, Outcome, Rejected, ResendAnswer, StoreDown, StoreError, StoreRefused,
                               device_rows, merge_ranges)
from edged.cloud.payloads import Result

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def path_of(url: str) -> Path:
    """sqlite:///results.db is results.db (relative), sqlite:////var/lib/edged/r.db absolute."""
    return Path(url[len("sqlite:///"):])


def migrations() -> list[tuple[int, str, str]]:
    out = []
    for f in (resources.files("edged.cloud") / "migrations" / "sqlite").iterdir():
        m = _MIGRATION_RE.match(f.name)
        if m:
            out.append((int(m.group(1)), m.group(2), f.read_text(encoding="utf-8")))
    return sorted(out)


_DEVICES = """
INSERT INTO devices AS d (device_id, first_seen, last_seen, last_seq, duplicates, rejected)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    first_seen = coalesce(min(d.first_seen, excluded.first_seen), d.first_seen, excluded.first_seen),
    last_seen  = coalesce(max(d.last_seen, excluded.last_seen), d.last_seen, excluded.last_seen),
    last_seq   = coalesce(max(d.last_seq, excluded.last_seq), d.last_seq, excluded.last_seq),
    duplicates = d.duplicates + excluded.duplicates,
    rejected   = d.rejected + excluded.rejected
"""

_STATUS = """
INSERT INTO devices AS d (device_id, status, status_since) VALUES (?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, status_since = excluded.status_since
WHERE d.status IS NOT excluded.status
"""

_STATS = """
INSERT INTO devices AS d (device_id, stats, stats_at, dropped, backend, models) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id) DO UPDATE SET
    stats = excluded.stats, stats_at = excluded.stats_at, dropped = excluded.dropped,
    backend = coalesce(excluded.backend, d.backend), models = coalesce(excluded.models, d.models)
WHERE d.stats_at IS NULL OR d.stats_at <= excluded.stats_at
"""


class SqliteStore:
    """The worker's store on a SQLite file (WAL): the PostgresStore interface."""

    def __init__(self, url: str, application_name: str = "") -> None:
        self.path = path_of(url)
        self.conn: sqlite3.Connection | None = None
        self.applied: list[str] = []

    def open(self) -> None:
        if not self.path.parent.is_dir():
            raise StoreError(f"database.url: directory not found: {self.path.parent}")
        try:
            # One thread at a time uses it (the writer), not always the one that opened it.
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=10, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.applied = self._migrate()
        except sqlite3.OperationalError as exc:  # locked, I/O: may pass
            self.close()
            raise StoreDown(str(exc)) from None
        except sqlite3.DatabaseError as exc:  # not a database, corrupt: it will not pass
            self.close()
            raise StoreError(f"{self.path}: {exc}") from None
        except StoreError:
            self.close()
            raise

    @property
    def is_open(self) -> bool:
        return self.conn is not None

    def _migrate(self) -> list[str]:
        have = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if not have:
            columns = {row[1] for row in self.conn.execute("PRAGMA table_info(results)")}
            if columns:  # a results table the migrations did not make
                older = "body" in columns and "payload" not in columns
                raise StoreError(f"{self.path}: " + ("made by an older `edged subscribe`, whose tables differ"
                                                     if older else "holds a results table edged did not make")
                                 + ": move it aside or name another file")
        applied = []
        for version, name, sql in migrations():
            if version <= have:
                continue
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(sql):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {version}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            applied.append(f"{version:04d}_{name}")
        return applied

    def migrate(self, retention_days: int, now: float) -> list[str]:
        if not self.is_open:
            self.open()  # which applies what is missing
        self.maintain(retention_days, now)
        return self.applied

    @contextmanager
    def _transaction(self):
        """One write transaction; SQLite's errors as the worker's: locked or I/O → StoreDown,
        a constraint → StoreRefused, anything else about the file → StoreError."""
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise StoreDown(str(exc)) from None
        except sqlite3.IntegrityError as exc:
            raise StoreRefused(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    def write(self, results: list[Result], rejected: list[Rejected], news: dict[str, DeviceNews],
              duplicates: dict[str, int] | None) -> Outcome:
        out = Outcome()
        now = time.time()
        with self._transaction() as c:
            stored: set[tuple[str, int]] = set()
            for r in results:
                cur = c.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                (r.device_id, r.seq, r.kind, r.ts, now, r.json()))
                if cur.rowcount == 1:
                    stored.add((r.device_id, r.seq))
            out.stored, out.keys = len(stored), stored
            per = device_rows(results, stored, rejected, duplicates)
            c.executemany("INSERT INTO rejected (received_at, topic, device_id, kind, reason, size, payload) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)",
                          [(now, rj.topic, rj.device_id, rj.kind, rj.reason, rj.size, rj.payload)
                           for rj in rejected])
            out.rejected = len(rejected)
            c.executemany(_DEVICES, [(d, *per[d]) for d in sorted(per)])
            for device in sorted(news):
                n = news[device]
                if n.status is not None:
                    c.execute(_STATUS, (device, n.status, now))
                if n.stats is not None:
                    c.execute(_STATS, (device, *n.stats_row()))
        out.duplicates = {d: p[3] for d, p in per.items() if p[3]}
        return out

    def write_samples(self, samples) -> int:
        """Store checked samples (payloads.SampleRecord) in one transaction; returns the new ones."""
        if not samples:
            return 0
        now = time.time()
        with self._transaction() as c:
            new = 0
            for s in samples:
                cur = c.execute("INSERT INTO samples (device_id, sample_id, kind, ts, received_at, trigger, model, "
                                "device_label, score, bytes, meta, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                                "ON CONFLICT DO NOTHING",
                                (s.device_id, s.sample_id, s.kind, s.ts, now, s.trigger, s.model, s.label, s.score,
                                 len(s.data), s.meta_json(), s.data))
                new += cur.rowcount
        return new

    # -- resend (the PostgreSQL statements of edged.cloud.store, in SQLite's dialect) ---------------

    def _read(self, sql: str, params) -> list:
        try:
            return self.conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreDown(str(exc)) from None

    def resend_gaps(self, *, since: float, settled: float, device: str | None = None,
                    limit: int = 5000) -> list[tuple[str, int, int]]:
        return [tuple(r) for r in self._read(
            "SELECT s.device_id, s.seq + 1, s.next_seq - 1 FROM (SELECT device_id, seq, "
            "lead(seq) OVER w AS next_seq, lead(received_at) OVER w AS next_at FROM results "
            "WHERE ts >= ? AND (? IS NULL OR device_id = ?) WINDOW w AS (PARTITION BY device_id ORDER BY seq)) s "
            "LEFT JOIN devices d USING (device_id) "
            "WHERE s.next_seq > s.seq + 1 AND s.next_at <= ? AND d.status IS NOT 'offline' "
            "ORDER BY s.device_id, s.seq LIMIT ?", (since, device, device, settled, limit))]

    def gone_ranges(self, devices: list[str]) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for d in devices:
            rows = self._read("SELECT first_seq, last_seq FROM resend_gone WHERE device_id = ? ORDER BY first_seq", (d,))
            if rows:
                out[d] = [tuple(r) for r in rows]
        return out

    def claim_resends(self, pieces, *, base_s: float, cap_s: float, attempts: int,
                      force: bool) -> list[tuple[str, int, int, int]]:
        now = time.time()
        got = []
        with self._transaction() as c:
            for d, f, l in sorted(pieces):
                row = c.execute(
                    "INSERT INTO resend_asks AS a (device_id, first_seq, last_seq, asked, first_asked, last_asked, "
                    "next_ask) VALUES (?1, ?2, ?3, 1, ?4, ?4, ?4 + ?5) "
                    "ON CONFLICT (device_id, first_seq) DO UPDATE SET last_seq = excluded.last_seq, "
                    "asked = a.asked + 1, last_asked = ?4, next_ask = ?4 + min(?5 * (1 << min(a.asked, 20)), ?6) "
                    "WHERE ?7 OR (a.next_ask <= ?4 AND a.asked < ?8) RETURNING device_id, first_seq, last_seq, asked",
                    (d, f, l, now, base_s, cap_s, int(force), attempts)).fetchone()
                if row is not None:
                    got.append(tuple(row))
        return got

    def resend_answered(self, answers: list[ResendAnswer]) -> None:
        if not answers:
            return
        now = time.time()
        with self._transaction() as c:
            for device in sorted({a.device_id for a in answers}):
                mine = [a for a in answers if a.device_id == device]
                gone = [r for a in mine for r in a.gone]
                if gone:
                    old = c.execute("SELECT first_seq, last_seq FROM resend_gone WHERE device_id = ?",
                                    (device,)).fetchall()
                    c.execute("DELETE FROM resend_gone WHERE device_id = ?", (device,))
                    c.executemany("INSERT INTO resend_gone (device_id, first_seq, last_seq, said_at) VALUES (?, ?, ?, ?)",
                                  [(device, f, l, now) for f, l in merge_ranges([*map(tuple, old), *gone])])
                for f, l in (r for a in mine for r in a.later):
                    c.execute("UPDATE resend_asks SET next_ask = ?, asked = max(asked - 1, 0) "
                              "WHERE device_id = ? AND first_seq <= ? AND last_seq >= ?", (now, device, l, f))
            c.execute("DELETE FROM resend_asks WHERE last_asked < ?", (now - 30 * 86400,))

    def maintain(self, retention_days: int, now: float) -> list[str]:
        if not retention_days:
            return []
        try:
            cur = self.conn.execute("DELETE FROM results WHERE ts < ?", (now - retention_days * 86400.0,))
        except sqlite3.OperationalError as exc:
            raise StoreDown(str(exc)) from None
        return [f"{cur.rowcount} results"] if cur.rowcount else []

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except sqlite3.Error:
                pass
        self.conn = None


def _statements(sql: str) -> list[str]:
    """The statements of a migration file (none of ours has a ';' inside a string)."""
    text = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]
