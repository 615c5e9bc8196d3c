//! The read path: series lookup by matchers, then samples by series id and time range.

use super::copy_binary::{timestamp_ms, RowReader};
use super::lifecycle::Mode;
use super::packed;
use super::write::{MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS};
use super::{db_error, PostgresStorage};
use crate::model::{
    matches_all, Label, Labels, MatchOp, Matcher, Sample, SeriesSamples, TenantId, TimestampMs,
    METRIC_NAME_LABEL,
};
use crate::storage::{
    rollup, Resolution, RollupRead, RollupRow, SelectHints, SeriesQuery, SeriesRollups,
    StorageError, StorageResult,
};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, Postgres};
use std::collections::BTreeMap;

/// Series ids per sample query: bounds the statement size while keeping round trips few.
const SERIES_PER_SAMPLE_QUERY: usize = 1_000;

fn clamp_time(t: TimestampMs) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS)).unwrap_or_default()
}

/// The SQL condition for `time` in `[start, end]` (milliseconds, clamped to what is stored).
fn range_filter(start: TimestampMs, end: TimestampMs) -> String {
    let (start, end) = (
        start.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
        end.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS),
    );
    format!(
        "time >= {} AND time <= {}",
        timestamp_literal(start),
        timestamp_literal(end)
    )
}

/// An `int8[]` constant of `values`. Statements that stream with binary COPY take no bind
/// parameters, so the (numeric, self-made) values are inlined.
fn int8_array(values: &[i64]) -> String {
    let list: Vec<String> = values.iter().map(i64::to_string).collect();
    format!("'{{{}}}'::int8[]", list.join(","))
}

/// A `timestamptz` constant for a time in the stored range: a literal, not an expression, so
/// PostgreSQL prunes partitions while planning instead of planning every one of them.
pub(super) fn timestamp_literal(t: TimestampMs) -> String {
    format!(
        "'{}'::timestamptz",
        clamp_time(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

pub(super) fn labels_from_json(json: &str) -> StorageResult<Labels> {
    let map: BTreeMap<String, String> = serde_json::from_str(json)
        .map_err(|e| StorageError::Internal(format!("corrupt labels column: {e}")))?;
    Ok(Labels::from_trusted(
        map.into_iter().map(|(n, v)| Label::new(n, v)).collect(),
    ))
}

/// Label sets by series id, for reads. Bounded: emptied when full.
pub(super) struct LabelCache {
    capacity: usize,
    map: std::sync::RwLock<std::collections::HashMap<i64, Labels>>,
}

impl LabelCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: std::sync::RwLock::new(std::collections::HashMap::new()),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&std::collections::HashMap<i64, Labels>) -> R) -> R {
        f(&self.map.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn insert_all(&self, entries: Vec<(i64, Labels)>) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.len() + entries.len() > self.capacity {
            map.clear();
        }
        map.extend(entries);
    }
}

/// A pooled connection for a read that goes back to the pool only when the read finished
/// ([`ReadConnection::release`]): one dropped on an error or with its future (a query timeout,
/// a client gone) may be in the middle of a COPY or a transaction, and is closed instead.
struct ReadConnection(Option<PoolConnection<Postgres>>);

impl ReadConnection {
    fn conn(&mut self) -> &mut PgConnection {
        self.0.as_mut().expect("a connection until released")
    }

    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for ReadConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

/// Streams `sql` (a `COPY (…) TO STDOUT (FORMAT binary)` of rows of `fields` eight-byte
/// fields) into `on_row` and returns the rows read, stopping with
/// [`StorageError::TooManySamples`] past `limit` rows. After an error the connection may be
/// in the middle of a COPY: the caller closes it, never hands it back to the pool.
pub(super) async fn copy_rows(
    conn: &mut PgConnection,
    sql: &str,
    fields: usize,
    mut on_row: impl FnMut(&[i64]),
    limit: Option<usize>,
) -> StorageResult<usize> {
    let mut reader = RowReader::new(fields);
    let mut rows = 0usize;
    let mut stream = conn.copy_out_raw(sql).await.map_err(db_error)?;
    while let Some(bytes) = stream.try_next().await.map_err(db_error)? {
        reader
            .feed(&bytes, &mut |row| {
                rows += 1;
                on_row(row)
            })
            .map_err(|e| StorageError::Internal(e.to_string()))?;
        if limit.is_some_and(|limit| rows > limit) {
            return Err(StorageError::TooManySamples);
        }
    }
    if !reader.finished() {
        return Err(StorageError::Unavailable("row stream ended early".into()));
    }
    Ok(rows)
}

impl PostgresStorage {
    /// Series of the tenant that match every matcher, with their ids. SQL narrows by metric
    /// name and by equality on non-empty values (served by the indexes); every matcher is then
    /// applied in Rust, so the answer never depends on PostgreSQL's regex dialect.
    pub(super) async fn find_series(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
    ) -> StorageResult<Vec<(i64, Labels)>> {
        let mut metric_name: Option<&str> = None;
        let mut containment = serde_json::Map::new();
        for m in matchers {
            if let MatchOp::Equal(value) = &m.op {
                if value.is_empty() {
                    continue;
                }
                if m.name == METRIC_NAME_LABEL && metric_name.is_none() {
                    metric_name = Some(value);
                } else {
                    containment.insert(m.name.clone(), serde_json::Value::String(value.clone()));
                }
            }
        }
        let containment = serde_json::Value::Object(containment).to_string();
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM series
             WHERE tenant_id = $1
               AND ($2::text IS NULL OR metric_name = $2)
               AND labels @> $3::jsonb",
        )
        .bind(tenant.as_str())
        .bind(metric_name)
        .bind(&containment)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        // Label sets never change for an id: match cached ones in place, load only the rest.
        let mut series = Vec::new();
        let mut missing = Vec::new();
        self.labels.with(|cache| {
            for &id in &ids {
                match cache.get(&id) {
                    Some(labels) if matches_all(matchers, labels) => {
                        series.push((id, labels.clone()))
                    }
                    Some(_) => {}
                    None => missing.push(id),
                }
            }
        });
        if !missing.is_empty() {
            let rows: Vec<(i64, String)> =
                sqlx::query_as("SELECT id, labels::text FROM series WHERE id = ANY($1)")
                    .bind(&missing)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db_error)?;
            let mut fresh = Vec::with_capacity(rows.len());
            for (id, json) in rows {
                let labels = labels_from_json(&json)?;
                if matches_all(matchers, &labels) {
                    series.push((id, labels.clone()));
                }
                fresh.push((id, labels));
            }
            self.labels.insert_all(fresh);
        }
        Ok(series)
    }

    pub(super) async fn select_samples(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        hints: &SelectHints,
    ) -> StorageResult<Vec<SeriesSamples>> {
        let series = self.find_series(tenant, matchers).await?;
        self.select_where(series, hints.start, hints.end, None, hints.max_samples)
            .await
    }

    /// Samples exactly at `instants`: point reads on the (series_id, time) index.
    pub(super) async fn select_at(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        instants: &[TimestampMs],
    ) -> StorageResult<Vec<SeriesSamples>> {
        let mut wanted: Vec<TimestampMs> = instants
            .iter()
            .filter(|t| (MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(t))
            .copied()
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let (Some(&first), Some(&last)) = (wanted.first(), wanted.last()) else {
            return Ok(Vec::new());
        };
        let series = self.find_series(tenant, matchers).await?;
        self.select_where(series, first, last, Some(&wanted), 0)
            .await
    }

    /// The `series` (ids and labels) with their samples in `[start, end]` (only those at
    /// `instants`, sorted, when given), sorted by labels. Packed and row-per-sample samples
    /// are read in one snapshot.
    async fn select_where(
        &self,
        mut series: Vec<(i64, Labels)>,
        start: TimestampMs,
        end: TimestampMs,
        instants: Option<&[TimestampMs]>,
        max_samples: usize,
    ) -> StorageResult<Vec<SeriesSamples>> {
        let started = std::time::Instant::now();
        series.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let index: rustc_hash::FxHashMap<i64, usize> = series
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); series.len()];
        let ids: Vec<i64> = series.iter().map(|(id, _)| *id).collect();
        let time_filter = match instants {
            Some(list) => format!(
                "time = ANY(ARRAY(SELECT timestamptz 'epoch' + x * interval '1 millisecond'
                                  FROM unnest({}) AS x))",
                int8_array(list)
            ),
            None => range_filter(start, end),
        };
        let packed = self.mode == Mode::Plain;
        let mut guard = ReadConnection(Some(self.pool.acquire().await.map_err(db_error)?));
        let conn = guard.conn();
        let read = async {
            let mut loaded = 0usize;
            let allowed =
                |loaded: usize| (max_samples > 0).then(|| max_samples.saturating_sub(loaded));
            if packed {
                // One snapshot for both layouts: a window moved between two statements
                // would otherwise be read twice or not at all.
                sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
                loaded += packed::read(
                    &mut *conn,
                    &ids,
                    (start, end),
                    instants,
                    allowed(0),
                    |id, mut got| {
                        if let Some(&i) = index.get(&id) {
                            samples[i].append(&mut got);
                        }
                    },
                )
                .await?;
            }
            let mut current: (i64, Option<usize>) = (i64::MIN, None);
            for chunk in ids.chunks(SERIES_PER_SAMPLE_QUERY) {
                // Binary COPY: statement text only, so the (numeric, self-made) values are
                // inlined. No ORDER BY: sorting millions of rows in PostgreSQL costs more than
                // checking each series' order here (rows mostly arrive in key order already).
                let sql = format!(
                    "COPY (SELECT series_id, time, value FROM samples
                     WHERE series_id = ANY({}) AND {time_filter})
                     TO STDOUT (FORMAT binary)",
                    int8_array(chunk)
                );
                loaded += copy_rows(
                    &mut *conn,
                    &sql,
                    3,
                    |f| {
                        // Rows come series by series (an index-only scan in key order):
                        // look the series up once per run of rows.
                        if f[0] != current.0 {
                            current = (f[0], index.get(&f[0]).copied());
                        }
                        if let Some(i) = current.1 {
                            samples[i].push(Sample {
                                t: timestamp_ms(f[1]),
                                v: f64::from_bits(f[2] as u64),
                            });
                        }
                    },
                    allowed(loaded),
                )
                .await?;
            }
            if packed {
                sqlx::query("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
            Ok::<_, StorageError>(loaded)
        }
        .await;
        let loaded = read?;
        guard.release();
        tracing::debug!(
            series = series.len(),
            samples = loaded,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "select"
        );
        for s in &mut samples {
            packed::settle(s);
        }
        Ok(series
            .into_iter()
            .zip(samples)
            .filter(|(_, samples)| !samples.is_empty())
            .map(|((_, labels), samples)| SeriesSamples { labels, samples })
            .collect())
    }

    /// Label sets of the series that match any matcher set (every series when there is none)
    /// and have at least one sample in the range.
    pub(super) async fn series_in_range(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<Labels>> {
        let mut candidates: Vec<(i64, Labels)> = Vec::new();
        if query.matcher_sets.is_empty() {
            candidates = self.find_series(tenant, &[]).await?;
        } else {
            for set in &query.matcher_sets {
                candidates.extend(self.find_series(tenant, set).await?);
            }
            candidates.sort_unstable_by_key(|(id, _)| *id);
            candidates.dedup_by_key(|(id, _)| *id);
        }
        let ids: Vec<i64> = candidates.iter().map(|(id, _)| *id).collect();
        let mut present = std::collections::HashSet::new();
        let packed = match self.mode {
            Mode::Plain => format!(
                "OR EXISTS (SELECT 1 FROM samples_packed WHERE series_id = id
                              AND window_start > $2 - interval '{} milliseconds'
                              AND window_start <= $3 AND last_time >= $2 AND first_time <= $3)",
                packed::WINDOW_MS
            ),
            Mode::TimescaleDb => String::new(),
        };
        let sql = format!(
            "SELECT id FROM unnest($1::int8[]) AS id
             WHERE EXISTS (SELECT 1 FROM samples WHERE series_id = id AND time >= $2 AND time <= $3)
                   {packed}"
        );
        for chunk in ids.chunks(SERIES_PER_SAMPLE_QUERY) {
            let rows: Vec<(i64,)> = sqlx::query_as(&sql)
                .bind(chunk)
                .bind(clamp_time(query.start))
                .bind(clamp_time(query.end))
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
            present.extend(rows.into_iter().map(|(id,)| id));
        }
        Ok(candidates
            .into_iter()
            .filter(|(id, _)| present.contains(id))
            .map(|(_, labels)| labels)
            .collect())
    }
}

impl PostgresStorage {
    /// Rollup rows from `samples_5m` / `samples_1h`; of rows read from a rollup relation only
    /// the aggregates in `columns` (the others NaN: every column streamed costs about as much
    /// as a row). TimescaleDB's
    /// real-time continuous aggregates are complete up to now. A plain rollup table is
    /// complete before its watermark, except where a late write waits for the lifecycle job;
    /// those buckets and everything after the watermark are aggregated from raw samples here,
    /// so the answer is the same as from raw data either way.
    pub(super) async fn select_rollup_rows(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        resolution: Resolution,
        (start, end): (TimestampMs, TimestampMs),
        read: RollupRead,
    ) -> StorageResult<Vec<SeriesRollups>> {
        let columns = read.columns;
        // Rows read so far, against `read.max_rows` (0: no limit).
        let mut loaded = 0usize;
        let left =
            |loaded: usize| (read.max_rows > 0).then(|| read.max_rows.saturating_sub(loaded));
        let start = resolution.bucket(start.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS));
        let end = resolution
            .bucket(end.clamp(MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS))
            .saturating_add(resolution.ms());
        if end <= start {
            return Ok(Vec::new());
        }
        let mut series = self.find_series(tenant, matchers).await?;
        series.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let index: rustc_hash::FxHashMap<i64, usize> = series
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let mut rows: Vec<Vec<RollupRow>> = vec![Vec::new(); series.len()];

        let table_end = match self.mode {
            Mode::TimescaleDb => end,
            Mode::Plain => {
                // The watermark and the earliest late write still waiting in the range, in
                // one round trip.
                let (watermark, pending): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) =
                    sqlx::query_as(
                        "SELECT (SELECT watermark FROM rollup_watermarks WHERE relation = $1),
                                (SELECT min(lo) FROM rollup_invalidations
                                 WHERE hi > $2 AND lo < $3)",
                    )
                    .bind(resolution.name())
                    .bind(clamp_time(start))
                    .bind(clamp_time(end))
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
                let watermark = watermark.map_or(i64::MIN, |w| w.timestamp_millis());
                // A late write never changes buckets past raw retention (their raw samples
                // are gone; the rollups are all there is).
                let kept_from = resolution
                    .bucket(chrono::Utc::now().timestamp_millis() - self.retention.keep_ms(None))
                    + resolution.ms();
                let pending = pending.map_or(i64::MAX, |lo| {
                    resolution.bucket(lo.timestamp_millis()).max(kept_from)
                });
                watermark.min(pending).clamp(start, end)
            }
        };
        if table_end > start && !series.is_empty() {
            let ids: Vec<i64> = series.iter().map(|(id, _)| *id).collect();
            // The requested columns, in the order of the row's fields after series_id and
            // bucket; `slot[k]` is where aggregate k (min, max, sum, count, last, first_time,
            // first) arrives, if it is read.
            let wanted = [
                ("min", columns.min),
                ("max", columns.max),
                ("sum", columns.sum),
                ("count", columns.count),
                ("last", columns.last),
                ("first_time", columns.first),
                ("first", columns.first),
            ];
            let mut list = String::from("series_id, bucket");
            let mut slot = [None; 7];
            let mut fields = 2;
            for (k, (name, read)) in wanted.iter().enumerate() {
                if *read {
                    list.push_str(", ");
                    list.push_str(name);
                    slot[k] = Some(fields);
                    fields += 1;
                }
            }
            let mut guard = ReadConnection(Some(self.pool.acquire().await.map_err(db_error)?));
            for chunk in ids.chunks(SERIES_PER_SAMPLE_QUERY) {
                // Binary COPY, as for raw samples: a fraction of the cost of decoding rows.
                let sql = format!(
                    "COPY (SELECT {list} FROM {} WHERE series_id = ANY({})
                           AND bucket >= {} AND bucket < {})
                     TO STDOUT (FORMAT binary)",
                    resolution.name(),
                    int8_array(chunk),
                    timestamp_literal(start),
                    timestamp_literal(table_end)
                );
                loaded += copy_rows(
                    guard.conn(),
                    &sql,
                    fields,
                    |f| {
                        if let Some(&i) = index.get(&f[0]) {
                            let float = |k: usize| {
                                slot[k].map_or(f64::NAN, |at| f64::from_bits(f[at] as u64))
                            };
                            rows[i].push(RollupRow {
                                t: timestamp_ms(f[1]),
                                min: float(0),
                                max: float(1),
                                sum: float(2),
                                count: float(3),
                                last: float(4),
                                first_t: slot[5]
                                    .map_or(RollupRow::UNKNOWN, |at| timestamp_ms(f[at])),
                                first: float(6),
                            });
                        }
                    },
                    left(loaded),
                )
                .await?;
            }
            guard.release();
            // No ORDER BY: as for raw samples, sorting here only what arrived out of order
            // costs less than a sort in PostgreSQL.
            for r in &mut rows {
                if !r.is_sorted_by_key(|row| row.t) {
                    r.sort_unstable_by_key(|row| row.t);
                }
            }
        }
        if table_end < end {
            // The raw tail is charged what is left.
            let budget = crate::storage::budget_left(read.max_rows, loaded);
            for raw in self
                .select_where(series.clone(), table_end, end - 1, None, budget)
                .await?
            {
                if let Ok(i) = series.binary_search_by(|(_, l)| l.cmp(&raw.labels)) {
                    rows[i].extend(rollup(&raw.samples, resolution));
                }
            }
        }
        Ok(series
            .into_iter()
            .zip(rows)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|((_, labels), rows)| SeriesRollups { labels, rows })
            .collect())
    }
}
