"""`edged subscribe`: the ingest worker on one machine, printing what it stores.

This is not a receiver of its own: it runs `edged.cloud.ingest.Worker` on a SQLite file (the
schema `edged ingest --db sqlite:///FILE` uses), with the same checks, the same exactly-once
key (device_id, seq) and the same acknowledgement after commit. What it adds for a person at a
desk: a plain (unshared) subscription, a clean session unless given a client id, one JSON line
per result *after* it is committed, and on exit a summary per device of what this run stored,
with the seqs the database does not hold (its `gaps` view). `Collector` is the same thing as an
object, which the end-to-end tests use as their receiving end.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edged.cloud import store
from edged.cloud.ingest import IngestConfig, Worker
from edged.cloud.payloads import Result


@dataclass
class RunTally:
    """What one run stored and refused for one device (from the commits' outcomes)."""

    stored: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    duplicates: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # kind -> count


class Collector:
    """An ingest worker on a SQLite file, run on a thread of its own.

    `db_path` None: a temporary file, removed by `stop()`. `count`: stop taking messages once
    that many results are stored (exactly that many: a batch never holds more messages than are
    still wanted). `on_stored(result)` is called for each stored result, after its commit."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, db_path: str | Path | None = None, *,
                 prefix: str = "edged", client_id: str | None = None, persistent: bool = False,
                 username: str = "", password: str = "", ca_file: str = "", cert_file: str = "",
                 key_file: str = "", count: int = 0, on_stored=None, cfg: IngestConfig | None = None) -> None:
        self._tmp = None
        if db_path is None:
            self._tmp = tempfile.mkdtemp(prefix="edged-subscriber-")
            db_path = Path(self._tmp) / "results.db"
        self.db_path = Path(db_path)
        if cfg is None:
            cfg = IngestConfig()
            m = cfg.mqtt
            m.host, m.port, m.topic_prefix = host, port, prefix
            m.username, m.password = username, password
            m.ca_file, m.cert_file, m.key_file = ca_file, cert_file, key_file
            m.reconnect_min_s, m.reconnect_max_s = 0.1, 1.0
            cfg.ingest.client_id = client_id or ""
            cfg.ingest.batch_delay_s = 0.05
            cfg.database.retention_days = 0
        cfg.database.url = f"sqlite:///{self.db_path}"
        if not cfg.ingest.client_id:  # a clean session: a name of its own each run
            cfg.ingest.client_id = f"edged-subscriber-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self.cfg = cfg
        self.count = count
        self.on_stored = on_stored
        self.tally: dict[str, RunTally] = {}
        self.stored = 0
        self.failure: str | None = None      # why the writer thread ended early, in words
        self.failure_is_store = False         # ... because of the database file (not transient)
        self.done = threading.Event()         # the writer thread has ended (count reached, stopped, failed)
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self.worker = Worker(cfg, shared=False, persistent=persistent or bool(client_id),
                             on_commit=self._committed)

    def start(self, timeout: float = 10.0) -> "Collector":
        """Connect and subscribe (ConnectionError saying why not); only then open (or create)
        the database, so a broker that cannot be reached leaves no file behind (StoreError: the
        file cannot be used)."""
        if not self.db_path.parent.is_dir():
            raise store.StoreError(f"{self.db_path}: directory not found: {self.db_path.parent}")
        self.worker.connect(timeout)
        if not self.worker._open_store():
            raise ConnectionError("stopped before the database was open")
        self._thread = threading.Thread(target=self._run, name="edged-subscriber", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self.worker.stopping.is_set():
                left = self.count - self.stored if self.count else None
                if left is not None and left <= 0:
                    break
                self.worker.step(left)
        except store.StoreError as exc:
            self.failure, self.failure_is_store = str(exc), True
        except Exception as exc:  # noqa: BLE001 — said by the caller, not a traceback on a thread
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def _committed(self, results: list[Result], rejected: list[store.Rejected], out: store.Outcome) -> None:
        with self._lock:
            for r in results:
                t = self.tally.setdefault(r.device_id, RunTally())
                t.stored += 1
                t.first_seq = r.seq if t.first_seq is None else min(t.first_seq, r.seq)
                t.last_seq = r.seq if t.last_seq is None else max(t.last_seq, r.seq)
            for device, n in out.duplicates.items():
                self.tally.setdefault(device, RunTally()).duplicates += n
            for rj in rejected:
                if rj.device_id:
                    kinds = self.tally.setdefault(rj.device_id, RunTally()).rejected
                    kinds[rj.kind] = kinds.get(rj.kind, 0) + 1
            self.stored += len(results)
        if self.on_stored is not None:
            for r in results:
                self.on_stored(r)

    def alive(self) -> bool:
        """Whether both the network thread and the writer are running."""
        return self.worker.alive() and self._thread is not None and self._thread.is_alive()

    def stop_receiving(self) -> None:
        """Let the batch being written commit, then disconnect: nothing more is stored after
        this returns. Messages taken in but not committed are not acknowledged (with a
        persistent session the broker delivers them next time)."""
        self.worker.stopping.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.worker.client.disconnect()
        except Exception:  # noqa: BLE001 — not connected
            pass
        self.worker.client.loop_stop()

    def stop(self) -> None:
        self.stop_receiving()
        self.worker.store.close()
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- what the database holds (read on a connection of its own) ---------------------------------

    def _query(self, sql: str, *params) -> list[tuple]:
        with self._lock:
            if self._reader is None:
                self._reader = sqlite3.connect(str(self.db_path), check_same_thread=False)
            return self._reader.execute(sql, params).fetchall()

    def seqs(self, device: str) -> set[int]:
        return {s for (s,) in self._query("SELECT seq FROM results WHERE device_id = ?", device)}

    def results(self, device: str, kind: str | None = None) -> list[dict]:
        """A device's stored payloads (of one kind), in the order they were stored."""
        rows = self._query("SELECT payload FROM results WHERE device_id = ?" + (" AND kind = ?" if kind else "")
                           + " ORDER BY received_at, seq", *((device, kind) if kind else (device,)))
        return [json.loads(p) for (p,) in rows]

    def gaps(self, device: str, first: int, last: int) -> list[tuple[int, int]]:
        """Runs of seqs between `first` and `last` (both stored) the database does not hold."""
        return [(a, b) for a, b in self._query(
            "SELECT first_missing, last_missing FROM gaps WHERE device_id = ? AND first_missing > ? "
            "AND last_missing < ? ORDER BY first_missing", device, first, last)]

    def summary(self) -> dict:
        """Per device, what this run stored (`unique`, its seq range), counted as duplicates or
        rejected, and the seqs in that range the database lacks (`gaps`, `missing`)."""
        with self._lock:
            tally = {d: (t.stored, t.first_seq, t.last_seq, t.duplicates, dict(t.rejected))
                     for d, t in self.tally.items()}
        out = {}
        for d, (stored, first, last, dups, rejected) in tally.items():
            gaps = self.gaps(d, first, last) if stored else []
            out[d] = {"unique": stored, "received": stored + dups, "duplicates": dups,
                      "undecodable": rejected.get("undecodable", 0),
                      "rejected": sum(n for k, n in rejected.items() if k != "undecodable"),
                      "first_seq": first, "last_seq": last, "gaps": gaps,
                      "missing": sum(b - a + 1 for a, b in gaps)}
        return out


def run_cli(args) -> int:
    """`edged subscribe`: print each stored result as a JSON line; a summary per device at the end."""
    import sys

    from edged import config as _config
    from edged.cloud import ingest
    from edged.service import log as edlog

    flags = {"host": "mqtt.host", "port": "mqtt.port", "prefix": "mqtt.topic_prefix",
             "username": "mqtt.username", "password": "mqtt.password", "ca_file": "mqtt.ca_file",
             "cert_file": "mqtt.cert_file", "key_file": "mqtt.key_file", "client_id": "ingest.client_id"}
    overrides = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag) is not None}
    if args.count < 0:
        print(f"edged: --count: expected 0 (no limit) or more, got {args.count}", file=sys.stderr)
        return 2
    try:
        cfg = ingest.load(None, overrides)
    except _config.ConfigError as exc:
        for line in exc.problems:
            print(f"edged: {line}", file=sys.stderr)
        return 2
    cfg.ingest.batch_delay_s = 0.05
    cfg.database.retention_days = 0  # a desk receiver keeps everything
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 0.1, 2.0
    # stdout carries the results: the worker's warnings (lost the broker, rejected payloads)
    # go to stderr in the daemon's format.
    edlog.setup("warning", stream=sys.stderr)

    def show(r: Result) -> None:
        if not args.quiet:
            print(json.dumps({"device": r.device_id, "topic": r.kind, **r.body}), flush=True)

    col = Collector(db_path=args.db, cfg=cfg, count=args.count, on_stored=show,
                    persistent=bool(args.client_id))
    try:
        col.start()
    except (OSError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"edged: cannot subscribe at {cfg.mqtt.host}:{cfg.mqtt.port}: {reason}", file=sys.stderr)
        return 69
    except store.StoreError as exc:
        col.stop()
        print(f"edged: {exc}", file=sys.stderr)
        return 2
    end = time.monotonic() + args.seconds if args.seconds else None
    status = 0
    try:
        while not col.done.wait(0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))):
            if end is not None and time.monotonic() >= end:
                break
            if not col.worker.alive():
                print("edged: the MQTT network thread stopped; results after this point were not received",
                      file=sys.stderr)
                status = 1
                break
    except KeyboardInterrupt:
        pass
    # Stop storing before counting, so the summary covers exactly what was printed and stored.
    col.stop_receiving()
    if col.failure:
        print(f"edged: {col.failure}", file=sys.stderr)
        status = 2 if col.failure_is_store else 1
    summary = col.summary()
    col.stop()
    for device, s in sorted(summary.items()):
        gaps = s["gaps"]
        shown = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in gaps[:10]) + ("…" if len(gaps) > 10 else "")
        extra = f", {s['rejected']} rejected" if s["rejected"] else ""
        extra += f", {s['undecodable']} undecodable" if s["undecodable"] else ""
        span = f" (seq {s['first_seq']}–{s['last_seq']})" if s["unique"] else ""
        print(f"edged: {device}: {s['unique']} results{span}, {s['duplicates']} duplicates, "
              f"{s['missing']} missing{': ' + shown if gaps else ''}{extra}", file=sys.stderr)
    return status
