-- edged ingest on SQLite (one machine, no server): the PostgreSQL schema's tables, columns and
-- views under the same names. Times are UNIX seconds (REAL), JSON is text. Not partitioned:
-- retention deletes rows. See docs/cloud.md.

CREATE TABLE results (
    device_id   TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('detections', 'motion')),
    ts          REAL    NOT NULL,
    received_at REAL    NOT NULL,
    payload     TEXT    NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX results_ts ON results (ts);

CREATE TABLE devices (
    device_id    TEXT PRIMARY KEY,
    first_seen   REAL,
    last_seen    REAL,
    last_seq     INTEGER,
    duplicates   INTEGER NOT NULL DEFAULT 0,
    rejected     INTEGER NOT NULL DEFAULT 0,
    status       TEXT,
    status_since REAL,
    stats        TEXT,
    stats_at     REAL,
    dropped      INTEGER,
    backend      TEXT,
    models       TEXT
);

CREATE TABLE rejected (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL    NOT NULL,
    topic       TEXT    NOT NULL,
    device_id   TEXT,
    kind        TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);

CREATE VIEW detected_objects AS
SELECT r.device_id, r.seq, r.ts,
       json_extract(o.value, '$.label') AS label,
       json_extract(o.value, '$.score') AS score,
       json_extract(o.value, '$.box')   AS box
FROM results r, json_each(r.payload, '$.objects') AS o
WHERE r.kind = 'detections';

CREATE VIEW detections AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       (SELECT json_group_array(l) FROM (SELECT json_extract(o.value, '$.label') AS l
                                         FROM json_each(r.payload, '$.objects') AS o ORDER BY 1)) AS labels,
       json_extract(r.payload, '$.inference_ms') AS inference_ms
FROM results r
WHERE r.kind = 'detections';

CREATE VIEW motion AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       json_extract(r.payload, '$.label')        AS label,
       json_extract(r.payload, '$.score')        AS score,
       json_extract(r.payload, '$.signature')    AS signature,
       json_extract(r.payload, '$.window_s')     AS window_s,
       json_extract(r.payload, '$.inference_ms') AS inference_ms
FROM results r
WHERE r.kind = 'motion';

CREATE VIEW gaps AS
SELECT s.device_id,
       s.seq + 1              AS first_missing,
       s.next_seq - 1         AS last_missing,
       s.next_seq - s.seq - 1 AS missing,
       d.dropped              AS device_dropped
FROM (SELECT device_id, seq, lead(seq) OVER (PARTITION BY device_id ORDER BY seq) AS next_seq
      FROM results) s
LEFT JOIN devices d USING (device_id)
WHERE s.next_seq > s.seq + 1;
