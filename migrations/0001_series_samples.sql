-- Series, samples and metric metadata for PostgreSQL (plain mode).
-- `samples` is range-partitioned by time; the server creates partitions as data arrives.

CREATE TABLE series (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   TEXT        NOT NULL,
    metric_name TEXT        NOT NULL,
    -- All labels, `__name__` included, as a JSON object.
    labels      JSONB       NOT NULL,
    -- xxh3-128 of the sorted label set: the identity of the series within its tenant.
    fingerprint BYTEA       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT series_identity UNIQUE (tenant_id, fingerprint)
);

-- Serves `{__name__="x", ...}`, by far the most common selector.
CREATE INDEX series_tenant_metric_idx ON series (tenant_id, metric_name);
-- Serves equality matchers on any other label (`labels @> '{"job":"node"}'`).
CREATE INDEX series_labels_idx ON series USING GIN (labels jsonb_path_ops);

CREATE TABLE samples (
    series_id BIGINT           NOT NULL,
    time      TIMESTAMPTZ      NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (series_id, time)
) PARTITION BY RANGE (time);

CREATE TABLE metric_metadata (
    tenant_id   TEXT        NOT NULL,
    metric_name TEXT        NOT NULL,
    type        TEXT        NOT NULL,
    unit        TEXT        NOT NULL,
    help        TEXT        NOT NULL,
    -- Help texts can be long; the key holds their hash.
    help_md5    TEXT        GENERATED ALWAYS AS (md5(help)) STORED,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, metric_name, type, unit, help_md5)
);
