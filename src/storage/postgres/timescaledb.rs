//! TimescaleDB mode: `samples` as a hypertable compressed after a week, `samples_5m` and
//! `samples_1h` as hierarchical continuous aggregates, and TimescaleDB's own jobs for refresh,
//! compression and retention. Everything here is idempotent: a second run changes nothing,
//! and a changed setting updates the existing policy in place (`alter_job`), keeping its id.

use super::{db_error, float_sum, not_stale, packed, relkind, PostgresConfig};
use crate::storage::{RetentionConfig, StorageError, StorageResult};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

/// What setting up the lifecycle did to one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobChange {
    Created,
    Updated,
    Unchanged,
}

/// One TimescaleDB job of SecuMon's relations, as `secumon migrate` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: i32,
    pub proc_name: String,
    pub relation: String,
    pub schedule: String,
    pub config: String,
    pub change: JobChange,
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let change = match self.change {
            JobChange::Created => "created",
            JobChange::Updated => "updated",
            JobChange::Unchanged => "unchanged",
        };
        write!(
            f,
            "job {} {} on {} every {} {} ({change})",
            self.id, self.proc_name, self.relation, self.schedule, self.config
        )
    }
}

/// How far back each refresh of the continuous aggregates reaches: late samples within it are
/// picked up by TimescaleDB's invalidation tracking. It stays well inside raw retention, since
/// refreshing a range whose raw data was dropped would empty the aggregate there.
fn refresh_window_hours(retention: &RetentionConfig) -> i64 {
    (i64::from(retention.raw_days.max(1)) * 12).min(72)
}

/// Creates or updates the hypertable, the continuous aggregates and every policy; returns the
/// jobs of SecuMon's relations afterwards. The caller holds the setup lock.
pub(super) async fn setup(
    conn: &mut PgConnection,
    config: &PostgresConfig,
    retention: &RetentionConfig,
) -> StorageResult<Vec<Job>> {
    // Refuse before changing anything: a plain-mode rollup table with rows stands where a
    // continuous aggregate must go.
    for name in ["samples_5m", "samples_1h"] {
        if relkind(&mut *conn, name).await?.as_deref() == Some("r") {
            let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
            if rows > 0 {
                return Err(StorageError::Internal(format!(
                    "{name} is a plain rollup table with {rows} rows; TimescaleDB mode needs \
                     a continuous aggregate there. Copy or drop it, or run with \
                     --timescaledb=off"
                )));
            }
        }
    }
    setup_locked(conn, config, retention).await
}

async fn setup_locked(
    conn: &mut PgConnection,
    config: &PostgresConfig,
    retention: &RetentionConfig,
) -> StorageResult<Vec<Job>> {
    let chunk = format!("{} hours", config.partition_hours.max(1));
    make_hypertable(conn, &chunk).await?;
    create_aggregates(conn).await?;

    let refresh = format!("{} hours", refresh_window_hours(retention));
    let mut changes = Vec::new();
    let policies = [
        Policy {
            relation: "samples",
            proc_name: "policy_compression",
            key: "compress_after",
            value: format!("{} days", config.compress_after_days),
            add: "SELECT add_compression_policy('samples', compress_after => $1::text::interval)",
        },
        Policy {
            relation: "samples_5m",
            proc_name: "policy_refresh_continuous_aggregate",
            key: "start_offset",
            value: refresh.clone(),
            add: "SELECT add_continuous_aggregate_policy('samples_5m',
                    start_offset => $1::text::interval, end_offset => INTERVAL '10 minutes',
                    schedule_interval => INTERVAL '5 minutes')",
        },
        Policy {
            relation: "samples_1h",
            proc_name: "policy_refresh_continuous_aggregate",
            key: "start_offset",
            value: refresh,
            add: "SELECT add_continuous_aggregate_policy('samples_1h',
                    start_offset => $1::text::interval, end_offset => INTERVAL '1 hour',
                    schedule_interval => INTERVAL '1 hour')",
        },
        Policy {
            relation: "samples",
            proc_name: "policy_retention",
            key: "drop_after",
            value: format!("{} days", retention.raw_days),
            add: "SELECT add_retention_policy('samples', drop_after => $1::text::interval)",
        },
        Policy {
            relation: "samples_5m",
            proc_name: "policy_retention",
            key: "drop_after",
            value: format!("{} days", retention.rollup_5m_days),
            add: "SELECT add_retention_policy('samples_5m', drop_after => $1::text::interval)",
        },
        Policy {
            relation: "samples_1h",
            proc_name: "policy_retention",
            key: "drop_after",
            value: format!("{} days", retention.rollup_1h_days),
            add: "SELECT add_retention_policy('samples_1h', drop_after => $1::text::interval)",
        },
    ];
    for policy in &policies {
        let (id, change) = policy.ensure(conn).await?;
        changes.push((id, change));
    }
    let mut jobs = jobs(conn).await?;
    for job in &mut jobs {
        if let Some((_, change)) = changes.iter().find(|(id, _)| *id == job.id) {
            job.change = *change;
        }
    }
    Ok(jobs)
}

async fn is_hypertable(conn: &mut PgConnection, name: &str) -> StorageResult<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                        WHERE hypertable_schema = current_schema() AND hypertable_name = $1)",
    )
    .bind(name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)
}

/// Turns `samples` into a hypertable: a partitioned `samples` (what the migrations create,
/// and what plain mode keeps) is replaced by a hypertable holding the same rows, in one
/// transaction. Then chunk interval and compression settings are brought to the config.
async fn make_hypertable(conn: &mut PgConnection, chunk: &str) -> StorageResult<()> {
    if !is_hypertable(conn, "samples").await? {
        let kind = relkind(&mut *conn, "samples").await?;
        let mut tx = conn.begin().await.map_err(db_error)?;
        if kind.is_some() {
            sqlx::query("ALTER TABLE samples RENAME TO samples_before_timescaledb")
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        sqlx::query(
            "CREATE TABLE samples (
                 series_id BIGINT           NOT NULL,
                 time      TIMESTAMPTZ      NOT NULL,
                 value     DOUBLE PRECISION NOT NULL,
                 PRIMARY KEY (series_id, time))",
        )
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "SELECT create_hypertable('samples', 'time', chunk_time_interval => $1::text::interval)",
        )
        .bind(chunk)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if kind.is_some() {
            let copied = sqlx::query(
                "INSERT INTO samples (series_id, time, value)
                 SELECT series_id, time, value FROM samples_before_timescaledb",
            )
            .execute(&mut *tx)
            .await
            .map_err(db_error)?
            .rows_affected();
            sqlx::query("DROP TABLE samples_before_timescaledb")
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            let unpacked = packed::unpack_all(&mut tx).await?;
            if unpacked > 0 {
                tracing::info!(
                    windows = unpacked,
                    "packed samples moved into the hypertable"
                );
            }
            tracing::info!(
                rows = copied,
                "samples converted to a TimescaleDB hypertable"
            );
        }
        tx.commit().await.map_err(db_error)?;
    }
    let same_interval: bool = sqlx::query_scalar(
        "SELECT coalesce(bool_and(time_interval = $1::text::interval), false)
         FROM timescaledb_information.dimensions
         WHERE hypertable_schema = current_schema() AND hypertable_name = 'samples'
           AND column_name = 'time'",
    )
    .bind(chunk)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if !same_interval {
        sqlx::query("SELECT set_chunk_time_interval('samples', $1::text::interval)")
            .bind(chunk)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        tracing::info!(
            interval = chunk,
            "chunk interval of samples changed (new chunks)"
        );
    }
    let compressed: bool = sqlx::query_scalar(
        "SELECT compression_enabled FROM timescaledb_information.hypertables
         WHERE hypertable_schema = current_schema() AND hypertable_name = 'samples'",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if !compressed {
        sqlx::query(
            "ALTER TABLE samples SET (timescaledb.compress,
                 timescaledb.compress_segmentby = 'series_id',
                 timescaledb.compress_orderby = 'time')",
        )
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// `samples_5m` over `samples`, `samples_1h` over `samples_5m`: min, max, sum, count, last
/// and the first sample (time and value) per series and bucket, as [`crate::storage::RollupRow`] defines them (staleness markers
/// excluded; max skips NaN unless the bucket holds only NaN, as `max_over_time` does; min
/// already does in PostgreSQL's order). Real-time aggregation is on, so the buckets past the
/// last refresh are computed from raw data at query time.
async fn create_aggregates(conn: &mut PgConnection) -> StorageResult<()> {
    let definitions = [
        (
            "samples_5m",
            format!(
                "CREATE MATERIALIZED VIEW samples_5m
                 WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
                 SELECT series_id, time_bucket(INTERVAL '5 minutes', time) AS bucket,
                        min(value) AS min,
                        coalesce(max(value) FILTER (WHERE value <> 'NaN'), max(value)) AS max,
                        {} AS sum, count(*)::float8 AS count, last(value, time) AS last,
                        min(time) AS first_time, first(value, time) AS first
                 FROM samples WHERE {}
                 GROUP BY series_id, time_bucket(INTERVAL '5 minutes', time)
                 WITH NO DATA",
                float_sum("value"),
                not_stale("value")
            ),
        ),
        (
            "samples_1h",
            format!(
                "CREATE MATERIALIZED VIEW samples_1h
             WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
             SELECT series_id, time_bucket(INTERVAL '1 hour', bucket) AS bucket,
                    min(min) AS min,
                    coalesce(max(max) FILTER (WHERE max <> 'NaN'), max(max)) AS max,
                    {} AS sum, sum(count) AS count, last(last, bucket) AS last,
                    min(first_time) AS first_time, first(first, bucket) AS first
             FROM samples_5m
             GROUP BY series_id, time_bucket(INTERVAL '1 hour', bucket)
             WITH NO DATA",
                float_sum("sum")
            ),
        ),
    ];
    for (name, ddl) in definitions {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM timescaledb_information.continuous_aggregates
                            WHERE view_schema = current_schema() AND view_name = $1)",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
        if exists {
            continue;
        }
        match relkind(&mut *conn, name).await?.as_deref() {
            None => {}
            Some("r") => {
                // Plain mode's rollup table, empty (`setup` refused a table with rows).
                sqlx::query(&format!("DROP TABLE {name}"))
                    .execute(&mut *conn)
                    .await
                    .map_err(db_error)?;
            }
            Some(kind) => {
                return Err(StorageError::Internal(format!(
                    "{name} exists (relation kind {kind}) but is not SecuMon's continuous aggregate"
                )))
            }
        }
        sqlx::query(&ddl)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// One policy: which job it is, the setting it must have, and how to create it.
struct Policy {
    relation: &'static str,
    proc_name: &'static str,
    key: &'static str,
    value: String,
    add: &'static str,
}

impl Policy {
    async fn ensure(&self, conn: &mut PgConnection) -> StorageResult<(i32, JobChange)> {
        let existing: Option<(i32, String)> = sqlx::query_as(
            "SELECT j.job_id, j.config::text FROM timescaledb_information.jobs j
             LEFT JOIN timescaledb_information.continuous_aggregates ca
               ON ca.materialization_hypertable_schema = j.hypertable_schema
              AND ca.materialization_hypertable_name = j.hypertable_name
             WHERE j.proc_name = $1 AND coalesce(ca.view_name, j.hypertable_name) = $2
               AND coalesce(ca.view_schema, j.hypertable_schema) = current_schema()
             ORDER BY j.job_id LIMIT 1",
        )
        .bind(self.proc_name)
        .bind(self.relation)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
        let Some((id, config)) = existing else {
            let id: i32 = sqlx::query_scalar(self.add)
                .bind(&self.value)
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
            return Ok((id, JobChange::Created));
        };
        let mut config: serde_json::Value = serde_json::from_str(&config)
            .map_err(|e| StorageError::Internal(format!("job {id} has a bad config: {e}")))?;
        let current = config.get(self.key).and_then(|v| v.as_str()).unwrap_or("");
        let same: bool = sqlx::query_scalar("SELECT $1::text::interval = $2::text::interval")
            .bind(current)
            .bind(&self.value)
            .fetch_one(&mut *conn)
            .await
            .unwrap_or(false);
        if same {
            return Ok((id, JobChange::Unchanged));
        }
        config[self.key] = serde_json::Value::String(self.value.clone());
        sqlx::query("SELECT alter_job($1, config => $2::text::jsonb)")
            .bind(id)
            .bind(config.to_string())
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        Ok((id, JobChange::Updated))
    }
}

/// The jobs on SecuMon's relations, by id.
pub(super) async fn jobs(conn: &mut PgConnection) -> StorageResult<Vec<Job>> {
    let rows: Vec<(i32, String, String, String, String)> = sqlx::query_as(
        "SELECT j.job_id, j.proc_name::text, coalesce(ca.view_name, j.hypertable_name)::text,
                j.schedule_interval::text, j.config::text
         FROM timescaledb_information.jobs j
         LEFT JOIN timescaledb_information.continuous_aggregates ca
           ON ca.materialization_hypertable_schema = j.hypertable_schema
          AND ca.materialization_hypertable_name = j.hypertable_name
         WHERE coalesce(ca.view_name, j.hypertable_name) IN ('samples', 'samples_5m', 'samples_1h')
           AND coalesce(ca.view_schema, j.hypertable_schema) = current_schema()
         ORDER BY j.job_id",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, proc_name, relation, schedule, config)| Job {
            id,
            proc_name,
            relation,
            schedule,
            config,
            change: JobChange::Unchanged,
        })
        .collect())
}
