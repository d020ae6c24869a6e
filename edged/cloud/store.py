"""The PostgreSQL side of `edged ingest`: migrations, partitions and retention, and one batch
written per transaction.

A batch is written in one transaction: its results in one multi-row INSERT (rows whose key is
already stored are skipped and counted as duplicates), its rejected payloads, and the device
rows it touches. The caller acknowledges the batch's messages to the broker only after `write`
returned, so a crash at any point leaves each message either committed or still with the
broker, never neither.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from importlib import resources

from edged.cloud.payloads import Result

_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# One lock id for migrations and the retention pass, so two workers never run either at once.
_LOCK_ID = 0x65646765  # "edge"
_PARTITION_RE = re.compile(r"^results_(\d{8})$")


class StoreError(Exception):
    """The database is not ready for ingest (not migrated, wrong schema): not a transient fault."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every shipped migration, in order."""
    out = []
    # Package data of edged.cloud (setup.cfg), read where the package is installed.
    for f in (resources.files("edged.cloud") / "migrations").iterdir():
        m = _MIGRATION_RE.match(f.name)
        if m:
            out.append((int(m.group(1)), m.group(2), f.read_text(encoding="utf-8")))
    return sorted(out)


def schema_version(conn) -> int:
    """The newest migration applied, 0 on an empty database."""
    row = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if row[0] is None:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]


def migrate(conn) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; returns their names.
    Safe to run again and from several machines at once (an advisory lock orders them)."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                     "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        for version, name, sql in migrations():
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied.append(f"{version:04d}_{name}")
    return applied


def require_schema(conn) -> None:
    want = migrations()[-1][0]
    have = schema_version(conn)
    if have < want:
        raise StoreError(f"the database schema is at version {have}, this edged needs {want}: "
                         f"run `edged ingest --migrate` first")


def _day(ts: float) -> dt.date:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).date()


def partition_name(day: dt.date) -> str:
    return f"results_{day:%Y%m%d}"


def ensure_partitions(conn, days, known: set[dt.date]) -> None:
    """Create the daily partitions of `results` for `days` that are not in `known` (adds them)."""
    for day in sorted(set(days) - known):
        lo = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
        with conn.transaction():
            # Serialised with other workers doing the same: two concurrent CREATE ... IF NOT
            # EXISTS for one name can otherwise fail on the catalogue's unique index.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID + 1,))
            conn.execute(f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF results "
                         f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{(lo + dt.timedelta(days=1)).isoformat()}')")
        known.add(day)


def existing_partitions(conn) -> set[dt.date]:
    rows = conn.execute("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = 'results'::regclass").fetchall()
    out = set()
    for (name,) in rows:
        m = _PARTITION_RE.match(name)
        if m:
            out.add(dt.datetime.strptime(m.group(1), "%Y%m%d").date())
    return out


def retention_pass(conn, retention_days: int, now: float, known: set[dt.date]) -> list[str]:
    """Drop the partitions wholly older than `retention_days` (0 keeps everything) and make the
    ones for yesterday to tomorrow ahead of time; returns the dropped tables' names. Only one
    worker at a time does it; the others skip."""
    dropped: list[str] = []
    with conn.transaction():
        got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_ID,)).fetchone()[0]
        if not got:
            return dropped
        today = _day(now)
        if retention_days:
            cutoff = today - dt.timedelta(days=retention_days)
            for day in sorted(existing_partitions(conn)):
                if day < cutoff:
                    conn.execute(f"DROP TABLE {partition_name(day)}")
                    dropped.append(partition_name(day))
                    known.discard(day)
    known &= existing_partitions(conn)
    ensure_partitions(conn, [today + dt.timedelta(days=d) for d in (-1, 0, 1)], known)
    return dropped


@dataclass
class Rejected:
    topic: str
    device_id: str | None
    kind: str
    reason: str
    payload: bytes  # as much of it as is kept
    size: int       # its size as received


@dataclass
class DeviceNews:
    """What one batch says about a device beyond its results."""

    status: str | None = None
    stats: dict | None = None
    stats_ts: float | None = None

    def stats_row(self) -> tuple:
        """The stats message as both stores write it: (JSON, ts, dropped, backend, models JSON),
        a field of the wrong type as NULL."""
        dropped, backend, models = (self.stats.get(k) for k in ("dropped", "backend", "models"))
        return (json.dumps(self.stats), self.stats_ts,
                dropped if isinstance(dropped, int) and not isinstance(dropped, bool) else None,
                backend if isinstance(backend, str) else None,
                json.dumps(models) if isinstance(models, (dict, list)) else None)


@dataclass
class Outcome:
    stored: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # device -> count
    rejected: int = 0
    keys: set[tuple[str, int]] = field(default_factory=set)  # (device_id, seq) of the rows stored


def device_rows(results: list[Result], stored: set[tuple[str, int]], rejected: list[Rejected],
                duplicates: dict[str, int] | None) -> dict[str, list]:
    """What a batch adds to each device's row, {device: [first ts, last ts, newest seq,
    duplicates, rejected]}: a result not in `stored` was already there (a duplicate), as are the
    copies the caller dropped from the batch (`duplicates`, per device). Both stores write these."""
    per: dict[str, list] = {}
    for r in results:
        p = per.setdefault(r.device_id, [r.ts, r.ts, r.seq, 0, 0])
        p[0], p[1], p[2] = min(p[0], r.ts), max(p[1], r.ts), max(p[2], r.seq)
        if (r.device_id, r.seq) not in stored:
            p[3] += 1
    for device, n in (duplicates or {}).items():
        per.setdefault(device, [None, None, None, 0, 0])[3] += n
    for rj in rejected:
        if rj.device_id:
            per.setdefault(rj.device_id, [None, None, None, 0, 0])[4] += 1
    return per


_INSERT = """
INSERT INTO results (device_id, seq, kind, ts, received_at, payload)
SELECT d, s, k, to_timestamp(t), statement_timestamp(), p::jsonb
FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::float8[], %s::text[]) AS u(d, s, k, t, p)
ON CONFLICT DO NOTHING
RETURNING device_id, seq
"""

# Device rows from a batch: first/last seen and the newest seq, duplicates added. Rows are
# touched in device order in every worker, so two batches never wait on each other in a cycle.
_DEVICES = """
INSERT INTO devices AS d (device_id, first_seen, last_seen, last_seq, duplicates, rejected)
SELECT u.d, to_timestamp(u.f), to_timestamp(u.l), u.s, u.dup, u.rej
FROM unnest(%s::text[], %s::float8[], %s::float8[], %s::bigint[], %s::bigint[], %s::bigint[])
     AS u(d, f, l, s, dup, rej)
ORDER BY u.d
ON CONFLICT (device_id) DO UPDATE SET
    first_seen = least(d.first_seen, excluded.first_seen),
    last_seen  = greatest(d.last_seen, excluded.last_seen),
    last_seq   = greatest(d.last_seq, excluded.last_seq),
    duplicates = d.duplicates + excluded.duplicates,
    rejected   = d.rejected + excluded.rejected
"""

_STATUS = """
INSERT INTO devices AS d (device_id, status, status_since) VALUES (%s, %s, now())
ON CONFLICT (device_id) DO UPDATE SET status = excluded.status, status_since = excluded.status_since
WHERE d.status IS DISTINCT FROM excluded.status
"""

_STATS = """
INSERT INTO devices AS d (device_id, stats, stats_at, dropped, backend, models)
VALUES (%s, %s::jsonb, to_timestamp(%s), %s, %s, %s::jsonb)
ON CONFLICT (device_id) DO UPDATE SET
    stats = excluded.stats, stats_at = excluded.stats_at, dropped = excluded.dropped,
    backend = coalesce(excluded.backend, d.backend), models = coalesce(excluded.models, d.models)
WHERE d.stats_at IS NULL OR d.stats_at <= excluded.stats_at
"""


def device_models(conn) -> list[tuple[str, object, float | None, str | None]]:
    """(device_id, models, stats_at as UNIX seconds, status) of every device, by id: what each
    one last said it runs (`stats.models`), for `edged release status --db`."""
    return conn.execute("SELECT device_id, models, extract(epoch FROM stats_at)::float8, status "
                        "FROM devices ORDER BY device_id").fetchall()


def write(conn, results: list[Result], rejected: list[Rejected], news: dict[str, DeviceNews],
          known_days: set[dt.date], duplicates: dict[str, int] | None = None) -> Outcome:
    """Commit one batch; raises psycopg errors as they come (nothing is then committed).
    `duplicates`: copies of results the caller already dropped from the batch (per device)."""
    out = Outcome()
    ensure_partitions(conn, {_day(r.ts) for r in results}, known_days)
    with conn.transaction():
        stored: set[tuple[str, int]] = set()
        if results:
            cur = conn.execute(_INSERT, ([r.device_id for r in results], [r.seq for r in results],
                                         [r.kind for r in results], [r.ts for r in results],
                                         [r.json() for r in results]))
            stored = {(d, s) for d, s in cur.fetchall()}
        out.stored, out.keys = len(stored), stored
        per = device_rows(results, stored, rejected, duplicates)
        if rejected:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO rejected (topic, device_id, kind, reason, size, payload) "
                                "VALUES (%s, %s, %s, %s, %s, %s)",
                                [(rj.topic, rj.device_id, rj.kind, rj.reason, rj.size,
                                  rj.payload) for rj in rejected])
            out.rejected = len(rejected)
        if per:
            devs = sorted(per)
            conn.execute(_DEVICES, (devs, [per[d][0] for d in devs], [per[d][1] for d in devs],
                                    [per[d][2] for d in devs], [per[d][3] for d in devs],
                                    [per[d][4] for d in devs]))
        for device in sorted(news):
            n = news[device]
            if n.status is not None:
                conn.execute(_STATUS, (device, n.status))
            if n.stats is not None:
                conn.execute(_STATS, (device, *n.stats_row()))
        out.duplicates = {d: p[3] for d, p in per.items() if p[3]}
    return out


_SAMPLES = """
INSERT INTO samples (device_id, sample_id, kind, ts, trigger, model, device_label, score, bytes, meta, data)
VALUES (%s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT DO NOTHING
"""


def write_samples(conn, samples) -> int:
    """Store checked samples (payloads.SampleRecord) in one transaction; a redelivered one is
    skipped. Returns how many were new."""
    if not samples:
        return 0
    new = 0
    with conn.transaction():
        with conn.cursor() as cur:
            for s in samples:
                cur.execute(_SAMPLES, (s.device_id, s.sample_id, s.kind, s.ts, s.trigger, s.model, s.label,
                                       s.score, len(s.data), s.meta_json(), s.data))
                new += cur.rowcount
    return new


# -- resend: asking devices for what `gaps` lists (docs/cloud.md, "Resend") -------------------------

_RESEND_GAPS = """
SELECT s.device_id, s.seq + 1, s.next_seq - 1
FROM (SELECT device_id, seq, lead(seq) OVER w AS next_seq, lead(received_at) OVER w AS next_at
      FROM results WHERE ts >= to_timestamp(%(since)s) AND (%(device)s::text IS NULL OR device_id = %(device)s)
      WINDOW w AS (PARTITION BY device_id ORDER BY seq)) s
LEFT JOIN devices d USING (device_id)
WHERE s.next_seq > s.seq + 1 AND s.next_at <= to_timestamp(%(settled)s)
  AND d.status IS DISTINCT FROM 'offline'
ORDER BY s.device_id, s.seq
LIMIT %(limit)s
"""

# Claim gaps to ask for: a gap asked for before is asked again only once its back-off has passed
# and while attempts remain. Two workers claiming the same gap at once: the second one's upsert
# waits for the first's row and then finds its condition false, so one of them asks.
_RESEND_CLAIM = """
INSERT INTO resend_asks AS a (device_id, first_seq, last_seq, asked, first_asked, last_asked, next_ask)
SELECT u.d, u.f, u.l, 1, now(), now(), now() + %(base)s * interval '1 second'
FROM unnest(%(d)s::text[], %(f)s::bigint[], %(l)s::bigint[]) AS u(d, f, l)
ORDER BY u.d, u.f
ON CONFLICT (device_id, first_seq) DO UPDATE SET
    last_seq = excluded.last_seq, asked = a.asked + 1, last_asked = now(),
    next_ask = now() + least(%(base)s * (1 << least(a.asked, 20)), %(cap)s) * interval '1 second'
WHERE %(force)s OR (a.next_ask <= now() AND a.asked < %(attempts)s)
RETURNING device_id, first_seq, last_seq, asked
"""


def resend_gaps(conn, *, since: float, settled: float, device: str | None, limit: int) -> list[tuple[str, int, int]]:
    """Gaps among the results since `since` whose later neighbour arrived before `settled` (old
    enough not to be a batch still on its way), of devices not known offline."""
    return [tuple(r) for r in conn.execute(_RESEND_GAPS, {"since": since, "settled": settled, "device": device,
                                                          "limit": limit}).fetchall()]


def gone_ranges(conn, devices: list[str]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for d, f, l in conn.execute("SELECT device_id, first_seq, last_seq FROM resend_gone WHERE device_id = ANY(%s) "
                                "ORDER BY device_id, first_seq", (devices,)):
        out.setdefault(d, []).append((f, l))
    return out


def claim_resends(conn, pieces: list[tuple[str, int, int]], *, base_s: float, cap_s: float, attempts: int,
                  force: bool) -> list[tuple[str, int, int, int]]:
    if not pieces:
        return []
    rows = conn.execute(_RESEND_CLAIM, {"d": [p[0] for p in pieces], "f": [p[1] for p in pieces],
                                        "l": [p[2] for p in pieces], "base": base_s, "cap": cap_s,
                                        "attempts": attempts, "force": force}).fetchall()
    return sorted(tuple(r) for r in rows)


def resend_answered(conn, answers: list["ResendAnswer"]) -> None:
    """Record devices' replies: the ranges they no longer hold (merged with what they said
    before), and ranges to ask for again soon (`later`: not counted as an attempt)."""
    with conn.transaction():
        for device in sorted({a.device_id for a in answers}):
            mine = [a for a in answers if a.device_id == device]
            gone = [r for a in mine for r in a.gone]
            if gone:
                old = conn.execute("DELETE FROM resend_gone WHERE device_id = %s RETURNING first_seq, last_seq",
                                   (device,)).fetchall()
                merged = merge_ranges([*map(tuple, old), *gone])
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO resend_gone (device_id, first_seq, last_seq, said_at) "
                                    "VALUES (%s, %s, %s, now())", [(device, f, l) for f, l in merged])
            for f, l in (r for a in mine for r in a.later):
                conn.execute("UPDATE resend_asks SET next_ask = now(), asked = greatest(asked - 1, 0) "
                             "WHERE device_id = %s AND first_seq <= %s AND last_seq >= %s", (device, l, f))
        conn.execute("DELETE FROM resend_asks WHERE last_asked < now() - interval '30 days'")


@dataclass
class ResendAnswer:
    """A device's reply to a resend request, checked (payloads.resend_answer)."""

    device_id: str
    gone: list[tuple[int, int]]
    later: list[tuple[int, int]]


def merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for f, l in sorted(ranges):
        if out and f <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], l))
        else:
            out.append((f, l))
    return out


def subtract_ranges(first: int, last: int, gone: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last] less the (sorted, merged) `gone` ranges."""
    out = []
    at = first
    for f, l in gone:
        if l < at:
            continue
        if f > last:
            break
        if f > at:
            out.append((at, f - 1))
        at = max(at, l + 1)
        if at > last:
            break
    if at <= last:
        out.append((at, last))
    return out


class StoreDown(Exception):
    """The database cannot be reached or lost the connection: try again later."""


class StoreRefused(Exception):
    """The database refused a row of the batch (a constraint, a value it cannot hold): nothing of
    the batch was committed; written one by one, the refused ones can be told apart."""


class PostgresStore:
    """One worker's PostgreSQL connection and what the worker asks of it. psycopg's errors stay
    in here: a fault of the connection is `StoreDown`, anything else about the schema is
    `StoreError`."""

    def __init__(self, url: str, application_name: str = "edged-ingest") -> None:
        self.url = url
        self.application_name = application_name
        self.conn = None
        self.known_days: set[dt.date] = set()

    def open(self) -> None:
        import psycopg

        try:
            self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                        application_name=self.application_name)
            require_schema(self.conn)
            self.known_days = existing_partitions(self.conn)
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreDown(_first_line(exc)) from None

    @property
    def is_open(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def write(self, results, rejected, news, duplicates) -> Outcome:
        import psycopg

        while True:
            try:
                return write(self.conn, results, rejected, news, self.known_days, duplicates)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                continue  # another worker's batch touched the same devices; nothing was committed
            except psycopg.OperationalError as exc:
                self.close()
                raise StoreDown(_first_line(exc)) from None
            except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
                raise StoreRefused(_first_line(exc)) from None
            except psycopg.Error as exc:  # e.g. an undefined table: the schema was changed under us
                raise StoreError(f"database error: {_first_line(exc)}") from None

    def write_samples(self, samples) -> int:
        import psycopg

        try:
            return write_samples(self.conn, samples)
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreDown(_first_line(exc)) from None
        except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
            raise StoreRefused(_first_line(exc)) from None
        except psycopg.Error as exc:
            raise StoreError(f"database error: {_first_line(exc)}") from None

    def maintain(self, retention_days: int, now: float) -> list[str]:
        import psycopg

        try:
            return retention_pass(self.conn, retention_days, now, self.known_days)
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreDown(_first_line(exc)) from None

    def _call(self, fn, *args, **kw):
        import psycopg

        try:
            return fn(self.conn, *args, **kw)
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreDown(_first_line(exc)) from None
        except psycopg.Error as exc:
            raise StoreError(f"database error: {_first_line(exc)}") from None

    def resend_gaps(self, *, since: float, settled: float, device: str | None = None,
                    limit: int = 5000) -> list[tuple[str, int, int]]:
        return self._call(resend_gaps, since=since, settled=settled, device=device, limit=limit)

    def gone_ranges(self, devices: list[str]) -> dict[str, list[tuple[int, int]]]:
        return self._call(gone_ranges, devices)

    def claim_resends(self, pieces, **kw) -> list[tuple[str, int, int, int]]:
        return self._call(claim_resends, pieces, **kw)

    def resend_answered(self, answers: list[ResendAnswer]) -> None:
        if answers:
            self._call(resend_answered, answers)

    def migrate(self, retention_days: int, now: float) -> list[str]:
        """Apply what is missing and make the current partitions (`--migrate`)."""
        import psycopg

        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                applied = migrate(conn)
                retention_pass(conn, retention_days, now, set())
                return applied
        except psycopg.OperationalError as exc:
            raise StoreDown(_first_line(exc)) from None
        except psycopg.Error as exc:
            raise StoreError(f"migration failed: {_first_line(exc)}") from None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 — already broken
                pass
        self.conn = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
