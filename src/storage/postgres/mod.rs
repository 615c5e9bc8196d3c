//! PostgreSQL backend: `series`, `samples`, `metric_metadata` and `exemplars` as `migrations/`
//! creates them, plus the data lifecycle of the mode chosen at connect (`--timescaledb`):
//! TimescaleDB's hypertable, continuous aggregates and policies (`timescaledb.rs`), or on plain
//! PostgreSQL partitions and rollup tables maintained by the server (`lifecycle.rs`).
//!
//! Writes resolve series ids through an in-memory cache and insert each batch in one
//! `unnest`-array statement. Reads find series with SQL on the metric name and equality
//! matchers, apply the remaining matchers in Rust (Prometheus's RE2 regex semantics, which
//! PostgreSQL's regex engine does not share), then load samples with one statement per chunk of
//! series. This module knows nothing of protocols or PromQL.

mod copy_binary;
mod exemplars;
mod lifecycle;
mod packed;
mod read;
mod timescaledb;
mod write;

pub use lifecycle::{LifecycleReport, Mode, TimescaleMode};
pub use timescaledb::{Job, JobChange};

use super::{
    AppendOutcome, ExemplarWrite, Resolution, RetentionConfig, RollupRead, SelectHints,
    SeriesQuery, SeriesRollups, Storage, StorageError, StorageResult, StorageStats, WriteBatch,
};
use crate::model::{
    Labels, Matcher, MetricMetadata, MetricType, SeriesExemplars, SeriesSamples, TenantId,
    TimestampMs, STALE_NAN_BITS,
};
use async_trait::async_trait;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;
use write::{PartitionSet, SeriesCache};

/// Settings of the PostgreSQL backend (`[postgres]` in the config file).
#[derive(Clone, Debug, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Most PostgreSQL connections the server opens.
    #[arg(
        id = "postgres.max_connections",
        long = "postgres-max-connections",
        env = "SECUMON_POSTGRES_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// Seconds a request waits for a free PostgreSQL connection before failing with a
    /// retryable error.
    #[arg(
        id = "postgres.acquire_timeout_secs",
        long = "postgres-acquire-timeout-secs",
        env = "SECUMON_POSTGRES_ACQUIRE_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub acquire_timeout_secs: u64,
    /// Width of one `samples` partition (plain PostgreSQL) or hypertable chunk (TimescaleDB),
    /// in hours.
    #[arg(
        id = "postgres.partition_hours",
        long = "postgres-partition-hours",
        env = "SECUMON_POSTGRES_PARTITION_HOURS",
        default_value_t = 24
    )]
    pub partition_hours: u32,
    /// Series ids kept in memory per server; the cache is emptied when it is full.
    #[arg(
        id = "postgres.series_cache_size",
        long = "postgres-series-cache-size",
        env = "SECUMON_POSTGRES_SERIES_CACHE_SIZE",
        default_value_t = 1_000_000
    )]
    pub series_cache_size: usize,
    /// Use TimescaleDB: `auto` when the extension is installed or can be created, `on` (fail
    /// when it is missing), `off` (plain PostgreSQL lifecycle).
    #[arg(
        id = "postgres.timescaledb",
        long = "timescaledb",
        env = "SECUMON_TIMESCALEDB",
        value_enum,
        default_value_t = TimescaleMode::Auto
    )]
    pub timescaledb: TimescaleMode,
    /// TimescaleDB: raw chunks are compressed once this many days old.
    #[arg(
        id = "postgres.compress_after_days",
        long = "postgres-compress-after-days",
        env = "SECUMON_POSTGRES_COMPRESS_AFTER_DAYS",
        default_value_t = 7
    )]
    pub compress_after_days: u32,
    /// Plain PostgreSQL: seconds between runs of the lifecycle job (partitions, rollup tables,
    /// retention).
    #[arg(
        id = "postgres.lifecycle_interval_secs",
        long = "postgres-lifecycle-interval-secs",
        env = "SECUMON_POSTGRES_LIFECYCLE_INTERVAL_SECS",
        default_value_t = 60
    )]
    pub lifecycle_interval_secs: u64,
    /// Write samples with binary `COPY FROM STDIN` (falling back to a checking insert when a
    /// batch repeats stored samples); false writes every batch with `INSERT … ON CONFLICT`,
    /// for servers or proxies that cannot take COPY.
    #[arg(
        id = "postgres.copy_writes",
        long = "postgres-copy-writes",
        env = "SECUMON_POSTGRES_COPY_WRITES",
        action = clap::ArgAction::Set,
        default_value_t = true
    )]
    pub copy_writes: bool,
    /// Most exemplars kept, across every series and tenant: each maintenance run deletes the
    /// oldest past this, and those older than raw retention.
    #[arg(
        id = "postgres.max_exemplars",
        long = "postgres-max-exemplars",
        env = "SECUMON_POSTGRES_MAX_EXEMPLARS",
        default_value_t = 100_000
    )]
    pub max_exemplars: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

pub struct PostgresStorage {
    pool: PgPool,
    series_cache: SeriesCache,
    labels: read::LabelCache,
    partitions: PartitionSet,
    mode: Mode,
    retention: RetentionConfig,
    lifecycle: lifecycle::LifecycleState,
    lifecycle_interval: Duration,
    /// Most exemplars kept (`--postgres-max-exemplars`).
    max_exemplars: usize,
    jobs: Vec<Job>,
    copy_writes: bool,
    /// TimescaleDB: samples older than this may sit in a compressed chunk.
    compress_horizon_ms: i64,
}

impl PostgresStorage {
    /// Connects, applies the migrations and sets up the data lifecycle of the mode
    /// `config.timescaledb` selects.
    pub async fn connect(
        url: &str,
        config: &PostgresConfig,
        retention: &RetentionConfig,
    ) -> StorageResult<PostgresStorage> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StorageError::Internal(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
            .connect_with(options)
            .await
            .map_err(db_error)?;
        migrate(&pool).await?;
        // Servers starting together decide the mode and set it up one at a time, on one
        // connection holding a session advisory lock.
        let mut conn = pool.acquire().await.map_err(db_error)?;
        sqlx::query("SELECT pg_advisory_lock(hashtext('secumon.lifecycle.setup'))")
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        let setup = async {
            let mode = lifecycle::detect(&mut conn, config.timescaledb).await?;
            let jobs = match mode {
                Mode::TimescaleDb => timescaledb::setup(&mut conn, config, retention).await?,
                Mode::Plain => {
                    lifecycle::setup_plain(&mut conn).await?;
                    Vec::new()
                }
            };
            Ok::<_, StorageError>((mode, jobs))
        }
        .await;
        let unlocked =
            sqlx::query("SELECT pg_advisory_unlock(hashtext('secumon.lifecycle.setup'))")
                .execute(&mut *conn)
                .await;
        if unlocked.is_err() {
            let _ = conn.close().await;
        }
        let (mode, jobs) = setup?;
        Ok(PostgresStorage {
            pool,
            series_cache: SeriesCache::new(config.series_cache_size),
            labels: read::LabelCache::new(config.series_cache_size),
            partitions: PartitionSet::new(config.partition_hours),
            mode,
            retention: retention.clone(),
            lifecycle: lifecycle::LifecycleState::default(),
            lifecycle_interval: Duration::from_secs(config.lifecycle_interval_secs.max(1)),
            max_exemplars: config.max_exemplars,
            jobs,
            copy_writes: config.copy_writes,
            // A chunk is compressed once its end is compress-after old, so any sample older
            // than that may sit in one; an hour less, for clocks that disagree.
            compress_horizon_ms: (i64::from(config.compress_after_days) * 24 - 1).max(0)
                * 3_600_000,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The lifecycle this backend runs on.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// TimescaleDB mode: the jobs on SecuMon's relations after setup, and what setup did to
    /// each. Empty on plain PostgreSQL.
    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    /// Plain PostgreSQL: one run of the lifecycle job at `now` (the server runs it every
    /// `lifecycle_interval_secs`); nothing on TimescaleDB, whose own jobs do it.
    pub async fn run_lifecycle_at(&self, now: TimestampMs) -> StorageResult<LifecycleReport> {
        match self.mode {
            Mode::Plain => self.run_lifecycle(now).await,
            Mode::TimescaleDb => Ok(LifecycleReport::default()),
        }
    }
}

/// Relation kind of `name` in the current schema (`p` partitioned table, `r` table, `v`
/// view), if it exists.
async fn relkind<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    name: &str,
) -> StorageResult<Option<String>> {
    sqlx::query_scalar(
        "SELECT c.relkind::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relname = $1",
    )
    .bind(name)
    .fetch_optional(executor)
    .await
    .map_err(db_error)
}

/// SQL sum of a float8 column that never fails: PostgreSQL's `sum(float8)` raises "value out
/// of range" where two finite values add up past the float range (Prometheus gives ±Inf), which
/// would stop a rollup job for good. The sum is taken in `numeric` (exact; ±Infinity and NaN
/// as in float) and brought back, ±Inf past the float range.
fn float_sum(column: &str) -> String {
    let s = format!("sum(({column})::numeric)");
    let max = "1.7976931348623157e308";
    format!(
        "CASE WHEN {s} = 'NaN' THEN 'NaN'::float8 WHEN {s} > {max} THEN 'Infinity'::float8
              WHEN {s} < -{max} THEN '-Infinity'::float8 ELSE {s}::float8 END"
    )
}

/// SQL condition that leaves staleness markers out (they end a series; they are not samples).
fn not_stale(column: &str) -> String {
    format!("float8send({column}) <> '\\x{STALE_NAN_BITS:016x}'::bytea")
}

/// Applies every migration in `migrations/` that has not run yet.
pub async fn migrate(pool: &PgPool) -> StorageResult<()> {
    sqlx::migrate!("./migrations")
        .run(pool)
        .await
        .map_err(|e| StorageError::Internal(format!("migration failed: {e}")))
}

/// Classifies a database error: connection-level trouble is retryable, the rest is not.
fn db_error(e: sqlx::Error) -> StorageError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StorageError::Unavailable(e.to_string()),
        sqlx::Error::Database(ref db) => match db.code().as_deref() {
            // Class 08 (connection exception), 53 (insufficient resources), 57P0x (shutdown),
            // 40001/40P01 (serialization failure, deadlock): a retry can cure these.
            Some(code)
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P0")
                    || code == "40001"
                    || code == "40P01" =>
            {
                StorageError::Unavailable(e.to_string())
            }
            _ => StorageError::Internal(e.to_string()),
        },
        other => StorageError::Internal(other.to_string()),
    }
}

#[async_trait]
impl Storage for PostgresStorage {
    async fn append_batch(
        &self,
        tenant: &TenantId,
        batch: &WriteBatch,
    ) -> StorageResult<AppendOutcome> {
        self.write_batch(tenant, batch).await
    }

    async fn append_metadata(
        &self,
        tenant: &TenantId,
        metadata: &[MetricMetadata],
    ) -> StorageResult<()> {
        if metadata.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = metadata
            .iter()
            .map(|m| m.metric_family_name.as_str())
            .collect();
        let types: Vec<&str> = metadata.iter().map(|m| m.metric_type.as_str()).collect();
        let units: Vec<&str> = metadata.iter().map(|m| m.unit.as_str()).collect();
        let helps: Vec<&str> = metadata.iter().map(|m| m.help.as_str()).collect();
        sqlx::query(
            "INSERT INTO metric_metadata (tenant_id, metric_name, type, unit, help)
             SELECT DISTINCT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
             ON CONFLICT (tenant_id, metric_name, type, unit, help_md5)
             DO UPDATE SET updated_at = now()",
        )
        .bind(tenant.as_str())
        .bind(&names)
        .bind(&types)
        .bind(&units)
        .bind(&helps)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    async fn append_exemplars(
        &self,
        tenant: &TenantId,
        batch: &[ExemplarWrite],
    ) -> StorageResult<()> {
        self.store_exemplars(tenant, batch).await
    }

    async fn exemplars(
        &self,
        tenant: &TenantId,
        query: &SeriesQuery,
    ) -> StorageResult<Vec<SeriesExemplars>> {
        self.load_exemplars(tenant, query).await
    }

    async fn select(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        hints: &SelectHints,
    ) -> StorageResult<Vec<SeriesSamples>> {
        self.select_samples(tenant, matchers, hints).await
    }

    async fn select_rollups(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        resolution: Resolution,
        start: TimestampMs,
        end: TimestampMs,
        read: RollupRead,
    ) -> StorageResult<Vec<SeriesRollups>> {
        self.select_rollup_rows(tenant, matchers, resolution, (start, end), read)
            .await
    }

    async fn select_instants(
        &self,
        tenant: &TenantId,
        matchers: &[Matcher],
        instants: &[TimestampMs],
    ) -> StorageResult<Vec<SeriesSamples>> {
        self.select_at(tenant, matchers, instants).await
    }

    fn stats(&self) -> Option<StorageStats> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.mode != Mode::Plain {
            return None;
        }
        let state = &self.lifecycle;
        Some(StorageStats {
            rollup_watermarks: [
                (Resolution::FiveMinutes, state.watermark_5m.load(Relaxed)),
                (Resolution::OneHour, state.watermark_1h.load(Relaxed)),
            ]
            .into_iter()
            .filter(|(_, w)| *w != i64::MIN)
            .collect(),
            partitions_dropped: state.partitions_dropped.load(Relaxed),
            rollup_rows_written: state.rollup_rows_written.load(Relaxed),
            lifecycle_failures: state.failed_runs.load(Relaxed),
            lifecycle_runs: state.completed_runs.load(Relaxed),
            ..StorageStats::default()
        })
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        // TimescaleDB runs the data lifecycle itself; exemplars are pruned by the server in
        // either mode.
        Some(self.lifecycle_interval)
    }

    async fn run_maintenance(&self) -> StorageResult<()> {
        let now = chrono::Utc::now().timestamp_millis();
        if self.mode == Mode::Plain {
            let report = self.run_lifecycle_at(now).await?;
            if report != LifecycleReport::default() {
                tracing::info!(?report, "PostgreSQL lifecycle");
            }
        }
        let pruned = self.prune_exemplars(now).await?;
        if pruned > 0 {
            tracing::debug!(pruned, "exemplars pruned");
        }
        Ok(())
    }

    async fn series(&self, tenant: &TenantId, query: &SeriesQuery) -> StorageResult<Vec<Labels>> {
        let mut series = self.series_in_range(tenant, query).await?;
        series.sort();
        series.dedup();
        if query.limit > 0 {
            series.truncate(query.limit);
        }
        Ok(series)
    }

    async fn metadata(
        &self,
        tenant: &TenantId,
        metric: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<MetricMetadata>> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT metric_name, type, help, unit FROM metric_metadata
             WHERE tenant_id = $1 AND ($2::text IS NULL OR metric_name = $2)
             ORDER BY metric_name, updated_at DESC",
        )
        .bind(tenant.as_str())
        .bind(metric)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let mut families = 0;
        let mut out: Vec<MetricMetadata> = Vec::with_capacity(rows.len());
        for (name, metric_type, help, unit) in rows {
            let new_family = out.last().is_none_or(|m| m.metric_family_name != name);
            if new_family {
                if limit > 0 && families == limit {
                    break;
                }
                families += 1;
            }
            out.push(MetricMetadata {
                metric_family_name: name,
                metric_type: MetricType::parse(&metric_type),
                help,
                unit,
            });
        }
        Ok(out)
    }

    async fn ping(&self) -> StorageResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }
}
