-- Exemplars: one per series and timestamp, with their own labels (trace_id, span_id, ...).
CREATE TABLE exemplars (
    series_id BIGINT           NOT NULL,
    time      TIMESTAMPTZ      NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    labels    JSONB            NOT NULL,
    PRIMARY KEY (series_id, time)
);
