//! Configuration: one tree of settings, read from a TOML file (`--config`), then overridden by
//! `SECUMON_*` environment variables, then by command-line flags. `secumon serve --help` lists
//! every key with its default.

use crate::ingest::otlp::OtlpConfig;
use crate::ingest::IngestConfig;
use crate::promql::EngineConfig;
use crate::storage::embedded::{EmbeddedConfig, FsyncPolicy};
use crate::storage::postgres::{PostgresConfig, TimescaleMode};
use crate::storage::RetentionConfig;
use crate::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::path::PathBuf;

/// The whole configuration of `secumon serve`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP server (Prometheus API, remote-write, health, metrics).
    pub http_listen: String,
    /// Address of the OTLP/gRPC listener; empty to disable it.
    pub otlp_grpc_listen: String,
    /// Address of the OTLP/HTTP listener (`POST /v1/metrics`); empty to disable it.
    pub otlp_http_listen: String,
    /// Where data lives: a directory for the embedded engine, or a `postgres://` URL.
    pub storage: String,
    /// Log filter, `RUST_LOG` syntax (e.g. `info`, `secumon=debug`).
    pub log_level: String,
    pub log_format: LogFormat,
    pub embedded: EmbeddedConfig,
    pub postgres: PostgresConfig,
    pub retention: RetentionConfig,
    pub ingest: IngestConfig,
    pub otlp: OtlpConfig,
    pub query: EngineConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_listen: "127.0.0.1:8080".into(),
            otlp_grpc_listen: "127.0.0.1:4317".into(),
            otlp_http_listen: "127.0.0.1:4318".into(),
            storage: "./data".into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            embedded: EmbeddedConfig::default(),
            postgres: PostgresConfig::default(),
            retention: RetentionConfig::default(),
            ingest: IngestConfig::default(),
            otlp: OtlpConfig::default(),
            query: EngineConfig::default(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "secumon",
    version,
    about = "Prometheus- and OpenTelemetry-compatible metrics backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, which is also the default subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (default).
    Serve(ServeArgs),
    /// Apply database migrations to the PostgreSQL given by --storage, then exit.
    Migrate(ServeArgs),
}

/// Every configuration key as a flag. Unset flags leave the file's or the default value.
#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file; its keys are the flag names with `-` as `_`, nested tables
    /// `[embedded]`, `[postgres]`, `[retention]`, `[ingest]`, `[otlp]`, `[query]` for the prefixed flags.
    #[arg(long, env = "SECUMON_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Address of the HTTP server. [default: 127.0.0.1:8080]
    #[arg(long, env = "SECUMON_HTTP_LISTEN", global = true)]
    pub http_listen: Option<String>,
    /// Address of the OTLP/gRPC listener; empty disables it. [default: 127.0.0.1:4317]
    #[arg(long, env = "SECUMON_OTLP_GRPC_LISTEN", global = true)]
    pub otlp_grpc_listen: Option<String>,
    /// Address of the OTLP/HTTP listener; empty disables it. [default: 127.0.0.1:4318]
    #[arg(long, env = "SECUMON_OTLP_HTTP_LISTEN", global = true)]
    pub otlp_http_listen: Option<String>,
    /// Storage: a directory for the embedded engine, or `postgres://user:pass@host:port/db`.
    /// [default: ./data]
    #[arg(long, env = "SECUMON_STORAGE", global = true)]
    pub storage: Option<String>,
    /// Log filter in RUST_LOG syntax. [default: info]
    #[arg(long, env = "SECUMON_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Log format. [default: text]
    #[arg(long, env = "SECUMON_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Embedded engine: fsync the write-ahead log before acknowledging (`always`), or leave it
    /// to the OS (`never`). [default: always]
    #[arg(long, env = "SECUMON_EMBEDDED_FSYNC", global = true, value_enum)]
    pub embedded_fsync: Option<FsyncPolicy>,
    /// Embedded engine: how far behind a series' latest sample a new one may be, in seconds.
    /// [default: 3600]
    #[arg(long, env = "SECUMON_EMBEDDED_OUT_OF_ORDER_WINDOW_SECS", global = true)]
    pub embedded_out_of_order_window_secs: Option<u64>,
    /// Embedded engine: seconds between maintenance runs (flush to disk, checkpoint,
    /// compaction, retention). [default: 300]
    #[arg(long, env = "SECUMON_EMBEDDED_FLUSH_INTERVAL_SECS", global = true)]
    pub embedded_flush_interval_secs: Option<u64>,
    /// Days raw samples are kept. [default: 30]
    #[arg(long, env = "SECUMON_RETENTION_RAW_DAYS", global = true)]
    pub retention_raw_days: Option<u32>,
    /// Days 5-minute rollups are kept. [default: 90]
    #[arg(long, env = "SECUMON_RETENTION_ROLLUP_5M_DAYS", global = true)]
    pub retention_rollup_5m_days: Option<u32>,
    /// Days 1-hour rollups are kept. [default: 365]
    #[arg(long, env = "SECUMON_RETENTION_ROLLUP_1H_DAYS", global = true)]
    pub retention_rollup_1h_days: Option<u32>,
    /// OTLP resource attributes copied onto every series, comma-separated. [default: none]
    #[arg(
        long,
        env = "SECUMON_OTLP_PROMOTE_RESOURCE_ATTRIBUTES",
        global = true,
        value_delimiter = ','
    )]
    pub otlp_promote_resource_attributes: Option<Vec<String>>,
    /// Translate OTLP names to Prometheus conventions; false keeps OpenTelemetry's UTF-8 names.
    /// [default: true]
    #[arg(long, env = "SECUMON_OTLP_TRANSLATE_NAMES", global = true)]
    pub otlp_translate_names: Option<bool>,
    /// Most PostgreSQL connections. [default: 16]
    #[arg(long, env = "SECUMON_POSTGRES_MAX_CONNECTIONS", global = true)]
    pub postgres_max_connections: Option<u32>,
    /// Seconds a request waits for a PostgreSQL connection. [default: 10]
    #[arg(long, env = "SECUMON_POSTGRES_ACQUIRE_TIMEOUT_SECS", global = true)]
    pub postgres_acquire_timeout_secs: Option<u64>,
    /// Width of a `samples` partition (plain) or hypertable chunk (TimescaleDB) in hours.
    /// [default: 24]
    #[arg(long, env = "SECUMON_POSTGRES_PARTITION_HOURS", global = true)]
    pub postgres_partition_hours: Option<u32>,
    /// Use TimescaleDB: `auto` when the extension is installed or can be created, `on` (fail
    /// when it is missing), `off` (plain PostgreSQL lifecycle). [default: auto]
    #[arg(long, env = "SECUMON_TIMESCALEDB", global = true, value_enum)]
    pub timescaledb: Option<TimescaleMode>,
    /// TimescaleDB: compress raw chunks older than this many days. [default: 7]
    #[arg(long, env = "SECUMON_POSTGRES_COMPRESS_AFTER_DAYS", global = true)]
    pub postgres_compress_after_days: Option<u32>,
    /// Plain PostgreSQL: seconds between lifecycle runs (partitions, rollup tables,
    /// retention). [default: 60]
    #[arg(long, env = "SECUMON_POSTGRES_LIFECYCLE_INTERVAL_SECS", global = true)]
    pub postgres_lifecycle_interval_secs: Option<u64>,
    /// Write samples with binary COPY (false: INSERT … ON CONFLICT for every batch).
    /// [default: true]
    #[arg(long, env = "SECUMON_POSTGRES_COPY_WRITES", global = true)]
    pub postgres_copy_writes: Option<bool>,
    /// Series ids cached in memory. [default: 1000000]
    #[arg(long, env = "SECUMON_POSTGRES_SERIES_CACHE_SIZE", global = true)]
    pub postgres_series_cache_size: Option<usize>,
    /// Largest ingest request body as sent, in bytes. [default: 16777216]
    #[arg(long, env = "SECUMON_INGEST_MAX_REQUEST_BYTES", global = true)]
    pub ingest_max_request_bytes: Option<usize>,
    /// Largest ingest request body after decompression, in bytes. [default: 33554432]
    #[arg(long, env = "SECUMON_INGEST_MAX_DECOMPRESSED_BYTES", global = true)]
    pub ingest_max_decompressed_bytes: Option<usize>,
    /// Lookback of instant selectors, in seconds. [default: 300]
    #[arg(long, env = "SECUMON_QUERY_LOOKBACK_DELTA_SECS", global = true)]
    pub query_lookback_delta_secs: Option<u64>,
    /// Longest a query may run, in seconds. [default: 120]
    #[arg(long, env = "SECUMON_QUERY_TIMEOUT_SECS", global = true)]
    pub query_timeout_secs: Option<u64>,
    /// Most samples one query may load or produce. [default: 50000000]
    #[arg(long, env = "SECUMON_QUERY_MAX_SAMPLES", global = true)]
    pub query_max_samples: Option<usize>,
    /// Coarsest rollups sum_over_time and avg_over_time may read when a query does not pass
    /// `max_source_resolution` (answers may then differ from raw in the last bits); exact
    /// functions read rollups regardless. [default: raw]
    #[arg(
        long,
        env = "SECUMON_QUERY_MAX_SOURCE_RESOLUTION",
        global = true,
        value_enum
    )]
    pub query_max_source_resolution: Option<crate::promql::SourceResolution>,
    /// Let rollups answer queries (false: raw samples for everything). [default: true]
    #[arg(long, env = "SECUMON_QUERY_ROLLUPS", global = true)]
    pub query_rollups: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl ServeArgs {
    /// The file's settings (or the defaults), overridden by what flags and environment set.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => Config::default(),
        };
        self.apply(&mut config);
        Ok(config)
    }

    fn apply(&self, c: &mut Config) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut c.http_listen, &self.http_listen);
        set(&mut c.otlp_grpc_listen, &self.otlp_grpc_listen);
        set(&mut c.otlp_http_listen, &self.otlp_http_listen);
        set(&mut c.storage, &self.storage);
        set(
            &mut c.otlp.promote_resource_attributes,
            &self.otlp_promote_resource_attributes,
        );
        set(&mut c.otlp.translate_names, &self.otlp_translate_names);
        set(&mut c.log_level, &self.log_level);
        set(&mut c.log_format, &self.log_format);
        set(
            &mut c.postgres.max_connections,
            &self.postgres_max_connections,
        );
        set(
            &mut c.postgres.acquire_timeout_secs,
            &self.postgres_acquire_timeout_secs,
        );
        set(
            &mut c.postgres.partition_hours,
            &self.postgres_partition_hours,
        );
        set(
            &mut c.postgres.series_cache_size,
            &self.postgres_series_cache_size,
        );
        set(&mut c.postgres.timescaledb, &self.timescaledb);
        set(&mut c.postgres.copy_writes, &self.postgres_copy_writes);
        set(
            &mut c.postgres.compress_after_days,
            &self.postgres_compress_after_days,
        );
        set(
            &mut c.postgres.lifecycle_interval_secs,
            &self.postgres_lifecycle_interval_secs,
        );
        set(
            &mut c.ingest.max_request_bytes,
            &self.ingest_max_request_bytes,
        );
        set(
            &mut c.ingest.max_decompressed_bytes,
            &self.ingest_max_decompressed_bytes,
        );
        set(
            &mut c.query.lookback_delta_secs,
            &self.query_lookback_delta_secs,
        );
        set(&mut c.query.timeout_secs, &self.query_timeout_secs);
        set(&mut c.query.max_samples, &self.query_max_samples);
        set(
            &mut c.query.max_source_resolution,
            &self.query_max_source_resolution,
        );
        set(&mut c.query.rollups, &self.query_rollups);
        set(&mut c.embedded.fsync, &self.embedded_fsync);
        set(
            &mut c.embedded.out_of_order_window_secs,
            &self.embedded_out_of_order_window_secs,
        );
        set(
            &mut c.embedded.flush_interval_secs,
            &self.embedded_flush_interval_secs,
        );
        set(&mut c.retention.raw_days, &self.retention_raw_days);
        set(
            &mut c.retention.rollup_5m_days,
            &self.retention_rollup_5m_days,
        );
        set(
            &mut c.retention.rollup_1h_days,
            &self.retention_rollup_1h_days,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secumon.toml");
        std::fs::write(
            &path,
            "http_listen = \"0.0.0.0:9000\"\nstorage = \"postgres://file\"\n[query]\ntimeout_secs = 5\nmax_source_resolution = \"5m\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            storage: Some("postgres://flag".into()),
            ..ServeArgs::default()
        };
        let config = args.load().unwrap();
        assert_eq!(config.http_listen, "0.0.0.0:9000");
        assert_eq!(config.storage, "postgres://flag");
        assert_eq!(config.query.timeout_secs, 5);
        assert_eq!(
            config.query.max_source_resolution,
            crate::promql::SourceResolution::FiveMinutes
        );
        let embedded = ServeArgs {
            embedded_fsync: Some(FsyncPolicy::Never),
            embedded_out_of_order_window_secs: Some(7),
            embedded_flush_interval_secs: Some(9),
            retention_raw_days: Some(3),
            query_max_source_resolution: Some(crate::promql::SourceResolution::Auto),
            ..ServeArgs::default()
        }
        .load()
        .unwrap();
        assert_eq!(embedded.embedded.fsync, FsyncPolicy::Never);
        assert_eq!(embedded.embedded.out_of_order_window_secs, 7);
        assert_eq!(embedded.embedded.flush_interval_secs, 9);
        assert_eq!(embedded.retention.raw_days, 3);
        assert_eq!(
            embedded.query.max_source_resolution,
            crate::promql::SourceResolution::Auto
        );
        assert_eq!(
            config.query.max_samples,
            EngineConfig::default().max_samples
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secumon.toml");
        std::fs::write(&path, "htp_listen = \"x\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        assert!(matches!(args.load(), Err(ConfigError::Parse { .. })));
    }
}
