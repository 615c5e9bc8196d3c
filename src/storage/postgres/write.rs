//! The write path: series-id resolution through a cache, partition creation, and one
//! `unnest`-array insert per batch.

use super::lifecycle::{Mode, LATE_MS};
use super::packed::{window_of, WINDOW_MS};
use super::{db_error, PostgresStorage};
use crate::model::{Labels, LabelsRef, SeriesId, TenantId, TimestampMs};
use crate::storage::{AppendOutcome, RejectReason, StorageResult, WriteBatch};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};

/// Earliest and latest timestamps the backend stores: years 1 to 9999, well inside
/// PostgreSQL's `timestamptz` range, and every partition name stays 8 digits of date.
pub const MIN_TIMESTAMP_MS: TimestampMs = -62_135_596_800_000;
pub const MAX_TIMESTAMP_MS: TimestampMs = 253_402_300_799_999;

/// Series ids by tenant and fingerprint. Bounded: emptied when it reaches its capacity, which
/// costs one round trip per series on the next write of each, never a wrong id.
pub(super) struct SeriesCache {
    capacity: usize,
    state: RwLock<CacheState>,
}

#[derive(Default)]
struct CacheState {
    len: usize,
    by_tenant: HashMap<String, HashMap<[u8; 16], SeriesId>>,
}

impl SeriesCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: RwLock::new(CacheState::default()),
        }
    }

    fn get(&self, tenant: &TenantId, fingerprint: &[u8; 16]) -> Option<SeriesId> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .by_tenant
            .get(tenant.as_str())?
            .get(fingerprint)
            .copied()
    }

    fn insert_all(&self, tenant: &TenantId, entries: HashMap<[u8; 16], SeriesId>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.len + entries.len() > self.capacity {
            *state = CacheState::default();
        }
        state.len += entries.len();
        state
            .by_tenant
            .entry(tenant.as_str().to_owned())
            .or_default()
            .extend(entries);
    }
}

/// The `samples` partitions known to exist, by start time.
pub(super) struct PartitionSet {
    pub(super) width_ms: i64,
    known: Mutex<HashSet<TimestampMs>>,
}

impl PartitionSet {
    pub(super) fn new(width_hours: u32) -> Self {
        Self {
            width_ms: i64::from(width_hours.max(1)) * 3_600_000,
            known: Mutex::new(HashSet::new()),
        }
    }

    fn start_of(&self, t: TimestampMs) -> TimestampMs {
        t.div_euclid(self.width_ms) * self.width_ms
    }

    /// Partition starts the timestamps need that are not known to exist yet.
    fn missing(&self, timestamps: &[DateTime<Utc>]) -> Vec<TimestampMs> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<TimestampMs> = timestamps
            .iter()
            .map(|t| self.start_of(t.timestamp_millis()))
            .filter(|start| !known.contains(start))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        missing.sort_unstable();
        missing
    }

    /// Forgets every partition (they are looked up again as data arrives).
    pub(super) fn forget_all(&self) {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Forgets a partition that was dropped.
    pub(super) fn forget(&self, start: TimestampMs) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&start);
    }

    fn mark(&self, start: TimestampMs) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(start);
    }
}

/// A stored time as `timestamptz`. Callers keep to the stored range (years 1 to 9999); the
/// fallback is never reached for such input.
pub(super) fn to_datetime(t: TimestampMs) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t).unwrap_or_default()
}

impl PostgresStorage {
    pub(super) async fn write_batch(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome> {
        let mut outcome = AppendOutcome::default();
        let ids = self.resolve_series(tenant, batch).await?;

        let total = batch.sample_count();
        let mut series_ids = Vec::with_capacity(total);
        let mut times = Vec::with_capacity(total);
        let mut values = Vec::with_capacity(total);
        for (series, id) in batch.iter().zip(&ids) {
            for sample in series.samples {
                if !(MIN_TIMESTAMP_MS..=MAX_TIMESTAMP_MS).contains(&sample.t) {
                    outcome.reject(RejectReason::TimestampOutOfRange, 1, || {
                        format!(
                            "timestamp {} out of range for series {}",
                            sample.t, series.labels
                        )
                    });
                    continue;
                }
                series_ids.push(id.0);
                times.push(to_datetime(sample.t));
                values.push(sample.v);
            }
        }
        let now = Utc::now().timestamp_millis();
        let mut already_stored = 0;
        if self.mode == Mode::Plain {
            // Late samples may fall in a packed window, where `samples`' key cannot see them.
            let (same, conflicts) = self
                .drop_packed_duplicates(&mut series_ids, &mut times, &mut values, now - LATE_MS)
                .await?;
            already_stored = same;
            if let Some(&(id, t)) = conflicts.first() {
                outcome.reject(RejectReason::DuplicateTimestamp, conflicts.len(), || {
                    format!(
                        "duplicate sample for timestamp {t} with a different value, series {}",
                        labels_of(batch, &ids, id)
                    )
                });
            }
        }
        if series_ids.is_empty() {
            outcome.accepted = already_stored;
            return Ok(outcome);
        }
        if self.mode == Mode::Plain {
            self.ensure_partitions(&times).await?;
        }
        let inserted = match self.write_rows(&series_ids, &times, &values).await {
            Err(e) if self.mode == Mode::Plain && no_partition(&e) => {
                // Another server's lifecycle dropped a partition this one still knew of.
                self.partitions.forget_all();
                self.ensure_partitions(&times).await?;
                self.write_rows(&series_ids, &times, &values)
                    .await
                    .map_err(db_error)?
            }
            other => other.map_err(db_error)?,
        };
        let mut conflicting = 0;
        if inserted < series_ids.len() {
            // Some timestamps were already stored (a client retry, or a real conflict).
            // Prometheus accepts a repeat of the same value silently and rejects another value
            // for the same timestamp (`ErrDuplicateSampleForTimestamp`); tell them apart.
            // Rare path: it runs only when the insert skipped rows.
            let rows: Vec<(i64, DateTime<Utc>)> = sqlx::query_as(
                "SELECT i.series_id, i.time
                 FROM unnest($1::int8[], $2::timestamptz[], $3::float8[]) AS i(series_id, time, value)
                 JOIN samples s ON s.series_id = i.series_id AND s.time = i.time
                 WHERE float8send(s.value) <> float8send(i.value)",
            )
            .bind(&series_ids)
            .bind(&times)
            .bind(&values)
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?;
            conflicting = rows.len();
            if let Some((id, time)) = rows.first() {
                outcome.reject(RejectReason::DuplicateTimestamp, conflicting, || {
                    format!(
                        "duplicate sample for timestamp {} with a different value, series {}",
                        time.timestamp_millis(),
                        labels_of(batch, &ids, *id)
                    )
                });
            }
        }
        if self.mode == Mode::Plain {
            // Samples the rollup tables may already have passed: recorded once they are
            // committed, so the lifecycle job recomputes their buckets (see lifecycle.rs).
            // Samples past raw retention never change rollups (docs/storage.md).
            let (late_before, kept_from) = (now - LATE_MS, now - self.retention.keep_ms(None));
            let mut late: Vec<TimestampMs> = times
                .iter()
                .map(DateTime::timestamp_millis)
                .filter(|&t| t < late_before && t >= kept_from)
                .collect();
            late.sort_unstable();
            // One range per run of packing windows with late samples, not one span: a
            // straggler days old must not make the job unpack and recompute every day between.
            let mut ranges: Vec<(TimestampMs, TimestampMs)> = Vec::new();
            for t in late {
                match ranges.last_mut() {
                    Some((_, hi)) if window_of(t) <= window_of(*hi) + WINDOW_MS => *hi = t,
                    _ => ranges.push((t, t)),
                }
            }
            if !ranges.is_empty() {
                self.invalidate(&ranges).await?;
            }
        }
        outcome.accepted = series_ids.len() - conflicting + already_stored;
        Ok(outcome)
    }

    /// Writes the rows; returns how many were new.
    async fn write_rows(
        &self,
        series_ids: &[i64],
        times: &[DateTime<Utc>],
        values: &[f64],
    ) -> Result<usize, sqlx::Error> {
        // Binary COPY first: a third cheaper in PostgreSQL than an insert that checks each
        // row for conflicts. A batch holding a sample already stored fails whole (unique
        // violation, nothing written) and goes the checking way. On TimescaleDB only batches
        // newer than any compressed chunk can be: conflicts with compressed rows are checked
        // by the insert's explicit conflict target, which is the documented path.
        let uncompressed = match self.mode {
            Mode::Plain => true,
            Mode::TimescaleDb => {
                let horizon = Utc::now().timestamp_millis() - self.compress_horizon_ms;
                times.iter().all(|t| t.timestamp_millis() > horizon)
            }
        };
        if self.copy_writes && uncompressed {
            if let Some(n) = self.copy_samples(series_ids, times, values).await? {
                return Ok(n);
            }
        }
        Ok(sqlx::query(
            "INSERT INTO samples (series_id, time, value)
             SELECT * FROM unnest($1::int8[], $2::timestamptz[], $3::float8[])
             ON CONFLICT (series_id, time) DO NOTHING",
        )
        .bind(series_ids)
        .bind(times)
        .bind(values)
        .execute(&self.pool)
        .await?
        .rows_affected() as usize)
    }

    /// `COPY … FROM STDIN (FORMAT binary)` of the rows; `None` when a row is already stored
    /// (then nothing was written).
    async fn copy_samples(
        &self,
        series_ids: &[i64],
        times: &[DateTime<Utc>],
        values: &[f64],
    ) -> Result<Option<usize>, sqlx::Error> {
        let times_ms: Vec<TimestampMs> = times.iter().map(DateTime::timestamp_millis).collect();
        let data = super::copy_binary::encode_rows(series_ids, &times_ms, values);
        let mut conn = self.pool.acquire().await?;
        let result = async {
            let mut copy = conn
                .copy_in_raw("COPY samples (series_id, time, value) FROM STDIN (FORMAT binary)")
                .await?;
            if let Err(e) = copy.send(data).await {
                let _ = copy.abort("send failed").await;
                return Err(e);
            }
            copy.finish().await
        }
        .await;
        match result {
            Ok(rows) => Ok(Some(rows as usize)),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(None),
            Err(e) => {
                // The connection may be mid-COPY: never hand it back to the pool.
                let _ = conn.close().await;
                Err(e)
            }
        }
    }

    /// Series ids for every series of the batch, in batch order, creating the missing ones in
    /// two round trips at most.
    pub(super) async fn resolve_series(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<Vec<SeriesId>> {
        let fingerprints: Vec<[u8; 16]> =
            batch.iter().map(|s| s.fingerprint.to_be_bytes()).collect();
        let mut ids: Vec<Option<SeriesId>> = fingerprints
            .iter()
            .map(|fp| self.series_cache.get(tenant, fp))
            .collect();

        let mut misses: HashMap<[u8; 16], LabelsRef<'_>> = HashMap::new();
        for ((fp, id), series) in fingerprints.iter().zip(&ids).zip(batch.iter()) {
            if id.is_none() {
                misses.entry(*fp).or_insert(series.labels);
            }
        }
        if !misses.is_empty() {
            let resolved = self.create_series(tenant, &misses).await?;
            for (i, id) in ids.iter_mut().enumerate() {
                if id.is_none() {
                    *id = resolved.get(&fingerprints[i]).copied();
                }
            }
            self.series_cache.insert_all(tenant, resolved);
        }
        ids.into_iter()
            .map(|id| {
                id.ok_or_else(|| {
                    crate::storage::StorageError::Internal(
                        "series id not resolved after insert".into(),
                    )
                })
            })
            .collect()
    }

    async fn create_series(
        &self,
        tenant: &TenantId,
        missing: &HashMap<[u8; 16], LabelsRef<'_>>,
    ) -> StorageResult<HashMap<[u8; 16], SeriesId>> {
        let mut fingerprints: Vec<Vec<u8>> = Vec::with_capacity(missing.len());
        let mut names: Vec<&str> = Vec::with_capacity(missing.len());
        let mut labels_json: Vec<String> = Vec::with_capacity(missing.len());
        for (fp, labels) in missing {
            fingerprints.push(fp.to_vec());
            names.push(labels.metric_name().unwrap_or_default());
            labels_json.push(pairs_to_json(labels.iter()));
        }
        sqlx::query(
            "INSERT INTO series (tenant_id, metric_name, labels, fingerprint)
             SELECT $1, name, labels::jsonb, fp
             FROM unnest($2::text[], $3::text[], $4::bytea[]) AS t(name, labels, fp)
             ON CONFLICT (tenant_id, fingerprint) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(&names)
        .bind(&labels_json)
        .bind(&fingerprints)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, fingerprint FROM series WHERE tenant_id = $1 AND fingerprint = ANY($2)",
        )
        .bind(tenant.as_str())
        .bind(&fingerprints)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, fp)| Some((<[u8; 16]>::try_from(fp.as_slice()).ok()?, SeriesId(id))))
            .collect())
    }

    /// Creates the partitions the timestamps fall in, once per partition per process. An
    /// advisory lock serialises creation across servers sharing the database.
    /// Returns how many it did not know of.
    pub(super) async fn ensure_partitions(&self, times: &[DateTime<Utc>]) -> StorageResult<usize> {
        let missing = self.partitions.missing(times);
        let count = missing.len();
        for start in missing {
            let end = start + self.partitions.width_ms;
            let name = format!("samples_p{}", to_datetime(start).format("%Y%m%d_%H%M"));
            let mut tx = self.pool.begin().await.map_err(db_error)?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('secumon.samples.partitions'))")
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF samples
                 FOR VALUES FROM ('{}') TO ('{}')",
                to_datetime(start).to_rfc3339(),
                to_datetime(end).to_rfc3339()
            );
            sqlx::query(&ddl)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            self.partitions.mark(start);
        }
        Ok(count)
    }
}

/// The label set of series `id` of the batch, for messages.
fn labels_of(batch: &WriteBatch, ids: &[SeriesId], id: i64) -> String {
    batch
        .iter()
        .zip(ids)
        .find(|(_, sid)| sid.0 == id)
        .map(|(s, _)| s.labels.to_string())
        .unwrap_or_default()
}

/// "no partition of relation … found for row" (a partition dropped by another server).
fn no_partition(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23514"))
}

/// The `labels` column: a JSON object of every label.
pub(super) fn labels_to_json(labels: &Labels) -> String {
    pairs_to_json(labels.pairs())
}

fn pairs_to_json<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = labels
        .map(|(name, value)| (name.to_owned(), serde_json::Value::String(value.to_owned())))
        .collect();
    serde_json::Value::Object(map).to_string()
}
