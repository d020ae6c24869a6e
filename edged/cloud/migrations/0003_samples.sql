-- edged ingest, schema version 3: samples (`<prefix>/<device_id>/sample`, docs/mqtt.md): raw IMU
-- windows and frame crops a device's models could not place, kept for labelling. One row per
-- sample, keyed by (device_id, sample_id): a redelivery is not stored twice. Not partitioned and
-- not subject to the results' retention: samples are few by design (the device's budget) and a
-- label given to one is worth keeping.
CREATE TABLE samples (
    device_id    text        NOT NULL,
    sample_id    bigint      NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('imu', 'crop')),
    ts           timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    trigger      text        NOT NULL,
    model        text        NOT NULL,
    device_label text        NOT NULL,   -- what the device called it (`unknown`, or the detection's label)
    score        real        NOT NULL,
    bytes        integer     NOT NULL,   -- size of `data`
    meta         jsonb       NOT NULL,   -- imu: t0, n, signature, sig_v; crop: box, region, width, height
    data         bytea       NOT NULL,   -- imu: n rows of 7 little-endian float32; crop: the JPEG
    label        text,                   -- NULL until someone labels it (`edged samples label`)
    labelled_at  timestamptz,
    PRIMARY KEY (device_id, sample_id)
);
CREATE INDEX samples_to_label ON samples (kind, ts) WHERE label IS NULL;
