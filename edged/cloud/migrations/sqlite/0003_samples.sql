-- edged ingest on SQLite, schema version 3: samples, as in PostgreSQL (times in UNIX seconds,
-- meta as JSON text).
CREATE TABLE samples (
    device_id    TEXT    NOT NULL,
    sample_id    INTEGER NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('imu', 'crop')),
    ts           REAL    NOT NULL,
    received_at  REAL    NOT NULL,
    trigger      TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    device_label TEXT    NOT NULL,
    score        REAL    NOT NULL,
    bytes        INTEGER NOT NULL,
    meta         TEXT    NOT NULL,
    data         BLOB    NOT NULL,
    label        TEXT,
    labelled_at  REAL,
    PRIMARY KEY (device_id, sample_id)
) WITHOUT ROWID;
CREATE INDEX samples_to_label ON samples (kind, ts) WHERE label IS NULL;
