-- edged ingest, schema version 1: results, devices, rejected, and the views users query.
-- Applied once by `edged ingest --migrate` (recorded in schema_migrations); see docs/cloud.md.

-- One row per result a device published. PostgreSQL requires a partitioned table's primary key
-- to contain the partition key, so `ts` is part of it: a redelivery carries the same payload
-- (the device re-sends the bytes its outbox stored), hence the same ts, and is caught by it.
CREATE TABLE results (
    device_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('detections', 'motion')),
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    payload     jsonb       NOT NULL,
    PRIMARY KEY (device_id, seq, ts)
) PARTITION BY RANGE (ts);

-- One row per device, kept by every worker from the results, the retained status and the stats.
CREATE TABLE devices (
    device_id    text PRIMARY KEY,
    first_seen   timestamptz,
    last_seen    timestamptz,
    last_seq     bigint,
    duplicates   bigint      NOT NULL DEFAULT 0,
    rejected     bigint      NOT NULL DEFAULT 0,
    status       text,
    status_since timestamptz,
    stats        jsonb,
    stats_at     timestamptz,
    dropped      bigint,
    backend      text,
    models       jsonb
);

-- Payloads that could not be stored as results: kept (first max_payload_bytes of them) with why.
CREATE TABLE rejected (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text        NOT NULL,
    device_id   text,
    kind        text        NOT NULL,
    reason      text        NOT NULL,
    size        integer     NOT NULL,
    payload     bytea       NOT NULL
);
CREATE INDEX rejected_received_at ON rejected (received_at);

-- One row per detected object.
CREATE VIEW detected_objects AS
SELECT r.device_id, r.seq, r.ts,
       o.value ->> 'label'                          AS label,
       (o.value ->> 'score')::real                  AS score,
       ARRAY(SELECT jsonb_array_elements_text(o.value -> 'box')::real) AS box
FROM results r, jsonb_array_elements(r.payload -> 'objects') AS o
WHERE r.kind = 'detections';

-- One row per detections message: the labels in view (sorted, with repeats for several objects).
CREATE VIEW detections AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       ARRAY(SELECT o ->> 'label' FROM jsonb_array_elements(r.payload -> 'objects') o ORDER BY 1) AS labels,
       (r.payload ->> 'inference_ms')::real AS inference_ms
FROM results r
WHERE r.kind = 'detections';

-- One row per motion window.
CREATE VIEW motion AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       r.payload ->> 'label'             AS label,
       (r.payload ->> 'score')::real      AS score,
       ARRAY(SELECT jsonb_array_elements_text(r.payload -> 'signature')::smallint) AS signature,
       (r.payload ->> 'window_s')::real   AS window_s,
       (r.payload ->> 'inference_ms')::real AS inference_ms
FROM results r
WHERE r.kind = 'motion';

-- The seq ranges between a device's first and last stored result that never arrived, beside the
-- device's own count of results its outbox dropped (from its last stats).
CREATE VIEW gaps AS
SELECT s.device_id,
       s.seq + 1                   AS first_missing,
       s.next_seq - 1              AS last_missing,
       s.next_seq - s.seq - 1      AS missing,
       d.dropped                   AS device_dropped
FROM (SELECT device_id, seq, lead(seq) OVER (PARTITION BY device_id ORDER BY seq) AS next_seq
      FROM results) s
LEFT JOIN devices d USING (device_id)
WHERE s.next_seq > s.seq + 1;
