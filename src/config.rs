//! Configuration: one tree of settings, read from a TOML file (`--config`), then overridden by
//! `SECUMON_*` environment variables, then by command-line flags.
//!
//! Every key is declared once, as a field of one of the structs below: its doc comment is the
//! help text, its `#[arg]` the flag, the environment variable and the default, and serde reads
//! the same field from the file (`[ingest] max_request_bytes` is `--ingest-max-request-bytes`
//! is `SECUMON_INGEST_MAX_REQUEST_BYTES`). `Default` is what clap's defaults give, so the file,
//! the flags and `--help` cannot disagree; a test checks the naming rule and that
//! docs/operations.md lists every flag.

use crate::ingest::otlp::OtlpConfig;
use crate::ingest::IngestConfig;
use crate::promql::EngineConfig;
use crate::storage::embedded::EmbeddedConfig;
use crate::storage::postgres::PostgresConfig;
use crate::storage::RetentionConfig;
use crate::telemetry::LogFormat;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The whole configuration of `secumon serve`.
#[derive(Clone, Debug, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP server (Prometheus API, remote-write, OTLP/HTTP, health, metrics).
    #[arg(
        id = "http_listen",
        long = "http-listen",
        env = "SECUMON_HTTP_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub http_listen: String,
    /// Address of the OTLP/gRPC listener; empty disables it.
    #[arg(
        id = "otlp_grpc_listen",
        long = "otlp-grpc-listen",
        env = "SECUMON_OTLP_GRPC_LISTEN",
        default_value = "127.0.0.1:4317"
    )]
    pub otlp_grpc_listen: String,
    /// Address of the OTLP/HTTP listener (`POST /v1/metrics`); empty disables it.
    #[arg(
        id = "otlp_http_listen",
        long = "otlp-http-listen",
        env = "SECUMON_OTLP_HTTP_LISTEN",
        default_value = "127.0.0.1:4318"
    )]
    pub otlp_http_listen: String,
    /// Where data lives: a directory for the embedded engine, or
    /// `postgres://user:pass@host:port/db`.
    #[arg(
        id = "storage",
        long = "storage",
        env = "SECUMON_STORAGE",
        default_value = "./data"
    )]
    pub storage: String,
    /// Log filter in `RUST_LOG` syntax (e.g. `info`, `secumon=debug`).
    #[arg(
        id = "log_level",
        long = "log-level",
        env = "SECUMON_LOG_LEVEL",
        default_value = "info"
    )]
    pub log_level: String,
    /// Log format.
    #[arg(
        id = "log_format",
        long = "log-format",
        env = "SECUMON_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    #[command(flatten, next_help_heading = "HTTP listeners")]
    pub http: crate::server::HttpConfig,
    #[command(flatten, next_help_heading = "OTLP/gRPC listener")]
    pub grpc: crate::server::GrpcConfig,
    #[command(flatten, next_help_heading = "Embedded engine")]
    pub embedded: EmbeddedConfig,
    #[command(flatten, next_help_heading = "PostgreSQL")]
    pub postgres: PostgresConfig,
    #[command(flatten, next_help_heading = "Retention")]
    pub retention: RetentionConfig,
    #[command(flatten, next_help_heading = "Ingest")]
    pub ingest: IngestConfig,
    #[command(flatten, next_help_heading = "OTLP")]
    pub otlp: OtlpConfig,
    #[command(flatten, next_help_heading = "Queries")]
    pub query: EngineConfig,
    #[command(flatten, next_help_heading = "Authentication")]
    pub auth: crate::auth::AuthConfig,
    #[command(flatten, next_help_heading = "TLS")]
    pub tls: crate::server::tls::TlsConfig,
    #[command(flatten, next_help_heading = "Fleet")]
    pub fleet: crate::fleet::FleetConfig,
    #[command(flatten, next_help_heading = "Rules")]
    pub rules: crate::rules::RulesConfig,
    #[command(flatten, next_help_heading = "Self-monitoring")]
    pub self_monitor: crate::telemetry::record::SelfMonitorConfig,
}

impl Default for Config {
    fn default() -> Self {
        clap_defaults()
    }
}

/// A setting's Prometheus duration (`500ms`, `90s`, `1h30m`) within `min_ms..=max_ms`;
/// `range` says the bounds in the error (`"from 1s to 1d"`).
pub fn duration_within(
    text: &str,
    min_ms: i64,
    max_ms: i64,
    range: &str,
) -> Result<std::time::Duration, String> {
    let ms = crate::api::params::parse_prometheus_duration(text)
        .ok_or_else(|| format!("not a valid duration string: {text:?}"))?;
    if !(min_ms..=max_ms).contains(&ms) {
        return Err(format!("{text:?}: {range}"));
    }
    Ok(std::time::Duration::from_millis(ms as u64))
}

/// A duration setting in the config file, read with the flag's own parser.
pub fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    parse: fn(&str) -> Result<std::time::Duration, String>,
) -> Result<std::time::Duration, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

/// The value every key of `T` takes when neither a file, the environment nor a flag sets it:
/// clap's declared defaults, with the environment ignored.
pub fn clap_defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .mut_args(|arg| arg.env(None::<&str>).required(false));
    let matches = command.get_matches_from(["defaults"]);
    // A key without a default is a declaration bug, caught by the first test that runs.
    T::from_arg_matches(&matches).expect("every configuration key declares a default")
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
    /// Configuration file (TOML); its keys are the flag names with `_` for `-`, the prefixed
    /// ones in tables (`--ingest-max-request-bytes` is `max_request_bytes` in `[ingest]`).
    #[arg(long, env = "SECUMON_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Config,
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the server (default).
    Serve,
    /// Apply database migrations to the PostgreSQL given by --storage, then exit.
    Migrate,
    /// Manage API tokens in the catalog of --storage (the server may be running).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check files as the server reads them, with `promtool check`'s output and exit codes.
    #[command(subcommand)]
    Check(CheckCommand),
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum CheckCommand {
    /// Check rule files (Prometheus's format): `SUCCESS: N rules found`, or each problem.
    Rules {
        /// Rule files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once on stdout.
    Create {
        /// Tenant the token belongs to.
        #[arg(long)]
        tenant: String,
        /// Comma-separated scopes: ingest, read, admin, operator.
        #[arg(long)]
        scopes: String,
        /// A name to tell the token apart (who or what uses it).
        #[arg(long)]
        name: String,
        /// Lifetime (`30d`, `12h`, `90m`); none by default.
        #[arg(long)]
        expires: Option<String>,
    },
    /// List tokens (of one tenant with --tenant).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke (delete) the token with this id.
    Revoke { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cli(#[from] clap::Error),
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

/// The command line as clap sees it: every setting also accepted after the subcommand.
pub fn command() -> clap::Command {
    Cli::command().mut_args(|arg| {
        // `--ingest-max-request-bytes <MAX_REQUEST_BYTES>`, not `<ingest.max_request_bytes>`.
        let name = arg
            .get_id()
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or("")
            .to_uppercase();
        let arg = arg.global(true);
        if arg.get_action().takes_values() {
            arg.value_name(name)
        } else {
            arg
        }
    })
}

/// Parses a command line (program name first) into what to do and the configuration: the
/// file's settings, or the defaults, overridden by the environment and the flags.
pub fn parse<I, T>(args: I) -> Result<(Command, Config), ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    let action = match matches.subcommand() {
        Some(_) => Command::from_arg_matches(&matches)?,
        None => Command::Serve,
    };
    // Settings are global: their values are on the innermost subcommand's matches.
    let mut matches = &matches;
    while let Some((_, sub)) = matches.subcommand() {
        matches = sub;
    }
    let path = matches.get_one::<PathBuf>("config").cloned();
    Ok((action, load(path.as_deref(), matches)?))
}

/// The file at `path` (or the defaults), then every key the environment or a flag set.
fn load(path: Option<&Path>, matches: &ArgMatches) -> Result<Config, ConfigError> {
    let mut config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?
        }
        None => Config::default(),
    };
    // clap fills in defaults; only what was given may override the file.
    let mut given = matches.clone();
    let defaulted: Vec<String> = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::DefaultValue))
        .map(|id| id.as_str().to_owned())
        .collect();
    for id in defaulted {
        given
            .try_clear_id(&id)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, e))?;
    }
    config.update_from_arg_matches(&given)?;
    Ok(config)
}

/// The settings reference of docs/operations.md, generated from the command line so the guide
/// cannot drift from `--help`: a table per help heading of every key's flag, environment
/// variable, default and meaning (its doc comment).
pub fn reference() -> String {
    let command = command();
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "config" | "help" | "version") {
            continue;
        }
        let heading = arg.get_help_heading().unwrap_or("Server").to_owned();
        let cell = |text: &str| {
            text.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .replace('|', "\\|")
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| cell(&h.to_string()))
            .unwrap_or_default();
        let help = help.trim_end_matches('.').to_owned();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = match defaults.join(",") {
            d if d.is_empty() => "(none)".to_owned(),
            d => d,
        };
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        // Named once: not when the help already lists them, nor for a boolean.
        let listed = choices.first().is_some_and(|c| help.contains(c.as_str()));
        let help = if listed || choices.is_empty() || choices == ["`true`", "`false`"] {
            help
        } else {
            format!("{help} ({})", choices.join(", "))
        };
        let row = format!(
            "| `--{}` | `{}` | `{default}` | {help} |",
            arg.get_long().unwrap_or(id),
            arg.get_env()
                .map_or_else(String::new, |e| e.to_string_lossy().into_owned()),
        );
        match sections.iter_mut().find(|(h, _)| *h == heading) {
            Some((_, rows)) => rows.push(row),
            None => sections.push((heading, vec![row])),
        }
    }
    let mut out = String::new();
    for (heading, rows) in sections {
        out.push_str(&format!(
            "### {heading}\n\n| flag | environment | default | meaning |\n|---|---|---|---|\n"
        ));
        for row in rows {
            out.push_str(&row);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::FsyncPolicy;

    /// Keys named apart from the rule, kept as the contract names them.
    const CONTRACT_NAMES: [(&str, &str); 7] = [
        ("rules.files", "rules"),
        ("rules.alertmanager_urls", "alertmanager-url"),
        ("rules.alert_receivers", "alert-receivers"),
        ("postgres.timescaledb", "timescaledb"),
        ("auth.mode", "auth"),
        ("fleet.live_interval", "live-interval"),
        ("fleet.nats_url", "nats-url"),
    ];

    #[test]
    fn flags_override_the_environment_the_file_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secumon.toml");
        std::fs::write(
            &path,
            "http_listen = \"0.0.0.0:9000\"\nstorage = \"postgres://file\"\n[query]\ntimeout_secs = 5\nmax_source_resolution = \"5m\"\n[embedded]\nflush_interval_secs = 11\n",
        )
        .unwrap();
        let path = path.to_str().unwrap();
        let (action, config) =
            parse(["secumon", "--config", path, "--storage", "postgres://flag"]).unwrap();
        assert_eq!(action, Command::Serve);
        assert_eq!(config.http_listen, "0.0.0.0:9000");
        assert_eq!(config.storage, "postgres://flag");
        assert_eq!(config.query.timeout_secs, 5);
        assert_eq!(
            config.query.max_source_resolution,
            crate::promql::SourceResolution::FiveMinutes
        );
        assert_eq!(config.embedded.flush_interval_secs, 11);
        assert_eq!(
            config.query.max_samples,
            EngineConfig::default().max_samples
        );

        // Settings given after the subcommand count as well.
        let (action, config) = parse([
            "secumon",
            "migrate",
            "--embedded-fsync",
            "never",
            "--embedded-out-of-order-window-secs",
            "7",
            "--retention-raw-days",
            "3",
            "--query-max-source-resolution",
            "auto",
            "--otlp-promote-resource-attributes",
            "a,b",
            "--otlp-translate-names",
            "false",
            "--timescaledb",
            "off",
        ])
        .unwrap();
        assert_eq!(action, Command::Migrate);
        assert_eq!(config.embedded.fsync, FsyncPolicy::Never);
        assert_eq!(config.embedded.out_of_order_window_secs, 7);
        assert_eq!(config.retention.raw_days, 3);
        assert_eq!(
            config.query.max_source_resolution,
            crate::promql::SourceResolution::Auto
        );
        assert_eq!(config.otlp.promote_resource_attributes, ["a", "b"]);
        assert!(!config.otlp.translate_names);
        assert_eq!(
            config.postgres.timescaledb,
            crate::storage::postgres::TimescaleMode::Off
        );
        assert_eq!(config.http_listen, Config::default().http_listen);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secumon.toml");
        std::fs::write(&path, "htp_listen = \"x\"\n").unwrap();
        let path = path.to_str().unwrap();
        assert!(matches!(
            parse(["secumon", "--config", path]),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            parse(["secumon", "--query-timeout-secs", "soon"]),
            Err(ConfigError::Cli(_))
        ));
        // Each query thread is a thread of the process: a mistyped count is refused, not
        // tried.
        assert!(matches!(
            parse(["secumon", "--query-threads", "100000"]),
            Err(ConfigError::Cli(_))
        ));
        assert!(parse(["secumon", "--query-threads", "1024"]).is_ok());
    }

    /// The settings section of docs/operations.md is [`reference`]'s output, between its
    /// markers. `SECUMON_UPDATE_DOCS=1 cargo test --lib config` rewrites it.
    #[test]
    fn the_operations_guide_lists_the_settings_as_generated() {
        const BEGIN: &str = "<!-- settings: generated by `SECUMON_UPDATE_DOCS=1 cargo test --lib config`; do not edit -->\n";
        const END: &str = "<!-- end of settings -->\n";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
        let guide = std::fs::read_to_string(&path).unwrap();
        let start = guide
            .find(BEGIN)
            .expect("docs/operations.md has the settings marker")
            + BEGIN.len();
        let end = start + guide[start..].find(END).expect("the settings end marker");
        let generated = reference();
        if std::env::var_os("SECUMON_UPDATE_DOCS").is_some() {
            let updated = format!("{}{generated}{}", &guide[..start], &guide[end..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        assert!(
            guide[start..end] == generated,
            "docs/operations.md's settings differ from the configuration: run SECUMON_UPDATE_DOCS=1 cargo test --lib config"
        );
        assert!(generated.contains("### Self-monitoring"));
        assert!(
            generated.contains(
                "| `--log-format` | `SECUMON_LOG_FORMAT` | `text` | Log format (`text`, `json`) |"
            ),
            "{generated}"
        );
    }

    /// The one rule that ties the three spellings of a key together, and the operations guide
    /// that documents them.
    #[test]
    fn every_key_is_named_by_one_rule_and_documented() {
        let guide = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
        )
        .unwrap();
        let command = command();
        let mut keys = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "config" | "help" | "version") {
                continue;
            }
            keys += 1;
            let long = arg.get_long().unwrap();
            let expected_long = CONTRACT_NAMES
                .iter()
                .find(|(key, _)| *key == id)
                .map_or_else(
                    || id.replace(['.', '_'], "-"),
                    |(_, name)| (*name).to_owned(),
                );
            assert_eq!(long, expected_long, "flag of {id}");
            let env = arg.get_env().unwrap().to_str().unwrap();
            assert_eq!(
                env,
                format!("SECUMON_{}", expected_long.replace('-', "_").to_uppercase()),
                "environment variable of {id}"
            );
            assert!(
                arg.get_help().is_some_and(|h| !h.to_string().is_empty()),
                "{id} has no help"
            );
            assert!(
                guide.contains(&format!("`--{long}`")),
                "docs/operations.md does not list --{long}"
            );
        }
        assert!(keys > 30, "only {keys} keys found");
        // Defaults are complete: building them does not panic, and they parse back.
        let defaults = Config::default();
        assert_eq!(defaults.storage, "./data");
    }
}
