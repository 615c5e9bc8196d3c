-- The primary key of a partitioned `samples` carries the value, so a read of some series is an
-- index-only scan: the key's entries are in (series_id, time) order while heap rows arrive in
-- time order, one series' rows on as many pages as it has samples. Reads of 5 % of the series
-- over 2 h went from about 300 ms to about 70 ms (docs/storage.md, "Reads"). Index-only scans
-- need pages marked all-visible; the lifecycle job vacuums the recent partitions every run.
-- A hypertable (TimescaleDB mode) keeps its own key: its compressed chunks are ordered by
-- series already.
DO $$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass) = 'p' THEN
        ALTER TABLE samples DROP CONSTRAINT samples_pkey;
        ALTER TABLE samples ADD CONSTRAINT samples_pkey PRIMARY KEY (series_id, time) INCLUDE (value);
    END IF;
END
$$;
