-- edged ingest on SQLite, schema version 4: resend, as in PostgreSQL (times in UNIX seconds).
CREATE TABLE resend_asks (
    device_id   TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    asked       INTEGER NOT NULL,
    first_asked REAL    NOT NULL,
    last_asked  REAL    NOT NULL,
    next_ask    REAL    NOT NULL,
    PRIMARY KEY (device_id, first_seq)
) WITHOUT ROWID;

CREATE TABLE resend_gone (
    device_id   TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    said_at     REAL    NOT NULL,
    PRIMARY KEY (device_id, first_seq)
) WITHOUT ROWID;

DROP VIEW gaps;

CREATE VIEW gaps AS
SELECT s.device_id,
       s.seq + 1              AS first_missing,
       s.next_seq - 1         AS last_missing,
       s.next_seq - s.seq - 1 AS missing,
       d.dropped              AS device_dropped,
       coalesce(a.asked, 0)   AS resend_asked,
       a.last_asked           AS resend_last_asked,
       (SELECT coalesce(sum(min(g.last_seq, s.next_seq - 1) - max(g.first_seq, s.seq + 1) + 1), 0)
        FROM resend_gone g
        WHERE g.device_id = s.device_id AND g.first_seq <= s.next_seq - 1 AND g.last_seq >= s.seq + 1)
                              AS resend_gone
FROM (SELECT device_id, seq, lead(seq) OVER (PARTITION BY device_id ORDER BY seq) AS next_seq
      FROM results) s
LEFT JOIN devices d USING (device_id)
LEFT JOIN resend_asks a ON a.device_id = s.device_id AND a.first_seq = s.seq + 1
WHERE s.next_seq > s.seq + 1;
