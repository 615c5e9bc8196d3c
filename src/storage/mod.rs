//! The storage trait every backend implements, and the types it speaks.
//!
//! Ingest and query know only this trait; backends (`postgres`, later the embedded engine) know
//! nothing above it. Every backend must answer every call identically for the same data: the
//! PromQL engine evaluates over what `select` returns and never asks which backend answered.

mod batch;
pub mod embedded;
pub(crate) mod encoding;
pub mod postgres;
mod strings;

pub use batch::{SeriesRef, SeriesWrite, WriteBatch};
pub use strings::{Merge, StringList};

use crate::model::{
    Exemplar, Labels, Matcher, MetricMetadata, Sample, SeriesExemplars, SeriesSamples, TenantId,
    TimestampMs,
};
use async_trait::async_trait;
use std::sync::Arc;

/// Exemplars of one series in a write batch.
#[derive(Clone, Debug)]
pub struct ExemplarWrite {
    pub series: Labels,
    pub exemplars: Vec<Exemplar>,
}

/// Why a backend did not store a sample that it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// A sample with the same timestamp but another value is already stored
    /// (Prometheus's `storage.ErrDuplicateSampleForTimestamp`).
    DuplicateTimestamp,
    /// The timestamp is outside what the backend can represent.
    TimestampOutOfRange,
    /// Older than the out-of-order window allows (Prometheus's `ErrOutOfOrderSample`).
    OutOfOrder,
}

impl RejectReason {
    /// The `reason` label value in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::DuplicateTimestamp => "duplicate_timestamp",
            RejectReason::TimestampOutOfRange => "timestamp_out_of_range",
            RejectReason::OutOfOrder => "out_of_order",
        }
    }
}

/// What happened to a batch: every sample is either stored (or was already stored with the
/// same value, which Prometheus also accepts silently) or rejected with a reason.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppendOutcome {
    pub accepted: usize,
    pub rejected: Vec<(RejectReason, usize)>,
    /// One rejected sample described for the client's error message.
    pub first_rejection: Option<String>,
}

impl AppendOutcome {
    pub fn reject(&mut self, reason: RejectReason, count: usize, example: impl FnOnce() -> String) {
        if count == 0 {
            return;
        }
        match self.rejected.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += count,
            None => self.rejected.push((reason, count)),
        }
        if self.first_rejection.is_none() {
            self.first_rejection = Some(example());
        }
    }

    pub fn rejected_total(&self) -> usize {
        self.rejected.iter().map(|(_, n)| n).sum()
    }
}

/// What the query engine knows about a `select`, like Prometheus's `storage.SelectHints`, so a
/// backend may prune or push work down. `start` and `end` are inclusive and already include
/// lookback, range and offset.
#[derive(Clone, Debug, Default)]
pub struct SelectHints {
    pub start: TimestampMs,
    pub end: TimestampMs,
    /// Query step in ms; 0 for an instant query.
    pub step: TimestampMs,
    /// Range of a range selector in ms; 0 for an instant selector.
    pub range: TimestampMs,
    /// The function the selector is an argument of, if any.
    pub func: Option<String>,
    /// The most samples the caller accepts; a backend stops and fails with
    /// [`StorageError::TooManySamples`] past it instead of loading everything.
    pub max_samples: usize,
    /// Where a backend reports what the answer lacks (damaged data it skipped); the query's
    /// answer carries these as Prometheus's `warnings`.
    pub warnings: Warnings,
}

/// What is left of a read budget of `max` rows or samples (0: no limit) after `used`: never 0
/// while limited (a reader given 0 would read without limit), 0 when unlimited.
pub fn budget_left(max: usize, used: usize) -> usize {
    if max == 0 {
        0
    } else {
        max.saturating_sub(used).max(1)
    }
}

/// Warnings gathered while answering one query, shared by the calls it makes.
#[derive(Clone, Debug, Default)]
pub struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Warnings {
    /// Adds a warning, once however often it is met.
    pub fn push(&self, warning: String) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains(&warning) {
            all.push(warning);
        }
    }

    /// The warnings so far.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A time range and matcher sets for the metadata-style reads (series, labels, label values).
/// Matcher sets are OR-ed; an empty list means every series.
#[derive(Clone, Debug)]
pub struct SeriesQuery {
    pub matcher_sets: Vec<Vec<Matcher>>,
    pub start: TimestampMs,
    pub end: TimestampMs,
    /// 0 means no limit.
    pub limit: usize,
}

/// Resolution of a rollup: samples aggregated per series and aligned bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resolution {
    FiveMinutes,
    OneHour,
}

impl Resolution {
    pub const ALL: [Resolution; 2] = [Resolution::FiveMinutes, Resolution::OneHour];

    /// Bucket width in milliseconds; buckets start at multiples of it (Unix epoch aligned).
    pub fn ms(self) -> i64 {
        match self {
            Resolution::FiveMinutes => 300_000,
            Resolution::OneHour => 3_600_000,
        }
    }

    /// The name of the relation or file holding it: `samples_5m`, `samples_1h`.
    pub fn name(self) -> &'static str {
        match self {
            Resolution::FiveMinutes => "samples_5m",
            Resolution::OneHour => "samples_1h",
        }
    }

    /// The short name used in labels and parameters: `5m`, `1h`.
    pub fn label(self) -> &'static str {
        match self {
            Resolution::FiveMinutes => "5m",
            Resolution::OneHour => "1h",
        }
    }

    /// Start of the bucket holding `t`.
    pub fn bucket(self, t: TimestampMs) -> TimestampMs {
        t.div_euclid(self.ms()).saturating_mul(self.ms())
    }
}

/// One series' aggregate over one bucket `[t, t + resolution)`: what `min_over_time`,
/// `max_over_time`, `sum_over_time`, `count_over_time` and `last_over_time` would answer over
/// exactly that bucket's samples (staleness markers excluded, NaN as Prometheus treats it),
/// and the bucket's first sample: the query engine needs the sample exactly at a window's
/// closed end, which is the first of the next bucket when it sits on the boundary.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RollupRow {
    pub t: TimestampMs,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: f64,
    pub last: f64,
    /// Time and value of the bucket's first sample; `first_t` is [`RollupRow::UNKNOWN`] for
    /// rows stored before it was kept (embedded blocks of earlier versions).
    pub first_t: TimestampMs,
    pub first: f64,
}

impl RollupRow {
    pub const UNKNOWN: TimestampMs = TimestampMs::MIN;

    /// The row of a single sample at `t` (not a staleness marker) in the bucket starting at
    /// `t`.
    pub fn of(t: TimestampMs, v: f64) -> RollupRow {
        RollupRow::of_sample(t, t, v)
    }

    /// The row of a single sample at `t` in the bucket starting at `bucket`.
    pub fn of_sample(bucket: TimestampMs, t: TimestampMs, v: f64) -> RollupRow {
        RollupRow {
            t: bucket,
            min: v,
            max: v,
            sum: v,
            count: 1.0,
            last: v,
            first_t: t,
            first: v,
        }
    }

    /// The sample at exactly `t`, when the row knows it: the first sample of its bucket
    /// if that sits at `t`.
    pub fn sample_at(&self, t: TimestampMs) -> Option<f64> {
        (self.first_t == t && t != RollupRow::UNKNOWN).then_some(self.first)
    }

    /// Folds a later part of the same bucket into this one. The result equals the aggregate
    /// over both parts' samples: min/max skip NaN unless everything is NaN, as
    /// `min_over_time`/`max_over_time` do; the sum up to floating-point rounding (the additions
    /// happen in another order), exactly for integer values.
    pub fn merge(&mut self, later: &RollupRow) {
        if later.min < self.min || self.min.is_nan() {
            self.min = later.min;
        }
        if later.max > self.max || self.max.is_nan() {
            self.max = later.max;
        }
        self.sum += later.sum;
        self.count += later.count;
        self.last = later.last;
        // The first sample is this part's: it is the earlier one.
    }
}

/// The aggregates of [`RollupRow`]s a reader uses. A backend may leave the others unread
/// (NaN, and `first_t` [`RollupRow::UNKNOWN`]) where reading fewer columns is cheaper:
/// on PostgreSQL every column a row streams costs about as much as the row itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollupColumns {
    pub min: bool,
    pub max: bool,
    pub sum: bool,
    pub count: bool,
    pub last: bool,
    /// `first_t` and `first`.
    pub first: bool,
}

/// What a rollup read fetches: the aggregates wanted and the most rows (0: no limit), and
/// where the backend reports what the answer lacks.
#[derive(Clone, Debug)]
pub struct RollupRead {
    pub columns: RollupColumns,
    pub max_rows: usize,
    pub warnings: Warnings,
}

impl From<RollupColumns> for RollupRead {
    /// Every row of those aggregates.
    fn from(columns: RollupColumns) -> Self {
        RollupRead {
            columns,
            max_rows: 0,
            warnings: Warnings::default(),
        }
    }
}

impl RollupColumns {
    pub const ALL: RollupColumns = RollupColumns {
        min: true,
        max: true,
        sum: true,
        count: true,
        last: true,
        first: true,
    };

    /// Keeps only the requested aggregates of `row`, as a backend that reads fewer columns
    /// may answer (what tests compare with).
    pub fn project(self, row: &RollupRow) -> RollupRow {
        let keep = |wanted: bool, v: f64| if wanted { v } else { f64::NAN };
        RollupRow {
            t: row.t,
            min: keep(self.min, row.min),
            max: keep(self.max, row.max),
            sum: keep(self.sum, row.sum),
            count: keep(self.count, row.count),
            last: keep(self.last, row.last),
            first_t: if self.first {
                row.first_t
            } else {
                RollupRow::UNKNOWN
            },
            first: keep(self.first, row.first),
        }
    }
}

/// Rollup rows of a series, sorted by bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesRollups {
    pub labels: Labels,
    pub rows: Vec<RollupRow>,
}

/// Aggregates samples (sorted by time) into rollup rows; staleness markers are skipped.
pub fn rollup(samples: &[Sample], resolution: Resolution) -> Vec<RollupRow> {
    let mut rows: Vec<RollupRow> = Vec::new();
    for s in samples {
        if s.v.to_bits() == crate::model::STALE_NAN_BITS {
            continue;
        }
        let bucket = resolution.bucket(s.t);
        match rows.last_mut() {
            Some(row) if row.t == bucket => row.merge(&RollupRow::of_sample(bucket, s.t, s.v)),
            _ => rows.push(RollupRow::of_sample(bucket, s.t, s.v)),
        }
    }
    rows
}

/// Merges two row lists of one series (each sorted; `later` holds later samples of a shared
/// bucket).
pub fn merge_rollups(earlier: Vec<RollupRow>, later: &[RollupRow]) -> Vec<RollupRow> {
    if later.is_empty() {
        return earlier;
    }
    let mut out = Vec::with_capacity(earlier.len() + later.len());
    let mut later = later.iter().peekable();
    for row in earlier {
        while let Some(l) = later.next_if(|l| l.t < row.t) {
            out.push(*l);
        }
        let mut row = row;
        if let Some(l) = later.next_if(|l| l.t == row.t) {
            row.merge(l);
        }
        out.push(row);
    }
    out.extend(later.copied());
    out
}

/// Sizes of what a backend holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StorageStats {
    /// Series held in memory.
    pub series_in_memory: u64,
    /// Since start: series the embedded engine's head forgot after a flush (no sample left in
    /// memory; their labels live on in the blocks' indexes).
    pub head_series_removed: u64,
    /// Since start: the embedded engine's log compactions (checkpoints written with the head's
    /// samples, the segments before them deleted).
    pub log_compactions: u64,
    /// On-disk blocks and the raw samples in them.
    pub blocks: u64,
    pub block_samples: u64,
    /// Bytes of blocks' raw chunks, of their rollups, and of the write-ahead log.
    pub block_bytes: u64,
    pub rollup_bytes: u64,
    pub wal_bytes: u64,
    /// Rollup relations maintained incrementally: every bucket before the watermark is there.
    pub rollup_watermarks: Vec<(Resolution, TimestampMs)>,
    /// Since start: partitions dropped by retention, rollup rows written, lifecycle runs that
    /// failed and that completed (not counting runs left to another server holding the job;
    /// for the embedded engine, its maintenance runs: flush, compaction, retention).
    pub partitions_dropped: u64,
    pub rollup_rows_written: u64,
    pub lifecycle_failures: u64,
    pub lifecycle_runs: u64,
    /// Since start: the longest time writers waited for one step of the embedded engine's
    /// maintenance (a batch of a flush, a block swapped in).
    pub maintenance_writer_hold_max: std::time::Duration,
}

/// How long data is kept, the same for every backend (`[retention]` in the config file).
#[derive(Clone, Debug, serde::Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days raw samples are kept.
    #[arg(
        id = "retention.raw_days",
        long = "retention-raw-days",
        env = "SECUMON_RETENTION_RAW_DAYS",
        default_value_t = 30
    )]
    pub raw_days: u32,
    /// Days 5-minute rollups are kept.
    #[arg(
        id = "retention.rollup_5m_days",
        long = "retention-rollup-5m-days",
        env = "SECUMON_RETENTION_ROLLUP_5M_DAYS",
        default_value_t = 90
    )]
    pub rollup_5m_days: u32,
    /// Days 1-hour rollups are kept.
    #[arg(
        id = "retention.rollup_1h_days",
        long = "retention-rollup-1h-days",
        env = "SECUMON_RETENTION_ROLLUP_1H_DAYS",
        default_value_t = 365
    )]
    pub rollup_1h_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl RetentionConfig {
    /// How long data of a resolution (`None`: raw samples) is kept, in milliseconds.
    pub fn keep_ms(&self, resolution: Option<Resolution>) -> i64 {
        let days = match resolution {
            None => self.raw_days,
            Some(Resolution::FiveMinutes) => self.rollup_5m_days,
            Some(Resolution::OneHour) => self.rollup_1h_days,
        };
        i64::from(days) * 86_400_000
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend cannot be reached or failed in a way a retry may cure.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("query processing would load too many samples into memory in query execution")]
    TooManySamples,
    #[error("storage error: {0}")]
    Internal(String),
}

impl StorageError {
    /// Whether the same request could succeed later (maps to HTTP 5xx for writers).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Stores a batch. Returns only after the accepted samples are durable.
    async fn append_batch(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome>;

    /// [`Storage::append_batch`] of series with owned labels.
    async fn append(
        &self,
        tenant: &TenantId,
        series: &[SeriesWrite],
    ) -> StorageResult<AppendOutcome> {
        self.append_batch(tenant, &WriteBatch::from_series(series))
            .await
    }

    /// Stores metric metadata (latest wins per family, type, unit and help text).
    async fn append_metadata(
        &self,
        tenant: &TenantId,
        metadata: &[MetricMetadata],
    ) -> StorageResult<()>;

    /// Stores exemplars; one per series and timestamp (a repeat replaces nothing).
    async fn append_exemplars(
        &self,
        tenant: &TenantId,
        batch: &[ExemplarWrite],
    ) -> StorageResult<()>;

    /// Exemplars in the range of the series matching any matcher set, sorted by series labels
    /// and time.
    async fn exemplars(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<SeriesExemplars>>;

    /// Series matching all `matchers` with their samples in `[hints.start, hints.end]`, sorted by
    /// labels; series with no sample in the range are left out.
    async fn select(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        hints: &SelectHints,
    ) -> StorageResult<Vec<SeriesSamples>>;

    /// Rollup rows (5 min or 1 h buckets) of the series matching all `matchers`, for buckets
    /// starting in `[start, end]`, sorted by labels; series without rows are left out. A
    /// backend answers from its rollup relations where it keeps them and aggregates raw
    /// samples otherwise, so the answer is the same either way; this default aggregates raw
    /// samples. Only the aggregates in `read.columns` need be read (see [`RollupColumns`]);
    /// past `read.max_rows` rows (0: no limit) a backend stops with
    /// [`StorageError::TooManySamples`].
    async fn select_rollups(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        resolution: Resolution,
        start: TimestampMs,
        end: TimestampMs,
        read: RollupRead,
    ) -> StorageResult<Vec<SeriesRollups>> {
        let start = resolution.bucket(start);
        let hints = SelectHints {
            start,
            end: resolution.bucket(end).saturating_add(resolution.ms() - 1),
            max_samples: read.max_rows,
            warnings: read.warnings.clone(),
            ..SelectHints::default()
        };
        Ok(self
            .select(tenant, matchers, &hints)
            .await?
            .into_iter()
            .map(|s| SeriesRollups {
                rows: rollup(&s.samples, resolution),
                labels: s.labels,
            })
            .filter(|s| !s.rows.is_empty())
            .collect())
    }

    /// The samples stored exactly at `instants` (any order, repeats allowed) of the series
    /// matching all `matchers`, staleness markers included as stored, sorted by labels; series
    /// without such a sample are left out. The query engine reads the sample at the closed end
    /// of a range window with it when the rest of the window comes from rollups. This default
    /// reads every raw sample between the first and the last instant and keeps those at the
    /// instants; a backend with an index by time answers it with point reads.
    async fn select_instants(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        instants: &[TimestampMs],
    ) -> StorageResult<Vec<SeriesSamples>> {
        let mut wanted = instants.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let (Some(&start), Some(&end)) = (wanted.first(), wanted.last()) else {
            return Ok(Vec::new());
        };
        let hints = SelectHints {
            start,
            end,
            ..SelectHints::default()
        };
        Ok(self
            .select(tenant, matchers, &hints)
            .await?
            .into_iter()
            .filter_map(|mut s| {
                s.samples.retain(|p| wanted.binary_search(&p.t).is_ok());
                (!s.samples.is_empty()).then_some(s)
            })
            .collect())
    }

    /// Label sets of the series with samples in the range, sorted.
    async fn series(&self, tenant: &TenantId, query: &SeriesQuery) -> StorageResult<Vec<Labels>>;

    /// Label names of the series with samples in the range, sorted. Derived from
    /// [`Storage::series`] unless a backend knows better.
    async fn label_names(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<StringList> {
        label_names_of_series(self, tenant, query).await
    }

    /// Values of label `name` over the series with samples in the range, sorted. Derived from
    /// [`Storage::series`] unless a backend knows better.
    async fn label_values(
        &self,
        tenant: &TenantId,
        name: &str,
        query: &SeriesQuery,
    ) -> StorageResult<StringList> {
        label_values_of_series(self, tenant, name, query).await
    }

    /// Metadata per metric family, optionally of one metric only. `limit` bounds the number of
    /// families (0: no limit).
    async fn metadata(
        &self,
        tenant: &TenantId,
        metric: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<MetricMetadata>>;

    /// Succeeds when the backend answers; `/ready` is this.
    async fn ping(&self) -> StorageResult<()>;

    /// Sizes of what the backend holds, for `/metrics` (`None` when it does not know).
    fn stats(&self) -> Option<StorageStats> {
        None
    }

    /// How often the server calls [`Storage::run_maintenance`]; `None` for never.
    fn maintenance_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Background work of the backend's data lifecycle (flushing, compaction, rollups,
    /// retention), called every [`Storage::maintenance_interval`].
    async fn run_maintenance(&self) -> StorageResult<()> {
        Ok(())
    }

    /// Bytes of damaged data the backend cut off when it opened (a torn write-ahead log
    /// tail), reported in `/metrics`.
    fn damaged_bytes_recovered(&self) -> u64 {
        0
    }
}

pub type DynStorage = Arc<dyn Storage>;

/// Label names of the series [`Storage::series`] finds.
pub async fn label_names_of_series<S: Storage + ?Sized>(
    storage: &S,
    tenant: &TenantId,
    query: &SeriesQuery,
) -> StorageResult<StringList> {
    let all = SeriesQuery {
        limit: 0,
        ..query.clone()
    };
    let names: std::collections::BTreeSet<String> = storage
        .series(tenant, &all)
        .await?
        .iter()
        .flat_map(|labels| labels.iter().map(|l| l.name.clone()))
        .collect();
    Ok(limited(names, query.limit))
}

/// Values of label `name` over the series [`Storage::series`] finds.
pub async fn label_values_of_series<S: Storage + ?Sized>(
    storage: &S,
    tenant: &TenantId,
    name: &str,
    query: &SeriesQuery,
) -> StorageResult<StringList> {
    let all = SeriesQuery {
        limit: 0,
        ..query.clone()
    };
    let values: std::collections::BTreeSet<String> = storage
        .series(tenant, &all)
        .await?
        .iter()
        .filter_map(|labels| labels.get(name).map(str::to_owned))
        .collect();
    Ok(limited(values, query.limit))
}

/// The first `limit` items (all when 0), in order.
pub(crate) fn limited(items: impl IntoIterator<Item = String>, limit: usize) -> StringList {
    let take = if limit == 0 { usize::MAX } else { limit };
    items.into_iter().take(take).collect()
}
