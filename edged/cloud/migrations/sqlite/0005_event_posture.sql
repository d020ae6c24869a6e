-- edged ingest on SQLite, schema version 5: the events view also shows the track's stage, its
-- enclosing track and a person's posture (as the PostgreSQL migration of the same number).

DROP VIEW events;

CREATE VIEW events AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       json_extract(r.payload, '$.type')     AS type,
       json_extract(r.payload, '$.id')       AS track_id,
       json_extract(r.payload, '$.label')    AS label,
       json_extract(r.payload, '$.score')    AS score,
       json_extract(r.payload, '$.box')      AS box,
       json_extract(r.payload, '$.start_ts') AS start_ts,
       json_extract(r.payload, '$.dwell_s')  AS dwell_s,
       json_extract(r.payload, '$.inside')   AS inside,
       json_extract(r.payload, '$.stage')    AS stage,
       json_extract(r.payload, '$.parent')   AS parent,
       json_extract(r.payload, '$.posture')  AS posture
FROM results r
WHERE r.kind = 'events';
