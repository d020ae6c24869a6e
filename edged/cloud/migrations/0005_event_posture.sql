-- edged ingest, schema version 5: the events view also shows which stage made a track, its
-- enclosing track (a face's person) and a person's posture (`fallen` after a fall), which
-- devices with a pose stage send (docs/mqtt.md, "events"). Rows stored before are unchanged:
-- the columns read what their payloads hold, NULL where they hold nothing.

CREATE OR REPLACE VIEW events AS
SELECT r.device_id, r.seq, r.ts, r.received_at,
       r.payload ->> 'type'                                     AS type,
       (r.payload ->> 'id')::bigint                             AS track_id,
       r.payload ->> 'label'                                    AS label,
       (r.payload ->> 'score')::real                            AS score,
       ARRAY(SELECT jsonb_array_elements_text(r.payload -> 'box')::real) AS box,
       to_timestamp((r.payload ->> 'start_ts')::float8)         AS start_ts,
       (r.payload ->> 'dwell_s')::real                          AS dwell_s,
       ARRAY(SELECT jsonb_array_elements_text(r.payload -> 'inside')) AS inside,
       r.payload ->> 'stage'                                    AS stage,
       (r.payload ->> 'parent')::bigint                         AS parent,
       r.payload ->> 'posture'                                  AS posture
FROM results r
WHERE r.kind = 'events';
