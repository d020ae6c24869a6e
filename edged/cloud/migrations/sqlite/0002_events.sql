-- edged ingest on SQLite, schema version 2: track events are results too. SQLite cannot alter a
-- CHECK, so `results` is rebuilt (its views with it) and the events view added.

DROP VIEW detected_objects;
DROP VIEW detections;
DROP VIEW motion;
DROP VIEW gaps;

CREATE TABLE results_v2 (
    device_id   TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('detections', 'motion', 'events')),
    ts          REAL    NOT NULL,
    received_at REAL    NOT NULL,
    payload     TEXT    NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
INSERT INTO results_v2 SELECT device_id, seq, kind, ts, received_at, payload FROM results;
DROP TABLE results;
ALTER TABLE results_v2 RENAME TO results;
CREATE INDEX results_ts_v2 ON results (ts);

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

CREATE VIEW events AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       json_extract(r.payload, '$.type')     AS type,
       json_extract(r.payload, '$.id')       AS track_id,
       json_extract(r.payload, '$.label')    AS label,
       json_extract(r.payload, '$.score')    AS score,
       json_extract(r.payload, '$.box')      AS box,
       json_extract(r.payload, '$.start_ts') AS start_ts,
       json_extract(r.payload, '$.dwell_s')  AS dwell_s,
       json_extract(r.payload, '$.inside')   AS inside
FROM results r
WHERE r.kind = 'events';

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
