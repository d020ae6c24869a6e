-- edged ingest, schema version 4: asking devices to send again what was lost after their broker
-- acknowledged it (docs/cloud.md, "Resend"). Workers ask for the ranges `gaps` lists; these
-- tables say what was asked and what the devices said they no longer hold.

-- One row per gap asked for, keyed by its first seq: how often, when, and when next.
CREATE TABLE resend_asks (
    device_id   text        NOT NULL,
    first_seq   bigint      NOT NULL,
    last_seq    bigint      NOT NULL,
    asked       integer     NOT NULL,
    first_asked timestamptz NOT NULL,
    last_asked  timestamptz NOT NULL,
    next_ask    timestamptz NOT NULL,
    PRIMARY KEY (device_id, first_seq)
);

-- Seq ranges a device answered it no longer holds (aged out or dropped): never asked for again.
CREATE TABLE resend_gone (
    device_id   text        NOT NULL,
    first_seq   bigint      NOT NULL,
    last_seq    bigint      NOT NULL,
    said_at     timestamptz NOT NULL,
    PRIMARY KEY (device_id, first_seq)
);

-- The gaps, as before, and what resend knows of each: requests sent, the last one, and how many
-- of its seqs the device said are gone (missing = gone: nothing left to ask for).
CREATE OR REPLACE VIEW gaps AS
SELECT s.device_id,
       s.seq + 1                   AS first_missing,
       s.next_seq - 1              AS last_missing,
       s.next_seq - s.seq - 1      AS missing,
       d.dropped                   AS device_dropped,
       coalesce(a.asked, 0)        AS resend_asked,
       a.last_asked                AS resend_last_asked,
       (SELECT coalesce(sum(least(g.last_seq, s.next_seq - 1) - greatest(g.first_seq, s.seq + 1) + 1), 0)
        FROM resend_gone g
        WHERE g.device_id = s.device_id AND g.first_seq <= s.next_seq - 1 AND g.last_seq >= s.seq + 1)::bigint
                                   AS resend_gone
FROM (SELECT device_id, seq, lead(seq) OVER (PARTITION BY device_id ORDER BY seq) AS next_seq
      FROM results) s
LEFT JOIN devices d USING (device_id)
LEFT JOIN resend_asks a ON a.device_id = s.device_id AND a.first_seq = s.seq + 1
WHERE s.next_seq > s.seq + 1;
