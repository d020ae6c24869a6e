-- edged ingest, schema version 2: track events (`<prefix>/<device_id>/events`, docs/mqtt.md) are
-- results too, and get a view of their own.

ALTER TABLE results DROP CONSTRAINT results_kind_check;
ALTER TABLE results ADD CONSTRAINT results_kind_check CHECK (kind IN ('detections', 'motion', 'events'));

-- One row per track event: new / update / end of one tracked object.
CREATE VIEW events AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       r.payload ->> 'type'                                     AS type,
       (r.payload ->> 'id')::bigint                             AS track_id,
       r.payload ->> 'label'                                    AS label,
       (r.payload ->> 'score')::real                            AS score,
       ARRAY(SELECT jsonb_array_elements_text(r.payload -> 'box')::real) AS box,
       to_timestamp((r.payload ->> 'start_ts')::float8)         AS start_ts,
       (r.payload ->> 'dwell_s')::real                          AS dwell_s,
       ARRAY(SELECT jsonb_array_elements_text(r.payload -> 'inside')) AS inside
FROM results r
WHERE r.kind = 'events';
