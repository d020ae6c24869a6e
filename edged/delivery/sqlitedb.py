"""What the outbox and the sample queue do the same way on their SQLite files (WAL, one
connection each in autocommit mode, guarded by the caller's lock): a write transaction, the
meta table, a table's payload totals, the oldest rows dropped for room."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT; on any exception (the COMMIT's own included) rolled back, unless
    SQLite already did (it does on a full disk), and the exception goes on."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def meta(db: sqlite3.Connection, key: str) -> int:
    return db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]


def totals(db: sqlite3.Connection, table: str) -> tuple[int, int]:
    """(payload bytes, rows) of `table`."""
    return db.execute(f"SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM {table}").fetchone()


def drop_oldest(db: sqlite3.Connection, table: str, key: str, excess: int,
                below: int | None = None) -> tuple[int, int]:
    """Delete the oldest rows of `table` (by its integer `key`, only those under `below` if
    given) covering `excess` payload bytes, inside the caller's transaction. Returns (rows,
    bytes) deleted."""
    if excess <= 0:
        return 0, 0
    where, args = (f"WHERE {key} < ? ", (below,)) if below is not None else ("", ())
    cut, n, freed = None, 0, 0
    for k, size in db.execute(f"SELECT {key}, LENGTH(payload) FROM {table} {where}ORDER BY {key}", args):
        cut, n, freed = k, n + 1, freed + size
        if freed >= excess:
            break
    if cut is not None:
        db.execute(f"DELETE FROM {table} WHERE {key} <= ?", (cut,))
    return n, freed
