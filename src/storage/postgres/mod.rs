//! PostgreSQL backend (plain mode): `series`, range-partitioned `samples` and
//! `metric_metadata`, as `migrations/` creates them.
//!
//! Writes resolve series ids through an in-memory cache and insert each batch in one
//! `unnest`-array statement. Reads find series with SQL on the metric name and equality
//! matchers, apply the remaining matchers in Rust (Prometheus's RE2 regex semantics, which
//! PostgreSQL's regex engine does not share), then load samples with one statement per chunk of
//! series. This module knows nothing of protocols or PromQL.

mod copy_binary;
mod exemplars;
mod read;
mod write;

use super::{
    AppendOutcome, ExemplarWrite, SelectHints, SeriesQuery, SeriesWrite, Storage, StorageError,
    StorageResult,
};
use crate::model::{
    Labels, Matcher, MetricMetadata, MetricType, SeriesExemplars, SeriesSamples, TenantId,
};
use async_trait::async_trait;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;
use write::{PartitionSet, SeriesCache};

/// Settings of the PostgreSQL backend (`[postgres]` in the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Largest number of connections the server opens.
    pub max_connections: u32,
    /// How long a request waits for a free connection before failing with a retryable error.
    pub acquire_timeout_secs: u64,
    /// Width of one `samples` partition, in hours.
    pub partition_hours: u32,
    /// Series ids kept in memory per server; the cache is emptied when it is full.
    pub series_cache_size: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout_secs: 10,
            partition_hours: 24,
            series_cache_size: 1_000_000,
        }
    }
}

pub struct PostgresStorage {
    pool: PgPool,
    series_cache: SeriesCache,
    labels: read::LabelCache,
    partitions: PartitionSet,
}

impl PostgresStorage {
    /// Connects and applies the migrations.
    pub async fn connect(url: &str, config: &PostgresConfig) -> StorageResult<PostgresStorage> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StorageError::Internal(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs))
            .connect_with(options)
            .await
            .map_err(db_error)?;
        migrate(&pool).await?;
        Ok(PostgresStorage {
            pool,
            series_cache: SeriesCache::new(config.series_cache_size),
            labels: read::LabelCache::new(config.series_cache_size),
            partitions: PartitionSet::new(config.partition_hours),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
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
    async fn append(
        &self,
        tenant: &TenantId,
        batch: &[SeriesWrite],
    ) -> StorageResult<AppendOutcome> {
        self.append_batch(tenant, batch).await
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
