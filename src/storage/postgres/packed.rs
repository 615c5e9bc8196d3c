//! Packed samples, plain PostgreSQL's series-major layout for data past the last minutes.
//!
//! `samples` holds a row per sample, and rows arrive time-major: the rows of one series are
//! spread over every page of a partition, and a read of many series costs PostgreSQL a row
//! each, client side too. Once a [`WINDOW_MS`] window is rolled up (it ended
//! [`super::lifecycle::LAG_MS`] ago), the lifecycle job moves every series' samples of the
//! window into one row of `samples_packed` (`series_id`, `window_start`, `first_time`,
//! `last_time`, `data`): the embedded engine's sample encoding (delta-of-delta timestamps,
//! decimal or XOR values, zstd when it pays; bit-exact, staleness markers included) in a
//! `bytea`. This is what TimescaleDB's compression segmented by series gives.
//!
//! - Moving is one transaction per window: `DELETE … RETURNING` out of `samples` and the
//!   packed rows in, so a reader sees every sample exactly once, and a write that arrives
//!   meanwhile stays in `samples`, where reads find it; being late, it records an
//!   invalidation, and the run that handles it packs the window again.
//! - Reads take both, in one repeatable-read snapshot; where a timestamp is in both (a late
//!   write that raced the move), the packed sample, the one stored first, wins.
//! - Late writes (older than [`super::lifecycle::LATE_MS`]) are checked against packed rows
//!   as against stored rows: the same value again is accepted and dropped, another value
//!   rejected, as Prometheus does. The lifecycle job unpacks the windows a late write touched
//!   before it recomputes their rollups from raw samples, then packs them again.
//! - `samples_packed` is partitioned like `samples`, and its partitions are dropped with
//!   theirs by raw retention.
//! - TimescaleDB mode never packs: its compression does this job.

use super::copy_binary::timestamp_ms;
use super::read::{copy_rows, timestamp_literal};
use super::write::to_datetime;
use super::{db_error, PostgresStorage};
use crate::model::{Sample, TimestampMs};
use crate::storage::encoding as codec;
use crate::storage::{StorageError, StorageResult};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use rustc_hash::FxHashMap;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

/// Width of the time window one packed row holds.
pub(super) const WINDOW_MS: i64 = 15 * 60_000;
/// The `rollup_watermarks` row of packing: every window before it has been packed.
pub(super) const WATERMARK: &str = "samples_packed";
/// Packed rows per statement of a read.
const READ_CHUNK: usize = 1_000;
/// Samples per statement when unpacking.
const UNPACK_BATCH: usize = 100_000;

/// Start of the window `t` falls in.
pub(super) fn window_of(t: TimestampMs) -> TimestampMs {
    t.div_euclid(WINDOW_MS) * WINDOW_MS
}

fn corrupt(e: std::io::Error) -> StorageError {
    StorageError::Internal(format!("corrupt packed samples: {e}"))
}

/// Creates `samples_packed`.
pub(super) async fn setup(conn: &mut PgConnection) -> StorageResult<()> {
    for sql in [
        "CREATE TABLE IF NOT EXISTS samples_packed (
             series_id    BIGINT      NOT NULL,
             window_start TIMESTAMPTZ NOT NULL,
             first_time   TIMESTAMPTZ NOT NULL,
             last_time    TIMESTAMPTZ NOT NULL,
             data         BYTEA       NOT NULL,
             PRIMARY KEY (series_id, window_start)
         ) PARTITION BY RANGE (window_start)",
        // Unpacking a time range (late writes) finds its rows without reading every row.
        "CREATE INDEX IF NOT EXISTS samples_packed_window_brin ON samples_packed
         USING brin (window_start)",
    ] {
        sqlx::query(sql)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Packed samples of `data` in `[start, end]`.
fn decode_range(data: &[u8], start: TimestampMs, end: TimestampMs) -> StorageResult<Vec<Sample>> {
    let mut samples = codec::decode(data).map_err(corrupt)?;
    samples.retain(|s| s.t >= start && s.t <= end);
    Ok(samples)
}

/// Sorts each series' samples by time and keeps the first of equal timestamps (packed
/// samples go first: they were stored first).
pub(super) fn settle(samples: &mut Vec<Sample>) {
    if !samples.is_sorted_by(|a, b| a.t < b.t) {
        samples.sort_by_key(|s| s.t);
        samples.dedup_by_key(|s| s.t);
    }
}

/// The SQL that reads the packed rows of some series overlapping `[start, end]`, only of the
/// windows holding `instants` when given.
fn read_sql(
    ids: &[i64],
    start: TimestampMs,
    end: TimestampMs,
    instants: Option<&[TimestampMs]>,
) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    let windows = match instants {
        // Point reads far apart (a rollup query's bucket boundaries over weeks) decode only
        // the windows they fall in.
        Some(instants) => {
            let mut windows: Vec<TimestampMs> = instants.iter().map(|&t| window_of(t)).collect();
            windows.dedup();
            let literals: Vec<String> = windows.iter().map(|&w| timestamp_literal(w)).collect();
            format!("window_start IN ({})", literals.join(","))
        }
        None => format!(
            "window_start >= {} AND window_start <= {}",
            timestamp_literal(window_of(start)),
            timestamp_literal(end)
        ),
    };
    format!(
        "SELECT series_id, data FROM samples_packed
         WHERE series_id = ANY('{{{}}}'::int8[]) AND {windows}
           AND last_time >= {} AND first_time <= {}",
        list.join(","),
        timestamp_literal(start),
        timestamp_literal(end)
    )
}

/// Streams the packed samples of `ids` in `[start, end]` (only those at `instants`, sorted,
/// when given) into `on_series`; returns how many. `limit` stops it with
/// [`StorageError::TooManySamples`].
pub(super) async fn read(
    conn: &mut PgConnection,
    ids: &[i64],
    (start, end): (TimestampMs, TimestampMs),
    instants: Option<&[TimestampMs]>,
    limit: Option<usize>,
    mut on_series: impl FnMut(i64, Vec<Sample>),
) -> StorageResult<usize> {
    let mut loaded = 0usize;
    for chunk in ids.chunks(READ_CHUNK) {
        let sql = read_sql(chunk, start, end, instants);
        // Text made for this call: not kept as a prepared statement.
        let mut rows = sqlx::query(&sql).persistent(false).fetch(&mut *conn);
        while let Some(row) = rows.try_next().await.map_err(db_error)? {
            let id: i64 = row.try_get(0).map_err(db_error)?;
            let data: &[u8] = row.try_get(1).map_err(db_error)?;
            let mut samples = decode_range(data, start, end)?;
            if let Some(wanted) = instants {
                samples.retain(|s| wanted.binary_search(&s.t).is_ok());
            }
            loaded += samples.len();
            if limit.is_some_and(|limit| loaded > limit) {
                return Err(StorageError::TooManySamples);
            }
            on_series(id, samples);
        }
    }
    Ok(loaded)
}

/// Moves the samples of the window starting at `start` out of `samples` into packed rows,
/// merged with rows packed before (late samples of a window already packed). One
/// transaction. Returns the samples moved.
pub(super) async fn pack_window(
    conn: &mut PgConnection,
    partition_width_ms: i64,
    start: TimestampMs,
) -> StorageResult<u64> {
    let end = start + WINDOW_MS;
    let mut tx = conn.begin().await.map_err(db_error)?;
    let mut by_series: FxHashMap<i64, Vec<Sample>> = FxHashMap::default();
    // Found through the key, series by series: `samples` has no time index (writes would pay
    // for it), and a time index over pages that packing empties and new rows refill would
    // soon cover the whole partition.
    let sql = format!(
        "COPY (DELETE FROM samples
               WHERE series_id = ANY(ARRAY(SELECT id FROM series)) AND time >= {} AND time < {}
               RETURNING series_id, time, value)
         TO STDOUT (FORMAT binary)",
        timestamp_literal(start),
        timestamp_literal(end)
    );
    let moved = copy_rows(
        &mut tx,
        &sql,
        3,
        |f| {
            by_series.entry(f[0]).or_default().push(Sample {
                t: timestamp_ms(f[1]),
                v: f64::from_bits(f[2] as u64),
            })
        },
        None,
    )
    .await?;
    if moved == 0 {
        return Ok(0);
    }
    ensure_partition(&mut tx, partition_width_ms, start).await?;
    let ids: Vec<i64> = by_series.keys().copied().collect();
    let before: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT series_id, data FROM samples_packed
         WHERE window_start = $1 AND series_id = ANY($2)",
    )
    .bind(to_datetime(start))
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    for (id, data) in before {
        if let Some(samples) = by_series.get_mut(&id) {
            let mut merged = codec::decode(&data).map_err(corrupt)?;
            merged.append(samples);
            *samples = merged;
        }
    }
    let (mut firsts, mut lasts, mut blobs) = (
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
        Vec::with_capacity(ids.len()),
    );
    for id in &ids {
        let samples = by_series.get_mut(id).expect("a key of the map");
        settle(samples);
        firsts.push(to_datetime(samples[0].t));
        lasts.push(to_datetime(samples[samples.len() - 1].t));
        blobs.push(codec::encode(samples));
    }
    sqlx::query(
        "INSERT INTO samples_packed (series_id, window_start, first_time, last_time, data)
         SELECT id, $2, f, l, d FROM unnest($1::int8[], $3::timestamptz[], $4::timestamptz[],
                                            $5::bytea[]) AS t(id, f, l, d)
         ON CONFLICT (series_id, window_start) DO UPDATE SET first_time = excluded.first_time,
             last_time = excluded.last_time, data = excluded.data",
    )
    .bind(&ids)
    .bind(to_datetime(start))
    .bind(&firsts)
    .bind(&lasts)
    .bind(&blobs)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(moved as u64)
}

/// The `samples_packed` partition holding `window_start` (bounds as `samples`' partitions).
async fn ensure_partition(
    conn: &mut PgConnection,
    width_ms: i64,
    window_start: TimestampMs,
) -> StorageResult<()> {
    let lo = window_start.div_euclid(width_ms) * width_ms;
    let name = format!("samples_packed_p{}", to_datetime(lo).format("%Y%m%d_%H%M"));
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF samples_packed
         FOR VALUES FROM ('{}') TO ('{}')",
        to_datetime(lo).to_rfc3339(),
        to_datetime(lo + width_ms).to_rfc3339()
    );
    sqlx::query(&ddl)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Moves the packed rows of windows overlapping `[lo, hi)` back into `samples` (in the
/// caller's transaction), where a stored sample of the same timestamp gives way to the packed
/// one. Returns the windows unpacked, to be packed again.
pub(super) async fn unpack(
    conn: &mut PgConnection,
    lo: TimestampMs,
    hi: TimestampMs,
) -> StorageResult<Vec<TimestampMs>> {
    let mut windows = Vec::new();
    let mut from = window_of(lo);
    while from < hi {
        // A window at a time bounds the memory.
        let to = from + WINDOW_MS;
        let rows: Vec<(i64, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
            "DELETE FROM samples_packed WHERE window_start >= $1 AND window_start < $2
             RETURNING series_id, window_start, data",
        )
        .bind(to_datetime(from))
        .bind(to_datetime(to))
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
        let (mut ids, mut times, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (id, window, data) in rows {
            windows.push(window.timestamp_millis());
            for s in codec::decode(&data).map_err(corrupt)? {
                ids.push(id);
                times.push(to_datetime(s.t));
                values.push(s.v);
            }
        }
        for at in (0..ids.len()).step_by(UNPACK_BATCH) {
            let until = (at + UNPACK_BATCH).min(ids.len());
            sqlx::query(
                "INSERT INTO samples (series_id, time, value)
                 SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::float8[])
                 ON CONFLICT (series_id, time) DO UPDATE SET value = excluded.value",
            )
            .bind(&ids[at..until])
            .bind(&times[at..until])
            .bind(&values[at..until])
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        }
        from = to;
    }
    windows.sort_unstable();
    windows.dedup();
    Ok(windows)
}

/// Moves every packed row back into `samples` and drops `samples_packed` (plain mode turning
/// into TimescaleDB, whose compression takes over). Returns the windows unpacked.
pub(super) async fn unpack_all(conn: &mut PgConnection) -> StorageResult<usize> {
    if super::relkind(&mut *conn, "samples_packed")
        .await?
        .is_none()
    {
        return Ok(0);
    }
    let (lo, hi): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT min(window_start), max(window_start) FROM samples_packed")
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?;
    let windows = match (lo, hi) {
        (Some(lo), Some(hi)) => {
            unpack(&mut *conn, lo.timestamp_millis(), hi.timestamp_millis() + 1)
                .await?
                .len()
        }
        _ => 0,
    };
    for sql in [
        "DROP TABLE samples_packed",
        "DELETE FROM rollup_watermarks WHERE relation = 'samples_packed'",
    ] {
        sqlx::query(sql)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(windows)
}

impl PostgresStorage {
    /// Of the samples to write, those older than `late_before` checked against packed rows:
    /// removed from the arrays when their timestamp is packed already. Returns how many had
    /// the same value (accepted, as Prometheus accepts a repeat) and the `(series_id, t)` of
    /// those with another value (to reject).
    pub(super) async fn drop_packed_duplicates(
        &self,
        series_ids: &mut Vec<i64>,
        times: &mut Vec<DateTime<Utc>>,
        values: &mut Vec<f64>,
        late_before: TimestampMs,
    ) -> StorageResult<(usize, Vec<(i64, TimestampMs)>)> {
        let mut keys: Vec<(i64, TimestampMs)> = series_ids
            .iter()
            .zip(times.iter())
            .map(|(&id, t)| (id, t.timestamp_millis()))
            .filter(|&(_, t)| t < late_before)
            .map(|(id, t)| (id, window_of(t)))
            .collect();
        if keys.is_empty() {
            return Ok((0, Vec::new()));
        }
        keys.sort_unstable();
        keys.dedup();
        let (key_ids, key_windows): (Vec<i64>, Vec<DateTime<Utc>>) =
            keys.iter().map(|&(id, w)| (id, to_datetime(w))).unzip();
        let rows: Vec<(i64, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
            "SELECT p.series_id, p.window_start, p.data
             FROM unnest($1::int8[], $2::timestamptz[]) AS k(series_id, window_start)
             JOIN samples_packed p USING (series_id, window_start)",
        )
        .bind(&key_ids)
        .bind(&key_windows)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        if rows.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut packed: FxHashMap<(i64, TimestampMs), Vec<Sample>> = FxHashMap::default();
        for (id, window, data) in rows {
            packed.insert(
                (id, window.timestamp_millis()),
                codec::decode(&data).map_err(corrupt)?,
            );
        }
        let (mut same, mut conflicts) = (0, Vec::new());
        let mut keep = Vec::with_capacity(series_ids.len());
        for i in 0..series_ids.len() {
            let (id, t) = (series_ids[i], times[i].timestamp_millis());
            let stored = packed
                .get(&(id, window_of(t)))
                .and_then(|s| s.binary_search_by_key(&t, |s| s.t).ok().map(|at| s[at].v));
            match stored {
                Some(v) if v.to_bits() == values[i].to_bits() => same += 1,
                Some(_) => conflicts.push((id, t)),
                None => keep.push(i),
            }
        }
        if keep.len() < series_ids.len() {
            *series_ids = keep.iter().map(|&i| series_ids[i]).collect();
            *times = keep.iter().map(|&i| times[i]).collect();
            *values = keep.iter().map(|&i| values[i]).collect();
        }
        Ok((same, conflicts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_to_the_epoch() {
        assert_eq!(window_of(0), 0);
        assert_eq!(window_of(WINDOW_MS - 1), 0);
        assert_eq!(window_of(WINDOW_MS), WINDOW_MS);
        assert_eq!(window_of(-1), -WINDOW_MS);
    }

    #[test]
    fn settled_samples_are_sorted_and_the_first_of_a_timestamp_wins() {
        let s = |t, v| Sample { t, v };
        let mut samples = vec![s(10, 1.0), s(30, 3.0), s(20, 2.0), s(10, 9.0)];
        settle(&mut samples);
        let got: Vec<(i64, f64)> = samples.iter().map(|s| (s.t, s.v)).collect();
        assert_eq!(got, vec![(10, 1.0), (20, 2.0), (30, 3.0)]);
    }
}
