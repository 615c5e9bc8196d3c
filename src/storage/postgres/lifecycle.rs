//! The data lifecycle of the PostgreSQL backend. Which one runs is decided at connect:
//! TimescaleDB's own (see `timescaledb.rs`) when the extension is there, or this module's on
//! plain PostgreSQL, run by the server every `lifecycle_interval_secs`:
//! - `samples` partitions are created ahead of time and dropped once past raw retention;
//! - `samples_5m` (from `samples`) and `samples_1h` (from `samples_5m`) are tables with the
//!   continuous aggregates' names and columns, filled incrementally: each holds every bucket
//!   before its watermark (`rollup_watermarks`), which moves on once a bucket ended
//!   [`LAG_MS`] ago;
//! - writes of samples older than [`LATE_MS`] record the range they touched in
//!   `rollup_invalidations` (after the samples are committed); the next run recomputes those
//!   buckets, and reads compute ranges with a pending invalidation from raw samples;
//! - every 15-minute window that ended before the 5 min watermark is packed, one row per
//!   series (`packed.rs`); windows with late writes are unpacked for their recomputation and
//!   packed again;
//! - rollup rows past their retention are deleted.
//!
//! One server at a time runs it (a session advisory lock); the watermarks make it resumable
//! after a restart at the bucket where it stopped.

use super::write::to_datetime;
use super::{db_error, float_sum, not_stale, packed, relkind, PostgresStorage};
use crate::model::TimestampMs;
use crate::storage::{Resolution, StorageError, StorageResult};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Whether to use TimescaleDB (`--timescaledb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TimescaleMode {
    /// TimescaleDB when the extension is installed or can be created, plain PostgreSQL otherwise.
    #[default]
    Auto,
    /// TimescaleDB, or fail at start.
    On,
    /// Plain PostgreSQL, even where TimescaleDB is available.
    Off,
}

/// The lifecycle the backend runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plain,
    TimescaleDb,
}

/// A rollup bucket is materialized once it ended this long ago.
pub(super) const LAG_MS: i64 = 10 * 60_000;
/// Writers record an invalidation for samples older than this: a minute less than
/// [`LAG_MS`], for clocks of servers sharing the database that disagree a little.
pub(super) const LATE_MS: i64 = 9 * 60_000;
/// Time one run spends packing before it leaves the rest for the next run.
const PACK_BUDGET: std::time::Duration = std::time::Duration::from_secs(30);
/// Raw time aggregated per statement while catching up.
const STEP_5M_MS: i64 = 3_600_000;
const STEP_1H_MS: i64 = 86_400_000;

/// Progress of the plain lifecycle, for `/metrics`.
#[derive(Debug)]
pub(super) struct LifecycleState {
    pub watermark_5m: AtomicI64,
    pub watermark_1h: AtomicI64,
    pub partitions_dropped: AtomicU64,
    pub rollup_rows_written: AtomicU64,
    pub failed_runs: AtomicU64,
    pub completed_runs: AtomicU64,
    pub samples_packed: AtomicU64,
}

impl Default for LifecycleState {
    fn default() -> Self {
        Self {
            watermark_5m: AtomicI64::new(i64::MIN),
            watermark_1h: AtomicI64::new(i64::MIN),
            partitions_dropped: AtomicU64::new(0),
            rollup_rows_written: AtomicU64::new(0),
            failed_runs: AtomicU64::new(0),
            completed_runs: AtomicU64::new(0),
            samples_packed: AtomicU64::new(0),
        }
    }
}

/// What one run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LifecycleReport {
    pub partitions_created: usize,
    pub partitions_dropped: usize,
    pub invalidations: usize,
    pub rows_5m: u64,
    pub rows_1h: u64,
    pub rows_expired: u64,
    /// Partitions vacuumed (the current and the previous one).
    pub partitions_vacuumed: usize,
    /// Partitions whose windows were all packed and whose emptied heap and key were given
    /// back to the file system.
    pub partitions_released: usize,
    /// Samples moved into packed rows (`samples_packed`).
    pub samples_packed: u64,
    /// Windows unpacked or packed again for late writes.
    pub windows_unpacked: usize,
}

/// Decides the mode: `off` is plain; otherwise TimescaleDB when the extension is installed
/// or can be created; `on` fails loudly when it cannot.
pub(super) async fn detect(conn: &mut PgConnection, setting: TimescaleMode) -> StorageResult<Mode> {
    if setting == TimescaleMode::Off {
        return Ok(Mode::Plain);
    }
    let installed: Option<String> =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
    if installed.is_some() {
        return Ok(Mode::TimescaleDb);
    }
    let available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let failure = if available {
        match sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .execute(&mut *conn)
            .await
        {
            Ok(_) => return Ok(Mode::TimescaleDb),
            Err(e) => format!("CREATE EXTENSION timescaledb failed: {e}"),
        }
    } else {
        "the timescaledb extension is not available in this PostgreSQL server".to_owned()
    };
    if setting == TimescaleMode::On {
        return Err(StorageError::Internal(format!(
            "--timescaledb=on: {failure}; install TimescaleDB (and add it to \
             shared_preload_libraries), or use --timescaledb=auto or off"
        )));
    }
    tracing::info!(reason = %failure, "TimescaleDB not used; plain PostgreSQL lifecycle");
    Ok(Mode::Plain)
}

/// Plain mode's relations: the rollup tables, their watermarks and the invalidation log.
pub(super) async fn setup_plain(conn: &mut PgConnection) -> StorageResult<()> {
    if relkind(&mut *conn, "samples").await?.as_deref() != Some("p") {
        return Err(StorageError::Internal(
            "samples is not a partitioned table (a TimescaleDB hypertable?); plain mode cannot \
             manage it: run with --timescaledb=auto or on"
                .into(),
        ));
    }
    for resolution in Resolution::ALL {
        let name = resolution.name();
        if relkind(&mut *conn, name).await?.is_some_and(|k| k != "r") {
            return Err(StorageError::Internal(format!(
                "{name} is not a table (a TimescaleDB continuous aggregate?); run with \
                 --timescaledb=auto or on"
            )));
        }
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {name} (
                 series_id BIGINT           NOT NULL,
                 bucket    TIMESTAMPTZ      NOT NULL,
                 min       DOUBLE PRECISION NOT NULL,
                 max       DOUBLE PRECISION NOT NULL,
                 sum       DOUBLE PRECISION NOT NULL,
                 count     DOUBLE PRECISION NOT NULL,
                 last       DOUBLE PRECISION NOT NULL,
                 first_time TIMESTAMPTZ      NOT NULL,
                 first      DOUBLE PRECISION NOT NULL,
                 PRIMARY KEY (series_id, bucket))"
        ))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        // Retention deletes by bucket alone; rows arrive in bucket order, so BRIN serves it.
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS {name}_bucket_idx ON {name} USING brin (bucket)"
        ))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS rollup_watermarks (
             relation   TEXT        PRIMARY KEY,
             watermark  TIMESTAMPTZ NOT NULL,
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS rollup_invalidations (
             lo         TIMESTAMPTZ NOT NULL,
             hi         TIMESTAMPTZ NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    packed::setup(conn).await
}

/// Watermark of a rollup table (every bucket before it is materialized) or of packing.
async fn watermark(conn: &mut PgConnection, relation: &str) -> StorageResult<Option<TimestampMs>> {
    let w: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT watermark FROM rollup_watermarks WHERE relation = $1")
            .bind(relation)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
    Ok(w.map(|w| w.timestamp_millis()))
}

async fn set_watermark(
    conn: &mut PgConnection,
    relation: &str,
    t: TimestampMs,
) -> StorageResult<()> {
    sqlx::query(
        "INSERT INTO rollup_watermarks (relation, watermark) VALUES ($1, $2)
         ON CONFLICT (relation) DO UPDATE SET watermark = excluded.watermark, updated_at = now()",
    )
    .bind(relation)
    .bind(to_datetime(t))
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The statement that aggregates `[$1, $2)` of the source into a rollup table. One ordered
/// array per group gives both the last and the first value.
fn aggregate_sql(resolution: Resolution) -> String {
    let upsert = "ON CONFLICT (series_id, bucket) DO UPDATE SET min = excluded.min,
               max = excluded.max, sum = excluded.sum, count = excluded.count,
               last = excluded.last, first_time = excluded.first_time, first = excluded.first";
    match resolution {
        Resolution::FiveMinutes => format!(
            "INSERT INTO samples_5m (series_id, bucket, min, max, sum, count, last, first_time, first)
             SELECT series_id, bucket, min, max, sum, count, v[cardinality(v)], first_time, v[1]
             FROM (SELECT series_id, date_bin('5 minutes', time, timestamptz 'epoch') AS bucket,
                          min(value) AS min,
                          coalesce(max(value) FILTER (WHERE value <> 'NaN'), max(value)) AS max,
                          {} AS sum, count(*)::float8 AS count, min(time) AS first_time,
                          array_agg(value ORDER BY time) AS v
                   FROM samples WHERE time >= $1 AND time < $2 AND {}
                   GROUP BY 1, 2) AS a
             {upsert}",
            float_sum("value"),
            not_stale("value")
        ),
        Resolution::OneHour => format!(
            "INSERT INTO samples_1h (series_id, bucket, min, max, sum, count, last, first_time, first)
             SELECT series_id, bucket, min, max, sum, count, l[cardinality(l)], first_time, f[1]
             FROM (SELECT series_id, date_bin('1 hour', bucket, timestamptz 'epoch') AS bucket,
                          min(min) AS min,
                          coalesce(max(max) FILTER (WHERE max <> 'NaN'), max(max)) AS max,
                          {} AS sum, sum(count) AS count, min(first_time) AS first_time,
                          array_agg(last ORDER BY bucket) AS l,
                          array_agg(first ORDER BY bucket) AS f
                   FROM samples_5m WHERE bucket >= $1 AND bucket < $2
                   GROUP BY 1, 2) AS a
             {upsert}",
            float_sum("sum")
        ),
    }
}

/// Aggregates `[from, to)` into the rollup table; with `replace`, rows there are deleted
/// first (a recomputation).
async fn aggregate(
    conn: &mut PgConnection,
    resolution: Resolution,
    from: TimestampMs,
    to: TimestampMs,
    replace: bool,
) -> StorageResult<u64> {
    if replace {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE bucket >= $1 AND bucket < $2",
            resolution.name()
        ))
        .bind(to_datetime(from))
        .bind(to_datetime(to))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(sqlx::query(&aggregate_sql(resolution))
        .bind(to_datetime(from))
        .bind(to_datetime(to))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?
        .rows_affected())
}

/// A partition's heap bytes, and whether every valid index is down to its metapage.
async fn partition_space(conn: &mut PgConnection, name: &str) -> Result<(i64, bool), sqlx::Error> {
    sqlx::query_as(
        "SELECT pg_relation_size($1::regclass),
                coalesce(bool_and(pg_relation_size(indexrelid)
                                  <= current_setting('block_size')::int8), true)
         FROM pg_index WHERE indrelid = $1::regclass AND indisvalid",
    )
    .bind(name)
    .fetch_one(conn)
    .await
}

/// Partitions of `parent` (`samples` or `samples_packed`) with their bounds, oldest first.
async fn partitions(
    conn: &mut PgConnection,
    parent: &str,
) -> StorageResult<Vec<(String, i64, i64)>> {
    let rows: Vec<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT name,
                (extract(epoch FROM (regexp_match(bound, 'FROM \\(''([^'']+)''\\)'))[1]::timestamptz) * 1000)::int8,
                (extract(epoch FROM (regexp_match(bound, 'TO \\(''([^'']+)''\\)'))[1]::timestamptz) * 1000)::int8
         FROM (SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
               FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
               WHERE i.inhparent = $1::regclass) p",
    )
    .bind(parent)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut out: Vec<(String, i64, i64)> = rows
        .into_iter()
        .filter_map(|(name, lo, hi)| Some((name, lo?, hi?)))
        .collect();
    out.sort_by_key(|p| p.1);
    Ok(out)
}

impl PostgresStorage {
    /// Records that samples in each `[lo, hi]` arrived late, once they are committed.
    pub(super) async fn invalidate(
        &self,
        ranges: &[(TimestampMs, TimestampMs)],
    ) -> StorageResult<()> {
        let (lo, hi): (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) = ranges
            .iter()
            .map(|&(lo, hi)| (to_datetime(lo), to_datetime(hi.saturating_add(1))))
            .unzip();
        sqlx::query("INSERT INTO rollup_invalidations (lo, hi) SELECT * FROM unnest($1::timestamptz[], $2::timestamptz[])")
            .bind(&lo)
            .bind(&hi)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    /// One run of the plain lifecycle, unless another server holds it.
    pub(super) async fn run_lifecycle(&self, now: TimestampMs) -> StorageResult<LifecycleReport> {
        let mut conn = self.pool.acquire().await.map_err(db_error)?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('secumon.lifecycle'))")
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
        if !locked {
            return Ok(LifecycleReport::default());
        }
        let result = self.lifecycle_locked(&mut conn, now).await;
        if result.is_err() {
            // It may have failed in the middle of a COPY: closing it also frees the lock.
            let _ = conn.detach().close().await;
        } else {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext('secumon.lifecycle'))")
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // A connection that may still hold the lock is never reused.
                let _ = conn.detach().close().await;
            }
        }
        match &result {
            Ok(_) => self
                .lifecycle
                .completed_runs
                .fetch_add(1, Ordering::Relaxed),
            Err(_) => self.lifecycle.failed_runs.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    /// Gives back the disk space of partitions packed whole by an earlier run (`hi` at or
    /// before `packed`, and after `dropped`, below which retention drops them anyway).
    /// Packing deletes every row, and VACUUM makes the pages reusable, but a past day is
    /// hardly ever written again, so its heap and its key would keep their size until
    /// retention: about 120 bytes for every sample that now takes a few in `samples_packed`.
    /// So the partition is vacuumed (which, once no snapshot can see the deleted rows, cuts
    /// the empty heap to nothing), and a partition left with an empty heap gets its key
    /// rebuilt with `REINDEX CONCURRENTLY`. Both are MVCC-safe and take no lock that stops
    /// reads or writes for long; TRUNCATE would be neither. A partition with rows (a late
    /// write not yet packed again) or one a reader still holds waits for a later run. The
    /// REINDEX waits for older transactions, for at most `lock_timeout` 10 s and
    /// `statement_timeout` 5 min; an invalid index a failed one left is dropped before the
    /// next try. At most 30 s of it a run; a failure is logged: it costs space, never data.
    async fn release_packed(
        &self,
        conn: &mut PgConnection,
        parts: &[(String, i64, i64)],
        packed: Option<TimestampMs>,
        dropped: TimestampMs,
    ) -> usize {
        let Some(packed) = packed else { return 0 };
        let deadline = std::time::Instant::now() + PACK_BUDGET;
        let mut released = 0;
        for (name, _, _) in parts.iter().filter(|p| p.2 <= packed && p.2 > dropped) {
            if std::time::Instant::now() > deadline {
                break;
            }
            let step = async {
                let (heap, keys_empty) = partition_space(&mut *conn, name).await?;
                if heap == 0 && keys_empty {
                    return Ok::<_, sqlx::Error>(false);
                }
                if heap > 0 {
                    // Cheap on a partition vacuumed before: its pages are all-visible.
                    let sql = format!("VACUUM (SKIP_LOCKED) \"{name}\"");
                    sqlx::Executor::execute(&mut *conn, sql.as_str()).await?;
                    if partition_space(&mut *conn, name).await?.0 > 0 {
                        return Ok(false);
                    }
                }
                let invalid: Vec<String> = sqlx::query_scalar(
                    "SELECT indexrelid::regclass::text FROM pg_index
                     WHERE indrelid = $1::regclass AND NOT indisvalid",
                )
                .bind(name)
                .fetch_all(&mut *conn)
                .await?;
                for index in invalid {
                    let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {index}");
                    sqlx::Executor::execute(&mut *conn, sql.as_str()).await?;
                }
                sqlx::Executor::execute(
                    &mut *conn,
                    "SET lock_timeout = '10s'; SET statement_timeout = '5min'",
                )
                .await?;
                let sql = format!("REINDEX TABLE CONCURRENTLY \"{name}\"");
                let reindexed = sqlx::Executor::execute(&mut *conn, sql.as_str()).await;
                sqlx::Executor::execute(&mut *conn, "RESET lock_timeout; RESET statement_timeout")
                    .await?;
                reindexed?;
                Ok(true)
            };
            match step.await {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(partition = %name, error = %e, "giving back a packed partition's space failed")
                }
            }
        }
        released
    }

    async fn lifecycle_locked(
        &self,
        conn: &mut PgConnection,
        now: TimestampMs,
    ) -> StorageResult<LifecycleReport> {
        let mut report = LifecycleReport::default();
        let width = self.partitions.width_ms;
        let ahead: Vec<DateTime<Utc>> = (0..3).map(|i| to_datetime(now + i * width)).collect();
        report.partitions_created = self.ensure_partitions(&ahead).await?;

        let raw_cutoff = now - self.retention.keep_ms(None);
        let oldest_raw = partitions(conn, "samples")
            .await?
            .first()
            .map_or(now, |p| p.1)
            .max(raw_cutoff);
        let w5 = watermark(conn, Resolution::FiveMinutes.name()).await?;
        let w1 = watermark(conn, Resolution::OneHour.name()).await?;
        let packed_before = watermark(conn, packed::WATERMARK).await?;

        // Late writes below the watermarks: recompute those buckets from what raw data is
        // left (never below raw retention, where the rollups are all there is).
        let mut tx = conn.begin().await.map_err(db_error)?;
        let ranges: Vec<(DateTime<Utc>, DateTime<Utc>)> =
            sqlx::query_as("DELETE FROM rollup_invalidations RETURNING lo, hi")
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
        report.invalidations = ranges.len();
        let mut repack = Vec::new();
        for (lo, hi) in merge_ranges(
            ranges
                .iter()
                .map(|(lo, hi)| (lo.timestamp_millis(), hi.timestamp_millis())),
        ) {
            // Rollups are recomputed from `samples`: packed windows there go back first, and
            // every window below the packing watermark is packed again after the commit
            // (with the late samples, also where nothing was packed before). Not limited to
            // the watermark: a window packed by a run that stopped before moving it is there.
            let from = lo.max(oldest_raw);
            if from < hi {
                repack.extend(packed::unpack(&mut tx, from, hi).await?);
                let mut w = packed::window_of(from);
                while w < hi.min(packed_before.unwrap_or(i64::MIN)) {
                    repack.push(w);
                    w += packed::WINDOW_MS;
                }
            }
            let five = Resolution::FiveMinutes;
            let from = five.bucket(lo).max(five.bucket(oldest_raw + five.ms() - 1));
            let to = (five.bucket(hi - 1) + five.ms()).min(w5.unwrap_or(i64::MIN));
            if from < to {
                report.rows_5m += aggregate(&mut tx, five, from, to, true).await?;
                let hour = Resolution::OneHour;
                let from = hour.bucket(from);
                let to = (hour.bucket(to - 1) + hour.ms()).min(w1.unwrap_or(i64::MIN));
                if from < to {
                    report.rows_1h += aggregate(&mut tx, hour, from, to, true).await?;
                }
            }
        }
        tx.commit().await.map_err(db_error)?;
        repack.sort_unstable();
        repack.dedup();
        report.windows_unpacked = repack.len();
        for window in repack {
            report.samples_packed += packed::pack_window(conn, width, window).await?;
        }

        // Move the watermarks on: 5 min from raw samples (the partitions read after the late
        // writes were taken, so a partition they created is not skipped), 1 h from the 5 min
        // rows, from the oldest of them on a first run.
        let parts = partitions(conn, "samples").await?;
        let target_5m = Resolution::FiveMinutes.bucket(now - LAG_MS);
        let start_5m = w5.unwrap_or_else(|| {
            parts
                .first()
                .map_or(target_5m, |p| Resolution::FiveMinutes.bucket(p.1))
        });
        let (w5, rows) = self
            .advance(conn, Resolution::FiveMinutes, start_5m, target_5m, &parts)
            .await?;
        report.rows_5m += rows;
        let target_1h = Resolution::OneHour.bucket(w5);
        let start_1h = match w1 {
            Some(w1) => w1,
            None => {
                let oldest: Option<DateTime<Utc>> =
                    sqlx::query_scalar("SELECT min(bucket) FROM samples_5m")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(db_error)?;
                Resolution::OneHour.bucket(oldest.map_or(w5, |t| t.timestamp_millis()))
            }
        };
        let (w1, rows) = self
            .advance(conn, Resolution::OneHour, start_1h, target_1h, &parts)
            .await?;
        report.rows_1h += rows;
        report.samples_packed += self.pack(conn, packed_before, w5, &parts).await?;
        report.partitions_released = self
            .release_packed(conn, &parts, packed_before, raw_cutoff.min(w5))
            .await;

        // Raw retention: whole partitions, so the space is freed at once; only what the 5 min
        // rollups already hold, so a stalled job never lets raw data go unrolled.
        for (name, lo, hi) in &parts {
            if *hi <= raw_cutoff.min(w5) {
                sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
                self.partitions.forget(*lo);
                report.partitions_dropped += 1;
            }
        }
        for (name, _, hi) in partitions(conn, "samples_packed").await? {
            if hi <= raw_cutoff.min(w5) {
                sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
        }
        self.lifecycle
            .partitions_dropped
            .fetch_add(report.partitions_dropped as u64, Ordering::Relaxed);
        self.lifecycle.watermark_5m.store(w5, Ordering::Relaxed);
        self.lifecycle.watermark_1h.store(w1, Ordering::Relaxed);
        self.lifecycle
            .rollup_rows_written
            .fetch_add(report.rows_5m + report.rows_1h, Ordering::Relaxed);

        // Rollup retention.
        for resolution in Resolution::ALL {
            report.rows_expired += sqlx::query(&format!(
                "DELETE FROM {} WHERE bucket < $1",
                resolution.name()
            ))
            .bind(to_datetime(now - self.retention.keep_ms(Some(resolution))))
            .execute(&mut *conn)
            .await
            .map_err(db_error)?
            .rows_affected();
        }
        sqlx::query("DELETE FROM rollup_invalidations WHERE hi < $1")
            .bind(to_datetime(raw_cutoff))
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;

        // Index-only scans (the key carries the value) skip the heap only on all-visible
        // pages: vacuum the partitions being written, so every sample older than a run is
        // read from the key alone. On an insert-only partition VACUUM visits only the pages
        // written since its last run; older partitions are left to autovacuum. Last, and a
        // failure only logged: reads stay correct without it, retention must not wait on it.
        for (name, _, _) in parts
            .iter()
            .filter(|(_, lo, hi)| *lo <= now && *hi > now - width)
        {
            let sql = format!("VACUUM (SKIP_LOCKED) \"{name}\"");
            match sqlx::Executor::execute(&mut *conn, sql.as_str()).await {
                Ok(_) => report.partitions_vacuumed += 1,
                Err(e) => tracing::warn!(partition = %name, error = %e, "vacuum failed"),
            }
        }
        Ok(report)
    }

    /// Aggregates from `from` up to `target` in steps, each committed with its watermark, and
    /// skips time without source data. Returns the new watermark and rows written.
    async fn advance(
        &self,
        conn: &mut PgConnection,
        resolution: Resolution,
        from: TimestampMs,
        target: TimestampMs,
        parts: &[(String, i64, i64)],
    ) -> StorageResult<(TimestampMs, u64)> {
        let step = match resolution {
            Resolution::FiveMinutes => STEP_5M_MS,
            Resolution::OneHour => STEP_1H_MS,
        };
        let mut w = from;
        let mut rows = 0;
        while w < target {
            // Where the source has data next: raw samples by partition, 5 min rows (which
            // outlive raw partitions) by a look at the table.
            let (lo, hi) = match resolution {
                Resolution::FiveMinutes => match parts.iter().find(|p| p.2 > w) {
                    Some(&(_, lo, hi)) => (lo, hi),
                    None => (target, target),
                },
                Resolution::OneHour => {
                    let next: Option<DateTime<Utc>> = sqlx::query_scalar(
                        "SELECT min(bucket) FROM samples_5m WHERE bucket >= $1 AND bucket < $2",
                    )
                    .bind(to_datetime(w))
                    .bind(to_datetime(target))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db_error)?;
                    next.map_or((target, target), |t| (t.timestamp_millis(), i64::MAX))
                }
            };
            if resolution.bucket(lo) > w {
                w = resolution.bucket(lo).min(target);
                continue;
            }
            let next = (w + step).min(
                resolution
                    .bucket(hi.saturating_sub(1))
                    .saturating_add(resolution.ms()),
            );
            let next = next.min(target).max(w + resolution.ms());
            let mut tx = conn.begin().await.map_err(db_error)?;
            rows += aggregate(&mut tx, resolution, w, next, false).await?;
            set_watermark(&mut tx, resolution.name(), next).await?;
            tx.commit().await.map_err(db_error)?;
            w = next;
        }
        set_watermark(conn, resolution.name(), w.max(from)).await?;
        Ok((w.max(from), rows))
    }

    /// Packs every window from `from` (the oldest raw partition on a first run) that ended
    /// before the 5 min watermark `w5`, skipping time no partition covers. Returns the
    /// samples moved.
    async fn pack(
        &self,
        conn: &mut PgConnection,
        from: Option<TimestampMs>,
        w5: TimestampMs,
        parts: &[(String, i64, i64)],
    ) -> StorageResult<u64> {
        let target = packed::window_of(w5);
        let Some(from) = from.or_else(|| parts.first().map(|p| packed::window_of(p.1))) else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut w = from;
        // A first run over an existing database packs its history a budget at a time, so
        // the rest of the job (retention, vacuum) keeps its pace.
        let deadline = std::time::Instant::now() + PACK_BUDGET;
        let mut done = true;
        'parts: for &(_, lo, hi) in parts.iter().take_while(|p| p.1 < target) {
            w = w.max(packed::window_of(lo));
            while w < hi.min(target) {
                if std::time::Instant::now() > deadline {
                    done = false;
                    break 'parts;
                }
                moved += packed::pack_window(conn, self.partitions.width_ms, w).await?;
                w += packed::WINDOW_MS;
                set_watermark(conn, packed::WATERMARK, w).await?;
            }
        }
        if done && target > from {
            set_watermark(conn, packed::WATERMARK, target).await?;
        }
        self.lifecycle
            .samples_packed
            .fetch_add(moved, Ordering::Relaxed);
        Ok(moved)
    }
}

/// Sorted, overlapping or touching ranges merged.
fn merge_ranges(ranges: impl Iterator<Item = (i64, i64)>) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = ranges.collect();
    ranges.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        let got = merge_ranges([(5, 7), (1, 3), (3, 4), (10, 12), (6, 9)].into_iter());
        assert_eq!(got, vec![(1, 4), (5, 9), (10, 12)]);
    }
}
