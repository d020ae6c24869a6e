"""The samples the ingest stored (`samples` table): listing, labelling, and reading labelled
IMU windows back for training (`scripts/train_motion.py --samples URL`).

Works on either store of `edged ingest` (PostgreSQL, or `sqlite:///FILE`). Every row came from
the network: a window is decoded and checked again here (its size against `n`, finite values)
before it is handed to training; a row that fails is skipped with one line naming it.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass

import numpy as np

_LABEL_RE = re.compile(r"^[a-z0-9 _-]{1,64}$")


class SamplesError(Exception):
    pass


@dataclass(frozen=True)
class LabelledWindow:
    device_id: str
    sample_id: int
    label: str
    t: np.ndarray      # float64 (n,), UNIX seconds
    data: np.ndarray   # float32 (n, 6): ax, ay, az (m/s²), gx, gy, gz (rad/s)
    sig_v: int


def decode_window(meta: dict, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A stored imu sample's samples, exactly as the device's motion stage received them."""
    n, t0 = meta.get("n"), meta.get("t0")
    if type(n) is not int or n < 2 or len(data) != n * 28 or isinstance(t0, bool) or not isinstance(t0, (int, float)):
        raise SamplesError(f"expected n × 7 float32 values, got {len(data)} bytes for n = {n!r}")
    rows = np.frombuffer(bytes(data), "<f4").reshape(n, 7)
    if not np.isfinite(rows).all():
        raise SamplesError("a value is not a finite number")
    return float(t0) + rows[:, 0].astype(np.float64), np.ascontiguousarray(rows[:, 1:], dtype=np.float32)


class _Db:
    """The two stores' connections behind one small interface (placeholders, times)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite:///")
        if self.sqlite:
            import sqlite3

            from edged.cloud.sqlite_store import path_of

            path = path_of(url)
            if not path.is_file():
                raise SamplesError(f"{path}: no such database")
            self.conn = sqlite3.connect(str(path), isolation_level=None)
        elif url.startswith(("postgresql://", "postgres://")):
            import psycopg

            try:
                self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise SamplesError(f"cannot reach the database: {str(exc).strip().splitlines()[0]}") from None
        else:
            raise SamplesError(f"{url}: expected a postgresql:// URL or sqlite:///FILE")

    def query(self, sql: str, params=()) -> list[tuple]:
        if self.sqlite:
            sql = sql.replace("%s", "?")
        try:
            return list(self.conn.execute(sql, params).fetchall())
        except Exception as exc:  # noqa: BLE001 — a missing table: not migrated to version 3
            if "samples" in str(exc):
                raise SamplesError(f"no samples table ({str(exc).splitlines()[0]}): run `edged ingest --migrate`") from None
            raise

    def execute(self, sql: str, params=()) -> int:
        if self.sqlite:
            sql = sql.replace("%s", "?").replace("now()", "((julianday('now') - 2440587.5) * 86400.0)")
        return self.conn.execute(sql, params).rowcount

    def ts(self, column: str) -> str:
        return column if self.sqlite else f"extract(epoch FROM {column})::float8"

    def close(self) -> None:
        self.conn.close()


def listing(url: str, *, unlabelled: bool = False, kind: str | None = None, limit: int = 1000) -> list[dict]:
    db = _Db(url)
    try:
        where, params = [], []
        if unlabelled:
            where.append("label IS NULL")
        if kind:
            where.append("kind = %s")
            params.append(kind)
        rows = db.query(f"SELECT device_id, sample_id, kind, {db.ts('ts')}, trigger, model, device_label, score, "
                        f"bytes, label FROM samples {'WHERE ' + ' AND '.join(where) if where else ''} "
                        f"ORDER BY ts LIMIT %s", (*params, limit))
    finally:
        db.close()
    keys = ("device_id", "id", "kind", "ts", "trigger", "model", "device_label", "score", "bytes", "label")
    return [dict(zip(keys, r)) for r in rows]


def set_label(url: str, device_id: str, sample_id: int, label: str | None) -> None:
    if label is not None and not _LABEL_RE.match(label):
        raise SamplesError(f"label: expected 1 to 64 lowercase letters, digits, ' ', '_' or '-', got {label!r}")
    db = _Db(url)
    try:
        n = db.execute("UPDATE samples SET label = %s, labelled_at = " + ("now()" if label else "NULL")
                       + " WHERE device_id = %s AND sample_id = %s", (label, device_id, sample_id))
    finally:
        db.close()
    if not n:
        raise SamplesError(f"no sample {sample_id} of device {device_id!r}")


def labelled_windows(url: str, *, labels: list[str] | None = None, warn=None) -> list[LabelledWindow]:
    """Every labelled imu sample, decoded; `labels` keeps only those."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    db = _Db(url)
    try:
        rows = db.query("SELECT device_id, sample_id, label, meta, data FROM samples "
                        "WHERE kind = 'imu' AND label IS NOT NULL ORDER BY device_id, sample_id")
    finally:
        db.close()
    out = []
    for device, sid, label, meta, data in rows:
        if labels and label not in labels:
            continue
        try:
            m = json.loads(meta) if isinstance(meta, str) else meta
            t, x = decode_window(m, data)
        except (SamplesError, ValueError, TypeError) as exc:
            warn(f"edged: sample {sid} of {device}: skipped: {exc}")
            continue
        out.append(LabelledWindow(device, int(sid), label, t, x, int(m.get("sig_v", 1))))
    return out


def export(url: str, out_dir, *, unlabelled: bool = True) -> list:
    """Write each stored sample as a file to look at and label: an imu window as an IMU CSV
    (`edged motion` reads it), a crop as its JPEG; returns the paths."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = _Db(url)
    try:
        rows = db.query("SELECT device_id, sample_id, kind, meta, data FROM samples "
                        + ("WHERE label IS NULL " if unlabelled else "") + "ORDER BY device_id, sample_id")
    finally:
        db.close()
    paths = []
    for device, sid, kind, meta, data in rows:
        # The ingest checked the device id; a file name is made safe anyway (rows may come from elsewhere).
        base = out_dir / f"{re.sub(r'[^A-Za-z0-9_-]', '_', str(device))[:64]}-{int(sid)}"
        if kind == "imu":
            try:
                t, x = decode_window(json.loads(meta) if isinstance(meta, str) else meta, data)
            except (SamplesError, ValueError, TypeError) as exc:
                print(f"edged: sample {sid} of {device}: skipped: {exc}", file=sys.stderr)
                continue
            path = base.with_suffix(".csv")
            # The device's IMU CSV format (edged.sources.imu.imucsv), times from the window's start.
            np.savetxt(path, np.column_stack([t - t[0], x.astype(np.float64)]), delimiter=",",
                       header="t,ax,ay,az,gx,gy,gz", comments="", fmt="%.7f")
        else:
            path = base.with_suffix(".jpg")
            path.write_bytes(bytes(data))
        paths.append(path)
    return paths
